"""Paired comparison of runs on the same questions: accuracy difference with a paired bootstrap
confidence interval, per-question wins and losses, and an exact McNemar test.

Only the question ids present in every run are compared (runs may have been cut short or limited
differently); how many each run loses is reported. Per question, a run's score is the mean
correctness over its samples (skipped = wrong), so k > 1 works the same as k = 1.

McNemar needs one yes/no outcome per question and run. With k > 1 it uses each question's first
sample (the lowest sample index): a single draw from the same distribution as pass@1, so the test
stays valid, whereas a majority over samples would test a different quantity than the reported
accuracy. Wins and losses use the per-question mean and so can differ from McNemar's counts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from diffmas.errors import DiffmasError
from diffmas.evaluate.metrics import bootstrap_ci, by_question, first_sample_correct, question_scores
from diffmas.evaluate.rundir import Run


class CompareError(DiffmasError):
    """Runs that cannot be compared (too few, different tasks, no shared questions)."""


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b = questions only the run got right, c = only the baseline.

    Under the null each discordant question is a fair coin, so p = 2 * P(Binomial(b + c, 1/2) <=
    min(b, c)), capped at 1; p = 1 with no discordant pairs.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integer arithmetic until the final division


def compare_runs(runs: Sequence[Run], baseline: int = 0, n_boot: int = 1000, seed: int = 0) -> dict:
    """Compare every run with `runs[baseline]` on the question ids shared by all runs.

    Returns {"baseline": name, "n_shared": int, "mcnemar_on": str, "runs": [entry per run]}; each
    entry has name, path, task, method, latent_steps, k, n_questions, n_dropped (its questions not
    in the shared set), accuracy and accuracy_ci on the shared ids, is_baseline, and for the other
    runs delta (run - baseline), delta_ci (paired bootstrap over questions), wins, losses, ties,
    mcnemar_b (run right, baseline wrong), mcnemar_c (the reverse) and p_value; None for the baseline.
    """
    if len(runs) < 2:
        raise CompareError(f"need at least two runs to compare, got {len(runs)}")
    if not 0 <= baseline < len(runs):
        raise CompareError(f"baseline index {baseline} is out of range for {len(runs)} runs (0..{len(runs) - 1})")
    _check_same_questions(runs)
    scores = [question_scores(run.records) for run in runs]
    firsts = [first_sample_correct(run.records) for run in runs]
    shared = [qid for qid in scores[baseline] if all(qid in s for s in scores)]
    if not shared:
        raise CompareError("the runs share no question id; were they run on the same task and split?")
    base = np.array([scores[baseline][q] for q in shared])
    base_first = np.array([firsts[baseline][q] for q in shared])
    entries = []
    for i, run in enumerate(runs):
        acc = np.array([scores[i][q] for q in shared])
        entry = {
            "name": run.name,
            "path": str(run.path),
            "task": run.task,
            "method": run.method,
            "latent_steps": run.latent_steps,
            "k": max(len(recs) for recs in by_question(run.records).values()),
            "n_questions": len(scores[i]),
            "n_dropped": len(scores[i]) - len(shared),
            "accuracy": float(acc.mean()),
            "accuracy_ci": list(bootstrap_ci(acc, n_boot, seed)),
            "is_baseline": i == baseline,
        }
        entry.update(
            _paired(acc, base, np.array([firsts[i][q] for q in shared]), base_first, n_boot, seed)
            if i != baseline
            else dict.fromkeys(_PAIRED_KEYS)
        )
        entries.append(entry)
    return {
        "baseline": runs[baseline].name,
        "n_shared": len(shared),
        "mcnemar_on": "first sample of each question",
        "runs": entries,
    }


_PAIRED_KEYS = ("delta", "delta_ci", "wins", "losses", "ties", "mcnemar_b", "mcnemar_c", "p_value")


def _paired(acc, base, first, base_first, n_boot, seed) -> dict:
    diff = acc - base  # (n_shared,) per-question difference of mean correctness
    b = int(np.sum(first & ~base_first))
    c = int(np.sum(~first & base_first))
    return {
        "delta": float(diff.mean()),
        "delta_ci": list(bootstrap_ci(diff, n_boot, seed)),
        "wins": int(np.sum(diff > 0)),
        "losses": int(np.sum(diff < 0)),
        "ties": int(np.sum(diff == 0)),
        "mcnemar_b": b,
        "mcnemar_c": c,
        "p_value": mcnemar_p(b, c),
    }


def _check_same_questions(runs: Sequence[Run]) -> None:
    """Ids only identify a question within one task and split; refuse to pair across them."""
    for key in ("task", "split"):
        values = {run.setting(key) for run in runs} - {None}
        if len(values) > 1:
            listing = ", ".join(f"{run.name}={run.setting(key)}" for run in runs)
            raise CompareError(f"runs are on different {key}s ({listing}); compare runs of one {key}")
