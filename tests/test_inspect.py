"""Trace inspection on the tiny models: attention shares, logit lens, segment bookkeeping, the
answer left unchanged, the HTML page (in a real headless browser where chromium is installed),
the CLI and the eval/report/compare aggregation."""

from __future__ import annotations

import json

import pytest
import torch

from diffmas import DecodeConfig, LatentTrace, MethodConfig, Role, Topology, get_method
from diffmas.channel import latent_steps, prefill, tokenize
from diffmas.generate import decode
from diffmas.inspect import InspectConfig, InspectError, inspect_question
from diffmas.methods import asks_of

QUESTION = "Alice's secret word is tiger. What is it?"
PAIR = Topology(
    "sequential",
    (Role("sender", "", "{private} Your team is asked: {question}"), Role("reader", "", "{question} {format}")),
)


def method_on(backbone, name="latent_mas", topology=PAIR, m=3, reads="all", max_new=5, temperature=0.0):
    config = MethodConfig(
        latent_steps=m, reads=reads, decode=DecodeConfig(max_new_tokens=max_new, temperature=temperature)
    )
    return get_method(name, backbone, topology, config)


def test_shares_sum_to_one_per_token_and_layer(backbone):
    method = method_on(backbone, topology=None)  # the default four agents
    record = inspect_question(method, QUESTION)
    att = record["attention"]
    assert len(att["tokens"]) == len(record["answer"]["token_ids"]) >= 1
    for token in att["tokens"]:
        assert len(token["per_layer"]) == backbone.n_layers
        for row in token["per_layer"]:
            assert len(row) == len(att["segments"])
            assert sum(row) == pytest.approx(1.0, abs=1e-4)
            assert min(row) >= 0
        assert sum(token["mean"]) == pytest.approx(1.0, abs=1e-4)
    assert sum(att["mean"]) == pytest.approx(1.0, abs=1e-4)
    # every agent's latent steps get some of the final agent's attention (reads=all): no segment is lost
    labels = [s["label"] for s in att["segments"]]
    assert labels[:2] == ["planner/prompt", "planner/latent"] and labels[-1] == "solver/generated"


def test_reads_latent_hides_the_sender_prompt_from_the_shares(backbone):
    record = inspect_question(method_on(backbone, reads="latent"), QUESTION, private={"sender": "The word is tiger."})
    att = record["attention"]
    share = dict(zip([s["label"] for s in att["segments"]], att["mean"]))
    assert share["sender/prompt"] == 0.0  # masked: the reader never sees it
    assert share["sender/latent"] > 0
    for token in att["tokens"]:
        for row in token["per_layer"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-4)


def _reference_steps(method, question: str, private: dict, m: int):
    """The sender's prompt end and latent steps recomputed without the trace: one full forward of
    the whole sequence per step through the HF model's own forward (LM head included)."""
    bb = method.backbone
    sender = method.topology.roles[0]
    prompt = method.prompts(sender, asks_of([question], [private]), "")
    ids, _ = tokenize(bb.tokenizer, prompt, bb.device)
    seq = bb.embed(ids)  # (1, T, d)
    probs = []
    with torch.no_grad():
        for _ in range(m + 1):
            logits = bb.base_model()(inputs_embeds=seq).logits[0, -1].float()  # (V,)
            probs.append(logits.softmax(dim=-1))
            hidden = bb.decoder()(inputs_embeds=seq).last_hidden_state[:, -1]  # (1, d)
            seq = torch.cat([seq, bb.realigner(hidden)[:, None]], dim=1)
    return probs  # [prompt end, step 1, ..., step m (and one beyond)]


