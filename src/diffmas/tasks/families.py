"""The built-in tasks, grouped by answer type, and custom JSONL tasks.

Each family (math, multiple choice, code) fixes how to ask, score and build a training target;
each benchmark only says where its data lives and how a row becomes an `Example`. Scoring is
delegated to `diffmas.scoring`, the one place that reads answers out of generations.

Example ids: the source's own id where it has one (ARC, CommonsenseQA, MATH-500, HumanEval, MBPP,
GPQA's Record ID), else ``"{split}-{row position}"`` (GSM8K, AIME 2025, MedQA).

Custom tasks, ``get_task("jsonl:PATH[?key=value&...]")`` or ``jsonl_task(PATH, **keys)``:

    jsonl:/data/mine.jsonl?type=math&question=prompt&answer=gold
    jsonl:/data/quiz_{split}.jsonl?type=choice&choices=options   # {split} is replaced by the split

* ``type``: ``math`` (default), ``choice`` or ``code``; ``name``: the name used in results
  (default: the whole spec).
* Field names, each defaulting to its key: ``question``, ``answer``, ``id``, ``target``,
  ``choices``, ``labels``, ``tests``, ``entry_point``. Required: ``question`` and, per type,
  ``answer`` (math), ``choices`` + ``answer`` (choice), ``tests`` (code). ``id`` (else
  ``"{split}-{line position}"``), ``target`` (a worked solution / reference code) and, for choice,
  ``labels`` (else A, B, C, ...) are used when the row has them.
* choice rows: ``choices`` is a list of option texts, a ``{label: text}`` dict (MedQA style) or
  ``{"text": [...], "label": [...]}`` (Hugging Face ARC style); ``answer`` is a label or the exact
  text of the correct option.
* code rows: ``tests`` is a list of ``assert`` lines (or one string of test code), run MBPP style
  after the generated code and shown in the prompt.
* A relative PATH is read from ``data_dir`` when given, else from the working directory; without
  ``{split}`` in PATH, every split reads the same file.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl

from diffmas import scoring
from diffmas.tasks.base import AnswerType, Example, Score
from diffmas.tasks.data import HubSource, RowError, Source, TaskError, get_field, read_jsonl
from diffmas.tasks.registry import CUSTOM_PREFIX, Task, check_limit, register_task, select_examples

MATH_INSTRUCTION = "Reason step by step and put the final answer inside \\boxed{}."
CHOICE_INSTRUCTION = "Answer with the letter of the correct option inside \\boxed{}, e.g. \\boxed{A}."
CODE_INSTRUCTION = "Write a self-contained Python function in a ```python code block."


def _boxed_sentence(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def _row_id(row: dict[str, Any], field: str | None, index: int, split: str) -> str:
    """The source's id if it has one, else the row's position in its split."""
    if field is not None and field in row:
        return str(get_field(row, field, (str, int)))
    return f"{split}-{index}"


# ============================================================================= math


class MathTask(Task):
    """Free-form answer (a number or an expression), scored by equivalence with math-verify."""

    answer_type: AnswerType = "math"
    format_instruction = MATH_INSTRUCTION

    def prompt(self, example: Example) -> str:
        return example.question

    def score(self, example: Example, text: str) -> Score:
        return scoring.score_math(text, example.answer)

    def target_text(self, example: Example) -> str:
        if not example.target:
            return _boxed_sentence(example.answer)
        # Keep a solution whose last \boxed{} is the gold (MATH-500's are); else say the answer at the end.
        last_box = example.target.rfind("\\boxed")
        if last_box >= 0 and example.target[last_box:].startswith(f"\\boxed{{{example.answer}}}"):
            return example.target
        return f"{example.target.rstrip()}\n{_boxed_sentence(example.answer)}"


def _math_example(
    row: dict[str, Any],
    index: int,
    split: str,
    *,
    id_field: str | None,
    target_field: str | None,
    meta_fields: tuple[str, ...] = (),
) -> Example:
    """MATH-500 / AIME layout: problem, answer, optional solution."""
    return Example(
        id=_row_id(row, id_field, index, split),
        question=get_field(row, "problem"),
        answer=str(get_field(row, "answer", (str, int))),
        target=row.get(target_field) if target_field else None,
        meta={k: row[k] for k in meta_fields if k in row},
    )


@register_task
class GSM8K(MathTask):
    name = "gsm8k"
    sources = {
        split: Source(
            files=(f"gsm8k_{split}.jsonl",),
            hub=HubSource("openai/gsm8k", "main", split),
            demo="gsm8k_demo.jsonl" if split == "test" else None,
            n_demo_rows=20 if split == "test" else 0,
        )
        for split in ("test", "train")
    }

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        solution = get_field(row, "answer")
        if "####" not in solution:
            raise RowError("field 'answer' has no '#### <final answer>' line")
        gold = scoring.gsm8k_gold(solution)
        return Example(
            id=f"{split}-{index}",
            question=get_field(row, "question"),
            answer=gold,
            target=_gsm8k_target(solution, gold),
        )


def _gsm8k_target(solution: str, gold: str) -> str:
    """The worked solution without its <<48/2=24>> calculator annotations, ending in \\boxed{gold}."""
    body = solution.rpartition("####")[0]
    body = re.sub(r"<<.*?>>", "", body).rstrip()
    return f"{body}\n{_boxed_sentence(gold)}"


@register_task
class MATH500(MathTask):
    name = "math500"
    sources = {
        "test": Source(files=("math500_test.jsonl",), hub=HubSource("HuggingFaceH4/MATH-500", None, "test")),
    }

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        return _math_example(
            row, index, split, id_field="unique_id", target_field="solution", meta_fields=("subject", "level")
        )


@register_task
class AIME24(MathTask):
    name = "aime24"
    sources = {
        "test": Source(files=("aime24_test.jsonl",), hub=HubSource("HuggingFaceH4/aime_2024", None, "train")),
    }

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        return _math_example(row, index, split, id_field="id", target_field="solution", meta_fields=("url",))


@register_task
class AIME25(MathTask):
    name = "aime25"
    sources = {"test": Source(files=("aime25_test.jsonl",), hub=HubSource("math-ai/aime25", None, "test"))}

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        # The local file has no ids and the hub copy's ids are its own, so both use row positions.
        return _math_example(row, index, split, id_field=None, target_field=None)


# ============================================================================= multiple choice


class ChoiceTask(Task):
    """Pick one option by its label; the prompt lists options as "A. text" with the row's own labels."""

    answer_type: AnswerType = "choice"
    format_instruction = CHOICE_INSTRUCTION

    def prompt(self, example: Example) -> str:
        options = "\n".join(f"{label}. {text}" for label, text in zip(example.labels, example.choices))
        return f"{example.question}\n{options}"

    def score(self, example: Example, text: str) -> Score:
        return scoring.score_choice(text, example.answer, example.labels, example.choices)

    def target_text(self, example: Example) -> str:
        text = example.choices[example.labels.index(example.answer)].strip().rstrip(".")
        return f"The correct option is {example.answer}: {text}. {_boxed_sentence(example.answer)}"

    def option_texts(self, example: Example) -> list[str]:
        return [" " + text for text in example.choices]


