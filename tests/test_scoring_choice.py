"""Multiple-choice scoring: labels from free text, numeric labels, the option-text fallback."""

from __future__ import annotations

import json

import pytest

from diffmas.scoring import extract_choice, score_choice
from diffmas.scoring.choice import _normalise_text

from conftest import data_file

ABCD = ["A", "B", "C", "D"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"After weighing the options, \boxed{D}", "D"),
        (r"\boxed{\text{(B) Photosynthesis}}", "B"),
        ("The answer is (B).", "B"),
        ("Therefore, the answer is C", "C"),
        ("Answer: **C**", "C"),
        ("**Answer:** A", "A"),
        ("Final answer: A", "A"),
        ("the correct option is (A)", "A"),
        ("The correct answer is: (D) none of the above", "D"),
        ("I would choose C.", "C"),
        ("so the answer: b", "B"),  # lower-case letter in an answer statement
        ("The answer is A because it fits all the data.", "A"),
        ("I think it is\n\nB\n", "B"),  # a line holding only the label
        ("Considering everything:\n**D.**", "D"),
        ("Option A is wrong. Option C is right.", "C"),  # last mention wins
        ("(A) fails the energy test, while (C) passes it.", "C"),
        ("Therefore, it's D.", "D"),
        # a later, explicit correction beats an earlier statement
        ("The answer is A. Wait, re-checking the units, the answer is B.", "B"),
        # a statement beats a marked mention that comes after it
        ("The answer is (C). Note that (A) was tempting.", "C"),
    ],
)
def test_extract_from_verbose_answers(text: str, expected: str) -> None:
    assert extract_choice(text, ABCD) == expected


@pytest.mark.parametrize(
    "text",
    [
        "A plant needs water and light to grow.",  # the article "A", not an answer
        "A cell is the smallest unit of life. It has a membrane.",
        "The answer is a mitochondrion.",
        "B cells make antibodies.",
        "Let me think about this carefully.",
        "",
        "A) foo\nB) bar\nC) baz\nD) qux\nHmm, I'm not sure.",  # restating the options is no answer
    ],
)
def test_no_answer_and_no_false_positives(text: str) -> None:
    assert extract_choice(text, ABCD) is None


def test_article_does_not_hide_a_later_answer() -> None:
    assert extract_choice("A plant needs light to make sugar. The answer is C", ABCD) == "C"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 3", "3"),
        ("I pick (2)", "2"),
        (r"\boxed{4}", "4"),
        ("Answer: 1", "1"),
        ("The answer is 3.5 cm", None),  # a decimal is not label "3"
        ("The answer is 2 moles", None),  # a quantity is not label "2"
    ],
)
def test_numeric_labels(text: str, expected: str | None) -> None:
    assert extract_choice(text, ["1", "2", "3", "4"]) == expected


CHOICES = ["Respiration", "photosynthesis", "Digestion", "Osmosis"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Photosynthesis.", "B"),
        ("The answer is: Digestion", "C"),
        ("It must be about water moving.\nosmosis", "D"),
        (r"\boxed{\text{Respiration}}", "A"),
        ("Something about plants", None),
    ],
)
def test_option_text_fallback(text: str, expected: str | None) -> None:
    assert extract_choice(text, ABCD, CHOICES) == expected


def test_option_text_containing_a_label_like_token() -> None:
    choices = ["Amphotericin B", "Fluconazole", "Vitamin C", "Caspofungin"]
    assert extract_choice("Amphotericin B", ABCD, choices) == "A"
    assert extract_choice("The answer is: vitamin c", ABCD, choices) == "C"


def test_ambiguous_option_text_is_no_answer() -> None:
    assert extract_choice("water", ABCD, ["water", "Water!", "ice", "steam"]) is None


def test_option_texts_keep_their_signs() -> None:
    assert extract_choice("+1", ABCD, ["+2", "+1", "-1", "-2"]) == "B"


def test_score_choice_fields() -> None:
    right = score_choice("The answer is (B).", "B", ABCD)
    wrong = score_choice("The answer is (C).", "B", ABCD)
    none = score_choice("No idea.", "B", ABCD)
    assert (right.correct, right.extracted, right.reason) == (True, "B", None)
    assert (wrong.correct, wrong.extracted, wrong.reason) == (False, "C", "wrong answer")
    assert (none.correct, none.extracted, none.reason) == (False, None, "no answer")


def test_bad_arguments_name_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match="'Photosynthesis' is not one of the labels"):
        score_choice("B", "Photosynthesis", ABCD)
    with pytest.raises(ValueError, match="3 choices for 4 labels"):
        extract_choice("B", ABCD, ["x", "y", "z"])
    with pytest.raises(ValueError, match="non-empty option labels"):
        extract_choice("B", [])


def _questions(name: str) -> list[tuple[list[str], list[str], str]]:
    """(labels, option texts, gold label) per row, for the ARC/CSQA and MedQA layouts."""
    out = []
    with open(data_file(name), encoding="utf-8") as f:
        for row in map(json.loads, f):
            if "choices" in row:
                out.append((row["choices"]["label"], row["choices"]["text"], row["answerKey"]))
            else:
                labels = sorted(row["options"])
                out.append((labels, [row["options"][k] for k in labels], row["answer_idx"]))
    return out


@pytest.mark.parametrize(
    "name", ["arc_easy_test.jsonl", "arc_challenge_test.jsonl", "commonsenseqa_validation.jsonl", "medqa_test.jsonl"]
)
def test_benchmark_questions_in_several_answer_styles(name: str) -> None:
    questions = _questions(name)
    misses = []
    for labels, texts, gold in questions:
        styles = [
            f"Let me reason step by step.\nThe answer is ({gold}).",
            rf"\boxed{{{gold}}}",
            f"Answer: {gold}",
            f"Thinking...\n\n{gold}\n",
        ]
        normalised = {_normalise_text(t) for t in texts}
        if len(normalised) == len(texts) and not normalised & {lab.casefold() for lab in labels}:
            styles.append(texts[labels.index(gold)])  # the option text alone, when unambiguous
        misses += [(gold, s[:40]) for s in styles if extract_choice(s, labels, texts) != gold]
    assert misses == []
    if name == "arc_easy_test.jsonl":  # keeps its numeric labels: make sure they are covered
        assert sum(labels[0] == "1" for labels, _, _ in questions) >= 90


ARC_CHOICES = [
    "Sunlight is the source of energy for nearly all ecosystems.",
    "Most ecosystems are found on land instead of in water.",
    "Carbon dioxide is more available than other gases.",
    "The producers in all ecosystems are plants.",
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A. Sunlight is the source of energy for nearly all ecosystems.", "A"),  # seen from SmolLM2
        ("(C) Carbon dioxide is more available than other gases", "C"),
        ("Let me think.\nD) The producers in all ecosystems are plants. They make food.", "D"),
        ("**B.** Most ecosystems are found on land instead of in water.", "B"),
        # the label and the option text disagree: no confident reading either way
        ("A. Carbon dioxide is more available than other gases.", None),
        ("A. Plants make food from light.", None),
    ],
)
def test_label_restating_its_option(text: str, expected: str | None) -> None:
    assert extract_choice(text, ABCD, ARC_CHOICES) == expected
