"""bench/roofline.py: the arithmetic behind the floors in docs/benchmarks.md, against hand counts."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import roofline  # noqa: E402  (a bench script's module, next to the scripts that import it)


def test_shape_counts_the_models_weights(backbone):
    """The tiny Llama: 2 layers, width 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 259."""
    layers, d, heads, kv_heads, head_dim, mlp, vocab = 2, 64, 4, 2, 16, 128, 259
    shape = roofline.Shape.of(backbone)
    products = layers * (2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * mlp)
    assert shape.product_params == products
    assert shape.head_params == vocab * d
    assert shape.realign_params == (0 if backbone.tied else d * d)
    assert shape.attention_flops_per_entry == 4 * heads * head_dim * layers
    norms = (2 * layers + 1) * d
    assert shape.decoder_bytes == 4 * (products + norms)
    assert shape.head_bytes == 4 * vocab * d
    assert shape.realign_bytes == 4 * shape.realign_params
    assert shape.kv_bytes_per_entry == layers * 2 * kv_heads * head_dim * 4


SHAPE = roofline.Shape(
    product_params=1000,
    head_params=100,
    realign_params=0,
    attention_flops_per_entry=10,
    decoder_bytes=4000,
    head_bytes=400,
    realign_bytes=0,
    kv_bytes_per_entry=8,
)
AGENTS = {
    "a": {"n_prompt_tokens": 3, "n_latent_steps": 2, "n_generated_tokens": 0},
    "b": {"n_prompt_tokens": 2, "n_latent_steps": 0, "n_generated_tokens": 3},
}
PEAKS = roofline.Peaks(product_flops_per_s=1e3, read_bytes_per_s=1e3)  # 1 FLOP and 1 byte per ms


def test_floors_of_agents_on_one_trace():
    """Counted by hand, 2 rows sharing every weight read; each phase the slower of compute and reads."""
    f = roofline.agent_floors(SHAPE, AGENTS, rows=2, peaks=PEAKS, shared_trace=True)
    # a's prompt: 3 x 2000 FLOPs + (1 + 2 + 3) entries x 10 = 6060 FLOPs; reads 4000 / 2 B
    assert f["a"]["prompt_s"] == pytest.approx(6.06)
    # a's 2 latent steps from 3 entries: 2 x 2000 + (4 + 5) x 10 = 4090 FLOPs; reads 2 x 2000 + 9 x 8 = 4072 B
    assert f["a"]["steps_s"] == pytest.approx(4.09)
    # b's prompt on a's 5 entries: 2 x 2000 + (6 + 7) x 10 = 4130 FLOPs; reads 2000 + 5 x 8 B
    assert f["b"]["prompt_s"] == pytest.approx(4.13)
    # b decodes 3 tokens: 3 heads and 2 forwards from 7 entries: 2 x 2 x 1100 + (8 + 9) x 10 = 4570
    # FLOPs against 2 x 4400 / 2 + 17 x 8 = 4536 B, plus the first token's head (200 FLOPs, 200 B)
    assert f["b"]["steps_s"] == pytest.approx(4.57 + 0.2)
    assert f["b"]["total_s"] == pytest.approx(f["b"]["prompt_s"] + f["b"]["steps_s"])


def test_agents_on_their_own_traces_start_from_nothing():
    f = roofline.agent_floors(SHAPE, AGENTS, rows=2, peaks=PEAKS, shared_trace=False)
    assert f["a"]["prompt_s"] == pytest.approx(6.06)
    assert f["b"]["prompt_s"] == pytest.approx(4.03)  # 4000 + (1 + 2) x 10 FLOPs
    assert f["b"]["steps_s"] == pytest.approx(4.47 + 0.2)  # 4400 + (3 + 4) x 10 FLOPs


def test_memory_bound_steps_take_the_read_time():
    fast = roofline.Peaks(product_flops_per_s=1e6, read_bytes_per_s=1e3)
    steps = roofline.steps_floor_s(SHAPE, "decode", 2, context=7, rows=2, peaks=fast)
    assert steps == pytest.approx(4.536)


def test_peaks_and_rows():
    best = roofline.Peaks.best(
        {"product_flops_per_s": 2.0, "read_bytes_per_s": 5.0}, {"product_flops_per_s": 3.0, "read_bytes_per_s": 4.0}
    )
    assert best == roofline.Peaks(3.0, 5.0)
    assert roofline.rows_per_batch(20, 8) == pytest.approx(20 / 3)  # batches of 8, 8 and 4
    assert roofline.rows_per_batch(16, 8) == 8