def _choice_example(
    example_id: str, question: str, choices: list, labels: list, answer: str, meta: dict | None = None
) -> Example:
    """Check the options and the gold label, then build the Example."""
    if len(choices) < 2 or len(choices) != len(labels):
        raise RowError(
            f"needs at least 2 options with one label each, got {len(choices)} options and {len(labels)} labels"
        )
    if not all(isinstance(x, str) for x in (*choices, *labels)):
        raise RowError("option texts and labels should be strings")
    if len(set(labels)) != len(labels):
        raise RowError(f"option labels repeat: {labels}")
    if answer not in labels:
        raise RowError(f"gold label {answer!r} is not one of the option labels {labels}")
    return Example(
        id=example_id, question=question, answer=answer, choices=tuple(choices), labels=tuple(labels), meta=meta or {}
    )


def _hf_choice_example(row: dict[str, Any], meta_fields: tuple[str, ...] = ()) -> Example:
    """ai2_arc / commonsense_qa layout: id, question, choices {text, label}, answerKey."""
    choices = get_field(row, "choices", dict)
    return _choice_example(
        example_id=str(get_field(row, "id")),
        question=get_field(row, "question"),
        choices=get_field(choices, "text", list),
        labels=get_field(choices, "label", list),
        answer=get_field(row, "answerKey"),
        meta={k: row[k] for k in meta_fields if k in row},
    )


