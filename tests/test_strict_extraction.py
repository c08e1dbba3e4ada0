"""Strict-match beside flexible extraction for multiple choice, and the restated option list."""

from __future__ import annotations

import pytest

from diffmas.evaluate.metrics import summarize
from diffmas.scoring import extract_choice, extract_choice_strict, score_choice

ABCD = ["A", "B", "C", "D"]
CHOICES = [
    "Sunlight is the source of energy for nearly all ecosystems.",
    "Most ecosystems are found on land instead of in water.",
    "Carbon dioxide is more available than other gases.",
    "The producers in all ecosystems are plants.",
]
RESTATED = "\n".join(f"{lab}. {text}" for lab, text in zip(ABCD, CHOICES))


def test_a_restated_option_list_is_no_choice():
    assert extract_choice(RESTATED, ABCD, CHOICES) is None  # was "D", the last line restated
    assert extract_choice(f"{RESTATED}\nThe answer is (B).", ABCD, CHOICES) == "B"
    assert extract_choice("A. " + CHOICES[0], ABCD, CHOICES) == "A"  # one label restating its option still counts


@pytest.mark.parametrize(
    "text, flexible, strict",
    [
        (r"Reasoning... so \boxed{C}", "C", "C"),
        ("The answer is (B).", "B", "B"),
        ("Answer: **D**", "D", "D"),
        ("I think it is\n\nB\n", "B", None),  # a bare label line: flexible only
        ("It must be (C), the carbon one.", "C", None),
        ("The producers in all ecosystems are plants.", "D", None),  # the option's text
        ("A. " + CHOICES[0], "A", None),
        ("Let me think about this carefully.", None, None),
    ],
)
def test_strict_reads_only_explicit_answers(text, flexible, strict):
    assert extract_choice(text, ABCD, CHOICES) == flexible
    assert extract_choice_strict(text, ABCD, CHOICES) == strict


def test_score_choice_reports_both():
    score = score_choice("I think it is\n\nB\n", "B", ABCD, CHOICES)
    assert (score.correct, score.extracted, score.correct_strict, score.extracted_strict) == (True, "B", False, None)
    boxed = score_choice(r"\boxed{A}", "B", ABCD, CHOICES)
    assert (boxed.correct, boxed.correct_strict, boxed.extracted_strict) == (False, False, "A")


def _record(qid, text, gold="B"):
    from diffmas.evaluate.records import answer_record
    from diffmas.methods import AgentRecord, RunResult
    from diffmas.tasks.base import Example

    example = Example(id=qid, question="q", answer=gold, choices=tuple(CHOICES), labels=tuple(ABCD))
    result = RunResult(
        method="single",
        text=text,
        agents=[AgentRecord("solver", 3, 0, 2, 0.1, text)],
        trace_len=5,
        trace_bytes=10,
        wall_s=0.1,
        peak_memory_bytes=1,
        batch_size=1,
        truncated=False,
    )
    return answer_record(example, 0, result, score_choice(text, gold, ABCD, CHOICES))


def test_records_and_summary_carry_strict_beside_flexible():
    records = [_record("a", r"\boxed{B}"), _record("b", "I think it is\n\nB\n"), _record("c", r"\boxed{C}")]
    assert [(r["correct"], r["correct_strict"]) for r in records] == [(True, True), (True, False), (False, False)]
    assert records[1]["extracted"] == "B" and records[1]["extracted_strict"] is None
    summary = summarize(records)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["accuracy_strict"] == pytest.approx(1 / 3)
    assert len(summary["accuracy_strict_ci"]) == 2


def test_summary_without_strict_extraction_leaves_it_undefined():
    from test_metrics import rec  # a math record: no strict form

    assert summarize([rec("a")])["accuracy_strict"] is None


def test_run_examples_records_strict_and_the_option_scoring_cost(tmp_path):
    import json

    from diffmas.evaluate.records import run_examples
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig, get_method
    from diffmas.roles import default_topology
    from diffmas.tasks import get_task

    from conftest import make_backbone

    path = tmp_path / "c.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"After {i}?", "choices": [str(i + 1), str(i)], "answer": "A"})
            + "\n"
            for i in range(3)
        )
    )
    task = get_task(f"jsonl:{path}?type=choice")
    method = get_method(
        "single",
        make_backbone(False),
        default_topology("sequential", 1),
        MethodConfig(decode=DecodeConfig(max_new_tokens=3, min_new_tokens=1)),
    )
    records = list(run_examples(method, task, task.load("test"), batch_size=2, option_likelihood=True))
    assert all("correct_strict" in r and "extracted_strict" in r for r in records)
    assert all(r["option_likelihood"]["wall_s"] > 0 for r in records)


def test_summary_table_shows_strict_beside_flexible():
    from rich.console import Console

    from diffmas.cli.common import summary_table

    records = [_record("a", r"\boxed{B}"), _record("b", "I think it is\n\nB\n"), _record("c", r"\boxed{C}")]
    summary = {"task": "arc_easy", "method": "single", "latent_steps": 0, **summarize(records)}
    console = Console(record=True, width=200)
    console.print(summary_table(summary, "out"))
    text = console.export_text()
    assert "accuracy, strict extraction" in text and "33.3%" in text and "66.7%" in text
