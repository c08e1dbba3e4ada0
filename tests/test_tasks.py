"""Task registry and loaders: counts, ids, labels, prompts, targets, custom tasks, errors, GPQA zip.

Reads the shared benchmark files (../shared/data next to the repository, or $DIFFMAS_DATA_DIR);
tests whose file is absent are skipped. No network: HF_HUB_OFFLINE=1 throughout.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from diffmas.tasks import Example, TaskError, get_task, jsonl_task, list_tasks, register_task
from diffmas.tasks.families import GPQA_ZIP_PASSWORD

DATA_DIR = Path(os.environ.get("DIFFMAS_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")

# (task, split, rows, file) as in shared/data/README.md
COUNTS = [
    ("gsm8k", "test", 1319, "gsm8k_test.jsonl"),
    ("gsm8k", "train", 7473, "gsm8k_train.jsonl"),
    ("math500", "test", 500, "math500_test.jsonl"),
    ("aime24", "test", 30, "aime24_test.jsonl"),
    ("aime25", "test", 30, "aime25_test.jsonl"),
    ("arc_easy", "test", 2376, "arc_easy_test.jsonl"),
    ("arc_easy", "train", 2251, "arc_easy_train.jsonl"),
    ("arc_challenge", "test", 1172, "arc_challenge_test.jsonl"),
    ("arc_challenge", "train", 1119, "arc_challenge_train.jsonl"),
    ("commonsenseqa", "train", 9741, "commonsenseqa_train.jsonl"),
    ("commonsenseqa", "validation", 1221, "commonsenseqa_validation.jsonl"),
    ("medqa", "test", 1273, "medqa_test.jsonl"),
    ("humaneval", "test", 164, "humaneval_test.jsonl"),
    ("mbpp", "test", 500, "mbpp.jsonl"),
    ("mbppplus", "test", 399, "mbppplus_test.jsonl"),
    ("gpqa_diamond", "test", 198, "gpqa_diamond.csv"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFMAS_HOME", str(tmp_path / "home"))  # GPQA unpacks here, never in the repo


def require(*names: str) -> None:
    for name in names:
        if not (DATA_DIR / name).is_file():
            pytest.skip(f"{name} not in {DATA_DIR}")


def load(name: str, split: str = "test", **kwargs) -> list[Example]:
    return get_task(name).load(split, data_dir=DATA_DIR, **kwargs)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_task():
    assert list_tasks() == sorted(
        [
            "gsm8k",
            "math500",
            "aime24",
            "aime25",
            "gpqa_diamond",
            "arc_easy",
            "arc_challenge",
            "commonsenseqa",
            "medqa",
            "humaneval",
            "mbpp",
            "mbppplus",
            "relay_word",
            "relay_code",
            "relay_chain",
            "relay_sum",
        ]
    )
    for name in list_tasks():
        task = get_task(name)
        assert task.name == name and task.answer_type in ("math", "choice", "code", "exact")
        assert task.format_instruction


def test_unknown_task_suggests_close_names():
    with pytest.raises(TaskError, match="Did you mean 'gsm8k'") as info:
        get_task("gsm8kk")
    assert "arc_easy" in str(info.value)  # lists the valid names


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_task(type(get_task("gsm8k")))


def test_unknown_split_lists_valid_ones():
    with pytest.raises(TaskError, match="valid splits: test"):
        get_task("math500").load("dev", data_dir=DATA_DIR)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(("name", "split", "n_rows", "file"), COUNTS, ids=[f"{c[0]}-{c[1]}" for c in COUNTS])
def test_every_task_loads_with_its_row_count(name, split, n_rows, file):
    require(file)
    examples = load(name, split)
    assert len(examples) == n_rows
    assert len({e.id for e in examples}) == n_rows
    assert all(e.question.strip() for e in examples)
    task = get_task(name)
    if task.answer_type == "choice":
        assert all(e.answer in e.labels and len(e.labels) == len(e.choices) for e in examples)
    elif task.answer_type == "math":
        assert all(e.answer for e in examples)
    else:
        assert all(e.target and e.tests for e in examples)


def test_arc_keeps_numeric_labels_and_odd_option_counts():
    require("arc_easy_test.jsonl")
    examples = load("arc_easy")
    numeric = [e for e in examples if e.labels == ("1", "2", "3", "4")]
    assert len(numeric) == 97 and all(e.answer in e.labels for e in numeric)
    assert sum(len(e.choices) == 5 for e in examples) == 4
    assert sum(len(e.choices) == 3 for e in examples) == 7
    prompt = get_task("arc_easy").prompt(numeric[0])
    assert prompt.startswith(numeric[0].question + "\n1. ")
    assert prompt.splitlines()[-1] == f"4. {numeric[0].choices[3]}"


def test_choice_prompt_lists_options_with_their_labels():
    require("arc_challenge_test.jsonl")
    task = get_task("arc_challenge")
    example = load("arc_challenge", limit=1)[0]
    assert task.prompt(example) == (
        "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\n"
        "A. Planetary density will decrease.\n"
        "B. Planetary years will become longer.\n"
        "C. Planetary days will become shorter.\n"
        "D. Planetary gravity will become stronger."
    )
    assert task.option_texts(example)[2] == " Planetary days will become shorter."
    assert "\\boxed{}" in task.format_instruction


def test_option_texts_is_for_choice_tasks_only():
    with pytest.raises(TaskError, match="multiple-choice"):
        get_task("math500").option_texts(Example(id="x", question="q", answer="1"))


def test_medqa_options_come_from_the_dict():
    require("medqa_test.jsonl")
    example = load("medqa", limit=1)[0]
    assert example.labels == ("A", "B", "C", "D") and example.answer == "B"
    assert example.choices[1] == "Tell the attending that he cannot fail to disclose this mistake"


def test_commonsenseqa_test_reads_validation_with_a_warning():
    require("commonsenseqa_validation.jsonl")
    with pytest.warns(UserWarning, match="'test' is read as 'validation'"):
        examples = load("commonsenseqa", "test")
    assert len(examples) == 1221


def test_mbpp_test_split_is_task_ids_11_to_510():
    require("mbpp.jsonl")
    examples = load("mbpp")
    assert [int(e.id) for e in examples] == list(range(11, 511))
    assert sum(e.tests["entry_point"] is not None for e in examples) >= 490
    assert "Your code should pass these tests:\nassert " in get_task("mbpp").prompt(examples[0])


def test_mbppplus_prompt_names_the_function():
    require("mbppplus_test.jsonl")
    example = load("mbppplus", limit=1)[0]
    assert get_task("mbppplus").prompt(example) == (
        "Write a function to find the shared elements from the given two lists.\n"
        "Your code should pass this test:\n"
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)"
    )


def test_limit_and_seed():
    require("math500_test.jsonl")
    everything = load("math500")
    assert load("math500", limit=5) == everything[:5]
    sample = load("math500", limit=10, seed=0)
    assert sample == load("math500", limit=10, seed=0)  # reproducible
    assert sample != everything[:10] and sample != load("math500", limit=10, seed=1)
    positions = [everything.index(e) for e in sample]
    assert positions == sorted(positions)  # file order
    assert load("math500", limit=0) == []
    with pytest.raises(TaskError, match="limit=-1"):
        load("math500", limit=-1)


# ----------------------------------------------------------------------------- targets


def test_gsm8k_target_text_is_the_cleaned_solution():
    require("gsm8k_test.jsonl")
    task = get_task("gsm8k")
    example = load("gsm8k", limit=1)[0]
    assert example.id == "test-0" and example.answer == "18"
    assert task.target_text(example) == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\n"
        "The answer is \\boxed{18}."
    )


def test_arc_and_code_target_texts():
    require("arc_challenge_test.jsonl", "humaneval_test.jsonl", "mbpp.jsonl")
    arc = get_task("arc_challenge")
    assert arc.target_text(load("arc_challenge", limit=1)[0]) == (
        "The correct option is C: Planetary days will become shorter. The answer is \\boxed{C}."
    )
    humaneval = load("humaneval", limit=1)[0]
    target = get_task("humaneval").target_text(humaneval)
    assert target.startswith("```python\nfrom typing import List\n") and target.endswith("return False\n```")
    assert "def has_close_elements(" in target
    mbpp = get_task("mbpp").target_text(load("mbpp", limit=1)[0])
    assert mbpp.startswith("```python\n") and "\r" not in mbpp


def test_gsm8k_targets_score_correct():
    require("gsm8k_test.jsonl")
    task = get_task("gsm8k")
    wrong = [e.id for e in load("gsm8k") if not task.score(e, task.target_text(e)).correct]
    assert wrong == []


@pytest.mark.parametrize("name", ["math500", "aime24", "aime25"])
def test_math_targets_score_correct(name):
    task = get_task(name)
    require(task.sources["test"].files[0])
    wrong = [e.id for e in load(name) if not task.score(e, task.target_text(e)).correct]
    assert wrong == []


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_train_targets_score_correct(name):
    require(f"{name}_train.jsonl")
    task = get_task(name)
    wrong = [e.id for e in load(name, "train") if not task.score(e, task.target_text(e)).correct]
    assert wrong == []


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        ("humaneval", ["HumanEval/0", "HumanEval/32", "HumanEval/163"]),
        ("mbpp", ["11", "510"]),
        ("mbppplus", ["Mbpp/2"]),
    ],
)
def test_canonical_solutions_score_correct(name, ids):
    task = get_task(name)
    require(task.sources["test"].files[0])
    examples = {e.id: e for e in load(name)}
    for example_id in ids:
        score = task.score(examples[example_id], task.target_text(examples[example_id]))
        assert score.correct, (example_id, score)


# ----------------------------------------------------------------------------- data resolution


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(TaskError, match="math500_test.jsonl not found in") as info:
        get_task("math500").load(data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_no_data_anywhere_names_file_env_and_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    with pytest.raises(TaskError) as info:
        get_task("math500").load()
    message = str(info.value)
    for part in ("math500_test.jsonl", "DIFFMAS_DATA_DIR", str(tmp_path), "HuggingFaceH4/MATH-500", "HF_HUB_OFFLINE"):
        assert part in message


def test_env_data_dir_is_used(monkeypatch):
    require("aime25_test.jsonl")
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(DATA_DIR))
    assert len(get_task("aime25").load()) == 30


def test_shipped_demo_serves_small_gsm8k_requests_only(monkeypatch):
    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)
    task = get_task("gsm8k")
    demo = task.load("test", limit=20)
    assert [e.id for e in demo] == [f"test-{i}" for i in range(20)]
    if (DATA_DIR / "gsm8k_test.jsonl").is_file():
        assert demo == load("gsm8k", limit=20)
    for kwargs in ({"limit": 21}, {"limit": 5, "seed": 0}, {}):
        with pytest.raises(TaskError, match="gsm8k_test.jsonl"):
            task.load("test", **kwargs)


# ----------------------------------------------------------------------------- malformed rows


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "math500_test.jsonl"
    good = '{"problem": "1+1?", "answer": "2", "unique_id": "a"}'
    path.write_text(good + '\n\n{"problem": "2+2?", "answer": \n')  # line 2 is blank, line 3 is cut off
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}:3: not valid JSON"):
        get_task("math500").load(data_dir=tmp_path)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "math500_test.jsonl"
    write_jsonl(path, [{"problem": "1+1?", "answer": "2", "unique_id": "a"}, {"problem": "2+2?", "unique_id": "b"}])
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}:2: math500: missing field 'answer'"):
        get_task("math500").load(data_dir=tmp_path)


def test_bad_gold_label_and_duplicate_ids_are_errors(tmp_path):
    row = {"id": "q1", "question": "?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "C"}
    (tmp_path / "arc_easy_test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(TaskError, match=r"arc_easy_test.jsonl:1: arc_easy: gold label 'C' is not one of"):
        get_task("arc_easy").load(data_dir=tmp_path)
    row["answerKey"] = "B"
    (tmp_path / "arc_easy_test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(TaskError, match=r":2: arc_easy: id 'q1' already used at .*:1"):
        get_task("arc_easy").load(data_dir=tmp_path)


# ----------------------------------------------------------------------------- custom JSONL tasks


def test_custom_math_task_with_field_mapping(tmp_path):
    rows = [{"prompt": "1+1?", "gold": 2}, {"prompt": "2+3?", "gold": "5", "id": 7}]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    task = get_task(f"jsonl:{path}?question=prompt&answer=gold&type=math")
    assert task.name == f"jsonl:{path}?question=prompt&answer=gold&type=math" and task.answer_type == "math"
    examples = task.load()
    assert [(e.id, e.question, e.answer) for e in examples] == [("test-0", "1+1?", "2"), ("7", "2+3?", "5")]
    assert task.target_text(examples[0]) == "The answer is \\boxed{2}."
    assert task.score(examples[1], "so \\boxed{5}").correct
    assert not task.score(examples[1], "so \\boxed{6}").correct


def test_custom_choice_task_layouts_and_split_placeholder(tmp_path):
    write_jsonl(
        tmp_path / "quiz_test.jsonl",
        [
            {"q": "Sky?", "options": ["blue", "green"], "answer": "A"},
            {"q": "Grass?", "options": {"X": "blue", "Y": "green"}, "answer": "green"},
            {"q": "Sun?", "options": {"text": ["hot", "cold"], "label": ["1", "2"]}, "answer": "1"},
        ],
    )
    task = jsonl_task("quiz_{split}.jsonl", answer_type="choice", question="q", choices="options")
    examples = task.load("test", data_dir=tmp_path)
    assert [(e.labels, e.answer) for e in examples] == [
        (("A", "B"), "A"),
        (("X", "Y"), "Y"),
        (("1", "2"), "1"),
    ]
    assert task.prompt(examples[1]) == "Grass?\nX. blue\nY. green"
    with pytest.raises(TaskError, match="quiz_train.jsonl not found"):
        task.load("train", data_dir=tmp_path)


def test_custom_code_task(tmp_path):
    row = {
        "question": "Write add(a, b).",
        "tests": ["assert add(1, 2) == 3"],
        "target": "def add(a, b):\n    return a + b",
    }
    task = get_task(f"jsonl:{write_jsonl(tmp_path / 'code.jsonl', [row])}?type=code")
    example = task.load()[0]
    assert task.prompt(example) == ("Write add(a, b).\nYour code should pass these tests:\nassert add(1, 2) == 3")
    assert task.score(example, task.target_text(example)).correct
    wrong = task.score(example, "```python\ndef add(a, b):\n    return a - b\n```")
    assert not wrong.correct and "return a - b" in wrong.extracted


def test_custom_task_errors(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}])
    with pytest.raises(TaskError, match="unknown field key"):
        get_task(f"jsonl:{path}?questoin=prompt")
    with pytest.raises(TaskError, match="custom task type 'essay'"):
        get_task(f"jsonl:{path}?type=essay")
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}:1: .*missing field 'answer'"):
        get_task(f"jsonl:{path}").load()
    with pytest.raises(TaskError, match="not found"):
        get_task(f"jsonl:{tmp_path / 'absent.jsonl'}").load()


# ----------------------------------------------------------------------------- GPQA-Diamond

GPQA_FIELDS = [
    "Record ID",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "High-level domain",
    "Subdomain",
]


def write_fake_gpqa(directory: Path, n_rows: int = 6) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gpqa_diamond.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=GPQA_FIELDS)
        writer.writeheader()
        for i in range(n_rows):
            writer.writerow(
                {
                    "Record ID": f"rec{i}",
                    "Question": f"Fake question {i}?\nSecond line.",
                    "Correct Answer": f"right {i}",
                    "Incorrect Answer 1": f"wrong {i}a",
                    "Incorrect Answer 2": f"wrong {i}b",
                    "Incorrect Answer 3": f"wrong {i}c",
                    "High-level domain": "Physics",
                    "Subdomain": "Fake",
                }
            )
    return path


def make_password_zip(tmp_path: Path, password: bytes) -> Path:
    """dataset.zip holding dataset/gpqa_diamond.csv, encrypted as the official one (ZipCrypto)."""
    if shutil.which("zip") is None:
        pytest.skip("the `zip` CLI is not installed; Python's zipfile cannot write encrypted archives")
    staging = tmp_path / "staging"
    write_fake_gpqa(staging / "dataset")
    out = tmp_path / "zipdir"
    out.mkdir()
    command = ["zip", "-q", "-P", password.decode(), str(out / "dataset.zip"), "dataset/gpqa_diamond.csv"]
    subprocess.run(command, cwd=staging, check=True)
    return out


def check_gpqa(examples: list[Example]) -> None:
    assert [e.id for e in examples] == [f"rec{i}" for i in range(6)]
    for i, e in enumerate(examples):
        assert e.labels == ("A", "B", "C", "D") and e.choices[e.labels.index(e.answer)] == f"right {i}"
        assert sorted(e.choices) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
    assert len({e.answer for e in examples}) > 1  # shuffled: the correct answer is not always first


def test_gpqa_from_a_password_zip(tmp_path):
    zip_dir = make_password_zip(tmp_path, GPQA_ZIP_PASSWORD)
    task = get_task("gpqa_diamond")
    examples = task.load(data_dir=zip_dir)
    check_gpqa(examples)
    assert task.load(data_dir=zip_dir) == examples  # same shuffle every time (seeded by record id)
    assert sorted(p.name for p in zip_dir.iterdir()) == ["dataset.zip"]  # nothing unpacked next to it
    cached = list((tmp_path / "home" / "data").iterdir())
    assert len(cached) == 1 and stat.S_IMODE(cached[0].stat().st_mode) == 0o600


def test_gpqa_zip_with_a_wrong_password_is_a_clear_error(tmp_path):
    zip_dir = make_password_zip(tmp_path, b"not-the-password")
    with pytest.raises(TaskError, match="cannot decrypt dataset/gpqa_diamond.csv"):
        get_task("gpqa_diamond").load(data_dir=zip_dir)


def test_gpqa_from_a_plain_csv_matches_the_zip(tmp_path):
    csv_dir = tmp_path / "csv"
    write_fake_gpqa(csv_dir)
    examples = get_task("gpqa_diamond").load(data_dir=csv_dir)
    check_gpqa(examples)
    if shutil.which("zip"):
        zip_dir = make_password_zip(tmp_path, GPQA_ZIP_PASSWORD)
        assert get_task("gpqa_diamond").load(data_dir=zip_dir) == examples
