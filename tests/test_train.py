"""DiffMAS training on a tiny random model: gradients through the trace, overfitting, resume,
adapter save/reload, per-role adapters, base-model checks."""

from __future__ import annotations

import json

import pytest
import torch

from diffmas.backbone import BackboneError
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig, get_method
from diffmas.roles import default_topology
from diffmas.train import TrainConfig
from diffmas.train.adapters import add_trainable_adapters, attach_adapter, lora_parameters
from diffmas.train.trainer import train
from diffmas.train.trajectory import TrajectoryModel

from conftest import TEST_DEVICE, make_backbone

PAIRS = [
    ("What is two plus two?", "4"),
    ("Capital of France?", "Paris"),
    ("Colour of grass?", "green"),
    ("Opposite of up?", "down"),
    ("First letter?", "A"),
    ("Legs of a cat?", "four"),
    ("Sky colour?", "blue"),
    ("Water freezes at?", "zero"),
]


@pytest.fixture
def qa_task(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": q, "answer": a}) + "\n" for i, (q, a) in enumerate(PAIRS))
    )
    return f"jsonl:{path}?type=math"


def config(task, **kw):
    base = dict(
        task=task,
        split="test",
        method="diffmas",
        latent_steps=2,
        n_agents=3,
        batch_size=4,
        grad_accum=1,
        max_steps=4,
        learning_rate=5e-3,
        save_steps=2,
        device=TEST_DEVICE,
    )
    return TrainConfig(**{**base, **kw})


def trajectory(cfg, tied=False):
    bb = make_backbone(tied)
    topo = default_topology(cfg.topology, cfg.n_agents)
    mapping = add_trainable_adapters(bb, cfg, topo)
    infer = "latent_mas" if cfg.method == "diffmas" else "single"
    method = get_method(infer, bb, topo, MethodConfig(latent_steps=cfg.latent_steps), mapping)
    return TrajectoryModel(method, cfg.method, cfg.upstream_grad), bb


def one_backward(cfg, tied=False):
    torch.manual_seed(0)
    model, bb = trajectory(cfg, tied)
    batch = PAIRS[:3]
    loss = model([q for q, _ in batch], [a for _, a in batch], ["fmt"] * 3)["loss"]
    loss.backward()
    return bb


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_per_role_gradients_reach_upstream_adapters_only_with_full(tied):
    full = one_backward(config("x", adapters="per-role", upstream_grad="full"), tied)
    none = one_backward(config("x", adapters="per-role", upstream_grad="none"), tied)
    for role in ("planner", "critic"):
        grads_full = [p.grad for n, p in lora_parameters(full.model, role).items() if "lora_B" in n]
        grads_none = [p.grad for n, p in lora_parameters(none.model, role).items() if "lora_B" in n]
        assert grads_full and all(g is not None for g in grads_full)
        assert sum(float(g.abs().sum()) for g in grads_full) > 0, f"{role}: no gradient through the trace"
        assert all(g is None or float(g.abs().sum()) == 0 for g in grads_none)
    # the final agent learns either way
    for bb in (full, none):
        solver = [p.grad for n, p in lora_parameters(bb.model, "solver").items() if "lora_B" in n]
        assert sum(float(g.abs().sum()) for g in solver) > 0


def test_shared_adapter_gradient_includes_the_path_through_the_trace():
    full = one_backward(config("x", upstream_grad="full"))
    none = one_backward(config("x", upstream_grad="none"))
    g_full = torch.cat([p.grad.flatten() for n, p in lora_parameters(full.model, "default").items() if "lora_B" in n])
    g_none = torch.cat([p.grad.flatten() for n, p in lora_parameters(none.model, "default").items() if "lora_B" in n])
    assert (g_full - g_none).abs().max() > 1e-6  # the upstream uses of the shared adapter contribute


def test_training_only_touches_lora(qa_task, tmp_path):
    bb = make_backbone(False)
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    train(config(qa_task), tmp_path / "a", backbone=bb, report_to=[])
    after = dict(bb.model.base_model.model.named_parameters())
    changed_lora = False
    for name, p in after.items():
        if "lora_" in name:
            changed_lora |= True
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p.detach(), before[key]), f"frozen weight {key} changed"
    assert changed_lora