def test_last_layer_lens_is_the_models_next_token_distribution(backbone):
    m, private = 3, {"sender": "The word is tiger."}
    method = method_on(backbone, m=m)
    record = inspect_question(method, QUESTION, private=private, config=InspectConfig(top_k=8, watch=["tiger"]))
    (sender,) = record["latent"]
    assert sender["agent"] == "sender"
    assert [s["kind"] for s in sender["steps"]] == ["prompt_end"] + ["latent"] * m
    reference = _reference_steps(method, QUESTION, private, m)
    for step, probs in zip(sender["steps"], reference):
        last = step["lens"][-1]
        assert last["layer"] == backbone.n_layers
        top = probs.topk(8)
        assert [t["id"] for t in last["top"]] == top.indices.tolist()
        assert [t["p"] for t in last["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        (watched,) = last["watch"]
        assert watched["p"] == pytest.approx(float(probs[watched["id"]]), abs=1e-5)
        assert watched["rank"] == int((probs > probs[watched["id"]]).sum()) + 1
    # the intermediate layer reads something else than the last one (the lens is not a copy)
    first, last = sender["steps"][1]["lens"][0], sender["steps"][1]["lens"][-1]
    assert first["layer"] < last["layer"] and first["top"] != last["top"]


def test_segment_bookkeeping_matches_the_trace(backbone):
    m, private = 2, {"sender": "The word is tiger."}
    method = method_on(backbone, m=m, max_new=4)
    record = inspect_question(method, QUESTION, private=private)
    # the same run built by hand on a trace
    trace = LatentTrace(backbone, 1)
    sender, reader = PAIR.roles
    asks = asks_of([QUESTION], [private])
    with torch.no_grad():
        latent_steps(trace, "sender", prefill(trace, "sender", method.prompts(sender, asks, "")), m)
        hidden = prefill(trace, "reader", method.prompts(reader, asks, ""))
        out = decode(trace, "reader", hidden, method.config.decode, [0])
    got = record["trace"]
    assert [{k: v for k, v in s.items() if k != "n_bytes"} for s in got["segments"]] == [
        {**s, "n_tokens": s["n_tokens"][0]} for s in trace.summary()
    ]
    assert got["length"] == trace.length and got["n_bytes"] == trace.n_bytes()
    assert sum(s["n_bytes"] for s in got["segments"]) == trace.n_bytes()
    for s in got["segments"]:
        assert s["n_bytes"] == s["n_tokens"] * trace.bytes_per_entry()
    assert record["answer"]["token_ids"] == out.token_ids[0]
    n_generated = next(s["n_tokens"] for s in got["segments"] if s["kind"] == "generated")
    assert n_generated == len(out.token_ids[0]) - 1  # the last token is chosen, never appended


@pytest.mark.parametrize("reads", ["all", "latent"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_inspection_does_not_change_the_answer(backbone, reads, temperature):
    method = method_on(backbone, topology=None, reads=reads, max_new=8, temperature=temperature)
    fast = backbone.base_model().config._attn_implementation
    assert fast in ("sdpa", "diffmas_cpu_sdpa")
    normal = method.run_batch([QUESTION], seeds=[7])[0]
    record = inspect_question(method, QUESTION, seed=7)
    assert record["answer"]["token_ids"] == normal.token_ids
    assert record["answer"]["text"] == normal.text
    # the probes leave the model as they found it: fast attention back, no hooks left
    assert backbone.base_model().config._attn_implementation == fast
    modules = [
        backbone.decoder(),
        *backbone.decoder().layers,
        *(layer.self_attn for layer in backbone.decoder().layers),
    ]
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules)
    assert "new_trace" not in vars(method)
    assert method.run_batch([QUESTION], seeds=[7])[0].token_ids == normal.token_ids


def test_bad_settings_are_one_clear_error(tied_backbone):
    fast = tied_backbone.base_model().config._attn_implementation
    with pytest.raises(InspectError, match="top_k"):
        InspectConfig(top_k=0)
    with pytest.raises(InspectError, match="layers 1..2"):
        inspect_question(method_on(tied_backbone), QUESTION, config=InspectConfig(lens_layers=[5]))
    assert tied_backbone.base_model().config._attn_implementation == fast


# ----------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def page_dir(tmp_path_factory):
    from diffmas.inspect.page import write_inspection

    from conftest import make_backbone

    bb = make_backbone(tied=False)
    record = inspect_question(
        method_on(bb, reads="latent"),
        QUESTION,
        private={"sender": "The word is <tiger> & more."},
        config=InspectConfig(watch=["tiger"]),
    )
    out = tmp_path_factory.mktemp("page")
    write_inspection(record, out)
    return out


def test_page_is_self_contained_and_has_every_section(page_dir):
    text = (page_dir / "index.html").read_text()
    record = json.loads((page_dir / "inspection.json").read_text())
    for element in ("timeline", "segments", "logit-lens", "attention-heatmap", "attention-layers", "answer"):
        assert f"id='{element}'" in text
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "&lt;tiger&gt; &amp; more" in text  # inputs are escaped
    assert text.count("class='segment'") == len(record["trace"]["segments"])
    # one cell per segment and decoded token (plus the mean), and per segment and layer
    n_cells = len(record["attention"]["segments"]) * (len(record["attention"]["tokens"]) + 1 + record["n_layers"])
    assert text.count("class='cell'") == n_cells


def test_page_in_a_headless_browser(page_dir):
    from diffmas.inspect.browser import dump_dom, find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip(
            "CHROMIUM IS NOT INSTALLED: the inspection page was not opened in a real browser "
            "(apt-get install -y chromium, or `make sandbox-tools` as root)"
        )
    dom = dump_dom(page_dir / "index.html")
    record = json.loads((page_dir / "inspection.json").read_text())
    for element in ("timeline", "logit-lens", "attention-heatmap", "attention-layers", "answer"):
        assert f'id="{element}"' in dom, element
    assert dom.count('class="segment"') == len(record["trace"]["segments"])
    png = screenshot(page_dir / "index.html", page_dir / "shot.png", 900, 700)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the command


def cli(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffmas", *args], capture_output=True, text=True, timeout=180, env=env
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    make_model(tied=False).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_inspect_command_on_a_task_example(tiny_model_dir, tmp_path):
    out = tmp_path / "insp"
    args = ["--task", "relay_word", "--index", "2", "--reads", "latent", "-m", "2", "--max-new-tokens", "3"]
    proc = cli("inspect", *args, "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "inspection.json").read_text())
    assert (out / "index.html").is_file()
    assert record["task"] == "relay_word" and record["id"] and record["gold"]
    assert record["inspect"]["watch"] == [record["gold"]]  # the secret is watched in every lens reading
    assert record["settings"]["reads"] == "latent" and record["settings"]["roles"] == ["sender", "reader"]
    assert [s["kind"] for s in record["latent"][0]["steps"]] == ["prompt_end", "latent", "latent"]
    assert record["private"]["sender"].endswith(f"{record['gold']}.")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "either a QUESTION or --task"),
        (["Q?", "--task", "relay_word"], "either a QUESTION or --task"),
        (["--task", "relay_word", "--index", "100000"], "--index 100000"),
        (["Q?", "--lens-layers", "a,b"], "--lens-layers"),
        (["Q?", "--method", "latent_ma"], "did you mean 'latent_mas'"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_model_dir, tmp_path, args, message):
    proc = cli("inspect", *args, "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- eval --inspect N


def _relay_run(model_dir, out, m):
    from diffmas.evaluate.runner import EvalConfig, evaluate

    config = EvalConfig(
        task="relay_word",
        model=str(model_dir),
        limit=3,
        batch_size=3,
        device="cpu",
        method_config=MethodConfig(latent_steps=m, reads="latent", decode=DecodeConfig(max_new_tokens=3)),
    )
    return evaluate(config, out, progress=False, inspect=2)


def test_eval_inspect_aggregates_into_report_and_compare(tiny_model_dir, tmp_path, monkeypatch):
    from diffmas.evaluate.report import write_report
    from diffmas.evaluate.rundir import load_runs
    from diffmas.inspect.aggregate import attention_change, load_inspections, question_shares, run_attention

    a, b = tmp_path / "m1", tmp_path / "m3"
    _relay_run(tiny_model_dir, a, 1)
    _relay_run(tiny_model_dir, b, 3)
    inspections = load_inspections(a)
    assert len(inspections) == 2 and all(r["matches_run"] for r in inspections)  # the recorded answers
    records = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in inspections] == sorted(r["id"] for r in records[:2])
    # a rerun keeps the inspections it has (nothing recomputed: a poisoned inspector is never called)
    monkeypatch.setattr("diffmas.inspect.runs.inspect_example", lambda *a, **k: pytest.fail("recomputed"))
    _relay_run(tiny_model_dir, a, 1)
    monkeypatch.undo()

    runs = load_runs([a, b])
    att = run_attention(runs[0])
    assert att["n_inspected"] == 2 and att["all"]["n"] == 2
    assert att["correct"] is None or att["correct"]["n"] + att["incorrect"]["n"] == 2
    assert sum(att["all"]["agents"].values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(att["all"]["kinds"].values()) == pytest.approx(1.0, abs=1e-4)
    assert att["all"]["agents"]["sender"] == pytest.approx(att["all"]["kinds"]["latent"])  # reads=latent
    expected = sum(question_shares(r)["agents"]["sender"] for r in inspections) / 2
    assert att["all"]["agents"]["sender"] == pytest.approx(expected)

    change = attention_change(runs)
    base, other = change["runs"]
    assert base["is_baseline"] and "delta" not in base
    want = other["attention"]["all"]["kinds"]["latent"] - base["attention"]["all"]["kinds"]["latent"]
    assert other["delta"]["kinds"]["latent"] == pytest.approx(want)

    md = write_report(runs, tmp_path / "report", n_boot=50).read_text()
    assert "Attention share of the final agent" in md and "Δ sender" in md
    proc = cli("compare", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    assert "attention share" in proc.stdout
    as_json = json.loads(cli("compare", str(a), str(b), "--json").stdout)
    assert as_json["attention"]["runs"][1]["delta"]["kinds"]["latent"] == pytest.approx(want)


# ----------------------------------------------------------------------------- other methods


def test_per_role_adapters_lens_under_the_agents_adapter(untied_backbone):
    """diffmas with one LoRA per role: the lens reads the sender's state as its adapter computed it,
    and the answer is the one of a normal run."""
    from diffmas.train.adapters import add_trainable_adapters
    from diffmas.train.config import TrainConfig

    bb = untied_backbone
    mapping = add_trainable_adapters(bb, TrainConfig(task="x", adapters="per-role"), PAIR)
    torch.manual_seed(1)
    for name, p in bb.model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; random B makes each adapter change the model
            p.data.normal_(0, 0.3)
    bb.model.requires_grad_(False)
    config = MethodConfig(latent_steps=2, decode=DecodeConfig(max_new_tokens=5))
    method = get_method("diffmas", bb, PAIR, config, mapping)
    private = {"sender": "The word is tiger."}
    normal = method.run_batch([QUESTION], privates=[private])[0]
    record = inspect_question(method, QUESTION, private=private, config=InspectConfig(top_k=4))
    assert record["answer"]["token_ids"] == normal.token_ids
    with bb.use_adapter("sender"):
        reference = _reference_steps(method, QUESTION, private, 2)
    with bb.use_adapter(None):
        bare = _reference_steps(method, QUESTION, private, 2)
    for step, probs, other in zip(record["latent"][0]["steps"], reference, bare):
        assert [t["p"] for t in step["lens"][-1]["top"]] == pytest.approx(probs.topk(4).values.tolist(), abs=1e-5)
        assert not torch.allclose(probs, other, atol=1e-3)  # the adapter matters: the check can fail


@pytest.mark.parametrize("name", ["single", "text_mas"])
def test_methods_without_a_latent_channel(tied_backbone, name):
    """The final agent's trace only: no latent steps, the final agent's own segments; same answer."""
    method = method_on(tied_backbone, name=name, max_new=4)
    method.config.upstream_max_new_tokens = 3
    normal = method.run_batch([QUESTION])[0]
    record = inspect_question(method, QUESTION)
    assert record["latent"] == [] and record["answer"]["token_ids"] == normal.token_ids
    assert {s["agent"] for s in record["trace"]["segments"]} == {"reader"}
    for token in record["attention"]["tokens"]:
        assert sum(token["mean"]) == pytest.approx(1.0, abs=1e-4)


def test_eval_and_report_commands_with_inspect(tiny_model_dir, tmp_path):
    run, report = tmp_path / "run", tmp_path / "report"
    args = ["--task", "relay_word", "--limit", "2", "--inspect", "1", "-m", "1", "--max-new-tokens", "2"]
    proc = cli("eval", *args, "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    assert len(list((run / "inspection").glob("*/inspection.json"))) == 1
    assert len(list((run / "inspection").glob("*/index.html"))) == 1
    proc = cli("report", str(run), "--out", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "Attention share of the final agent" in (report / "report.md").read_text()
    proc = cli("eval", *args[:-6], "--inspect", "-1", "--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "inspect must be >= 0" in proc.stderr
