"""Integration: a trained latent channel carries a secret the reader cannot otherwise see.

relay_word with K=4 on the embedded SmolLM2-135M under reads=latent: the reader attends to the
sender's latent steps only. DiffMAS trained through the trajectory must answer far above chance;
the untrained channel and a channel trained with no latent step (m=0: nothing can pass) must not.
This is the test that fails if gradients stop reaching the channel or the mask lets the prompt
through (then m=0 would learn too).
"""

from __future__ import annotations

import os

import pytest
import torch

from diffmas.evaluate.information import above_chance_p, mutual_information_bits
from diffmas.evaluate.runner import EvalConfig, evaluate
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig
from diffmas.train import TrainConfig
from diffmas.train.trainer import train

pytestmark = pytest.mark.integration

TASK = "relay_word?k=4"
CHANCE = 0.25
N_TEST = 32
STEPS = 48  # about a minute on 2 CPU threads; the loss drops between steps ~25 and ~40


@pytest.fixture(scope="module", autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


def channel(tmp_path, m: int, trained: bool) -> tuple[float, float, float]:
    """(accuracy, p-value against chance, bits) on held-out examples."""
    adapter = tmp_path / f"adapter-m{m}"
    if trained:
        train(
            TrainConfig(
                task=TASK,
                latent_steps=m,
                reads="latent",
                limit=STEPS * 8,
                batch_size=8,
                grad_accum=1,
                max_steps=STEPS,
                learning_rate=3e-3,
                lr_scheduler="constant_with_warmup",
                warmup_ratio=5,
                save_steps=STEPS,
                device="cpu",
            ),
            adapter,
            report_to=[],
        )
    summary = evaluate(
        EvalConfig(
            task=TASK,
            method="diffmas" if trained else "latent_mas",
            limit=N_TEST,
            batch_size=16,
            device="cpu",
            adapter=str(adapter) if trained else None,
            method_config=MethodConfig(latent_steps=m, reads="latent", decode=DecodeConfig(max_new_tokens=3)),
        ),
        tmp_path / f"eval-m{m}-{trained}",
        progress=False,
    )
    records = [line for line in (tmp_path / f"eval-m{m}-{trained}" / "samples.jsonl").read_text().splitlines()]
    import json

    rows = [json.loads(r) for r in records]
    bits = mutual_information_bits([r["gold"] for r in rows], [r["extracted"] for r in rows])
    n_correct = sum(bool(r["correct"]) for r in rows)
    return summary["accuracy"], above_chance_p(n_correct, len(rows), CHANCE), bits


def test_trained_channel_carries_the_secret_and_the_controls_do_not(tmp_path):
    untrained = channel(tmp_path, 2, trained=False)
    trained = channel(tmp_path, 2, trained=True)
    blind = channel(tmp_path, 0, trained=True)
    summary = f"untrained {untrained}, trained m=2 {trained}, trained m=0 {blind}"
    print(summary)
    assert trained[0] >= 0.75 and trained[1] < 1e-6 and trained[2] > 1.0, summary
    for _, p, bits in (untrained, blind):
        assert p > 0.01 and bits < 0.3, summary  # not above chance, and the answer ignores the secret
