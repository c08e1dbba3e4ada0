"""From (method, task, examples) to one JSON-able record per (example, sample).

This is the loop shared by `diffmas eval`, `diffmas demo` and the benchmarks: batches questions,
derives each sample's seed from the example id (so results do not depend on batching, order or
sharding), scores each answer with the task, and turns failures of a single example into a
recorded skip with a reason instead of a lost batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Container, Iterator, Sequence

from diffmas.errors import DiffmasError
from diffmas.methods import Method, OptionQuery, RunResult
from diffmas.tasks.base import Example, Score


def sample_seed(base_seed: int, example_id: str, sample: int) -> int:
    """A stable 31-bit seed per (run seed, example, sample index)."""
    digest = hashlib.sha256(f"{base_seed}:{example_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_examples(
    method: Method,
    task,
    examples: Sequence[Example],
    batch_size: int = 8,
    samples: int = 1,
    base_seed: int = 0,
    option_likelihood: bool = False,
    skip: Container[tuple[str, int]] = (),
) -> Iterator[dict]:
    """Yield one record per (example, sample), in input order, a batch at a time.

    option_likelihood: for multiple-choice tasks, also rank the options by their likelihood under
        the final agent (through the trace) and record it beside the generated answer.
    skip: (id, sample) pairs already done (a resumed run).
    """
    jobs = [(ex, k) for ex in examples for k in range(samples) if (ex.id, k) not in skip]
    scored = option_likelihood and task.answer_type == "choice"
    for start in range(0, len(jobs), batch_size):
        yield from _run_jobs(method, task, jobs[start : start + batch_size], base_seed, scored)


def _run_jobs(method, task, jobs, base_seed, scored: bool) -> list[dict]:
    prompts = [task.prompt(ex) for ex, _ in jobs]
    seeds = [sample_seed(base_seed, ex.id, k) for ex, k in jobs]
    options = [OptionQuery(ex.question, tuple(task.option_texts(ex))) for ex, _ in jobs] if scored else None
    try:
        results = method.run_batch(
            prompts, task.format_instruction, seeds, options, privates=[ex.private for ex, _ in jobs]
        )
    except DiffmasError as exc:
        if len(jobs) == 1:
            ex, k = jobs[0]
            return [skipped_record(ex, k, method.name, str(exc))]
        # One bad example (e.g. a prompt beyond the context) must not sink its batch neighbours.
        return [rec for job in jobs for rec in _run_jobs(method, task, [job], base_seed, scored)]
    records = []
    for (ex, k), r in zip(jobs, results):
        record = answer_record(ex, k, r, _score(task, ex, r))
        if r.option_logprobs is not None:
            record["option_likelihood"] = {
                **option_record(ex, task.option_texts(ex), r.option_logprobs),
                # the scoring's own cost (whole batch), not in the method's
                "wall_s": r.option_wall_s,
                "peak_memory_bytes": r.option_peak_memory_bytes,
            }
        records.append(record)
    return records


def option_record(example: Example, options: Sequence[str], logprobs: Sequence[float]) -> dict:
    """Prediction by summed and by length-normalised log-likelihood (lm-evaluation-harness acc and
    acc_norm: normalised by the option's length in characters)."""
    n_chars = [len(o) for o in options]
    norm = [lp / max(n, 1) for lp, n in zip(logprobs, n_chars)]
    pred = example.labels[max(range(len(logprobs)), key=logprobs.__getitem__)]
    pred_norm = example.labels[max(range(len(norm)), key=norm.__getitem__)]
    return {
        "labels": list(example.labels),
        "logprobs": list(logprobs),
        "n_chars": n_chars,
        "pred": pred,
        "pred_norm": pred_norm,
        "correct": pred == example.answer,
        "correct_norm": pred_norm == example.answer,
    }


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
        # strict-match beside the flexible `extracted` / `correct` (choice tasks)
        **(
            {"extracted_strict": score.extracted_strict, "correct_strict": bool(score.correct_strict)}
            if score.correct_strict is not None
            else {}
        ),
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
    return {
        "id": example.id,
        "sample": sample,
        "method": method,
        "status": "skipped",
        "gold": example.answer,
        "text": None,
        "extracted": None,
        "correct": None,
        "reason": reason,
    }
