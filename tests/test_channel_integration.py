"""Integration: a trained latent channel carries a secret the reader cannot otherwise see.

relay_word (K=8) on the embedded SmolLM2-135M under reads=latent: the reader attends to the
sender's latent steps only. DiffMAS trained through the trajectory must answer far above chance;
the untrained channel and a channel trained with no latent step (m=0: nothing can pass) must not.
This is the test that fails if gradients stop reaching the channel or the mask lets the prompt
through (then m=0 would learn too).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from diffmas.evaluate.information import ChannelReading, read_channel
from diffmas.evaluate.runner import EvalConfig, evaluate
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig
from diffmas.train import TrainConfig
from diffmas.train.trainer import train

pytestmark = pytest.mark.integration

TASK = "relay_word"
CHANCE = 1 / 8
N_TEST = 32
M = 4
# The channel study's recipe (study/channel.py): the loss drops between steps ~40 and ~55.
STEPS = 80
# The m=0 control needs no long training: with nothing to read there is no path from the secret
# to the answer at all (tests/test_reads.py checks that no gradient reaches the sender).
CONTROL_STEPS = 16


@pytest.fixture(scope="module", autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


def channel(tmp_path, m: int, trained: bool, steps: int = STEPS) -> tuple[float, ChannelReading]:
    """Accuracy and what the records say about the channel, on held-out examples."""
    adapter = tmp_path / f"adapter-m{m}"
    if trained:
        train(
            TrainConfig(
                task=TASK,
                latent_steps=m,
                reads="latent",
                limit=steps * 8,
                batch_size=8,
                grad_accum=1,
                max_steps=steps,
                learning_rate=3e-3,
                lr_scheduler="cosine",
                warmup_ratio=10,
                save_steps=steps,
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
    rows = [json.loads(line) for line in (tmp_path / f"eval-m{m}-{trained}" / "samples.jsonl").read_text().splitlines()]
    return summary["accuracy"], read_channel(rows, CHANCE, n_perm=200)


def test_trained_channel_carries_the_secret_and_the_controls_do_not(tmp_path):
    untrained = channel(tmp_path, M, trained=False)
    trained = channel(tmp_path, M, trained=True)
    blind = channel(tmp_path, 0, trained=True, steps=CONTROL_STEPS)
    summary = f"untrained {untrained}, trained m={M} {trained}, trained m=0 {blind}"
    print(summary)
    accuracy, reading = trained
    # Far above chance (1/8) and above always giving the commonest secret: the exact accuracy after
    # 80 steps depends on the CPU's float kernels (MKL picks different code on Intel and AMD; the
    # same seed reached 0.75+ on an Intel machine and 20/32 on an AMD EPYC), the evidence does not.
    assert accuracy >= 2 * reading.top_share and reading.p_chance < 1e-6 and reading.bits > 1.5, summary
    for accuracy, reading in (untrained, blind):
        # no dependence of the answer on the secret, and no better than always giving the commonest
        # secret (a reader may learn the prior; 32 examples make 1/K itself a loose bound)
        assert reading.bits_p > 0.01 and accuracy <= reading.top_share, summary
