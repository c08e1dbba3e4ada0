"""How much a channel carries: mutual information between the secret and the answer, in bits.

Accuracy says how often the reader is right; mutual information says how much the answers depend
on the secret at all, wrong answers included (a reader that always answers the *next* word of the
vocabulary is 0 % correct and still carries log2 K bits). Estimated from (secret, answer) pairs
with the plug-in estimator and the Miller–Madow bias correction: the plug-in estimate of an
independent pair is positive, about (|X|-1)(|Y|-1) / (2 N ln 2) bits, which would read as a
channel where there is none. What remains of that bias is judged by a permutation test; a
percentile bootstrap interval is not offered, because resampling with replacement inflates the
plug-in estimate (its interval can miss the estimate itself).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np


def _entropy_nats(counts: Counter, n: int, correct_bias: bool) -> float:
    h = -sum(c / n * math.log(c / n) for c in counts.values())
    return h + ((len(counts) - 1) / (2 * n) if correct_bias else 0.0)  # Miller–Madow


def mutual_information_bits(
    secrets: Sequence[Hashable], answers: Sequence[Hashable], correct_bias: bool = True
) -> float:
    """I(secret; answer) in bits, never below 0. `answers` may hold None (no answer: one more symbol)."""
    if len(secrets) != len(answers):
        raise ValueError(f"{len(secrets)} secrets but {len(answers)} answers")
    n = len(secrets)
    if n == 0:
        return 0.0
    hx = _entropy_nats(Counter(secrets), n, correct_bias)
    hy = _entropy_nats(Counter(answers), n, correct_bias)
    hxy = _entropy_nats(Counter(zip(secrets, answers)), n, correct_bias)
    # The correction can overshoot a perfect channel; no estimate exceeds the sample's own entropy.
    ceiling = min(_entropy_nats(Counter(secrets), n, False), _entropy_nats(Counter(answers), n, False))
    return min(max(hx + hy - hxy, 0.0), ceiling) / math.log(2)


def above_chance_p(n_correct: int, n: int, chance: float) -> float:
    """One-sided exact binomial p-value of `n_correct` or more right answers out of `n` at `chance`."""
    if not 0 <= n_correct <= n:
        raise ValueError(f"n_correct={n_correct} must be within 0..n={n}")
    tail = sum(math.comb(n, k) * chance**k * (1 - chance) ** (n - k) for k in range(n_correct, n + 1))
    return min(1.0, tail)


def permutation_p(secrets: Sequence[Hashable], answers: Sequence[Hashable], n_perm: int = 500, seed: int = 0) -> float:
    """P-value of the observed mutual information against answers shuffled across examples (the
    null of no dependence), with the +1 correction: small alphabets and few examples leave a
    positive bias that a fixed threshold would misread as a channel."""
    observed = mutual_information_bits(secrets, answers)
    rng = np.random.default_rng(seed)
    shuffled = list(answers)
    hits = 0
    for _ in range(n_perm):
        rng.shuffle(shuffled)
        hits += mutual_information_bits(secrets, shuffled) >= observed - 1e-12
    return (hits + 1) / (n_perm + 1)


@dataclass(frozen=True)
class ChannelReading:
    """What an eval run's records say about a communication channel."""

    n: int  # records
    n_correct: int
    p_chance: float  # one-sided binomial test of n_correct against `chance`
    bits: float | None  # I(secret; extracted answer); None where secrets repeat too rarely to estimate it
    bits_p: float | None  # its permutation p-value
    top_share: float  # share of the commonest secret: what always giving it would score


def read_channel(records: Sequence[dict], chance: float, n_perm: int = 500) -> ChannelReading:
    """Accuracy against chance and information between the gold secret and the extracted answer.

    Mutual information needs many examples per secret (with thousands of distinct codes the
    estimate is noise): it is computed only where each secret occurs four times on average."""
    secrets = [r["gold"] for r in records]
    answers = [r.get("extracted") for r in records]
    n_correct = sum(bool(r.get("correct")) for r in records)
    has_bits = len(set(secrets)) <= len(secrets) / 4
    return ChannelReading(
        n=len(records),
        n_correct=n_correct,
        p_chance=above_chance_p(n_correct, len(records), chance),
        bits=mutual_information_bits(secrets, answers) if has_bits else None,
        bits_p=permutation_p(secrets, answers, n_perm) if has_bits else None,
        top_share=max(Counter(secrets).values()) / len(secrets) if secrets else 0.0,
    )
