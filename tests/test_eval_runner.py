"""`evaluate` and `diffmas eval` on a tiny saved model: the run directory contract, resuming (also
after SIGKILL), settings conflicts, data errors, skipped over-long prompts, k samples, and a
2-process sharded run that must equal the 1-process one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffmas.errors import DiffmasError
from diffmas.evaluate.runner import EvalConfig, RunConflictError, build_method, evaluate
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig
from diffmas.tasks.data import TaskError

from conftest import make_model, make_tokenizer

N_CTX = 1536  # fits the 4-agent trace of a short question (~1150 positions), not a 1500-character one
N_CHOICE = 12
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}  # conftest set OMP_NUM_THREADS=1 for subprocesses too


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    model = make_model(tied=False)
    model.config.max_position_embeddings = N_CTX  # rotary positions do not depend on it; the trace limit does
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    choice = [
        {
            "id": f"q{i}",
            "question": f"Which number comes after {i}?",
            "choices": [str(i + 1), str(i + 2), str(i)],
            "answer": "ABC"[i % 3],
        }
        for i in range(N_CHOICE)
    ]
    math = [
        {"id": "short-1", "question": "What is 1+1?", "answer": "2"},
        {"id": "long", "question": "How many words follow? " + "word " * 300, "answer": "300"},
        {"id": "short-2", "question": "What is 2+3?", "answer": "5"},
    ]
    return {"choice": write_jsonl(root / "choice.jsonl", choice), "math": write_jsonl(root / "math.jsonl", math)}


def choice_config(model_dir, data, **settings) -> EvalConfig:
    """The settings of `cli_args` below (the SIGKILL test checks that both give the same config.json)."""
    decode = DecodeConfig(max_new_tokens=settings.pop("max_new_tokens", 128))
    return EvalConfig(
        **{
            "task": f"jsonl:{data['choice']}?type=choice",
            "model": str(model_dir),
            "batch_size": 1,
            "method_config": MethodConfig(latent_steps=2, decode=decode),
            **settings,
        }
    )


def cli_args(model_dir, data, out) -> list[str]:
    return [
        "eval",
        "--task",
        f"jsonl:{data['choice']}?type=choice",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--latent-steps",
        "2",
        "--max-new-tokens",
        "128",
        "--batch-size",
        "1",
    ]


def cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffmas", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_same_answers(records: list[dict], expected: list[dict], tol: float = 1e-5) -> None:
    """Same questions, answers and option likelihoods; timing and memory fields are ignored."""
    assert [(r["id"], r["sample"]) for r in records] == [(r["id"], r["sample"]) for r in expected]
    for got, want in zip(records, expected):
        for key in ("status", "text", "extracted", "correct"):
            assert got[key] == want[key], (got["id"], key)
        if "option_likelihood" in want:
            g, w = got["option_likelihood"], want["option_likelihood"]
            assert (g["pred"], g["correct"], g["pred_norm"]) == (w["pred"], w["correct"], w["pred_norm"]), got["id"]
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=tol), got["id"]


class CountingMethod:
    """A built method that records the questions it is asked (to prove a resume recomputes nothing)."""

    def __init__(self, method):
        self.method, self.questions = method, []

    def __getattr__(self, name):
        return getattr(self.method, name)

    def run_batch(self, questions, *args, **kwargs):
        self.questions += list(questions)
        return self.method.run_batch(questions, *args, **kwargs)


@pytest.fixture(scope="module")
def reference(model_dir, data, tmp_path_factory) -> Path:
    """One uninterrupted run of the choice task, shared by the tests below (read, never changed)."""
    out = tmp_path_factory.mktemp("reference")
    evaluate(choice_config(model_dir, data), out, progress=False)
    return out


# ----------------------------------------------------------------------------- the run directory


def test_run_directory_contract(reference):
    config = read_json(reference / "config.json")
    assert config["eval"]["method_config"]["latent_steps"] == 2
    assert config["versions"]["diffmas"] and config["versions"]["torch"]
    assert "git_commit" in config
    records = read_records(reference)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(N_CHOICE)]  # one per id, question order
    for r in records:
        assert r["status"] == "ok" and r["sample"] == 0
        assert len(r["option_likelihood"]["logprobs"]) == 3 and r["option_likelihood"]["labels"] == ["A", "B", "C"]
        assert [a["n_latent_steps"] for a in r["agents"]] == [2, 2, 2, 0]
    summary = read_json(reference / "summary.json")
    assert (summary["n_questions"], summary["n_records"], summary["n_skipped"]) == (N_CHOICE, N_CHOICE, 0)
    assert summary["n_option_questions"] == N_CHOICE and summary["latent_steps"] == 2
    option_acc = sum(r["option_likelihood"]["correct"] for r in records) / N_CHOICE
    assert summary["option_accuracy"] == pytest.approx(option_acc)


def test_rerun_resumes_without_recomputing(reference, model_dir, data, tmp_path):
    config = choice_config(model_dir, data)
    method = CountingMethod(build_method(config))
    before = (reference / "samples.jsonl").read_bytes()
    # A finished run: nothing is asked again, also with another batch size (a runtime-only setting).
    evaluate(config, reference, method=method, progress=False)
    evaluate(replace(config, batch_size=4), reference, method=method, progress=False)
    assert method.questions == []
    assert (reference / "samples.jsonl").read_bytes() == before
    # A run cut after 8 records: only the last 4 questions are run, and the result is the same.
    out = tmp_path / "cut"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    (out / "samples.jsonl").write_text("".join(line + "\n" for line in before.decode().splitlines()[:8]))
    summary = evaluate(replace(config, batch_size=4), out, method=method, progress=False)
    assert len(method.questions) == 4
    assert_same_answers(read_records(out), read_records(reference))
    assert summary["accuracy"] == read_json(reference / "summary.json")["accuracy"]


def test_sigkill_mid_run_then_restart(reference, model_dir, data, tmp_path):
    out = tmp_path / "killed"
    samples = out / "samples.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffmas", *cli_args(model_dir, data, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    deadline = time.monotonic() + 120
    try:
        while not (samples.is_file() and samples.read_bytes().count(b"\n") >= 3):
            if proc.poll() is not None:
                pytest.fail(f"eval exited with {proc.returncode} before 3 records: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("eval wrote fewer than 3 records in 120 s")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()  # no-op when already dead
        proc.wait()
        proc.stderr.close()
    n_done = samples.read_bytes().count(b"\n")
    assert n_done < N_CHOICE and not (out / "summary.json").exists(), "the run finished before it was killed"
    with open(samples, "a") as f:
        f.write('{"id": "x')  # a write cut short by the kill

    proc = cli(*cli_args(model_dir, data, out))
    assert proc.returncode == 0, proc.stderr
    assert read_json(out / "config.json")["eval"] == read_json(reference / "config.json")["eval"]
    records = read_records(out)
    assert len({(r["id"], r["sample"]) for r in records}) == len(records) == N_CHOICE
    assert_same_answers(records, read_records(reference))
    summary, expected = read_json(out / "summary.json"), read_json(reference / "summary.json")
    for key in ("n_questions", "n_records", "accuracy", "option_accuracy", "option_accuracy_norm"):
        assert summary[key] == expected[key], key


# ----------------------------------------------------------------------------- refused settings and data


def test_changed_setting_conflicts_but_batch_size_does_not(reference, model_dir, data):
    changed = replace(
        choice_config(model_dir, data),
        method_config=MethodConfig(latent_steps=3, decode=DecodeConfig(max_new_tokens=128)),
    )
    with pytest.raises(RunConflictError) as info:
        evaluate(changed, reference, progress=False)
    message = str(info.value)
    assert str(reference) in message and "--out" in message
    assert "method_config.latent_steps: " in message and "-> 3" in message  # the nested setting, both values
    # batch size alone is no conflict (and a finished run needs no model)
    summary = evaluate(replace(choice_config(model_dir, data), batch_size=7), reference, progress=False)
    assert summary["n_records"] == N_CHOICE


def test_run_saved_before_a_setting_existed_still_resumes(reference, model_dir, data, tmp_path):
    """A setting added in a later version (absent from an old config.json) counts as its default."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(reference, old)
    saved = read_json(old / "config.json")
    del saved["eval"]["method_config"]["decode"]["ignore_eos"], saved["eval"]["method_config"]["chat_kwargs"]
    (old / "config.json").write_text(json.dumps(saved))
    assert evaluate(choice_config(model_dir, data), old, progress=False)["n_records"] == N_CHOICE
    config = choice_config(model_dir, data)
    changed = replace(config, method_config=replace(config.method_config, chat_kwargs={"x": 1}))
    with pytest.raises(RunConflictError, match=r"settings \(method_config.chat_kwargs.x: None -> 1\)"):
        evaluate(changed, old, progress=False)


