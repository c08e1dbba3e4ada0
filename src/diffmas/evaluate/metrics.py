"""Metrics over run records: pure functions from the dicts of `diffmas.evaluate.records` to numbers.

`summarize(records)` returns the JSON-able dict written as a run's `summary.json`: counts,
accuracy with a bootstrap confidence interval, agreement between samples (k > 1),
option-likelihood accuracy (multiple choice), decoding stability and cost.

Conventions used throughout:
- A *question* is one example id; a *record* is one (question, sample) answer. k is the largest
  number of samples of any question.
- A skipped record (status 'skipped': the method failed on that example) counts as wrong in every
  accuracy except `accuracy_answered`, so a method cannot gain accuracy by failing.
- Confidence intervals are 95 % percentile bootstraps that resample *questions*, since the samples
  of one question are not independent.
- Costs are "per question" in the sense of the spec of `summary.json`: per record, i.e. per
  answered sample. With k samples a question costs k times as much.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

_BOOT_CHUNK = 1 << 22  # indices drawn at once: bounds memory for large runs (n_boot x n questions)


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (shape (n,)).

    Draws `n_boot` resamples of the n entries with replacement (vectorised), and returns the
    alpha/2 and 1 - alpha/2 percentiles of their means. Deterministic for a given seed. For a paired
    comparison pass the per-item differences.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-d sequence, got shape {x.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    rows = max(1, _BOOT_CHUNK // x.size)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))  # (rows, n)
        means[start:stop] = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- per question


def by_question(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records grouped by example id, ids in order of first appearance, samples in index order."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["id"], []).append(rec)
    for recs in groups.values():
        recs.sort(key=lambda r: r.get("sample", 0))  # stable: records without an index keep file order
    return groups


def is_correct(record: dict) -> bool:
    """True only for an answered, correct record; a skipped record is wrong."""
    return record.get("status") == "ok" and record.get("correct") is True


def is_correct_strict(record: dict) -> bool:
    """True only for an answered record whose strict-match extraction is correct."""
    return record.get("status") == "ok" and record.get("correct_strict") is True


def question_scores(records: Iterable[dict]) -> dict[str, float]:
    """Per question: the mean correctness over its samples (skipped = wrong)."""
    return {qid: sum(map(is_correct, recs)) / len(recs) for qid, recs in by_question(records).items()}


def first_sample_correct(records: Iterable[dict]) -> dict[str, bool]:
    """Per question: the correctness of its first sample (the lowest sample index)."""
    return {qid: is_correct(recs[0]) for qid, recs in by_question(records).items()}


_DECIMAL = re.compile(r"-?\d+\.\d*")


def normalize_answer(text: str) -> str:
    """The key answers vote under: no surrounding whitespace, `$` or thousands commas, and no
    trailing zeros after a decimal point ("1,000.0" -> "1000", "$2.50" -> "2.5")."""
    s = text.strip().replace("$", "").replace(",", "").strip()
    if _DECIMAL.fullmatch(s):
        s = s.rstrip("0").rstrip(".")
    return s


def majority_vote(samples: Sequence[dict]) -> tuple[str | None, int, dict | None]:
    """(winning normalised answer, its votes, its first record) over one question's samples.

    Skipped records and samples without an extracted answer abstain. Ties go to the answer that
    appeared first. (None, 0, None) when every sample abstained.
    """
    votes: Counter[str] = Counter()
    first: dict[str, dict] = {}
    for rec in samples:
        if rec.get("status") != "ok" or rec.get("extracted") is None:
            continue
        key = normalize_answer(str(rec["extracted"]))
        if not key:
            continue
        votes[key] += 1
        first.setdefault(key, rec)
    if not votes:
        return None, 0, None
    winner = max(votes, key=votes.__getitem__)  # max keeps the first of equal counts: insertion order
    return winner, votes[winner], first[winner]


# ----------------------------------------------------------------------------- summary


def summarize(records: Iterable[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric of one run as a JSON-able dict (see the module docstring for conventions).

    Keys: n_questions, n_records, n_samples_per_question (k), n_skipped, skip_reasons
    ({reason: count}); accuracy (pass@1: mean over questions of the mean correctness of its
    samples, skipped = wrong; flexible extraction), accuracy_ci ([lo, hi]), accuracy_strict(_ci)
    (the same under strict-match extraction; None for tasks without one), accuracy_answered (over non-skipped
    records); majority_vote_accuracy, self_consistency (share of questions with >= 3/4 of samples
    correct), answer_agreement (mean share of samples giving the modal answer) -- None when k = 1;
    n_option_questions, option_accuracy(_ci), option_accuracy_norm(_ci), chance -- None without
    option likelihoods; perplexity (mean over records of exp(mean_nll)), mean_entropy; tokens
    ({per_role: {role: {prompt, latent, generated}}, per_question: {prompt, latent, generated,
    total}, total: {...}}); latency_s ({p50, p95} of batch wall time); seconds_per_question;
    option_seconds_per_question (option scoring, not part of the method's cost);
    trace_bytes ({mean, max}); peak_memory_bytes; truncated_rate; n_boot. Undefined values are None.
    """
    records = list(records)
    groups = by_question(records)
    ok = [r for r in records if r.get("status") == "ok"]
    skipped = [r for r in records if r.get("status") != "ok"]
    k = max((len(recs) for recs in groups.values()), default=0)
    scores = [sum(map(is_correct, recs)) / len(recs) for recs in groups.values()]
    return {
        "n_questions": len(groups),
        "n_records": len(records),
        "n_samples_per_question": k,
        "n_skipped": len(skipped),
        "skip_reasons": dict(Counter(str(r.get("reason")) for r in skipped).most_common()),
        **_accuracy("accuracy", scores, n_boot, seed),
        **_strict_accuracy(groups, n_boot, seed),
        "accuracy_answered": _mean([is_correct(r) for r in ok]),
        **_agreement(groups, k),
        **_option_accuracy(groups, n_boot, seed),
        **_stability(ok),
        **_cost(ok),
        "n_boot": n_boot,
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _accuracy(key: str, scores: Sequence[float], n_boot: int, seed: int) -> dict:
    if not len(scores):
        return {key: None, f"{key}_ci": None}
    return {key: float(np.mean(scores)), f"{key}_ci": list(bootstrap_ci(scores, n_boot, seed))}


def _strict_accuracy(groups: dict[str, list[dict]], n_boot: int, seed: int) -> dict:
    """accuracy under strict-match extraction, beside `accuracy` (flexible-extract), for runs whose
    records have it (choice tasks); skipped records and empty generations count as wrong."""
    if not any("correct_strict" in r for recs in groups.values() for r in recs):
        return {"accuracy_strict": None, "accuracy_strict_ci": None}
    scores = [sum(map(is_correct_strict, recs)) / len(recs) for recs in groups.values()]
    return _accuracy("accuracy_strict", scores, n_boot, seed)


def _agreement(groups: dict[str, list[dict]], k: int) -> dict:
    if k < 2:
        return {"majority_vote_accuracy": None, "self_consistency": None, "answer_agreement": None}
    voted, consistent, agreement = [], [], []
    for recs in groups.values():
        _, n_votes, winner = majority_vote(recs)
        voted.append(winner is not None and is_correct(winner))
        consistent.append(sum(map(is_correct, recs)) >= 0.75 * len(recs))
        agreement.append(n_votes / len(recs))
    return {
        "majority_vote_accuracy": _mean(voted),
        "self_consistency": _mean(consistent),
        "answer_agreement": _mean(agreement),
    }


def _option_accuracy(groups: dict[str, list[dict]], n_boot: int, seed: int) -> dict:
    """Accuracy of picking the most likely option, over the questions that have option likelihoods
    (a skipped example has none; `n_option_questions` says how many were scored)."""
    acc, acc_norm, chance = [], [], []
    for recs in groups.values():
        scored = [r["option_likelihood"] for r in recs if r.get("option_likelihood")]
        if not scored:
            continue
        acc.append(np.mean([bool(s["correct"]) for s in scored]))
        acc_norm.append(np.mean([bool(s["correct_norm"]) for s in scored]))
        chance.append(1 / len(scored[0]["labels"]))
    return {
        "n_option_questions": len(acc),
        **_accuracy("option_accuracy", acc, n_boot, seed),
        **_accuracy("option_accuracy_norm", acc_norm, n_boot, seed),
        "chance": _mean(chance),
    }


def _stability(ok: list[dict]) -> dict:
    nll = [r["mean_nll"] for r in ok if r.get("mean_nll") is not None]
    entropy = [r["mean_entropy"] for r in ok if r.get("mean_entropy") is not None]
    return {"perplexity": _mean([math.exp(x) for x in nll]), "mean_entropy": _mean(entropy)}


_KINDS = ("prompt", "latent", "generated")
_AGENT_FIELDS = {"prompt": "n_prompt_tokens", "latent": "n_latent_steps", "generated": "n_generated_tokens"}


def _record_tokens(rec: dict) -> dict[str, int]:
    if rec.get("n_tokens"):
        return {kind: int(rec["n_tokens"][kind]) for kind in _KINDS}
    return {kind: sum(int(a[_AGENT_FIELDS[kind]]) for a in rec.get("agents") or []) for kind in _KINDS}


def _per_role(ok: list[dict]) -> dict[str, dict[str, float]]:
    """Mean tokens of each role over the records that have it (a role repeated in one record is summed)."""
    rows: dict[str, list[list[int]]] = {}
    for rec in ok:
        this: dict[str, list[int]] = {}
        for agent in rec.get("agents") or []:
            row = this.setdefault(agent["role"], [0, 0, 0])
            for i, kind in enumerate(_KINDS):
                row[i] += int(agent[_AGENT_FIELDS[kind]])
        for role, row in this.items():
            rows.setdefault(role, []).append(row)
    return {role: dict(zip(_KINDS, map(float, np.mean(r, axis=0)))) for role, r in rows.items()}


def _cost(ok: list[dict]) -> dict:
    tokens = [_record_tokens(r) for r in ok]
    total = {kind: sum(t[kind] for t in tokens) for kind in _KINDS}
    total["total"] = sum(total.values())
    per_question = {kind: n / len(ok) for kind, n in total.items()} if ok else None
    timed = [r for r in ok if r.get("wall_s") is not None]
    wall = np.array([r["wall_s"] for r in timed], dtype=float)
    # Records of one batch share its wall time, so wall_s / batch_size sums to each batch's time once.
    shares = [r["wall_s"] / r["batch_size"] for r in timed if r.get("batch_size")]
    option_shares = [
        r["option_likelihood"]["wall_s"] / r["batch_size"]
        for r in ok
        if (r.get("option_likelihood") or {}).get("wall_s") is not None and r.get("batch_size")
    ]
    trace = [r["trace_bytes"] for r in ok if r.get("trace_bytes") is not None]
    peak = [r["peak_memory_bytes"] for r in ok if r.get("peak_memory_bytes") is not None]
    return {
        "tokens": {"per_role": _per_role(ok), "per_question": per_question, "total": total},
        "latency_s": (
            {"p50": float(np.percentile(wall, 50)), "p95": float(np.percentile(wall, 95))} if wall.size else None
        ),
        "seconds_per_question": _mean(shares),
        "option_seconds_per_question": _mean(option_shares),
        "trace_bytes": {"mean": _mean(trace), "max": int(max(trace))} if trace else None,
        "peak_memory_bytes": int(max(peak)) if peak else None,
        "truncated_rate": _mean([bool(r.get("truncated")) for r in ok]),
    }
