"""Scoring exact answers: a word, a digit string or an integer, read from the start of a generation.

The communication tasks (`diffmas.tasks.relay`) ask for a bare answer ("Answer with the word
only."), so extraction is strict on purpose: the *first* word / digit run / integer of the text is
the answer, and nothing later can rescue it. A reader that lists several candidates gets credit
for the first only, which keeps chance at 1/K and keeps the mutual-information estimate honest.
"""

from __future__ import annotations

import re
from typing import Literal

from diffmas.tasks.base import Score

ExactKind = Literal["word", "digits", "integer"]
EXACT_KINDS = ("word", "digits", "integer")

_PATTERNS = {
    "word": re.compile(r"[A-Za-z]+"),
    "digits": re.compile(r"\d+"),
    "integer": re.compile(r"-?\d+"),
}


def extract_exact(text: str, kind: ExactKind) -> str | None:
    """The first word (lower-cased), digit run or integer of `text`; None if there is none."""
    if kind not in _PATTERNS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(EXACT_KINDS)}")
    match = _PATTERNS[kind].search(text)
    if match is None:
        return None
    value = match.group(0)
    if kind == "word":
        return value.lower()
    if kind == "integer":
        return str(int(value))  # "007" and "7" are the same number
    return value


def score_exact(text: str, gold: str, kind: ExactKind) -> Score:
    """Correct iff the extracted answer equals `gold` (already normalised by the task)."""
    extracted = extract_exact(text, kind)
    if extracted is None:
        return Score(correct=False, extracted=None, reason="no answer")
    return Score(correct=extracted == gold, extracted=extracted)
