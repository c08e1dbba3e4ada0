"""Run directories, paired comparison, the report and the `compare` / `report` commands, on
synthetic runs with known correctness."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from diffmas.cli import app
from diffmas.evaluate.compare import CompareError, compare_runs, mcnemar_p
from diffmas.evaluate.metrics import summarize
from diffmas.evaluate.report import COST_PNG, STEPS_PNG, TOKENS_PNG, write_report
from diffmas.evaluate.rundir import RunDirError, TruncatedRunWarning, load_run


def make_records(correct: dict[str, list[bool]], method="latent_mas", m=10, tokens=100) -> list[dict]:
    """One record per (question, sample) with the given correctness; answers "1" (right) or "0"."""
    records = []
    for qid, samples in correct.items():
        for k, ok in enumerate(samples):
            agents = [
                {
                    "role": role,
                    "n_prompt_tokens": tokens,
                    "n_latent_steps": m if role != "solver" else 0,
                    "n_generated_tokens": 0 if role != "solver" else tokens // 4,
                    "wall_s": 0.1,
                    "text": None,
                }
                for role in ("planner", "critic", "solver")
            ]
            records.append(
                {
                    "id": qid,
                    "sample": k,
                    "method": method,
                    "status": "ok",
                    "gold": "1",
                    "text": "x",
                    "extracted": "1" if ok else "0",
                    "correct": ok,
                    "reason": None,
                    "truncated": False,
                    "agents": agents,
                    "n_tokens": {"prompt": 3 * tokens, "latent": 2 * m, "generated": tokens // 4},
                    "trace_len": 3 * tokens + 2 * m,
                    "trace_bytes": 4096 * (3 * tokens + 2 * m),
                    "wall_s": 0.02 * tokens,
                    "batch_size": 1,
                    "peak_memory_bytes": 300 * 2**20,
                    "mean_nll": 0.5,
                    "mean_entropy": 1.0,
                }
            )
    return records


def write_run(root, name, correct, method="latent_mas", m=10, task="gsm8k", split="test", tokens=100, summary=True):
    """A run directory laid out as `diffmas eval` writes it (settings nested under "eval")."""
    path = root / name
    path.mkdir(parents=True)
    config = {
        "eval": {
            "task": task,
            "method": method,
            "split": split,
            "model": "tiny",
            "samples": 1,
            "seed": 0,
            "batch_size": 1,
            "method_config": {"latent_steps": m, "decode": {"temperature": 0.0}},
        },
        "versions": {"diffmas": "0.1.0"},
        "git_commit": "0123456789abcdef",
    }
    (path / "config.json").write_text(json.dumps(config))
    records = make_records(correct, method, m, tokens)
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        (path / "summary.json").write_text(json.dumps(summarize(records)))
    return path


def pattern(bits: str, prefix="q") -> dict[str, list[bool]]:
    return {f"{prefix}{i}": [b == "1"] for i, b in enumerate(bits)}


# ----------------------------------------------------------------------------- run directories


def test_load_run_reads_nested_config(tmp_path):
    run = load_run(write_run(tmp_path, "a", pattern("1100"), m=7))
    assert (run.name, run.task, run.method, run.latent_steps) == ("a", "gsm8k", "latent_mas", 7)
    assert run.setting("temperature") == 0.0 and run.setting("git_commit") == "0123456789abcdef"
    assert len(run.records) == 4 and run.summary["accuracy"] == 0.5


def test_truncated_last_line_is_ignored_with_a_warning(tmp_path):
    path = write_run(tmp_path, "killed", pattern("1101"), summary=False)
    with open(path / "samples.jsonl", "a") as f:
        f.write('{"id": "q4", "sample": 0, "status": "o')  # the process died mid-write
    with pytest.warns(TruncatedRunWarning, match="cut-off last line 5"):
        run = load_run(path)
    assert [r["id"] for r in run.records] == ["q0", "q1", "q2", "q3"] and run.summary == {}


def test_bad_run_dirs_name_the_path_and_the_problem(tmp_path):
    with pytest.raises(RunDirError, match=f"run directory '{tmp_path / 'nope'}' does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="has no config.json"):
        load_run(tmp_path / "empty")
    path = write_run(tmp_path, "corrupt", pattern("11"))
    lines = (path / "samples.jsonl").read_text().splitlines()
    (path / "samples.jsonl").write_text("{oops\n" + lines[1] + "\n")
    with pytest.raises(RunDirError, match="line 1 is not valid JSON"):
        load_run(path)


# ----------------------------------------------------------------------------- compare


def test_mcnemar_exact_binomial():
    # b=1, c=6: 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    assert mcnemar_p(1, 6) == pytest.approx(0.125)
    assert mcnemar_p(6, 1) == pytest.approx(0.125)
    assert mcnemar_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(40, 60) == pytest.approx(2 * sum(math.comb(100, i) for i in range(41)) / 2**100)


def test_compare_pairs_on_shared_ids_only(tmp_path):
    base = load_run(write_run(tmp_path, "base", pattern("1100110000"), method="single", m=0))
    # q10, q11 exist only in the other run and must be ignored; so must q9 missing from it
    other = {**pattern("1111111000"), "q10": [True], "q11": [True]}
    del other["q9"]
    run = load_run(write_run(tmp_path, "lat", other, m=10))
    result = compare_runs([base, run])
    assert result["n_shared"] == 9 and result["baseline"] == "base"
    b, r = result["runs"]
    assert b["is_baseline"] and b["delta"] is None and b["n_dropped"] == 1
    assert r["n_dropped"] == 2 and r["n_questions"] == 11
    assert b["accuracy"] == pytest.approx(4 / 9) and r["accuracy"] == pytest.approx(7 / 9)
    # per question: base 110011000, run 111111100 -> wins at q2, q3, q6; no losses
    assert (r["wins"], r["losses"], r["ties"]) == (3, 0, 6)
    assert (r["mcnemar_b"], r["mcnemar_c"]) == (3, 0)
    assert r["p_value"] == pytest.approx(2 / 8)
    assert r["delta"] == pytest.approx(3 / 9)
    assert r["delta_ci"][0] <= r["delta"] <= r["delta_ci"][1]
    flipped = compare_runs([base, run], baseline=1)
    assert flipped["runs"][0]["delta"] == pytest.approx(-3 / 9) and flipped["runs"][0]["losses"] == 3


def test_compare_k4_uses_mean_for_wins_and_first_sample_for_mcnemar(tmp_path):
    base = load_run(write_run(tmp_path, "b", {"q0": [False, True, True, True], "q1": [True, False, False, False]}))
    run = load_run(write_run(tmp_path, "r", {"q0": [True, False, False, False], "q1": [True, True, True, True]}))
    r = compare_runs([base, run])["runs"][1]
    assert r["accuracy"] == pytest.approx((0.25 + 1) / 2) and r["delta"] == pytest.approx((-0.5 + 0.75) / 2)
    assert (r["wins"], r["losses"], r["ties"]) == (1, 1, 0)
    assert (r["mcnemar_b"], r["mcnemar_c"]) == (1, 0)  # sample 0: q0 run right, base wrong; q1 both right


def test_compare_refuses_different_tasks_and_disjoint_ids(tmp_path):
    a = load_run(write_run(tmp_path, "a", pattern("10")))
    with pytest.raises(CompareError, match="different tasks"):
        compare_runs([a, load_run(write_run(tmp_path, "b", pattern("10"), task="arc_easy"))])
    with pytest.raises(CompareError, match="share no question id"):
        compare_runs([a, load_run(write_run(tmp_path, "c", pattern("10", prefix="x")))])
    with pytest.raises(CompareError, match="at least two runs"):
        compare_runs([a])


# ----------------------------------------------------------------------------- report


@pytest.fixture
def sweep(tmp_path):
    """single + latent_mas at m = 0, 10, 20 on the same 12 questions."""
    root = tmp_path / "runs"
    paths = [
        write_run(root, "single", pattern("110000110000"), method="single", m=0, tokens=60),
        write_run(root, "latent_m0", pattern("110010110000"), m=0, tokens=150),
        write_run(root, "latent_m10", pattern("111010111000"), m=10, tokens=160),
        write_run(root, "latent_m20", pattern("111110111010"), m=20, tokens=170),
    ]
    return paths


def test_report_writes_markdown_html_and_readable_plots(sweep, tmp_path):
    runs = [load_run(p) for p in sweep]
    md_path = write_report(runs, tmp_path / "report")
    assert md_path == tmp_path / "report" / "report.md"
    md = md_path.read_text()
    html = (tmp_path / "report" / "report.html").read_text()
    for name in (STEPS_PNG, COST_PNG, TOKENS_PNG):
        image = imread(tmp_path / "report" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500, (name, image.shape)
        assert image.std() > 0.05  # not a blank canvas
        assert f"]({name})" in md
    assert html.count("data:image/png;base64,") == 3
    for run in runs:
        s = summarize(run.records)
        lo, hi = s["accuracy_ci"]
        assert f"{100 * s['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in md
        assert f"{s['tokens']['per_question']['total']:.0f}" in md
        assert f"| {run.name} |" in md and run.name in html
    assert "12 questions shared by all runs, against single" in md
    assert "+41.7" in md  # latent_m20 (9/12) vs single (4/12)


def test_report_without_a_latent_sweep_says_why(tmp_path):
    runs = [load_run(write_run(tmp_path, "only", pattern("10")))]
    write_report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No plot: no task/method has runs at several latent_steps values." in md
    assert "No task has two runs to compare." in md
    assert not (tmp_path / "out" / STEPS_PNG).exists() and (tmp_path / "out" / COST_PNG).exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_compare_table_and_json(sweep):
    runner = CliRunner()
    result = runner.invoke(app, ["compare", *map(str, sweep)])
    assert result.exit_code == 0, result.output
    for word in ("single", "latent_m20", "baseline", "shared questions"):
        assert word in result.output
    result = runner.invoke(app, ["compare", *map(str, sweep), "--json", "--baseline", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["baseline"] == "latent_m0" and [e["name"] for e in data["runs"]] == [p.name for p in sweep]


def test_cli_report_writes_the_folder(sweep, tmp_path):
    out = tmp_path / "rep"
    result = CliRunner().invoke(app, ["report", *map(str, sweep), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "report.html").is_file() and (out / COST_PNG).is_file()


def test_cli_missing_run_dir_is_a_clear_error(sweep, tmp_path):
    result = CliRunner().invoke(app, ["compare", str(sweep[0]), str(tmp_path / "missing")])
    assert isinstance(result.exception, RunDirError)
    assert str(result.exception).startswith(f"run directory '{tmp_path / 'missing'}' does not exist")
