"""Math scoring: answer extraction, math-verify equivalence, GSM8K golds end to end."""

from __future__ import annotations

import json
import threading

import pytest

from diffmas.scoring import extract_math_answer, gsm8k_gold, math_equal, score_math

from conftest import data_file


def _rows(name: str) -> list[dict]:
    with open(data_file(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", r"\frac{1}{2}"),
        ("1/2", r"\frac{1}{2}"),
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        (r"\frac14", "0.25"),
        ("1,000", "1000"),
        (r"1{,}000", "1000"),
        ("$18", "18"),
        (r"\$18", "18"),
        ("18.00", "18"),
        ("18 dollars", "18"),
        (r"18\text{ dollars}", "18"),
        ("$1,234.50", "1234.5"),
        ("x=5", "5"),
        ("5", "x = 5"),
        ("-3", "-3"),
        (r"\sqrt{8}", r"2\sqrt{2}"),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"),
        ("(1, 2)", "(1,2)"),  # a pair / an open interval, written with and without a space
        (r"\{2, 1\}", r"\{1,2\}"),  # sets ignore order
        ("[0, 1)", "[0,1)"),
        # percentages: math-verify accepts both readings, and so do we
        (r"50\%", "50"),
        (r"50\%", "0.5"),
        ("50%", "50"),
        ("0.333333", "1/3"),  # floats are compared at 6 decimals
        (r"90^\circ", "90"),
        (r"\infty", r"\infty"),
        ("Evelyn", r"\text{Evelyn}"),
    ],
)
def test_equivalent(pred: str, gold: str) -> None:
    assert math_equal(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("3", "-3"),
        ("12.5", "12"),
        ("3.0001", "3"),
        ("3.14159", r"\pi"),
        ("(2, 1)", "(1,2)"),  # order matters in a tuple
        ("(0, 1)", "[0,1)"),  # open vs half-open interval
        ("5 and 7", "5"),  # "and" joins two values, it is not a unit
        ("2x", "2"),
        ("abc", "5"),
        ("", "5"),
        (None, "5"),
        (r"\frac{1}{3}", "0.3"),
    ],
)
def test_not_equivalent(pred: str | None, gold: str) -> None:
    assert not math_equal(pred, gold)


@pytest.mark.parametrize("pred", [r"\frac{", "}}}{{", "\\" * 50, "1" * 5000, "$$$", "\x00", "(((1"])
def test_math_equal_never_raises(pred: str) -> None:
    assert math_equal(pred, "1") in (True, False)


def test_math_equal_works_off_the_main_thread() -> None:
    # math-verify's timeout uses signal.alarm, which raises in other threads; we must not.
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(math_equal("0.5", r"\frac{1}{2}")))
    worker.start()
    worker.join()
    assert results == [True]


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $x = \boxed{\frac{3}{4}}$.", r"\frac{3}{4}"),
        (r"first \boxed{1}, then after checking \boxed{2}", "2"),
        (r"nested \boxed{\frac{1}{\sqrt{2}}} done", r"\frac{1}{\sqrt{2}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5", "5"),
        (r"complete \boxed{5} then cut off \boxed{6", "5"),  # unbalanced last box is skipped
        ("She pays 3 * 6 = 18.\n#### 18", "18"),
        ("#### 1,234", "1,234"),
        ("Therefore, the answer is 42.", "42"),
        ("The answer is $18$. I hope it helps.", "$18$"),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "$\\frac{1}{2}$"),
        ("**Answer:** 3.5", "3.5"),
        ("The answer is 18 because 3 + 15 = 18", "18"),
        ("Answer:\n\n-7", "-7"),
        ("She had 3 apples, bought 5 more and gave away 2, so 6 remain", "6"),
        ("The total cost is $1,250.75 in all", "1,250.75"),
    ],
)
def test_extract(text: str, expected: str) -> None:
    assert extract_math_answer(text) == expected


def test_extract_from_verbose_generation() -> None:
    text = (
        "Let's think step by step. Janet's ducks lay 16 eggs per day. She eats 3 and bakes 4, "
        "so 16 - 3 - 4 = 9 eggs are left. At $2 each she makes 9 * 2 = 18 dollars.\n"
        "The answer is 18."
    )
    assert extract_math_answer(text) == "18"
    assert score_math(text, "18").correct


@pytest.mark.parametrize("text", ["", "I am not sure how to solve this.", "No idea, sorry!"])
def test_no_answer(text: str) -> None:
    assert extract_math_answer(text) is None
    score = score_math(text, "5")
    assert (score.correct, score.extracted, score.reason) == (False, None, "no answer")


def test_score_math_fields() -> None:
    right = score_math(r"... \boxed{\dfrac{1}{2}}", "0.5")
    wrong = score_math("The answer is 7.", "8")
    assert (right.correct, right.extracted, right.reason) == (True, r"\dfrac{1}{2}", None)
    assert (wrong.correct, wrong.extracted, wrong.reason) == (False, "7", "wrong answer")


def test_gsm8k_gold() -> None:
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("...\n#### 1,080") == "1080"
    assert gsm8k_gold("#### -3") == "-3"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("The answer is 18.")


def test_gsm8k_golds_score_fully_in_both_formats() -> None:
    rows = _rows("gsm8k_test.jsonl")
    assert len(rows) == 1319
    golds = [gsm8k_gold(row["answer"]) for row in rows]
    as_reference = [score_math(row["answer"], gold).correct for row, gold in zip(rows, golds)]
    as_boxed = [score_math(rf"So the total is \boxed{{{gold}}}.", gold).correct for gold in golds]
    off_by_one = [score_math(f"#### {int(gold) + 1}", gold).correct for gold in golds]
    assert sum(as_reference) == sum(as_boxed) == 1319
    assert sum(off_by_one) == 0


def test_math500_reference_solutions_score_fully() -> None:
    rows = _rows("math500_test.jsonl")
    scores = [score_math(row["solution"], row["answer"]) for row in rows]
    assert [row["unique_id"] for row, s in zip(rows, scores) if not s.correct] == []
    # and through math-verify rather than string equality: \frac written as \dfrac
    rewritten = [r["answer"] for r in rows if r"\frac" in r["answer"]]
    assert rewritten and all(math_equal(a.replace(r"\frac", r"\dfrac"), a) for a in rewritten)
