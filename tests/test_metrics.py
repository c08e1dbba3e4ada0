"""Metrics over synthetic records with hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from diffmas.evaluate.metrics import bootstrap_ci, majority_vote, normalize_answer, summarize


def rec(qid, sample=0, correct=True, extracted="1", **extra) -> dict:
    """An answered record in the format of `diffmas.evaluate.records.answer_record`."""
    base = {
        "id": qid,
        "sample": sample,
        "method": "latent_mas",
        "status": "ok",
        "gold": "1",
        "text": "x",
        "extracted": extracted,
        "correct": correct,
        "reason": None,
        "truncated": False,
        "agents": [
            {
                "role": "planner",
                "n_prompt_tokens": 10,
                "n_latent_steps": 4,
                "n_generated_tokens": 0,
                "wall_s": 0.5,
                "text": None,
            },
            {
                "role": "solver",
                "n_prompt_tokens": 20,
                "n_latent_steps": 0,
                "n_generated_tokens": 6,
                "wall_s": 0.5,
                "text": "x",
            },
        ],
        "n_tokens": {"prompt": 30, "latent": 4, "generated": 6},
        "trace_len": 40,
        "trace_bytes": 1024,
        "wall_s": 1.0,
        "batch_size": 1,
        "peak_memory_bytes": 2**20,
        "mean_nll": 0.0,
        "mean_entropy": 0.5,
    }
    return {**base, **extra}


def skipped(qid, sample=0, reason="prompt too long") -> dict:
    return {
        "id": qid,
        "sample": sample,
        "method": "latent_mas",
        "status": "skipped",
        "gold": "1",
        "text": None,
        "extracted": None,
        "correct": None,
        "reason": reason,
    }


def test_accuracy_counts_skipped_as_wrong():
    records = [
        rec("a", 0, True),
        rec("a", 1, True),
        rec("b", 0, True),
        rec("b", 1, False),
        rec("c", 0, False),
        rec("c", 1, False),
        rec("d", 0, True),
        skipped("d", 1),
    ]
    s = summarize(records)
    assert (s["n_questions"], s["n_records"], s["n_samples_per_question"], s["n_skipped"]) == (4, 8, 2, 1)
    assert s["skip_reasons"] == {"prompt too long": 1}
    assert s["accuracy"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert s["accuracy_answered"] == pytest.approx(4 / 7)
    lo, hi = s["accuracy_ci"]
    assert lo <= s["accuracy"] <= hi
    json.dumps(s, allow_nan=False)  # the summary.json contract: plain JSON


def test_bootstrap_ci_contains_mean_shrinks_with_n_and_is_deterministic():
    small = [1.0, 0.0] * 10
    large = [1.0, 0.0] * 200
    lo_s, hi_s = bootstrap_ci(small, seed=3)
    lo_l, hi_l = bootstrap_ci(large, seed=3)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2  # width ~ 1/sqrt(n): 20x the questions, ~4.5x narrower
    assert bootstrap_ci(small, seed=3) == (lo_s, hi_s)
    assert bootstrap_ci([0.25] * 5) == (0.25, 0.25)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_summary_ci_shrinks_with_more_questions():
    def run(n):
        return [rec(f"q{i}", correct=i % 2 == 0) for i in range(n)]

    lo_s, hi_s = summarize(run(20))["accuracy_ci"]
    lo_l, hi_l = summarize(run(400))["accuracy_ci"]
    assert hi_l - lo_l < hi_s - lo_s


@pytest.mark.parametrize(
    "raw, key",
    [(" 42 ", "42"), ("$42", "42"), ("42.0", "42"), ("1,000.50", "1000.5"), ("-3.", "-3"), ("B", "B"), ("0.0", "0")],
)
def test_normalize_answer(raw, key):
    assert normalize_answer(raw) == key


def test_majority_vote_self_consistency_and_agreement_k4():
    def q(qid, answers, correct):
        return [rec(qid, i, c, a) for i, (a, c) in enumerate(zip(answers, correct))]

    records = (
        q("q1", ["42", " 42.0", "$42", "7"], [True, True, True, False])  # 3 votes for 42: right; 3/4 right
        + q("q2", ["5", "6", "6", "5"], [False, True, True, False])  # tie 5 vs 6: first seen (5) wins: wrong
        + q("q3", ["1,000", "1000", "999", None], [True, True, False, False])  # 1000 wins 2 votes; 2/4 right
        + q("q4", ["9", "9", "9", "9"], [True] * 4)
    )
    s = summarize(records)
    assert s["n_samples_per_question"] == 4
    assert s["accuracy"] == pytest.approx((0.75 + 0.5 + 0.5 + 1) / 4)
    assert s["majority_vote_accuracy"] == pytest.approx(3 / 4)
    assert s["self_consistency"] == pytest.approx(2 / 4)  # q1 (3/4) and q4 (4/4)
    assert s["answer_agreement"] == pytest.approx((3 / 4 + 2 / 4 + 2 / 4 + 4 / 4) / 4)
    assert majority_vote(records[4:8])[:2] == ("5", 2)
    assert majority_vote([skipped("z"), rec("z", 1, extracted=None)]) == (None, 0, None)


def test_k1_leaves_sampling_metrics_undefined():
    s = summarize([rec("a"), rec("b", correct=False)])
    assert s["majority_vote_accuracy"] is s["self_consistency"] is s["answer_agreement"] is None
    assert s["accuracy"] == 0.5


def test_option_likelihood_accuracy_and_chance():
    def opt(labels, correct, correct_norm):
        return {
            "labels": labels,
            "logprobs": [-1.0] * len(labels),
            "n_chars": [3] * len(labels),
            "pred": labels[0],
            "pred_norm": labels[0],
            "correct": correct,
            "correct_norm": correct_norm,
        }

    records = [
        rec("a", option_likelihood=opt(list("ABCD"), True, True)),
        rec("b", option_likelihood=opt(list("ABCD"), False, True)),
        rec("c", option_likelihood=opt(["A", "B"], True, True)),
        skipped("d"),
    ]
    s = summarize(records)
    assert s["n_option_questions"] == 3  # the skipped question has no likelihoods
    assert s["option_accuracy"] == pytest.approx(2 / 3)
    assert s["option_accuracy_norm"] == pytest.approx(1.0)
    assert s["chance"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 2) / 3)
    assert s["option_accuracy_ci"][0] <= 2 / 3 <= s["option_accuracy_ci"][1]
    assert summarize([rec("a")])["option_accuracy"] is None


def test_stability_and_cost():
    def agents(p1, p2, g):
        return [
            {"role": "planner", "n_prompt_tokens": p1, "n_latent_steps": 5, "n_generated_tokens": 0, "wall_s": 1},
            {"role": "solver", "n_prompt_tokens": p2, "n_latent_steps": 0, "n_generated_tokens": g, "wall_s": 1},
        ]

    records = [
        # batch 1: two records sharing a 4 s batch
        rec(
            "a",
            wall_s=4.0,
            batch_size=2,
            mean_nll=0.0,
            mean_entropy=1.0,
            agents=agents(10, 20, 4),
            n_tokens={"prompt": 30, "latent": 5, "generated": 4},
            trace_bytes=1000,
            peak_memory_bytes=5,
        ),
        rec(
            "b",
            wall_s=4.0,
            batch_size=2,
            mean_nll=math.log(2),
            mean_entropy=2.0,
            agents=agents(30, 40, 8),
            n_tokens={"prompt": 70, "latent": 5, "generated": 8},
            trace_bytes=3000,
            peak_memory_bytes=7,
            truncated=True,
        ),
        # batch 2: one record alone, 1 s
        rec(
            "c",
            wall_s=1.0,
            batch_size=1,
            mean_nll=None,
            mean_entropy=None,
            agents=agents(20, 30, 6),
            n_tokens={"prompt": 50, "latent": 5, "generated": 6},
            trace_bytes=2000,
            peak_memory_bytes=6,
        ),
        skipped("d"),
    ]
    s = summarize(records)
    assert s["perplexity"] == pytest.approx((1 + 2) / 2)
    assert s["mean_entropy"] == pytest.approx(1.5)
    assert s["tokens"]["per_role"] == {
        "planner": {"prompt": 20, "latent": 5, "generated": 0},
        "solver": {"prompt": 30, "latent": 0, "generated": 6},
    }
    assert s["tokens"]["total"] == {"prompt": 150, "latent": 15, "generated": 18, "total": 183}
    assert s["tokens"]["per_question"]["total"] == pytest.approx(61)
    assert s["seconds_per_question"] == pytest.approx((4 + 1) / 3)  # each batch counted once
    assert s["latency_s"]["p50"] == pytest.approx(4.0)
    assert s["trace_bytes"] == {"mean": 2000.0, "max": 3000}
    assert s["peak_memory_bytes"] == 7
    assert s["truncated_rate"] == pytest.approx(1 / 3)


def test_summary_keys_and_empty_input():
    keys = {
        "n_questions",
        "n_records",
        "n_samples_per_question",
        "n_skipped",
        "skip_reasons",
        "accuracy",
        "accuracy_ci",
        "accuracy_answered",
        "majority_vote_accuracy",
        "self_consistency",
        "answer_agreement",
        "n_option_questions",
        "option_accuracy",
        "option_accuracy_ci",
        "option_accuracy_norm",
        "option_accuracy_norm_ci",
        "chance",
        "perplexity",
        "mean_entropy",
        "tokens",
        "latency_s",
        "seconds_per_question",
        "trace_bytes",
        "peak_memory_bytes",
        "truncated_rate",
        "n_boot",
        "accuracy_strict",
        "accuracy_strict_ci",
        "option_seconds_per_question",
    }
    assert set(summarize([rec("a")])) == keys
    empty = summarize([skipped("a")])
    assert set(empty) == keys
    assert empty["accuracy"] == 0.0 and empty["accuracy_answered"] is None and empty["perplexity"] is None
    assert empty["tokens"]["per_question"] is None and empty["seconds_per_question"] is None
    assert summarize([])["accuracy"] is None
    json.dumps(empty, allow_nan=False)
