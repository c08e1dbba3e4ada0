"""From (method, task, examples) to one JSON-able record per (example, sample).

This is the loop shared by `diffmas eval`, `diffmas demo` and the benchmarks: batches questions,
derives each sample's seed from the example id (so results do not depend on batching, order or
sharding), scores each answer with the task, and turns failures of a single example into a
recorded skip with a reason instead of a lost batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Iterator, Sequence

from diffmas.errors import DiffmasError
from diffmas.methods import Method, RunResult
from diffmas.tasks.base import Example, Score


def sample_seed(base_seed: int, example_id: str, sample: int) -> int:
    """A stable 31-bit seed per (run seed, example, sample index)."""
    digest = hashlib.sha256(f"{base_seed}:{example_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_examples(method: Method, task, examples: Sequence[Example], batch_size: int = 8,
                 samples: int = 1, base_seed: int = 0) -> Iterator[dict]:
    """Yield one record per (example, sample), in input order, a batch at a time."""
    jobs = [(ex, k) for ex in examples for k in range(samples)]
    for start in range(0, len(jobs), batch_size):
        yield from _run_jobs(method, task, jobs[start : start + batch_size], base_seed)


def _run_jobs(method, task, jobs, base_seed) -> list[dict]:
    prompts = [task.prompt(ex) for ex, _ in jobs]
    seeds = [sample_seed(base_seed, ex.id, k) for ex, k in jobs]
    try:
        results = method.run_batch(prompts, task.format_instruction, seeds)
    except DiffmasError as exc:
        if len(jobs) == 1:
            ex, k = jobs[0]
            return [skipped_record(ex, k, method.name, str(exc))]
        # One bad example (e.g. a prompt beyond the context) must not sink its batch neighbours.
        return [rec for job in jobs for rec in _run_jobs(method, task, [job], base_seed)]
    return [answer_record(ex, k, r, _score(task, ex, r)) for (ex, k), r in zip(jobs, results)]


def _score(task, example: Example, result: RunResult) -> Score:
    if not result.text.strip():
        return Score(correct=False, extracted=None, reason="empty generation")
    return task.score(example, result.text)


def answer_record(example: Example, sample: int, result: RunResult, score: Score) -> dict:
    n_gen = len(result.token_logprobs)
    return {
        "id": example.id,
        "sample": sample,
        "method": result.method,
        "status": "ok",
        "gold": example.answer,
        "text": result.text,
        "extracted": score.extracted,
        "correct": bool(score.correct),
        "reason": score.reason,
        "truncated": result.truncated,
        "agents": [asdict(a) for a in result.agents],
        "n_tokens": result.n_tokens,
        "trace_len": result.trace_len,
        "trace_bytes": result.trace_bytes,
        "wall_s": result.wall_s,
        "batch_size": result.batch_size,
        "peak_memory_bytes": result.peak_memory_bytes,
        # decoding stability of the final agent
        "mean_nll": -sum(result.token_logprobs) / n_gen if n_gen else None,
        "mean_entropy": sum(result.token_entropies) / n_gen if n_gen else None,
    }


def skipped_record(example: Example, sample: int, method: str, reason: str) -> dict:
    return {"id": example.id, "sample": sample, "method": method, "status": "skipped",
            "gold": example.answer, "text": None, "extracted": None, "correct": None, "reason": reason}
