"""Scoring multiple choice: read the chosen option label from generated text.

Labels are whatever the question shows ('A'..'E', or '1'..'4' in some ARC rows). Rules, strongest
first; the first rule that finds a label wins, and within a rule the last mention wins:

1. `\\boxed{B}` (also `\\boxed{\\text{(B) ...}}` or a boxed option text);
2. an answer statement: "The answer is (B)", "Answer: **B**", "the correct option is B",
   "I would choose B";
3. a line that is only a label: "B", "(B)", "**B.**", "Option B"; or a label restating its own
   option, as small models answer: "A. Sunlight is the source ...", "(B) safety goggles";
4. the text (or its last line, or what follows "answer is") equals exactly one option text,
   compared case-insensitively with spacing and surrounding punctuation normalised. This comes
   before the two weak rules below because option texts often contain label-like tokens
   ("Amphotericin B", "100°C", "carbon [C]") that those rules would otherwise take for the answer;
5. a marked label in running text: "(B)", "[B]", "**B**", "option B" / "choice B";
6. a bare label ending the text: "... so it's B.".

A restated option list ("A. <option A>\nB. <option B>\n...") is no answer: rule 3 counts a label
restating its own option only when no other label does too.

`extract_choice` is the flexible extraction (lm-evaluation-harness: flexible-extract);
`extract_choice_strict` reads only rules 1-2, an answer given as asked or stated as the answer
(strict-match). `score_choice` reports both.

A bare label counts only when it is clearly an answer token: a label followed by a lowercase
word ("A plant needs ...", "B cells") reads as prose and is skipped, unless the word is one that
continues an answer ("B because ...", "A is correct"). Letter labels match either case in rules
1-3 and 6 ("answer: b"), and only as written in rule 5, where "(a)" is usually an enumeration.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from diffmas.scoring.math import _last_boxed
from diffmas.tasks.base import Score

# Words that may follow a bare label in an answer ("B because ..."); any other lowercase word
# makes the label read as prose ("A plant", "B cells").
_CONTINUATIONS = {
    "is",
    "was",
    "because",
    "since",
    "as",
    "and",
    "or",
    "which",
    "with",
    "for",
    "from",
    "due",
    "given",
    "based",
    "that",
    "would",
    "should",
    "seems",
    "appears",
    "are",
    "so",
    "then",
    "here",
    "there",
    "in",
    "the",
}
_ANSWER_LEAD = (
    r"(?:final\s+answer|correct\s+answer|best\s+answer|right\s+answer|answer"
    r"|correct\s+(?:option|choice)|best\s+(?:option|choice)|right\s+(?:option|choice)"
    r"|I\s+(?:would\s+|will\s+|'d\s+|'ll\s+)?(?:choose|pick|select|go\s+with))"
    r"\s*(?:is|:|=|-|would\s+be|should\s+be|will\s+be|must\s+be)?\s*"
    r"(?:therefore|thus|clearly)?\s*:?\s*(?:option|choice)?\s*[(\[*\s]*"
)
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")


def _label_pattern(labels: Sequence[str]) -> str:
    return "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))


def _canonical(found: str, labels: Sequence[str]) -> str | None:
    for lab in labels:
        if lab == found or lab.lower() == found.lower():
            return lab
    return None


def _reads_as_answer(text: str, end: int) -> bool:
    """A bare label is an answer unless a lowercase prose word follows it ("A plant ...")."""
    if end < len(text) and text[end] in ")]*":
        return True  # wrapped: "(A)", "**A**"
    if re.match(r"[.,]\d", text[end:]):
        return False  # the "3" of "3.5"
    following = re.match(r"[ \t]+([a-z][a-z']*)", text[end:])
    return following is None or following.group(1) in _CONTINUATIONS


def _last_label(regex: re.Pattern, text: str, labels: Sequence[str], bare: bool) -> str | None:
    for match in reversed(list(regex.finditer(text))):
        if bare and not _reads_as_answer(text, match.end("label")):
            continue
        label = _canonical(match.group("label"), labels)
        if label is not None:
            return label
    return None


def _normalise_text(s: str) -> str:
    """Case, spacing and surrounding punctuation/markdown removed; inner symbols kept ("+1")."""
    return " ".join(s.casefold().split()).strip(" .,;:!?\"'*`")


def _match_option_text(candidate: str, labels: Sequence[str], choices: Sequence[str]) -> str | None:
    target = _normalise_text(candidate)
    if not target:
        return None
    hits = [lab for lab, choice in zip(labels, choices) if _normalise_text(choice) == target]
    return hits[0] if len(hits) == 1 else None


def _from_boxed(text: str, labels: Sequence[str], choices: Sequence[str]) -> str | None:
    boxed = _last_boxed(text)
    if boxed is None:
        return None
    content = _TEXT_WRAPPERS.sub(r"\1", boxed).strip()
    match = re.match(rf"[(\[]?\s*(?P<label>{_label_pattern(labels)})\s*[)\]]?(?:[\s.:\-]|$)", content, re.IGNORECASE)
    if match:
        return _canonical(match.group("label"), labels)
    return _match_option_text(content, labels, choices)


def _label_rules(labels: Sequence[str]) -> tuple[list, list]:
    """(strong rules 2-3, weak rules 5-6) as (regex, bare label?) pairs."""
    alt = _label_pattern(labels)
    any_case = re.IGNORECASE
    strong = [
        (re.compile(rf"{_ANSWER_LEAD}(?P<label>{alt})(?![\w])", any_case), True),
        (
            re.compile(
                rf"^[ \t]*[(\[*]*[ \t]*(?:(?i:option|choice)[ \t]+)?(?P<label>{alt})"
                rf"[ \t]*[)\]*.:]*[ \t]*$",
                re.MULTILINE | any_case,
            ),
            False,
        ),
    ]
    weak = [
        (
            re.compile(
                rf"\((?P<label>{alt})\)|\[(?P<l2>{alt})\]|\*\*(?P<l3>{alt})\*\*"
                rf"|\b(?i:option|choice)\s+(?P<l4>{alt})(?![\w])"
            ),
            False,
        ),
        (re.compile(rf"(?<![\w'.,°\-])(?P<label>{alt})[ \t]*[.)!]?[ \t]*\Z", any_case), True),
    ]
    return strong, weak


def _apply(rules: list, text: str, labels: Sequence[str]) -> str | None:
    for regex, bare in rules:
        if "l2" in regex.groupindex:  # the marked-label rule: four alternatives, one group each
            found = _last_marked(regex, text, labels)
        else:
            found = _last_label(regex, text, labels, bare)
        if found is not None:
            return found
    return None


def _last_marked(regex: re.Pattern, text: str, labels: Sequence[str]) -> str | None:
    for match in reversed(list(regex.finditer(text))):
        found = next(g for g in match.groups() if g is not None)
        label = _canonical(found, labels)
        if label is not None:
            return label
    return None


def _from_labelled_option(text: str, labels: Sequence[str], choices: Sequence[str]) -> str | None:
    """A line "A. <text of option A>" (or "(A) ...", "A) ..."): the label and its own option agree."""
    regex = re.compile(
        rf"^[ \t]*[(\[*]*[ \t]*(?P<label>{_label_pattern(labels)})[ \t]*[)\].:]+[ \t]*\**[ \t]*"
        rf"(?P<rest>\S.*)$",
        re.MULTILINE | re.IGNORECASE,
    )
    restated = []
    for match in regex.finditer(text):
        label = _canonical(match.group("label"), labels)
        if label is None:
            continue
        rest, option = _normalise_text(match.group("rest")), _normalise_text(choices[labels.index(label)])
        if option and (rest == option or rest.startswith(option)):
            restated.append(label)
    # several labels each restating their own option: the option list copied out, not a choice
    return restated[-1] if len(set(restated)) == 1 else None


def _from_option_text(text: str, labels: Sequence[str], choices: Sequence[str]) -> str | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    candidates = [text] + lines[-1:]
    after = list(re.finditer(r"\banswer\s*(?:is|:)", text, re.IGNORECASE))
    if after:
        candidates.append(text[after[-1].end() :].strip().split("\n", 1)[0].rstrip("."))
    for candidate in candidates:
        found = _match_option_text(candidate, labels, choices)
        if found is not None:
            return found
    return None


def _check_labels(labels: Sequence[str], choices: Sequence[str]) -> list[str]:
    labels = [str(lab).strip() for lab in labels]
    if not labels or any(not lab for lab in labels):
        raise ValueError(f"labels must be non-empty option labels such as ['A', 'B', 'C', 'D'], got {labels!r}")
    if choices and len(choices) != len(labels):
        raise ValueError(
            f"got {len(choices)} choices for {len(labels)} labels {labels!r}; pass "
            "one option text per label, in the same order (or no choices)"
        )
    return labels


def extract_choice(text: str, labels: Sequence[str], choices: Sequence[str] = ()) -> str | None:
    """The option label chosen in `text` (one of `labels`, as given), or None if there is none."""
    labels = _check_labels(labels, choices)
    strong, weak = _label_rules(labels)
    return (
        _from_boxed(text, labels, choices)
        or _apply(strong, text, labels)
        or (_from_labelled_option(text, labels, choices) if choices else None)
        or (_from_option_text(text, labels, choices) if choices else None)
        or _apply(weak, text, labels)
    )


def extract_choice_strict(text: str, labels: Sequence[str], choices: Sequence[str] = ()) -> str | None:
    """strict-match: the label of an explicit answer only, `\\boxed{B}` (the format the tasks ask
    for) or an answer statement ("The answer is (B)"); None for anything the flexible rules guess."""
    labels = _check_labels(labels, choices)
    statement = _label_rules(labels)[0][:1]
    return _from_boxed(text, labels, choices) or _apply(statement, text, labels)


def score_choice(text: str, gold_label: str, labels: Sequence[str], choices: Sequence[str] = ()) -> Score:
    """Extract the chosen label and compare it with `gold_label`."""
    labels = _check_labels(labels, choices)
    gold = str(gold_label).strip()
    if gold not in labels:
        raise ValueError(
            f"gold label {gold_label!r} is not one of the labels {labels!r}; pass "
            "the correct option's label (e.g. 'B'), not its text or position"
        )
    extracted = extract_choice(text, labels, choices)
    strict = extract_choice_strict(text, labels, choices)
    if extracted is None:
        return Score(
            correct=False, extracted=None, reason="no answer", extracted_strict=strict, correct_strict=strict == gold
        )
    correct = extracted == gold
    return Score(
        correct=correct,
        extracted=extracted,
        reason=None if correct else "wrong answer",
        extracted_strict=strict,
        correct_strict=strict == gold,
    )
