"""What a task is: data (examples) + how to ask (prompt, answer format) + how to score.

A task never generates text; methods do. A task never scores by itself; it delegates to the one
scorer of its answer type in `diffmas.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

AnswerType = Literal["math", "choice", "code", "exact"]


@dataclass(frozen=True)
class Example:
    """One benchmark item, normalised across sources."""

    id: str  # stable id, unique within the task (resumable runs key on it)
    question: str  # the raw question / problem / code prompt
    answer: str | None = None  # gold: final math answer, or the correct option *label* (e.g. "B")
    choices: tuple[str, ...] = ()  # option texts, multiple choice only
    labels: tuple[str, ...] = ()  # option labels as shown to the model, same order as choices
    target: str | None = None  # a worked solution text usable as a training target, if the source has one
    tests: dict[str, Any] = field(default_factory=dict)  # code tasks: what the sandbox needs to run tests
    meta: dict[str, Any] = field(default_factory=dict)  # anything else from the source row
    # role name -> text only that role receives (its `{private}` template field); e.g. the secret a
    # sender holds in the communication tasks. Empty for ordinary benchmarks.
    private: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    correct: bool
    extracted: str | None  # what was read from the generation (None: no answer found)
    reason: str | None = None  # why it failed / was skipped (e.g. "no answer", "timeout")
    # strict-match beside the flexible extraction above, as lm-evaluation-harness reports both;
    # None where the scorer has no strict form
    extracted_strict: str | None = None
    correct_strict: bool | None = None
