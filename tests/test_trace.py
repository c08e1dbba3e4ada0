"""The latent trace: batching, equivalence with a manual forward, segments, size in bytes."""

from __future__ import annotations

import pytest
import torch

from diffmas.channel import latent_steps, prefill, tokenize
from diffmas.roles import default_topology
from diffmas.trace import LatentTrace, TraceOverflowError

from conftest import make_backbone

ROWS = [
    ("short", "x", "final short"),
    ("a much much longer prompt here, with several words", "yy yy", "final?"),
    ("mid length one", "a long second prompt for row three", "the final agent prompt"),
]


def build(bb, rows, m=(3, 2)):
    """Two upstream agents (prompt + latent steps) then the final agent's prompt."""
    trace = LatentTrace(bb, len(rows))
    h = prefill(trace, "a", [r[0] for r in rows])
    h = latent_steps(trace, "a", h, m[0])
    h = prefill(trace, "b", [r[1] for r in rows])
    h = latent_steps(trace, "b", h, m[1])
    h = prefill(trace, "c", [r[2] for r in rows])
    return bb.logits(h), trace


@torch.no_grad()
def test_batched_equals_unbatched(backbone):
    batched, trace = build(backbone, ROWS)
    single = torch.cat([build(backbone, [r])[0] for r in ROWS])
    assert torch.allclose(batched, single, atol=1e-4), (batched - single).abs().max()
    # rows really were padded differently
    assert len(set(trace.n_real())) == len(ROWS)
    assert trace.length > max(trace.n_real())  # each chunk was padded: padding sits mid-trace


@torch.no_grad()
def test_trace_equals_manual_forward(backbone):
    """Final logits through the trace == one plain forward over the concatenated embeddings."""
    captured = []
    realign = backbone.realigner
    orig_call = type(realign).__call__

    def spy(self, hidden):
        out = orig_call(self, hidden)
        captured.append(out)
        return out

    type(realign).__call__ = spy
    try:
        logits, trace = build(backbone, [ROWS[1]], m=(3, 2))
    finally:
        type(realign).__call__ = orig_call
    assert len(captured) == 5

    tok = backbone.tokenizer
    ids = lambda s: tokenize(tok, [s], backbone.device)[0]
    pieces = [
        backbone.embed(ids(ROWS[1][0])),
        *[c[:, None] for c in captured[:3]],
        backbone.embed(ids(ROWS[1][1])),
        *[c[:, None] for c in captured[3:]],
        backbone.embed(ids(ROWS[1][2])),
    ]
    embeds = torch.cat(pieces, dim=1)
    assert embeds.shape[1] == trace.length
    manual = backbone.model(inputs_embeds=embeds).logits[:, -1].float()
    assert torch.allclose(logits, manual, atol=1e-4), (logits - manual).abs().max()

    # and each latent input is the realigned hidden state of the position before it
    hidden = backbone.decoder()(inputs_embeds=embeds).last_hidden_state[0]
    a_end = trace.segments[0].end  # last prompt position of agent a is a_end - 1
    for k in range(3):
        expected = realign(hidden[a_end - 1 + k])
        assert torch.allclose(expected, captured[k][0], atol=1e-4)