def test_resume_keeps_the_dtype_its_records_were_computed_in(reference, model_dir, data, tmp_path):
    """config.json records the dtype the model was loaded in ("auto" depends on the machine, the
    model and the version). Adding records in another dtype is refused, naming the one to resume
    with; a finished run needs no model and reports in any."""
    config = choice_config(model_dir, data, limit=N_CHOICE - 2)
    method = build_method(config)
    now = str(method.backbone.dtype).removeprefix("torch.")
    assert read_json(reference / "config.json")["dtype"] == read_json(reference / "summary.json")["dtype"] == now
    other = "float32" if now == "bfloat16" else "bfloat16"
    run = tmp_path / "other"
    evaluate(replace(config, dtype=other), run, progress=False)
    assert read_json(run / "config.json")["dtype"] == other
    grown = replace(config, limit=N_CHOICE)
    with pytest.raises(
        RunConflictError, match=f"computed in {other} and this model is loaded in {now}; resume with --dtype {other}"
    ):
        evaluate(grown, run, method=method, progress=False)
    assert (
        evaluate(replace(config, dtype=other), run, progress=False)["n_records"] == N_CHOICE - 2
    )  # finished: no model
    # Saved before the dtype was recorded: "auto" meant fp32 on every CPU then.
    legacy = tmp_path / "legacy"
    evaluate(replace(config, dtype="float32"), legacy, progress=False)
    saved = read_json(legacy / "config.json")
    del saved["dtype"]
    saved["eval"]["dtype"] = "auto"
    (legacy / "config.json").write_text(json.dumps(saved))
    fp32 = build_method(replace(config, dtype="float32"))
    if now == "bfloat16":
        with pytest.raises(RunConflictError, match="computed in float32 and this model is loaded in bfloat16"):
            evaluate(grown, legacy, method=method, progress=False)
    assert evaluate(grown, legacy, method=fp32, progress=False)["n_records"] == N_CHOICE
    assert read_json(legacy / "config.json")["dtype"] == "float32"  # recorded from then on


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"question": "What is 2+2?", "answer": ', "not valid JSON"),
        ('{"question": "What is 2+2?"}', "answer"),
    ],
)
def test_malformed_row_names_file_and_line_and_writes_nothing(model_dir, tmp_path, bad_line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "What is 1+1?", "answer": "2"}\n' + bad_line + "\n")
    out = tmp_path / "run"
    with pytest.raises(TaskError) as info:
        evaluate(EvalConfig(task=f"jsonl:{path}?type=math", model=str(model_dir)), out, progress=False)
    assert f"{path}:2" in str(info.value) and problem in str(info.value)
    assert not out.exists()


