"""`diffmas sweep`: one run directory per m with the model loaded once, a comparison and a report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from diffmas.cli import app
from diffmas.cli.sweep import check_latent_method, parse_steps
from diffmas.errors import DiffmasError
from diffmas.evaluate import runner

from conftest import make_model, make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_model(tied=False).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Latent steps of every `build_method` call (each one loads the backbone)."""
    calls = []
    build = runner.build_method

    def counting(config):
        calls.append(config.method_config.latent_steps)
        return build(config)

    monkeypatch.setattr(runner, "build_method", counting)
    return calls


def test_sweep_runs_each_m_with_one_backbone(model_dir, tmp_path, builds):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--task",
        f"jsonl:{data}?type=math",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--latent-steps",
        "0,2",
        "--agents",
        "2",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "3",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert builds == [0]  # one backbone for both runs
    for m in (0, 2):
        run_dir = out / f"m{m}"
        assert json.loads((run_dir / "config.json").read_text())["eval"]["method_config"]["latent_steps"] == m
        assert json.loads((run_dir / "summary.json").read_text())["latent_steps"] == m
        records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 3
        for r in records:
            assert [a["n_latent_steps"] for a in r["agents"]] == [m, 0]
            assert r["n_tokens"]["latent"] == m
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.html").is_file()
    assert "m0" in result.output and "baseline" in result.output  # the comparison table

    # Rerunning resumes every run: nothing left to do, so no model is loaded.
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert builds == [0]


@pytest.mark.parametrize("text", ["", "0,x", "5,5", "-1,2"])
def test_bad_latent_steps_are_refused(text):
    with pytest.raises(DiffmasError, match="--latent-steps"):
        parse_steps(text)


def test_parse_steps_keeps_order():
    assert parse_steps("10, 0,5") == [10, 0, 5]


def test_method_without_latent_steps_is_refused():
    with pytest.raises(DiffmasError, match="does not use latent steps"):
        check_latent_method("single")
    check_latent_method("latent_mas")


def test_sweep_over_agents_and_steps(model_dir, tmp_path, builds):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(2)))
    out = tmp_path / "grid"
    args = [
        "sweep",
        "--task",
        f"jsonl:{data}?type=math",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--latent-steps",
        "1",
        "--agents-sweep",
        "1,3",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert builds == [1]  # one backbone (built at m=1) for both agent counts
    for n in (1, 3):
        records = [json.loads(line) for line in (out / f"a{n}-m1" / "samples.jsonl").read_text().splitlines()]
        assert all(len(r["agents"]) == n for r in records)
        assert all([a["n_latent_steps"] for a in r["agents"]] == [1] * (n - 1) + [0] for r in records)