@torch.no_grad()
def test_zero_latent_steps_keeps_prompt_segments(backbone):
    _, trace = build(backbone, ROWS, m=(0, 0))
    kinds = [(s.agent, s.kind) for s in trace.segments]
    assert kinds == [("a", "prompt"), ("b", "prompt"), ("c", "prompt")]
    for seg, col in zip(trace.segments, range(3)):
        lengths = [len(backbone.tokenizer(r[col], add_special_tokens=False)["input_ids"]) for r in ROWS]
        assert seg.n_tokens == lengths


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trace_bytes_formula(backbone, dtype):
    backbone.model.to(dtype)
    _, trace = build(backbone, [ROWS[0]], m=(4, 1))
    cfg = backbone.config
    expected = (
        cfg.num_hidden_layers
        * 2
        * cfg.num_key_value_heads
        * (cfg.hidden_size // cfg.num_attention_heads)
        * trace.length
        * torch.finfo(dtype).bits
        // 8
    )
    assert trace.n_bytes() == expected
    assert trace.n_bytes() == trace.bytes_per_entry() * trace.length
    latent = [s for s in trace.segments if s.kind == "latent"]
    assert [s.n_tokens for s in latent] == [[4], [1]]


@torch.no_grad()
def test_segments_are_contiguous_and_append_only(backbone):
    _, trace = build(backbone, ROWS)
    assert [(s.agent, s.kind) for s in trace.segments] == [
        ("a", "prompt"),
        ("a", "latent"),
        ("b", "prompt"),
        ("b", "latent"),
        ("c", "prompt"),
    ]
    ends = [0] + [s.end for s in trace.segments]
    assert all(s.start == e for s, e in zip(trace.segments, ends))
    keys_before = trace.cache.layers[0].keys.clone()
    prefill(trace, "d", ["more"] * len(ROWS))
    assert torch.equal(trace.cache.layers[0].keys[:, :, : keys_before.shape[2]], keys_before)


@torch.no_grad()
def test_hierarchical_specialists_are_independent(backbone):
    """A specialist that hides the earlier ones computes what it would compute alone."""
    q = ["what is the boiling point of water"]
    trace = LatentTrace(backbone, 1)
    h = prefill(trace, "s1", ["first specialist prompt"])
    latent_steps(trace, "s1", h, 3)
    h = prefill(trace, "s2", q, hidden_agents=("s1",))
    h2 = latent_steps(trace, "s2", h, 3, hidden_agents=("s1",))

    alone = LatentTrace(backbone, 1)
    h = prefill(alone, "s2", q)
    h2_alone = latent_steps(alone, "s2", h, 3)
    # equal up to RoPE rounding at shifted absolute positions
    assert torch.allclose(h2, h2_alone, atol=1e-3)

    # without hiding, the second specialist does read the first
    shared = LatentTrace(backbone, 1)
    h = prefill(shared, "s1", ["first specialist prompt"])
    latent_steps(shared, "s1", h, 3)
    h = prefill(shared, "s2", q)
    assert (latent_steps(shared, "s2", h, 3) - h2_alone).abs().max() > 0.05


def test_topology_hiding_rules():
    seq = default_topology("sequential")
    hier = default_topology("hierarchical")
    assert all(seq.hidden_from(i) == () for i in range(len(seq.roles)))
    assert hier.hidden_from(0) == ()
    assert hier.hidden_from(2) == ("math", "science")
    assert hier.hidden_from(len(hier.roles) - 1) == ()


@torch.no_grad()
def test_expand_repeats_rows(backbone):
    _, trace = build(backbone, ROWS[:2])
    big = trace.expand(3)
    assert big.batch_size == 6 and big.length == trace.length
    assert big.n_real() == [n for n in trace.n_real() for _ in range(3)]
    h_big = prefill(big, "z", ["cont"] * 6)
    h_small = prefill(trace, "z", ["cont"] * 2)
    assert torch.allclose(h_big[::3], h_small, atol=1e-5)


@torch.no_grad()
def test_overflow_is_a_clear_error(backbone):
    backbone.config.max_position_embeddings = 40
    trace = LatentTrace(backbone, 1)
    with pytest.raises(TraceOverflowError, match="beyond the model's context of 40"):
        prefill(trace, "a", ["x" * 60])


# ----------------------------------------------------------------------------- row by row
LONG_ROWS = [
    "a prompt of moderate length, over thirty-two tokens",
    "a much longer prompt than that one, with several more words in it, to pad the others",
    "the third prompt, of some middle length, also long",
]


def build_long(bb, rows, hidden_agents=()):
    """Agent a's padded prompt and 2 latent steps, then agent b's padded prompt (hiding a when
    asked) and 4 decoded tokens: (both prompts' last hidden states (2, B, d), decoded ids, trace)."""
    from diffmas.generate import DecodeConfig, decode

    trace = LatentTrace(bb, len(rows))
    h_a = prefill(trace, "a", rows)
    latent_steps(trace, "a", h_a, 2)
    h_b = prefill(trace, "b", [r[::-1] for r in rows], hidden_agents)
    out = decode(trace, "b", h_b, DecodeConfig(max_new_tokens=4, min_new_tokens=4), [0] * len(rows))
    return torch.stack([h_a, h_b]), out.token_ids, trace


def count_decoder_calls(bb, monkeypatch) -> list:
    calls = []
    decoder = bb.decoder()
    real = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(k["inputs_embeds"].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one-forward-a-row"])
@pytest.mark.parametrize("hidden", [(), ("a",)], ids=["reads-all", "a-hidden"])
@torch.no_grad()
def test_row_by_row_prefill_equals_the_padded_batch(backbone, hidden, packed, monkeypatch):
    from diffmas.trace import packed_rows, row_by_row

    calls = count_decoder_calls(backbone, monkeypatch)
    in_place = []
    real_in_place = LatentTrace._forward_rows_in_place
    monkeypatch.setattr(LatentTrace, "_forward_rows_in_place", lambda *a: in_place.append(1) or real_in_place(*a))
    with packed_rows(packed):
        h, ids, trace = build_long(backbone, LONG_ROWS, hidden)
    rows = [shape[1] for shape in calls if shape[0] == 1 and shape[1] > 1]
    if packed:  # each prompt one forward of all rows' real tokens, one after another
        assert rows == [sum(trace.segments[0].n_tokens), sum(trace.segments[2].n_tokens)] and not in_place
    else:
        assert len(rows) == 2 * len(LONG_ROWS)  # both prompts ran row by row, on real tokens only
        assert len(in_place) == 1  # the second prompt's rows wrote into the grow store's buffers
        assert sorted(rows[:3]) == sorted(trace.segments[0].n_tokens)
    with row_by_row(False):
        h_ref, ids_ref, ref = build_long(backbone, LONG_ROWS, hidden)
    assert ids == ids_ref
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-5)  # padding columns: zeros vs unread values
    assert (trace.n_bytes(), trace.real_bytes(), trace.length) == (ref.n_bytes(), ref.real_bytes(), ref.length)
    assert torch.equal(trace.attention_mask, ref.attention_mask) and torch.equal(trace.positions, ref.positions)
    real = trace.attention_mask[:, None, :, None].float()
    for (k, v), (k_ref, v_ref) in zip(trace.kv(), ref.kv()):
        torch.testing.assert_close(k * real, k_ref * real, rtol=0, atol=1e-4)
        torch.testing.assert_close(v * real, v_ref * real, rtol=0, atol=1e-4)


@pytest.mark.parametrize("hidden", [(), ("a",)], ids=["reads-all", "a-hidden"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@torch.no_grad()
def test_a_rows_bits_are_the_same_alone_and_in_a_batch(tied, hidden, monkeypatch):
    """Batch size is a runtime-only setting, to the bit: prompts (packed, each row's attention
    over the columns it sees), latent steps and decoding (one-row products run as two rows; the
    kernel's sums follow visible positions) give each row alone the hidden states, decoded ids
    and keys and values it gets among the batch's rows. A 256-wide model, so its layers run
    oneDNN's packed products, whose rows keep their bits at any row count (tests/test_linear.py)."""
    from diffmas import linear
    from diffmas.linear import ONEDNN, linear_kernel

    if not ONEDNN.available():
        pytest.skip("NOT TESTED: needs a torch build with oneDNN (every x86 wheel has it)")
    monkeypatch.setattr(linear, "MIN_PACKED_WEIGHT", 0)  # the small KV projections too, as a real model's
    bb = make_backbone(tied, width=256, init=0.1)
    with linear_kernel("onednn"):
        h, ids, trace = build_long(bb, LONG_ROWS, hidden)
        for b, row in enumerate(LONG_ROWS):
            h_alone, ids_alone, alone = build_long(bb, [row], hidden)
            assert torch.equal(h[:, b], h_alone[:, 0]) and ids[b] == ids_alone[0]
            real, real_alone = trace.attention_mask[b].bool(), alone.attention_mask[0].bool()
            for (k, v), (k1, v1) in zip(trace.kv(), alone.kv()):
                assert torch.equal(k[b][:, real], k1[0][:, real_alone])
                assert torch.equal(v[b][:, real], v1[0][:, real_alone])


@torch.no_grad()
def test_packed_rows_only_under_the_attention_that_splits_them(backbone, monkeypatch):
    """Only `diffmas.attention`'s implementation splits a packed sequence back into rows: under
    any other (here transformers' eager one) the rows keep one forward each, with the same result."""
    calls = count_decoder_calls(backbone, monkeypatch)

    def forwards():
        calls.clear()
        trace = LatentTrace(backbone, len(LONG_ROWS))
        return prefill(trace, "a", LONG_ROWS), trace, len(calls)

    h, trace, n = forwards()
    assert n == 1
    backbone.model.set_attn_implementation("eager")
    h_eager, trace_eager, n_eager = forwards()
    assert n_eager == len(LONG_ROWS)
    torch.testing.assert_close(h_eager, h, rtol=0, atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(trace_eager.kv(), trace.kv()):
        torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_row_by_row_gives_each_row_its_result_alone(backbone):
    h, ids, _ = build_long(backbone, LONG_ROWS)
    for b, row in enumerate(LONG_ROWS):
        h_alone, ids_alone, _ = build_long(backbone, [row])
        assert ids[b] == ids_alone[0]
        torch.testing.assert_close(h[:, b], h_alone[:, 0], rtol=0, atol=1e-5)


def test_row_by_row_only_where_it_pays(backbone, monkeypatch):
    from diffmas.trace import packed_rows

    calls = count_decoder_calls(backbone, monkeypatch)

    def one_chunk(prompts, grad=False, record=False):
        calls.clear()
        trace = LatentTrace(backbone, len(prompts), record_inputs=record)
        with torch.set_grad_enabled(grad):
            prefill(trace, "a", prompts)
        return len(calls)

    assert one_chunk(LONG_ROWS) == 1  # packed: one forward of the rows' real tokens
    with packed_rows(False):
        assert one_chunk(LONG_ROWS) == len(LONG_ROWS)
    assert one_chunk(LONG_ROWS, grad=True) == 1  # training: one padded forward (gradients, checkpointing)
    assert one_chunk(LONG_ROWS, record=True) == 1  # recorded inputs replay chunks as written
    assert one_chunk([LONG_ROWS[0], "short"]) == 1  # a row under ROW_BY_ROW_MIN_TOKENS
    assert one_chunk([LONG_ROWS[0], LONG_ROWS[0][::-1]]) == 1  # no padding
