"""The Task interface and the registry that maps task names to tasks.

A task is data plus three small behaviours (lm-evaluation-harness style): where its splits live
(`sources`), how a source row becomes an `Example` (`parse`), and how to ask and score (`prompt`,
`format_instruction`, `score`, `target_text`). Built-in tasks register with `@register_task`; the
answer-type families (math, multiple choice, code) live in `diffmas.tasks.families`.

    task = get_task("gsm8k")
    examples = task.load("test", limit=50)
    prompt = task.prompt(examples[0]) + "\\n\\n" + task.format_instruction
    score = task.score(examples[0], generated_text)

`get_task("jsonl:PATH?...")` builds a custom task from a JSONL file (see `diffmas.tasks.families`).
"""

from __future__ import annotations

import difflib
import random
import warnings
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from diffmas.tasks.base import AnswerType, Example, Score
from diffmas.tasks.data import Row, RowError, Source, TaskError, load_rows


class Task:
    """One benchmark. Subclasses set the class attributes and implement parse, prompt, score, target_text."""

    name: str  # registry key, e.g. "gsm8k"
    answer_type: AnswerType  # "math" | "choice" | "code": which scorer in diffmas.scoring applies
    format_instruction: str  # appended to the final agent's prompt: how to present the answer
    sources: Mapping[str, Source]  # split name -> where its rows live
    split_aliases: ClassVar[Mapping[str, str]] = {}  # requested split -> split read instead, with a warning
    alias_reason: ClassVar[str] = ""  # why `split_aliases` exist, shown in the warning

    # ------------------------------------------------------------------ data

    def load(
        self,
        split: str = "test",
        data_dir: str | Path | None = None,
        limit: int | None = None,
        seed: int | None = None,
    ) -> list[Example]:
        """The examples of one split, in file order.

        limit: keep the first `limit` rows; with `seed`, `limit` rows drawn at random (same seed, same
            rows; a larger limit keeps those of a smaller one), still in file order. `seed` without
            `limit` changes nothing.
        data_dir: directory holding the task's file; see `diffmas.tasks.data` for the search order.
        """
        check_limit(limit)
        split = self._resolve_split(split)
        source = self.sources[split]
        rows = load_rows(self.name, split, source, data_dir, demo_ok=source.demo_serves(limit, seed))
        return select_examples(self.parse_rows(rows, split), limit, seed)

    def parse_rows(self, rows: list[Row], split: str) -> list[Example]:
        """Parse the rows kept for `split`; a bad row or a repeated id is a TaskError naming file and line."""
        examples: list[Example] = []
        seen: dict[str, str] = {}
        for index, (where, row) in enumerate(rows):
            try:
                if not self.keep(row, split):
                    continue
                example = self.parse(row, index, split)
            except RowError as error:
                raise TaskError(f"{where}: {self.name}: {error}") from None
            if not example.question.strip():  # the agents would answer their own prompt templates
                raise TaskError(f"{where}: {self.name}: the question is empty; fill it in or remove the row")
            if example.id in seen:
                raise TaskError(f"{where}: {self.name}: id {example.id!r} already used at {seen[example.id]}")
            seen[example.id] = where
            examples.append(example)
        return examples

    def _resolve_split(self, split: str) -> str:
        if split in self.split_aliases:
            target = self.split_aliases[split]
            message = f"{self.name}: split {split!r} is read as {target!r}. {self.alias_reason}"
            warnings.warn(message, stacklevel=3)
            return target
        if split not in self.sources:
            valid = sorted({*self.sources, *self.split_aliases})
            raise TaskError(f"{self.name}: unknown split {split!r}; valid splits: {', '.join(valid)}")
        return split

    def keep(self, row: dict[str, Any], split: str) -> bool:
        """Whether a row belongs to `split` (for sources that keep several splits in one file)."""
        return True

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        """One source row -> Example. `index`: the row's position in its file. Raise RowError if unusable."""
        raise NotImplementedError

    # ------------------------------------------------------------------ asking and scoring

    def prompt(self, example: Example) -> str:
        """The question as given to the agents (without `format_instruction`)."""
        raise NotImplementedError

    def score(self, example: Example, text: str) -> Score:
        """Score a generation against the example's gold, via diffmas.scoring."""
        raise NotImplementedError

    def target_text(self, example: Example) -> str:
        """A supervised training target that ends in the answer format `score` reads."""
        raise NotImplementedError

    def topology(self, n_agents: int | None = None):
        """The roles this task brings (a `diffmas.roles.Topology`), or None for the defaults.

        Tasks whose agents hold different inputs (the communication tasks) need their own."""
        return None

    def configured(self, query: dict[str, str]) -> "Task":
        """This task with parameters (`name?key=value`); only parametrised tasks accept any."""
        raise TaskError(f"task {self.name!r} takes no parameters (got {query})")

    def option_texts(self, example: Example) -> list[str]:
        """Multiple choice only: the continuations to rank by likelihood."""
        raise TaskError(f"{self.name} is a {self.answer_type} task; option_texts is for multiple-choice")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.answer_type!r}, splits={sorted(self.sources)})"


def _parse_query(name: str, query: str) -> dict[str, str]:
    """key=value&key=value -> dict, or a TaskError naming the bad part."""
    pairs = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise TaskError(f"task {name!r}: expected key=value parameters after '?', got {part!r}")
        pairs[key] = value
    return pairs


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise TaskError(f"limit={limit!r}: expected a non-negative integer or None")


def select_examples(examples: list[Example], limit: int | None, seed: int | None) -> list[Example]:
    """The first `limit` examples, or with `seed` `limit` drawn at random; always in file order.

    The random draw is nested: all positions are shuffled with the seed and the first `limit` are
    kept, so a larger limit holds every example of a smaller one (a run grown with a larger
    --limit keeps its records). diffmas 0.1 drew `sorted(random.Random(seed).sample(range(n),
    limit))` instead, which picks other examples for the same seed (see docs/design.md).
    """
    if limit is None or limit >= len(examples):
        return examples
    if seed is None:
        return examples[:limit]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Task] = {}
CUSTOM_PREFIX = "jsonl:"

T = TypeVar("T")


def register_task(task: T) -> T:
    """Register a Task instance, or a Task subclass (instantiated without arguments); also a decorator."""
    instance = task() if isinstance(task, type) else task
    if not isinstance(instance, Task):
        raise TypeError(f"register_task expects a Task or Task subclass, got {type(instance).__name__}")
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not name or name.startswith(CUSTOM_PREFIX):
        raise ValueError(f"task name {name!r}: expected a non-empty string not starting {CUSTOM_PREFIX!r}")
    if name in _REGISTRY:
        raise ValueError(f"task {name!r} is already registered (by {type(_REGISTRY[name]).__name__})")
    _REGISTRY[name] = instance
    return task


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted (custom `jsonl:` tasks are built on demand, not listed)."""
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """The registered task `name`, or a custom task for `jsonl:PATH[?field=...&type=...]`."""
    if name.startswith(CUSTOM_PREFIX):
        from diffmas.tasks.families import jsonl_task_from_spec  # families imports this module

        return jsonl_task_from_spec(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    base, _, query = name.partition("?")
    if query and base in _REGISTRY:  # a parametrised task, e.g. relay_word?k=32
        return _REGISTRY[base].configured(_parse_query(name, query))
    close = difflib.get_close_matches(base, list(_REGISTRY), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise TaskError(
        f"unknown task {name!r}.{hint} Valid tasks: {', '.join(list_tasks())}, "
        f"or {CUSTOM_PREFIX}PATH for a custom JSONL file."
    )
