"""Bad input gets one clear line and writes nothing: `eval` and `train` check model, roles, adapter,
device and data before they touch --out (the corrected command then just runs), and each kind of
bad input of issue 15 item 7 is one `error: ...` line with exit code 2 and no traceback."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_model, make_tokenizer

EVAL = ["--latent-steps", "1", "--max-new-tokens", "4", "--agents", "2"]
TRAIN = [
    "--split",
    "test",
    "--agents",
    "2",
    "--latent-steps",
    "1",
    "--batch-size",
    "2",
    "--grad-accum",
    "1",
    "--max-steps",
    "1",
    "--device",
    "cpu",
]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
PROGRESS = re.compile(r"^[^|]*\d+%\|")  # a progress bar line (loading weights, training steps)


@pytest.fixture
def cli(capsys, monkeypatch):
    """`diffmas ARGS` through the real entry point, in this process (no interpreter start per call):
    an exception other than the handled DiffmasError fails the test with its traceback."""
    from diffmas.cli import main

    def run(*args) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", ["diffmas", *map(str, args)])
        with pytest.raises(SystemExit) as exited:
            main()
        out = capsys.readouterr()
        return SimpleNamespace(returncode=exited.value.code or 0, stdout=out.out, stderr=out.err)

    return run


def error_line(proc) -> str:
    """The one line a failed command printed (exit code 2; progress bars of model loading aside)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    make_model(tied=False).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> Path:
    rows = [{"id": f"q{i}", "question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", rows)


@pytest.fixture(scope="module")
def bad_roles(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("roles") / "roles.yaml"
    path.write_text("kind: sequential\nroles:\n  - {name: scout, system: s, user: 'Look at {question}'\n")
    return path


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, qa, tmp_path_factory) -> Path:
    """A trained 2-agent adapter of the tiny model (one optimizer step)."""
    from diffmas.train import TrainConfig
    from diffmas.train.trainer import train

    out = tmp_path_factory.mktemp("adapter") / "ad"
    config = TrainConfig(
        task=f"jsonl:{qa}?type=math",
        split="test",
        model=str(tiny_model_dir),
        n_agents=2,
        latent_steps=1,
        batch_size=2,
        grad_accum=1,
        max_steps=1,
        device="cpu",
    )
    train(config, out, report_to=[])
    return out


# ----------------------------------------------------------------------------- nothing half-written


def eval_args(model_dir, qa, out, *extra) -> list[str]:
    return [
        "eval",
        "--task",
        f"jsonl:{qa}?type=math",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--limit",
        "2",
        *EVAL,
        *extra,
    ]


@pytest.mark.parametrize("option", ["--model", "--roles", "--adapter"])
def test_eval_with_a_bad_option_writes_nothing_and_the_fix_runs(cli, tiny_model_dir, qa, bad_roles, tmp_path, option):
    bad = {"--model": "/no/such/model", "--roles": str(bad_roles), "--adapter": str(tmp_path / "no-adapter")}[option]
    expected = {
        "--model": "error: model path '/no/such/model' is not a model directory (no config.json there)",
        "--roles": f"error: roles file '{bad_roles}' is not valid YAML at line 4, column 1 "
        "(expected ',' or '}', but got '<stream end>')",
        "--adapter": f"error: adapter directory '{tmp_path / 'no-adapter'}' does not exist",
    }[option]
    out = tmp_path / "run"
    args = eval_args(tiny_model_dir, qa, out)
    if option == "--model":
        args[args.index("--model") + 1] = bad
    else:
        args += [option, bad]
    assert error_line(cli(*args)) == expected
    assert not out.exists()
    proc = cli(*eval_args(tiny_model_dir, qa, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["n_records"] == 2


def test_eval_growing_with_a_bad_model_leaves_the_run_as_it_was(cli, tiny_model_dir, qa, tmp_path):
    out = tmp_path / "run"
    assert cli(*eval_args(tiny_model_dir, qa, out)).returncode == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    grow = eval_args(tiny_model_dir, qa, out)
    grow[grow.index("--limit") + 1] = "3"
    bad = list(grow)
    bad[bad.index("--model") + 1] = "/no/such/model"
    error_line(cli(*bad))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    proc = cli(*grow)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["eval"]["limit"] == 3
    assert [json.loads(line)["id"] for line in (out / "samples.jsonl").read_text().splitlines()] == ["q0", "q1", "q2"]


@pytest.mark.parametrize("option", ["--model", "--roles"])
def test_train_with_a_bad_option_writes_nothing_and_the_fix_runs(cli, tiny_model_dir, qa, bad_roles, tmp_path, option):
    out = tmp_path / "ad"
    good = ["train", "--task", f"jsonl:{qa}?type=math", "--model", str(tiny_model_dir), "--out", str(out), *TRAIN]
    bad = list(good)
    if option == "--model":
        bad[bad.index("--model") + 1] = "/no/such/model"
        expected = "error: model path '/no/such/model' is not a model directory (no config.json there)"
    else:
        bad += ["--roles", str(bad_roles)]
        expected = (
            f"error: roles file '{bad_roles}' is not valid YAML at line 4, column 1 "
            "(expected ',' or '}', but got '<stream end>')"
        )
    assert error_line(cli(*bad)) == expected
    assert not out.exists()
    proc = cli(*good)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_summary.json").is_file()


def test_train_with_an_unknown_target_module_writes_nothing(cli, tiny_model_dir, qa, tmp_path):
    out = tmp_path / "ad"
    proc = cli(
        "train",
        "--task",
        f"jsonl:{qa}?type=math",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        *TRAIN,
        "--target-modules",
        "q_proj,qkv",
    )
    assert error_line(proc) == (
        f"error: --target-modules qkv: not in model '{tiny_model_dir}'; its linear layers "
        "are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    )
    assert not out.exists()


# ----------------------------------------------------------------------------- roles files


@pytest.mark.parametrize(
    "name, text, problem",
    [
        (
            "roles.yaml",
            "kind: sequential\nroles:\n  - {name: a, system: s, user: 'x {question}'\n",
            "is not valid YAML at line 4, column 1 (expected ',' or '}', but got '<stream end>')",
        ),
        (
            "roles.json",
            '{"kind": "sequential", "roles": [}',
            "is not valid JSON at line 1, column 34 (Expecting value); YAML files need a .yaml or .yml suffix",
        ),
        (
            "roles.yaml",
            "roles:\n  - {name: 7, system: s, user: 'x {question}'}\n",
            ": role 1 field 'name' must be a string, got int (quote it in YAML)",
        ),
        (
            "roles.yaml",
            "roles:\n  - {name: a, system: [s], user: 'x {question}'}\n",
            ": role 1 field 'system' must be a string, got list (quote it in YAML)",
        ),
        (
            "roles.yaml",
            "roles:\n  - {name: a, system: s, user: 'x {question}'}\n  - just a string\n",
            ": role 2 must be a mapping with name, system and user, got str",
        ),
        ("roles.yaml", "roles: planner\n", ": 'roles' must be a non-empty list of {name, system, user} mappings"),
        (
            "roles.yaml",
            b"roles:\n  - {name: a, system: 'caf\xe9', user: 'x {question}'}\n",
            "is not UTF-8 text (line 2); save it as UTF-8",
        ),
    ],
    ids=["yaml-syntax", "json-syntax", "int-name", "list-system", "str-role", "roles-not-list", "latin1"],
)
def test_bad_roles_file_is_one_line(cli, tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    proc = cli("run", "q?", "--roles", str(path), "--model", "/never/loaded")
    assert error_line(proc) == f"error: roles file '{path}'" + (" " if not problem.startswith(":") else "") + problem


# ----------------------------------------------------------------------------- questions and data files


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question_is_one_line(cli, question):
    assert error_line(cli("run", question, "--model", "/never/loaded")) == (
        "error: the question is empty; pass the question to answer, e.g. diffmas run 'What is 2+2?'"
    )


def test_empty_question_in_a_data_file_is_one_line(cli, tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl", [{"question": "What is 1+1?", "answer": "2"}, {"question": " ", "answer": "3"}]
    )
    out = tmp_path / "run"
    proc = cli("eval", "--task", f"jsonl:{path}?type=math", "--model", "/never/loaded", "--out", str(out))
    assert error_line(proc) == (
        f"error: {path}:2: jsonl:{path}?type=math: the question is empty; fill it in or remove the row"
    )
    assert not out.exists()


def test_non_utf8_data_file_is_one_line(cli, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"question": "What is 1+1?", "answer": "2"}\n{"question": "Caf\xe9 au lait?", "answer": "3"}\n')
    out = tmp_path / "run"
    proc = cli("eval", "--task", f"jsonl:{path}?type=math", "--model", "/never/loaded", "--out", str(out))
    assert error_line(proc) == (
        f"error: {path}:2: not UTF-8 text (byte 0xe9); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
    )
    assert not out.exists()


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    from diffmas.tasks.data import read_jsonl

    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "Caf\xc3\xa9?", "answer": "2"}\n')
    assert read_jsonl(path) == [(f"{path}:1", {"question": "Café?", "answer": "2"})]


# ----------------------------------------------------------------------------- devices and adapters


@NO_CUDA
def test_cuda_without_cuda_is_one_line_and_writes_nothing(cli, tiny_model_dir, qa, tmp_path):
    out = tmp_path / "run"
    proc = cli(*eval_args(tiny_model_dir, qa, out, "--device", "cuda"))
    assert error_line(proc) == (
        "error: --device cuda: no CUDA device is available here "
        "(torch.cuda.is_available() is False); use --device cpu or --device auto"
    )
    assert not out.exists()


def test_unknown_device_is_one_line(cli):
    assert error_line(cli("run", "q?", "--device", "gpu", "--model", "/never/loaded")) == (
        "error: unknown device 'gpu'; use auto, cpu, cuda or cuda:N"
    )


def damage(adapter: Path, tmp_path: Path, how: str) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    if how == "metadata-json":
        (broken / "diffmas_config.json").write_text('{"method": "diffmas", ')
    elif how == "metadata-fields":
        (broken / "diffmas_config.json").write_text('{"method": "diffmas"}')
    elif how == "adapter-config":
        (broken / "adapter_config.json").write_text("[1, 2]")
    elif how == "weights-cut":
        weights = broken / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:50])
    elif how == "weights-missing":
        (broken / "adapter_model.safetensors").unlink()
    elif how == "other-layers":  # a LoRA for layers this model does not have
        config = json.loads((broken / "adapter_config.json").read_text())
        config["target_modules"] = ["qkv_proj"]
        (broken / "adapter_config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize(
    "how, problem",
    [
        (
            "metadata-json",
            "diffmas_config.json' is not valid JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 23 (char 22)); retrain the adapter or restore the file",
        ),
        (
            "metadata-fields",
            "diffmas_config.json lacks 'apply_to' (all, final or per-role) or 'adapters'; it was not "
            "written by `diffmas train`, retrain or restore it",
        ),
        ("adapter-config", "adapter_config.json' should hold a JSON object, got list"),
        ("weights-cut", "adapter_model.safetensors' is not a readable safetensors file"),
        ("weights-missing", "adapter_model.safetensors' is missing; retrain the adapter or restore the file"),
        ("other-layers", "does not fit model"),
    ],
    ids=["metadata-json", "metadata-fields", "adapter-config", "weights-cut", "weights-missing", "other-layers"],
)
def test_damaged_adapter_is_one_line_and_writes_nothing(cli, tiny_model_dir, qa, adapter, tmp_path, how, problem):
    broken = damage(adapter, tmp_path, how)
    out = tmp_path / "run"
    line = error_line(cli(*eval_args(tiny_model_dir, qa, out, "--method", "diffmas", "--adapter", str(broken))))
    assert line.startswith("error: ") and str(broken) in line and problem in line, line
    assert not out.exists()


def test_adapter_that_fits_runs(cli, tiny_model_dir, qa, adapter, tmp_path):
    out = tmp_path / "run"
    proc = cli(*eval_args(tiny_model_dir, qa, out, "--method", "diffmas", "--adapter", str(adapter)))
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- runs without answers


def test_limit_zero_prints_the_summary_table(cli, tiny_model_dir, qa, tmp_path):
    out = tmp_path / "run"
    args = eval_args(tiny_model_dir, qa, out)
    args[args.index("--limit") + 1] = "0"
    proc = cli(*args)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "questions (records, skipped)" in proc.stdout and "0 (0, 0)" in proc.stdout
    assert (out / "samples.jsonl").read_text() == ""
    assert json.loads((out / "summary.json").read_text())["n_records"] == 0


def test_every_question_skipped_prints_the_summary_table(cli, tmp_path):
    model_dir = tmp_path / "short-context"
    model = make_model(tied=False)
    model.config.max_position_embeddings = 256  # below any agent prompt: every question is skipped
    model.save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"What is {i}+1?", "answer": "1"} for i in range(2)])
    out = tmp_path / "run"
    proc = cli("eval", "--task", f"jsonl:{data}?type=math", "--model", str(model_dir), "--out", str(out), *EVAL)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "2 (2, 2)" in proc.stdout and "accuracy [95% CI]" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["n_skipped"] == 2