def _greedy_answers(bb, mapping, topo, m=2):
    method = get_method(
        "latent_mas", bb, topo, MethodConfig(latent_steps=m, decode=DecodeConfig(max_new_tokens=8)), mapping
    )
    return [r.text for r in method.run_batch([q for q, _ in PAIRS], "fmt")]


def test_overfit_eight_examples(qa_task, tmp_path):
    cfg = config(
        qa_task,
        batch_size=8,
        max_steps=60,
        learning_rate=1e-2,
        lora_r=16,
        lora_alpha=32,
        save_steps=1000,
        lr_scheduler="cosine",  # settles at the end: the memorised answers do not hang on rounding noise
    )
    bb = make_backbone(False)
    summary = train(cfg, tmp_path / "fit", backbone=bb, report_to=[])
    first, last = summary["loss_curve"][0][1], summary["loss_curve"][-1][1]
    assert last <= 0.1 * first, summary["loss_curve"]
    # greedy decoding reproduces the targets (the task's targets end with the boxed answer)
    from diffmas.tasks import get_task

    task = get_task(qa_task)
    targets = [task.target_text(ex) for ex in task.load("test")]
    topo = default_topology("sequential", 3)
    bb.model.eval()
    mapping = {r.name: "default" for r in topo.roles}
    method = get_method(
        "latent_mas", bb, topo, MethodConfig(latent_steps=2, decode=DecodeConfig(max_new_tokens=64)), mapping
    )
    answers = [r.text for r in method.run_batch([task.prompt(ex) for ex in task.load("test")], task.format_instruction)]
    assert answers == targets, (summary["loss_curve"][-5:], answers)


def test_resume_continues_the_loss_curve_identically(qa_task, tmp_path):
    cfg = config(qa_task, max_steps=6, save_steps=2)
    whole = train(cfg, tmp_path / "whole", backbone=make_backbone(False), report_to=[])
    stopped = train(cfg, tmp_path / "split", backbone=make_backbone(False), report_to=[], stop_after=3)
    assert stopped == {"stopped_at": 3}
    resumed = train(cfg, tmp_path / "split", backbone=make_backbone(False), report_to=[])
    assert resumed["resumed_from"].endswith("checkpoint-3")
    a, b = dict(whole["loss_curve"]), dict(resumed["loss_curve"])
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    # rerunning a finished run changes nothing: same summary back, adapter untouched
    weights = (tmp_path / "split" / "adapter_model.safetensors").read_bytes()
    again = train(cfg, tmp_path / "split", backbone=make_backbone(False), report_to=[])
    assert (
        again == json.loads(json.dumps(resumed))
        and (tmp_path / "split" / "adapter_model.safetensors").read_bytes() == weights
    )


@pytest.mark.parametrize("adapters", ["shared", "per-role"])
def test_saved_adapter_reloads_with_identical_outputs(qa_task, tmp_path, adapters):
    from peft import PeftModel

    cfg = config(qa_task, adapters=adapters, max_steps=3)
    bb = make_backbone(False)
    train(cfg, tmp_path / "ad", backbone=bb, report_to=[])
    topo = default_topology("sequential", 3)
    bb.model.eval()
    trained_mapping = (
        {r.name: r.name for r in topo.roles} if adapters == "per-role" else {r.name: "default" for r in topo.roles}
    )
    expected = _greedy_answers(bb, trained_mapping, topo)

    fresh = make_backbone(False)
    mapping = attach_adapter(fresh, tmp_path / "ad", topo)
    assert mapping == trained_mapping
    assert _greedy_answers(fresh, mapping, topo) == expected
    if adapters == "per-role":
        for role in ("planner", "critic", "solver"):
            assert (tmp_path / "ad" / role / "adapter_model.safetensors").is_file()
            a = lora_parameters(bb.model, role)
            b = lora_parameters(fresh.model, role)
            assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
        plain = PeftModel.from_pretrained(make_backbone(False).model, tmp_path / "ad")  # a standard peft dir
        ids = torch.tensor([[5, 6, 7, 8]], device=fresh.device)
        with torch.no_grad():
            assert torch.allclose(plain(ids).logits, fresh.model(ids).logits, atol=1e-6)
    meta = json.loads((tmp_path / "ad" / "diffmas_config.json").read_text())
    assert meta["method"] == "diffmas" and meta["latent_steps"] == 2 and meta["data_hash"]


