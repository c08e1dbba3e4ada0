"""Scoring math answers: extract the final answer from generated text, compare it with math-verify.

Extraction order (the first rule that finds something wins; within a rule, the last occurrence):
`\\boxed{...}` / `\\fbox{...}` with balanced braces, GSM8K's `#### N`, "the answer is X" /
"Answer: X", and finally the last number in the text.

Equivalence is math-verify's (huggingface/Math-Verify): fractions, `\\frac`/`\\dfrac`, decimals,
sets, tuples, intervals, `x = 5` vs `5`, radicals, units in `\\text{}`. Two choices worth knowing,
both math-verify's own: a percentage equals both readings ("50%" == "50" == "0.5"), and floats
are compared after rounding to 6 decimals ("1/3" == "0.333333"). Plain-number answers with
currency signs, thousands commas or a trailing unit word ("$1,000 dollars") are normalised first.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation

from math_verify import parse, verify

from diffmas.tasks.base import Score

_TIMEOUT_S = 3  # math-verify's per-call limit (signal.alarm: whole seconds, main thread only)
_MAX_ANSWER_CHARS = 400  # longer "answers" are prose, not worth a symbolic comparison

_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\s*:?|:|=|would\s+be|will\s+be|should\s+be)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_NUMBER_WITH_UNIT = re.compile(r"([-+]?[\d,]*\.?\d+)\s+((?:[a-zA-Z]{2,}\.?\s*){1,3})")
# words that join two values ("5 and 7") rather than name a unit ("18 dollars")
_NOT_UNITS = {"and", "or", "to", "plus", "minus", "times", "over", "divided", "by", "of", "pi"}


def _braced(text: str, start: int) -> str | None:
    """The content of the {...} group opening at text[start], or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (or \\fbox, or `\\boxed 5`)."""
    for match in reversed(list(_BOX.finditer(text))):
        rest = text[match.end() :]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            content = _braced(text, match.end() + len(rest) - len(stripped))
        else:  # `\boxed 5`: the next token
            token = re.match(r"\s+([^\s$]+)", rest)
            content = token.group(1) if token else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_sentence(tail: str) -> str:
    """The answer part of "...answer is X. Because..." : first line, up to the sentence end."""
    line = tail.lstrip(" \t*:\n").split("\n", 1)[0]
    line = re.split(r"\.(?=\s|$)", line, maxsplit=1)[0]  # a period that is not a decimal point
    line = re.split(r",?\s+(?:because|since|as|so|which)\b", line, maxsplit=1)[0]
    return line.strip().strip("*").strip().rstrip(".,;:").strip()


def extract_math_answer(text: str) -> str | None:
    """The final answer in a generation (see the module docstring for the order); None if none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = [m.group(1).strip().rstrip(".") for m in _HASHES.finditer(text)]
    if hashes and hashes[-1]:
        return hashes[-1]
    markers = list(_ANSWER_IS.finditer(text))
    if markers:
        answer = _clean_sentence(text[markers[-1].end() :])
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalise(answer: str) -> str:
    """Light clean-up before comparing: delimiters, currency, thousands commas, unit words."""
    s = answer.strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            s = s[len(left) : -len(right)].strip()
    s = re.sub(r"^(?:\\\$|\$)\s*", "", s)  # "$18", "\$18"
    s = s.rstrip(".").strip()
    unit = _NUMBER_WITH_UNIT.fullmatch(s)
    if unit and not _NOT_UNITS & set(unit.group(2).lower().replace(".", " ").split()):
        s = unit.group(1)  # "18 dollars", "5 cm" (plain numbers only; LaTeX is math-verify's)
    if _PLAIN_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    return s


def _as_decimal(s: str) -> Decimal | None:
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _math_verify_equal(gold: str, pred: str) -> bool:
    # signal.alarm only works in the main thread; elsewhere math-verify runs without a limit,
    # which the length cap on answers keeps cheap in practice.
    in_main = threading.current_thread() is threading.main_thread()
    timeout = _TIMEOUT_S if in_main else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def math_equal(pred: str | None, gold: str) -> bool:
    """True when `pred` is mathematically equivalent to `gold`. Never raises; False for None."""
    if pred is None:
        return False
    try:
        p, g = _normalise(str(pred)), _normalise(str(gold))
        if not p or not g:
            return False
        if p == g:
            return True
        p_num, g_num = _as_decimal(p), _as_decimal(g)
        if p_num is not None and g_num is not None and p_num == g_num:
            return True  # fast path (GSM8K): exact decimal equality needs no CAS
        if len(p) > _MAX_ANSWER_CHARS or len(g) > _MAX_ANSWER_CHARS:
            return False
        return _math_verify_equal(g, p)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # math-verify's TimeoutException is one; sympy can raise anything
        return False


def score_math(text: str, gold: str) -> Score:
    """Extract the final answer from `text` and compare it with `gold`."""
    extracted = extract_math_answer(text)
    if extracted is None:
        return Score(correct=False, extracted=None, reason="no answer")
    correct = math_equal(extracted, gold)
    return Score(correct=correct, extracted=extracted, reason=None if correct else "wrong answer")


def gsm8k_gold(answer_field: str) -> str:
    """The final answer of a GSM8K `answer` field: the number after '####', commas removed."""
    if "####" not in answer_field:
        raise ValueError(
            f"GSM8K answer field has no '#### N' line: {answer_field[-80:]!r}; pass "
            "the dataset's `answer` field, whose last line is '#### <number>'"
        )
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")
