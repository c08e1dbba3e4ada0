"""Growing a finished run: a larger --limit (with and without --subset-seed) or more --samples adds
exactly the missing records; a smaller --limit reports on part of the run and changes no file; a
damaged last line is dropped and computed again."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace

import pytest
from test_eval_runner import (  # noqa: F401
    N_CHOICE,
    CountingMethod,
    assert_same_answers,
    choice_config,
    data,
    model_dir,
    read_json,
    read_records,
    reference,
)

from diffmas.evaluate.runner import EvalConfig, RunConflictError, SubsetWarning, build_method, evaluate
from diffmas.generate import DecodeConfig
from diffmas.jsonl import JsonlError
from diffmas.methods import MethodConfig
from diffmas.tasks.base import Example
from diffmas.tasks.registry import select_examples


def ids(records):
    return [(r["id"], r["sample"]) for r in records]


@pytest.fixture(scope="module")
def method(model_dir, data):  # noqa: F811  (fixtures imported from test_eval_runner)
    """One built method for every run here (same settings as `choice_config`)."""
    return CountingMethod(build_method(choice_config(model_dir, data)))


def test_subset_draw_is_nested():
    examples = [Example(id=f"e{i}", question="q", answer="a") for i in range(50)]
    for seed in range(5):
        previous = set()
        for limit in (0, 1, 3, 4, 7, 22, 30, 49, 50):
            picked = select_examples(examples, limit, seed)
            got = [ex.id for ex in picked]
            assert len(got) == limit and got == sorted(got, key=lambda i: int(i[1:]))  # file order
            assert previous <= set(got), (seed, limit)
            previous = set(got)
    assert select_examples(examples, 5, 0) != select_examples(examples, 5, 1)


@pytest.mark.parametrize("subset_seed", [None, 3], ids=["first", "subset-seed"])
def test_larger_limit_adds_exactly_the_missing_records(model_dir, data, method, tmp_path, subset_seed):
    config = choice_config(model_dir, data, subset_seed=subset_seed)
    small, large = replace(config, limit=4), replace(config, limit=9)
    out = tmp_path / "grown"
    evaluate(small, out, method=method, progress=False)
    before = read_records(out)
    method.questions.clear()
    summary = evaluate(large, out, method=method, progress=False)
    assert len(method.questions) == 5  # the 5 new questions only
    records = read_records(out)
    assert records[: len(before)] == before  # kept as they were (appended after them)
    fresh = tmp_path / "fresh"
    evaluate(large, fresh, method=method, progress=False)
    # the grown run holds what a run started at limit 9 holds (after its merge: question order)
    assert sorted(ids(records)) == sorted(ids(read_records(fresh)))
    assert_same_answers(sorted(records, key=lambda r: r["id"]), sorted(read_records(fresh), key=lambda r: r["id"]))
    saved = read_json(out / "config.json")
    assert saved["eval"]["limit"] == 9 and saved["eval"]["subset_seed"] == subset_seed
    assert summary["n_questions"] == read_json(out / "summary.json")["n_questions"] == 9
    assert summary["accuracy"] == read_json(fresh / "summary.json")["accuracy"]
    # the same larger command again: nothing to do
    method.questions.clear()
    evaluate(large, out, method=method, progress=False)
    assert method.questions == []


def test_no_limit_grows_to_all_questions(model_dir, data, method, tmp_path):
    config = choice_config(model_dir, data, limit=5)
    out = tmp_path / "run"
    evaluate(config, out, method=method, progress=False)
    method.questions.clear()
    summary = evaluate(replace(config, limit=None), out, method=method, progress=False)
    assert len(method.questions) == N_CHOICE - 5 and summary["n_questions"] == N_CHOICE
    assert read_json(out / "config.json")["eval"]["limit"] is None


def test_more_samples_adds_only_the_new_sample_indices(model_dir, data, tmp_path):
    decode = DecodeConfig(max_new_tokens=4, temperature=0.8, top_p=0.95)
    config = EvalConfig(
        task=f"jsonl:{data['math']}?type=math",
        model=str(model_dir),
        limit=1,
        samples=2,
        batch_size=4,
        method_config=MethodConfig(latent_steps=1, decode=decode),
    )
    out = tmp_path / "run"
    counting = CountingMethod(build_method(config))
    evaluate(config, out, method=counting, progress=False)
    before = read_records(out)
    counting.questions.clear()
    summary = evaluate(replace(config, samples=3), out, method=counting, progress=False)
    assert len(counting.questions) == 1  # one new sample of the one question
    records = read_records(out)
    assert records[:2] == before and ids(records) == [("short-1", k) for k in range(3)]
    assert read_json(out / "config.json")["eval"]["samples"] == 3
    assert summary["n_samples_per_question"] == 3 and summary["n_records"] == 3


def test_smaller_limit_reports_on_part_and_changes_nothing(reference, model_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.warns(
        SubsetWarning,
        match=r"holds a larger run \(all questions, 1 sample each\); this summary "
        r"covers the limit 4, 1 sample each asked for",
    ):
        summary = evaluate(choice_config(model_dir, data, limit=4), out, progress=False)  # no model needed
    assert summary["n_questions"] == 4 and summary["n_records"] == 4
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    expected = sum(r["correct"] for r in read_records(reference)[:4]) / 4
    assert summary["accuracy"] == pytest.approx(expected)


def test_records_outside_the_selection_are_refused(reference, model_dir, data, tmp_path):  # noqa: F811
    """A record the selection does not hold (the data file or the subset draw changed) is a conflict,
    not a silent mix of two selections; nothing is written."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    lines = (out / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["id"] = "gone"
    (out / "samples.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    before = (out / "samples.jsonl").read_bytes()
    with pytest.raises(RunConflictError, match=r"holds 1 records outside this run's questions \(first: id 'gone'"):
        evaluate(choice_config(model_dir, data), out, progress=False)
    assert (out / "samples.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "damage",
    [b'{"id": "q11", "sam\n', b"\x00" * 40, b"\x00" * 40 + b"\n"],
    ids=["cut-with-newline", "zeros", "zeros-newline"],
)
def test_damaged_last_line_is_dropped_and_recomputed(reference, model_dir, data, method, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    lines = (reference / "samples.jsonl").read_bytes().splitlines(keepends=True)
    (out / "samples.jsonl").write_bytes(b"".join(lines[:-1]) + damage)
    method.questions.clear()
    evaluate(choice_config(model_dir, data), out, method=method, progress=False)
    assert len(method.questions) == 1
    assert_same_answers(read_records(out), read_records(reference))


def test_damaged_middle_line_is_one_clear_error(reference, model_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    lines = (out / "samples.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(JsonlError, match=r"samples.jsonl:3 is not a JSON object; delete that line"):
        evaluate(choice_config(model_dir, data), out, progress=False)


def test_subset_seed_draw_differs_from_the_first_rows():
    """--subset-seed draws at random (the nested draw is not "the first rows" in disguise)."""
    examples = [Example(id=f"e{i}", question="q", answer="a") for i in range(40)]
    first = [ex.id for ex in select_examples(examples, 10, None)]
    assert [ex.id for ex in select_examples(examples, 10, 0)] != first
    # it is the documented rule: shuffle all positions with the seed, keep the first `limit`
    order = list(range(40))
    random.Random(0).shuffle(order)
    assert [ex.id for ex in select_examples(examples, 10, 0)] == [f"e{i}" for i in sorted(order[:10])]


class FakeUpstream:
    """A text_mas stand-in that writes "ctx-<question>" and records what it was asked."""

    def __init__(self):
        self.asked = []

    def build_upstream(self, questions):
        from types import SimpleNamespace

        self.asked += [a.question for a in questions]  # Asks: the question and each role's own input
        return SimpleNamespace(contexts=[f"ctx-{a.question}" for a in questions])


@pytest.mark.parametrize(
    "damage", [b'{"id": "c", "cont', b'{"id": "c", "cont\n', b"\x00" * 16], ids=["cut", "cut-with-newline", "zeros"]
)
def test_cut_context_cache_line_is_recomputed(tmp_path, damage):
    """sft_text_mas: a kill while the upstream texts are cached leaves a damaged last line; the
    rerun drops it, writes that one text again, and the cache file stays readable."""
    from diffmas.train.data import attach_text_contexts

    items = [{"id": i, "question": i.upper()} for i in ("a", "b", "c")]
    cache = tmp_path / "text_mas_contexts.jsonl"
    cache.write_bytes(b'{"id": "a", "context": "ctx-A"}\n{"id": "b", "context": "ctx-B"}\n' + damage)
    upstream = FakeUpstream()
    attach_text_contexts(items, upstream, cache)
    assert upstream.asked == ["C"]
    assert [it["context"] for it in items] == ["ctx-A", "ctx-B", "ctx-C"]
    assert [json.loads(line)["id"] for line in cache.read_text().splitlines()] == ["a", "b", "c"]


def test_sweep_grows_every_run_with_one_backbone(model_dir, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from diffmas.cli import app
    from diffmas.evaluate import runner

    builds = []
    build = runner.build_method
    monkeypatch.setattr(runner, "build_method", lambda config: builds.append(config) or build(config))
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
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
        "0,1",
        "--agents",
        "2",
        "--max-new-tokens",
        "2",
        "--limit",
        "2",
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    args[args.index("--limit") + 1] = "3"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(builds) == 2  # one backbone per sweep command, shared by both runs
    for m in (0, 1):
        assert len(read_records(out / f"m{m}")) == 3
        assert read_json(out / f"m{m}" / "config.json")["eval"]["limit"] == 3


def test_train_resume_refuses_other_examples(tmp_path):
    """Same settings, other data (an edited file, or a subset drawn by another version): a resumed
    training run would train on a mix, so it is refused before anything is written."""
    from diffmas.train import TrainConfig
    from diffmas.train.trainer import TrainRunConflictError, train

    from conftest import make_backbone

    data = tmp_path / "qa.jsonl"
    rows = [{"id": f"q{i}", "question": f"Q{i}?", "answer": "yes"} for i in range(2)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig(
        task=f"jsonl:{data}?type=math",
        split="test",
        n_agents=2,
        latent_steps=1,
        batch_size=2,
        grad_accum=1,
        max_steps=2,
        save_steps=1,
        device="cpu",
    )
    out = tmp_path / "ad"
    assert train(config, out, backbone=make_backbone(tied=False), stop_after=1, report_to=[]) == {"stopped_at": 1}
    data.write_text(data.read_text().replace('"yes"', '"no"'))
    message = r"was trained on other examples \(data hash [0-9a-f]{16}, now [0-9a-f]{16}\): the data file"
    for old_version in (False, True):  # True: a train_config.json written before it held the hash
        if old_version:
            saved = json.loads((out / "train_config.json").read_text())
            del saved["data_hash"]
            (out / "train_config.json").write_text(json.dumps(saved))
        before = (out / "train_config.json").read_bytes()
        with pytest.raises(TrainRunConflictError, match=message):
            train(config, out, backbone=make_backbone(tied=False), report_to=[])
        assert (out / "train_config.json").read_bytes() == before