def test_adapter_for_another_base_model_is_refused(qa_task, tmp_path):
    train(config(qa_task, max_steps=1), tmp_path / "ad", backbone=make_backbone(False), report_to=[])
    other = make_backbone(False, seed=1)
    with pytest.raises(BackboneError, match="was trained for base model"):
        attach_adapter(other, tmp_path / "ad", default_topology("sequential", 3))


def test_controls_train_the_final_agent_only(qa_task, tmp_path):
    bb = make_backbone(False)
    train(config(qa_task, method="sft_single", max_steps=2), tmp_path / "s", backbone=bb, report_to=[])
    meta = json.loads((tmp_path / "s" / "diffmas_config.json").read_text())
    assert meta["apply_to"] == "final"
    topo = default_topology("sequential", 3)
    assert attach_adapter(make_backbone(False), tmp_path / "s", topo) == {"solver": "default"}


def test_sft_text_mas_caches_upstream_text(qa_task, tmp_path):
    cfg = config(qa_task, method="sft_text_mas", max_steps=2, upstream_max_new_tokens=4)
    train(cfg, tmp_path / "t", backbone=make_backbone(False), report_to=[])
    cached = [json.loads(line) for line in (tmp_path / "t" / "text_mas_contexts.jsonl").read_text().splitlines()]
    assert len(cached) == len(PAIRS) and all("[planner]" in c["context"] for c in cached)


def test_conflicting_settings_on_an_existing_run_are_refused(qa_task, tmp_path):
    from diffmas.train.trainer import TrainRunConflictError

    train(config(qa_task, max_steps=1), tmp_path / "c", backbone=make_backbone(False), report_to=[])
    with pytest.raises(TrainRunConflictError, match="latent_steps"):
        train(config(qa_task, max_steps=1, latent_steps=5), tmp_path / "c", backbone=make_backbone(False), report_to=[])


def test_two_process_training_matches_adapter_shape(qa_task, tmp_path):
    """torchrun (what `accelerate launch --multi_gpu` runs) with 2 CPU processes over gloo."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import make_model, make_tokenizer

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter")
    model_dir = tmp_path / "tiny"
    make_model(tied=False).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    args = [
        "--task",
        qa_task,
        "--split",
        "test",
        "--model",
        str(model_dir),
        "--latent-steps",
        "2",
        "--agents",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-steps",
        "2",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "diffmas",
            "train",
            "--out",
            str(tmp_path / "ddp"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"final_loss"') == 1  # the summary is reported once
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in losses] == [1, 2]  # logged once per step, not once per process
    assert losses[-1]["epoch"] == 1.0  # 2 steps x 2 processes x batch 2 = 8 examples: both ranks trained
    single = subprocess.run(
        [sys.executable, "-m", "diffmas", "train", "--out", str(tmp_path / "one"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    a = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed trace chunks (recomputed in backward, cache replayed) == plain autograd."""
    grads = []
    for checkpointing in (False, True):
        model, bb = trajectory(config("x", adapters="per-role", upstream_grad="full"))
        bb.gradient_checkpointing = checkpointing
        torch.manual_seed(1)  # non-zero LoRA B: gradients reach every LoRA tensor
        for _, p in bb.model.named_parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        batch = PAIRS[:3]
        loss = model([q for q, _ in batch], [a for _, a in batch], ["fmt"] * 3)["loss"]
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}))
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    assert any("planner" in n and float(g.abs().sum()) > 0 for n, g in b.items())