def test_unknown_task_is_one_line_with_a_suggestion(model_dir, tmp_path):
    out = tmp_path / "run"
    proc = cli("eval", "--task", "gsm8kk", "--model", str(model_dir), "--out", str(out))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "did you mean 'gsm8k'" in lines[0].lower(), (
        proc.stderr
    )
    assert not out.exists()


def test_overlong_prompt_is_skipped_and_neighbours_answered(model_dir, data, tmp_path):
    config = EvalConfig(
        task=f"jsonl:{data['math']}?type=math",
        model=str(model_dir),
        batch_size=3,
        method_config=MethodConfig(latent_steps=2, decode=DecodeConfig(max_new_tokens=4)),
    )
    summary = evaluate(config, tmp_path / "run", progress=False)
    records = {r["id"]: r for r in read_records(tmp_path / "run")}
    assert records["long"]["status"] == "skipped"
    assert "beyond the model's context" in records["long"]["reason"] and str(N_CTX) in records["long"]["reason"]
    for qid in ("short-1", "short-2"):
        assert records[qid]["status"] == "ok" and isinstance(records[qid]["text"], str)
        assert len(records[qid]["agents"]) == 4
    assert summary["n_skipped"] == 1 and summary["n_records"] == 3


# ----------------------------------------------------------------------------- k samples


def test_samples_need_temperature():
    with pytest.raises(DiffmasError, match="temperature"):
        EvalConfig(task="gsm8k", samples=3)


def test_k_samples_with_temperature(model_dir, data, tmp_path):
    decode = DecodeConfig(max_new_tokens=6, temperature=0.8, top_p=0.95)
    config = EvalConfig(
        task=f"jsonl:{data['math']}?type=math",
        model=str(model_dir),
        samples=3,
        limit=1,
        batch_size=4,
        method_config=MethodConfig(latent_steps=1, decode=decode),
    )
    summary = evaluate(config, tmp_path / "run", progress=False)
    records = read_records(tmp_path / "run")
    assert [(r["id"], r["sample"]) for r in records] == [("short-1", k) for k in range(3)]
    assert len({r["text"] for r in records}) > 1  # each sample draws with its own seed
    assert summary["n_samples_per_question"] == 3
    assert summary["majority_vote_accuracy"] is not None and summary["self_consistency"] is not None


# ----------------------------------------------------------------------------- two processes


def _torchrun() -> str | None:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return None
    local = Path(sys.executable).with_name("torchrun")
    return str(local) if local.is_file() else shutil.which("torchrun")


@pytest.mark.skipif(_torchrun() is None, reason="torch.distributed with gloo (and torchrun) is not available")
def test_two_process_sharded_eval_equals_one_process(model_dir, data, tmp_path):
    n = 6
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    proc = subprocess.run(
        [
            _torchrun(),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "diffmas",
            "eval",
            "--task",
            f"jsonl:{data['choice']}?type=choice",
            "--model",
            str(model_dir),
            "--out",
            str(sharded),
            "--limit",
            str(n),
            "--latent-steps",
            "2",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluate(choice_config(model_dir, data, limit=n, batch_size=2, max_new_tokens=8), single, progress=False)

    records = read_records(sharded)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(n)]  # merged, in question order, no duplicates
    assert_same_answers(records, read_records(single), tol=1e-4)
    assert not (sharded / "shards").exists()
    summary, expected = read_json(sharded / "summary.json"), read_json(single / "summary.json")
    for key in ("n_questions", "n_records", "accuracy", "option_accuracy"):
        assert summary[key] == expected[key], key
