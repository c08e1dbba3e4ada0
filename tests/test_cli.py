"""The CLI is a thin layer: a smoke test per command, and clean one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import make_model, make_tokenizer


def cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffmas", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_model(tied=False).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_run_json_record(tiny_model_dir):
    proc = cli(
        "run",
        "What is 2+2?",
        "--model",
        str(tiny_model_dir),
        "--method",
        "latent_mas",
        "--latent-steps",
        "3",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["method"] == "latent_mas"
    assert [a["role"] for a in record["agents"]] == ["planner", "critic", "refiner", "solver"]
    assert [a["n_latent_steps"] for a in record["agents"]] == [3, 3, 3, 0]
    assert 1 <= record["agents"][-1]["n_generated_tokens"] <= 4
    assert record["trace_bytes"] > 0 and record["peak_memory_bytes"] > 0


def test_run_under_a_trace_budget(tiny_model_dir):
    def record(*extra):
        args = ["run", "What is 2+2?", "--model", str(tiny_model_dir), "--method", "latent_mas"]
        proc = cli(*args, "--latent-steps", "2", "--max-new-tokens", "2", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    full, bounded = record(), record("--trace-policy", "window", "--trace-budget", "4")
    # the agents processed the same prompts; each upstream agent then keeps 4 of its prompt entries
    assert [a["n_prompt_tokens"] for a in bounded["agents"]] == [a["n_prompt_tokens"] for a in full["agents"]]
    upstream_prompt = sum(a["n_prompt_tokens"] for a in full["agents"][:-1])
    assert full["trace_len"] - bounded["trace_len"] == upstream_prompt - 3 * 4
    assert bounded["trace_bytes"] < full["trace_bytes"]
    # per trace: the three upstream agents keep 4 prompt entries between them
    whole = record("--trace-policy", "window", "--trace-budget", "4", "--trace-scope", "trace")
    assert full["trace_len"] - whole["trace_len"] == upstream_prompt - 4


def test_run_prints_answer_and_cost_table(tiny_model_dir):
    proc = cli(
        "run",
        "Hello?",
        "--model",
        str(tiny_model_dir),
        "--method",
        "text_mas",
        "--max-new-tokens",
        "3",
        "--upstream-max-new-tokens",
        "2",
        "--topology",
        "hierarchical",
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("answer (text_mas)", "math", "science", "code", "aggregator", "total", "trace:"):
        assert word in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "q", "--model", "/no/such/model"], "error: model path '/no/such/model' is not a model directory"),
        (["run", "q", "--method", "latentmas"], "error: unknown method 'latentmas' (did you mean 'latent_mas'?)"),
        (["run", "q", "--topology", "star"], "error: unknown topology 'star'"),
        (
            ["run", "q", "--chat-template-kwargs", "{enable_thinking: no}"],
            "error: --chat-template-kwargs is not valid JSON",
        ),
        (["run", "q", "--chat-template-kwargs", "[1]"], "error: --chat-template-kwargs must be a JSON object"),
        (["run", "q", "--trace-policy", "window"], "error: --trace-policy window needs --trace-budget"),
        (["run", "q", "--trace-policy", "prune", "--trace-budget", "8"], "error: trace policy 'prune'"),
        (["run", "q", "--trace-budget", "8"], "error: --trace-budget needs --trace-policy"),
        (
            ["run", "q", "--trace-policy", "window", "--trace-budget", "25%", "--trace-scope", "trace"],
            "error: a per-trace budget is prompt states",
        ),
        (
            ["run", "q", "--method", "single", "--trace-policy", "window", "--trace-budget", "8"],
            "error: a trace budget",
        ),
        (["run", "q", "--compile", "fast"], "error: compile='fast': choose one of off, auto"),
        (["--cpu-linear", "fast", "env"], "error: linear kernel 'fast': choose one of packed, mkl, onednn, default"),
        (["--cpu-attention", "fast", "env"], "error: CPU attention 'fast': choose one of kernel, sdpa"),
        (
            ["run", "q", "--compile", "auto", "--trace-policy", "window", "--trace-budget", "8"],
            "error: --compile auto does not combine with a trace budget",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    proc = cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_roles_file(tiny_model_dir, tmp_path):
    roles = tmp_path / "roles.yaml"
    roles.write_text(
        "kind: sequential\nroles:\n"
        "  - {name: scout, system: s, user: 'Look at {question}'}\n"
        "  - {name: judge, system: s, user: 'Answer {question} {format}'}\n"
    )
    proc = cli("run", "q?", "--model", str(tiny_model_dir), "--roles", str(roles), "--max-new-tokens", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [a["role"] for a in json.loads(proc.stdout)["agents"]] == ["scout", "judge"]


def test_env_block():
    proc = cli("env")
    assert proc.returncode == 0
    keys = (
        "torch:",
        "transformers:",
        "device:",
        "default dtype (--dtype auto):",
        "CPU bf16: avx512_bf16",
        "CPU linear layers:",
    )
    for key in keys + ("DIFFMAS_HOME:",):
        assert key in proc.stdout


def test_run_with_a_trained_adapter(tiny_model_dir, tmp_path):
    """`diffmas train` then `diffmas run --adapter`: the adapter is loaded and changes the answer."""
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"Question {i}?", "answer": "yes"}) + "\n" for i in range(4))
    )
    proc = cli(
        "train",
        "--task",
        f"jsonl:{data}?type=math",
        "--split",
        "test",
        "--model",
        str(tiny_model_dir),
        "--agents",
        "2",
        "--latent-steps",
        "1",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--max-steps",
        "3",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "ad"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = [
        "run",
        "Question 1?",
        "--model",
        str(tiny_model_dir),
        "--agents",
        "2",
        "--latent-steps",
        "1",
        "--max-new-tokens",
        "4",
        "--json",
    ]
    plain, tuned = cli(*args), cli(*args, "--adapter", str(tmp_path / "ad"))
    assert plain.returncode == 0 and tuned.returncode == 0, tuned.stderr[-2000:]
    plain, tuned = json.loads(plain.stdout), json.loads(tuned.stdout)
    assert tuned["adapter"] == str(tmp_path / "ad") and plain["adapter"] is None
    assert tuned["text"] != plain["text"]


def test_cpu_linear_option_reaches_the_kernel():
    proc = cli("--cpu-linear", "default", "env")
    assert proc.returncode == 0, proc.stderr
    assert "- CPU linear layers: PyTorch's" in proc.stdout


def test_cpu_linear_option_names_a_library():
    from diffmas.linear import ONEDNN

    proc = cli("--cpu-linear", "onednn", "env")
    assert proc.returncode == 0, proc.stderr
    expected = "oneDNN's prepacked GEMM for 1 row or more" if ONEDNN.available() else "PyTorch's (no onednn GEMM"
    assert f"- CPU linear layers: {expected}" in proc.stdout
