"""Training defects: the loss over gradient accumulation, the EOS of a cut target, and where each
process of a multi-process run loads its model."""

from __future__ import annotations

import json

import pytest
import torch

from diffmas.trace import LatentTrace
from diffmas.train import TrainConfig
from diffmas.train.trainer import _step_loss, process_device, train
from diffmas.train.trajectory import target_ids, teacher_forced_loss

from conftest import TEST_DEVICE, make_backbone


@pytest.fixture
def uneven_task(tmp_path):
    """Two examples whose targets differ a lot in length (1 vs ~60 tokens)."""
    path = tmp_path / "uneven.jsonl"
    rows = [
        {"id": "short", "question": "Say yes.", "answer": "y"},
        {"id": "long", "question": "Say a long sentence.", "answer": "x" * 60},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}?type=math"


def _first_step_loss(task, out, batch_size, grad_accum):
    cfg = TrainConfig(
        task=task,
        split="test",
        method="sft_single",
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=1,
        learning_rate=1e-3,
        save_steps=100,
        device=TEST_DEVICE,
    )
    summary = train(cfg, out, backbone=make_backbone(False), report_to=[])
    return summary["loss_curve"][0][1]


def test_gradient_accumulation_weights_micro_batches_by_target_tokens(uneven_task, tmp_path):
    # One batch of both examples and two accumulated micro-batches of one example each are the same
    # optimizer step: the loss is the mean over all target tokens either way.
    together = _first_step_loss(uneven_task, tmp_path / "together", batch_size=2, grad_accum=1)
    accumulated = _first_step_loss(uneven_task, tmp_path / "accumulated", batch_size=1, grad_accum=2)
    assert accumulated == pytest.approx(together, rel=1e-4)


def test_step_loss_divides_the_sum_by_the_step_count():
    out = {"loss": torch.tensor(2.0), "loss_sum": torch.tensor(6.0)}
    assert float(_step_loss(out, torch.tensor(12))) == 0.5
    assert float(_step_loss(out, torch.tensor(12), n_processes=4)) == 2.0  # DDP averages the gradients back
    assert float(_step_loss(out, None)) == 2.0


def test_no_eos_after_a_target_cut_at_max_target_tokens():
    tok = make_backbone(False).tokenizer
    whole = target_ids(tok, "abc", max_target_tokens=10)
    cut = target_ids(tok, "abcdefgh", max_target_tokens=4)
    assert whole[-1] == tok.eos_token_id and len(whole) == 4
    assert cut == tok("abcd", add_special_tokens=False)["input_ids"]  # stops mid-answer without an EOS


def test_teacher_forced_loss_counts_no_eos_on_a_cut_target():
    bb = make_backbone(False)
    loss_sum, n = teacher_forced_loss(LatentTrace(bb, 1), "solver", ["Q"], ["abcdefgh"], max_target_tokens=4)
    assert n == 4
    _, n_whole = teacher_forced_loss(LatentTrace(bb, 1), "solver", ["Q"], ["abc"], max_target_tokens=4)
    assert n_whole == 4  # 3 tokens + EOS
    assert loss_sum.ndim == 0 and float(loss_sum) > 0


def _fake_gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_each_rank_loads_on_its_own_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device("auto") == "cuda:3"
    assert process_device("cuda") == "cuda:3"
    assert process_device("cpu") == "cpu"
    assert process_device("cuda:5") == "cuda:5"  # an explicit device is kept
    monkeypatch.delenv("LOCAL_RANK")
    assert process_device("auto") == "auto"


class _Loaded(Exception):
    pass


def test_train_asks_the_loader_for_the_ranks_device(monkeypatch, uneven_task, tmp_path):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    asked = {}

    def fake_load(name, dtype="auto", device="auto", **kw):
        asked["device"] = device
        raise _Loaded

    monkeypatch.setattr("diffmas.backbone.load_backbone", fake_load)
    with pytest.raises(_Loaded):
        train(
            TrainConfig(task=uneven_task, split="test", method="sft_single", max_steps=1), tmp_path / "r", report_to=[]
        )
    assert asked["device"] == "cuda:1"