def test_smaller_limit_prints_which_part_is_reported(cli, tiny_model_dir, qa, tmp_path):
    out = tmp_path / "run"
    assert cli(*eval_args(tiny_model_dir, qa, out)).returncode == 0
    part = eval_args(tiny_model_dir, qa, out)
    part[part.index("--limit") + 1] = "1"
    proc = cli(*part)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"warning: {out} holds a larger run (limit 2, 1 sample each); this summary "
        "covers the limit 1, 1 sample each asked for, and the run's files are left "
        "as they are"
    )
    assert "1 (1, 0)" in proc.stdout


def test_method_adapter_mismatch_writes_nothing(cli, tiny_model_dir, qa, adapter, tmp_path):
    """diffmas without an adapter, and an adapter of another base model: refused before --out is made."""
    out = tmp_path / "run"
    assert error_line(cli(*eval_args(tiny_model_dir, qa, out, "--method", "diffmas"))) == (
        "error: method 'diffmas' needs a trained adapter: pass --adapter PATH (train one with `diffmas train`); "
        "use latent_mas for the untrained channel"
    )
    other = tmp_path / "other-model"
    make_model(tied=False, seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    line = error_line(cli(*eval_args(other, qa, out, "--method", "diffmas", "--adapter", adapter)))
    assert line.startswith(f"error: adapter '{adapter}' was trained for base model"), line
    assert not out.exists()