class _ARC(ChoiceTask):
    # Some ARC rows are labelled 1-4 rather than A-D; they are shown and scored with their own labels.
    format_instruction = (
        "Answer with the label (letter or number) of the correct option inside \\boxed{}, e.g. \\boxed{A}."
    )

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        return _hf_choice_example(row)


def _arc_sources(file_prefix: str, hub_config: str) -> dict[str, Source]:
    return {
        split: Source(files=(f"{file_prefix}_{split}.jsonl",), hub=HubSource("allenai/ai2_arc", hub_config, split))
        for split in ("test", "train", "validation")
    }


@register_task
class ARCEasy(_ARC):
    name = "arc_easy"
    sources = _arc_sources("arc_easy", "ARC-Easy")


@register_task
class ARCChallenge(_ARC):
    name = "arc_challenge"
    sources = _arc_sources("arc_challenge", "ARC-Challenge")


@register_task
class CommonsenseQA(ChoiceTask):
    name = "commonsenseqa"
    sources = {
        split: Source(files=(f"commonsenseqa_{split}.jsonl",), hub=HubSource("tau/commonsense_qa", None, split))
        for split in ("train", "validation")
    }
    split_aliases = {"test": "validation"}
    alias_reason = "The official test split has no labels; validation (1221 rows) is the usual test set."

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        return _hf_choice_example(row, meta_fields=("question_concept",))


@register_task
class MedQA(ChoiceTask):
    name = "medqa"
    sources = {
        split: Source(files=(f"medqa_{split}.jsonl",), hub=HubSource("GBaker/MedQA-USMLE-4-options", None, split))
        for split in ("test", "train")
    }

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        options = get_field(row, "options", dict)
        answer = get_field(row, "answer_idx")
        if "answer" in row and answer in options and row["answer"] != options[answer]:
            raise RowError("field 'answer' differs from the text of option 'answer_idx'")
        return _choice_example(
            example_id=f"{split}-{index}",
            question=get_field(row, "question"),
            choices=list(options.values()),
            labels=list(options),
            answer=answer,
            meta={k: row[k] for k in ("meta_info",) if k in row},
        )


GPQA_ZIP_PASSWORD = b"deserted-untie-orchid"  # published in the idavidrein/gpqa README


@register_task
class GPQADiamond(ChoiceTask):
    name = "gpqa_diamond"
    sources = {
        "test": Source(
            files=("gpqa_diamond.csv", "dataset.zip"),
            hub=HubSource("Idavidrein/gpqa", "gpqa_diamond", "train"),  # gated: accept its terms, log in
            zip_member="dataset/gpqa_diamond.csv",
            zip_password=GPQA_ZIP_PASSWORD,
            how_to_get=("The official dataset.zip is in github.com/idavidrein/gpqa; never publish it unzipped."),
        )
    }

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        record_id = get_field(row, "Record ID")
        correct = get_field(row, "Correct Answer").strip()
        options = [correct] + [get_field(row, f"Incorrect Answer {i}").strip() for i in (1, 2, 3)]
        if len(set(options)) != 4:
            raise RowError("two of its four answers have the same text")
        # The source always lists the correct answer first: shuffle per question, seeded by its id,
        # so the order is the same on every machine and run.
        seed = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big")
        random.Random(seed).shuffle(options)
        labels = ["A", "B", "C", "D"]
        return _choice_example(
            example_id=record_id,
            question=get_field(row, "Question").strip(),
            choices=options,
            labels=labels,
            answer=labels[options.index(correct)],
            meta={k: row[k] for k in ("High-level domain", "Subdomain") if k in row},
        )


# ============================================================================= code


class CodeTask(Task):
    """Write code; scored by running the benchmark's tests on it in the sandbox of diffmas.scoring."""

    answer_type: AnswerType = "code"
    format_instruction = CODE_INSTRUCTION
    timeout_s: float = 10.0  # wall-clock limit for one program (all its tests)
    memory_mb: int = 1024  # address-space limit for the program

    def program(self, example: Example, code: str) -> str:
        """The generated code joined with the example's tests into one runnable program."""
        raise NotImplementedError

    def score(self, example: Example, text: str) -> Score:
        code = scoring.extract_code(text, example.tests.get("entry_point"))
        if not code.strip():
            return Score(correct=False, extracted=None, reason="no answer")
        program = self.program(example, code)
        score = scoring.score_code(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return dataclasses.replace(score, extracted=code)  # the code read, not the whole test program

    def target_text(self, example: Example) -> str:
        if not example.target:
            raise TaskError(f"{self.name}: example {example.id!r} has no reference solution to train on")
        return f"```python\n{example.target.strip()}\n```"


@register_task
class HumanEval(CodeTask):
    name = "humaneval"
    sources = {
        "test": Source(files=("humaneval_test.jsonl",), hub=HubSource("openai/openai_humaneval", None, "test")),
    }

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        prompt = get_field(row, "prompt")
        return Example(
            id=get_field(row, "task_id"),
            question=prompt,
            target=prompt + get_field(row, "canonical_solution"),  # the whole function, imports included
            tests={
                "prompt": prompt,
                "test": get_field(row, "test"),
                "entry_point": get_field(row, "entry_point"),
            },
        )

    def prompt(self, example: Example) -> str:
        return f"Complete the following Python function.\n```python\n{example.question.rstrip()}\n```"

    def program(self, example: Example, code: str) -> str:
        t = example.tests
        return scoring.humaneval_program(t["prompt"], code, t["test"], t["entry_point"])


class AssertTestsTask(CodeTask):
    """MBPP protocol: the task text plus its assert lines; the same asserts score the code."""

    def prompt(self, example: Example) -> str:
        tests = "\n".join(example.tests["test_list"])
        return f"{example.question}\nYour code should pass these tests:\n{tests}"

    def program(self, example: Example, code: str) -> str:
        t = example.tests
        return scoring.mbpp_program(code, t["test_list"], t.get("test_setup_code", ""))


# task_id ranges of the standard MBPP splits (Austin et al. 2021)
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


@register_task
class MBPP(AssertTestsTask):
    name = "mbpp"
    # mbpp.jsonl holds all 974 problems; the standard splits are task_id ranges of it.
    sources = {
        split: Source(files=("mbpp.jsonl",), hub=HubSource("google-research-datasets/mbpp", "full", split))
        for split in MBPP_SPLITS
    }

    def keep(self, row: dict[str, Any], split: str) -> bool:
        low, high = MBPP_SPLITS[split]
        return low <= get_field(row, "task_id", int) <= high

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        code = get_field(row, "code").replace("\r\n", "\n")
        test_list = get_field(row, "test_list", list)
        return Example(
            id=str(get_field(row, "task_id", int)),
            question=get_field(row, "text"),
            target=code,
            tests={
                "test_list": test_list,
                "test_setup_code": get_field(row, "test_setup_code").replace("\r\n", "\n"),
                "entry_point": _tested_function(code, test_list),
            },
        )


def _tested_function(code: str, test_list: list[str]) -> str | None:
    """The function of `code` that the tests call (MBPP rows do not name it); None if unclear."""
    try:
        with warnings.catch_warnings():  # MBPP code has old-style escapes ("\w") that warn when parsed
            warnings.simplefilter("ignore")
            defined = [node.name for node in ast.parse(code).body if isinstance(node, ast.FunctionDef)]
            called = {
                node.func.id
                for test in test_list
                for node in ast.walk(ast.parse(test))
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            }
    except SyntaxError:
        return None
    tested = [name for name in defined if name in called]
    return tested[0] if len(tested) == 1 else None


def _plus_inputs(row: dict[str, Any]) -> list:
    plus_input = get_field(row, "plus_input", (list, dict))
    if plus_input == {}:  # MBPP+ v0.1.0 writes Mbpp/793's empty input list as {}
        return []
    if isinstance(plus_input, dict):
        raise RowError("field 'plus_input' should be a list of argument lists, got a non-empty dict")
    return plus_input


@register_task
class MBPPPlus(CodeTask):
    name = "mbppplus"
    timeout_s = 60.0  # one program runs the reference and the candidate on ~100 inputs (Mbpp/599 takes 20-40 s)
    memory_mb = 4096  # evalplus default; Mbpp/255's reference needs > 2 GB
    sources = {
        "test": Source(
            files=("mbppplus_test.jsonl",),
            how_to_get=(
                "Get MbppPlus.jsonl from the evalplus releases (github.com/evalplus/evalplus/releases) and "
                "save it as mbppplus_test.jsonl; the hub copy evalplus/mbppplus has another layout "
                "(no input lists)."
            ),
        )
    }

    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        entry_point = get_field(row, "entry_point")
        canonical = get_field(row, "canonical_solution")
        assertion = get_field(row, "assertion").strip()
        return Example(
            id=get_field(row, "task_id"),
            question=get_field(row, "prompt").strip().strip("'\"").strip(),  # drop the docstring quotes
            target=canonical,
            tests={
                "entry_point": entry_point,
                "base_input": get_field(row, "base_input", list),
                "plus_input": _plus_inputs(row),
                "atol": get_field(row, "atol", (int, float)),
                "canonical_solution": canonical,
                "example_test": assertion.splitlines()[0] if assertion else "",
            },
        )

    def prompt(self, example: Example) -> str:
        # As evalplus does: the task text and its first base assertion, which names the function.
        return f"{example.question}\nYour code should pass this test:\n{example.tests['example_test']}"

    def program(self, example: Example, code: str) -> str:
        t = example.tests
        return scoring.mbppplus_program(
            code,
            t["entry_point"],
            t["base_input"],
            t["plus_input"],
            t["atol"],
            t["canonical_solution"],
            task_id=example.id,
        )


# ============================================================================= custom JSONL tasks

CUSTOM_FIELDS = ("question", "answer", "id", "target", "choices", "labels", "tests", "entry_point")


class _JsonlTask(Task):
    """Reading for custom tasks; `jsonl_task` mixes it into one family class per answer type."""

    path: str  # may contain {split}
    fields: Mapping[str, str]  # key of CUSTOM_FIELDS -> the row's field name
    sources: Mapping[str, Source] = {}

    def load(
        self, split: str = "test", data_dir: str | Path | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        check_limit(limit)
        path = Path(self.path.replace("{split}", split)).expanduser()
        if not path.is_absolute() and data_dir is not None:
            path = Path(data_dir).expanduser() / path
        if not path.is_file():
            raise TaskError(f"{self.name}: file {path} not found (split {split!r})")
        return select_examples(self.parse_rows(read_jsonl(path), split), limit, seed)

    def _get(self, row: dict[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
        return get_field(row, self.fields[key], kind)

    def _get_optional(self, row: dict[str, Any], key: str) -> Any:
        return self._get(row, key) if self.fields[key] in row else None

    def _id(self, row: dict[str, Any], index: int, split: str) -> str:
        return _row_id(row, self.fields["id"], index, split)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _JsonlMath(_JsonlTask, MathTask):
    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        return Example(
            id=self._id(row, index, split),
            question=self._get(row, "question"),
            answer=str(self._get(row, "answer", (str, int, float))),
            target=self._get_optional(row, "target"),
        )


class _JsonlChoice(_JsonlTask, ChoiceTask):
    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        choices, labels = self._options(row)
        answer = str(self._get(row, "answer", (str, int)))
        if answer not in labels and answer in choices:  # the answer given as the option's text
            answer = labels[choices.index(answer)]
        question = self._get(row, "question")
        return _choice_example(self._id(row, index, split), question, choices, labels, answer)

    def _options(self, row: dict[str, Any]) -> tuple[list, list]:
        choices = self._get(row, "choices", (list, dict))
        if isinstance(choices, dict) and set(choices) == {"text", "label"}:  # Hugging Face ARC layout
            return list(choices["text"]), list(choices["label"])
        if isinstance(choices, dict):  # {label: text}
            return list(choices.values()), list(choices)
        if self.fields["labels"] in row:
            return choices, list(self._get(row, "labels", list))
        if len(choices) > 26:
            raise RowError(f"{len(choices)} options and no labels field: A-Z runs out")
        return choices, [chr(ord("A") + i) for i in range(len(choices))]


class _JsonlCode(_JsonlTask, AssertTestsTask):
    def parse(self, row: dict[str, Any], index: int, split: str) -> Example:
        tests = self._get(row, "tests", (list, str))
        return Example(
            id=self._id(row, index, split),
            question=self._get(row, "question"),
            target=self._get_optional(row, "target"),
            tests={
                "test_list": [tests] if isinstance(tests, str) else tests,
                "entry_point": self._get_optional(row, "entry_point"),
            },
        )


_JSONL_CLASSES: dict[str, type[_JsonlTask]] = {"math": _JsonlMath, "choice": _JsonlChoice, "code": _JsonlCode}


def jsonl_task(path: str | Path, answer_type: str = "math", name: str | None = None, **fields: str) -> Task:
    """A custom task over a JSONL file (see the module docstring).

    fields: keys of CUSTOM_FIELDS mapped to the file's field names, e.g. question="prompt".
    name: the task's name in results; defaults to "jsonl:PATH".
    """
    if answer_type not in _JSONL_CLASSES:
        raise TaskError(f"custom task type {answer_type!r}: expected one of {', '.join(_JSONL_CLASSES)}")
    unknown = sorted(set(fields) - set(CUSTOM_FIELDS))
    if unknown:
        raise TaskError(
            f"custom task: unknown field key(s) {unknown}; valid keys: type, name, {', '.join(CUSTOM_FIELDS)}"
        )
    task = _JSONL_CLASSES[answer_type]()
    task.path = str(path)
    task.fields = {key: fields.get(key, key) for key in CUSTOM_FIELDS}
    task.name = name or f"{CUSTOM_PREFIX}{path}"
    return task


def jsonl_task_from_spec(spec: str) -> Task:
    """Parse ``jsonl:PATH[?key=value&...]`` (see the module docstring)."""
    path, _, query = spec[len(CUSTOM_PREFIX) :].partition("?")
    if not path:
        raise TaskError(f"custom task {spec!r}: no path; expected {CUSTOM_PREFIX}PATH[?question=...&type=math]")
    try:
        pairs = parse_qsl(query, strict_parsing=bool(query))
    except ValueError:
        raise TaskError(
            f"custom task {spec!r}: cannot read {query!r}; expected key=value pairs joined by '&'"
        ) from None
    options = dict(pairs)
    if len(options) != len(pairs):
        raise TaskError(f"custom task {spec!r}: a key is given twice")
    answer_type = options.pop("type", "math")
    name = options.pop("name", spec)
    return jsonl_task(path, answer_type=answer_type, name=name, **options)
