"""Decoding stops computing finished rows (`generate.drop_finished`, `LatentTrace.narrowed`):
the same tokens, log-probabilities, streamed events and trace (mask, positions, segments, bytes,
real entries) as computing every row to the end, for greedy and sampled decoding and for every
method; the trace stays usable afterwards, and views taken before read the same entries."""

from __future__ import annotations

import pytest
import torch

from diffmas.channel import latent_steps, prefill
from diffmas.generate import DecodeConfig, decode, drop_finished, listening
from diffmas.methods import MethodConfig, get_method
from diffmas.trace import LatentTrace

ROWS = ["short", "a somewhat longer prompt here", "mid length one", "x", "the fifth row, longest of them all"]
NEW = 20


def upstream(bb) -> tuple[LatentTrace, torch.Tensor]:
    """Two agents' prompts and latent steps, then the decoding agent's prompt (rows padded apart)."""
    trace = LatentTrace(bb, len(ROWS))
    for agent in ("a", "b"):
        h = prefill(trace, agent, [f"{agent}: {r}" for r in ROWS])
        latent_steps(trace, agent, h, 3)
    return trace, prefill(trace, "c", list(ROWS))


def eos_at_different_steps(bb, monkeypatch, produce) -> None:
    """Make tokens that rows produce early count as end-of-sequence, so rows finish apart: a run
    in which nothing ends (`produce()`: per row, its token ids) picks them, and the same run with
    them as EOS is identical up to there."""
    monkeypatch.setattr(type(bb), "eos_token_ids", property(lambda self: [-1]))  # no token ends
    ids = produce()
    stops = sorted({ids[0][2], ids[3][6]})  # rows 0 and 3 (at least) finish early
    monkeypatch.setattr(type(bb), "eos_token_ids", property(lambda self: stops))


def free_decode(bb, config: DecodeConfig, seeds):
    trace, h = upstream(bb)
    return decode(trace, "c", h, config, seeds).token_ids


def run(bb, enabled: bool, config: DecodeConfig, seeds):
    events = []
    with drop_finished(enabled), listening(lambda agent, ids: events.append(list(ids))):
        trace, h = upstream(bb)
        early = [(k.clone(), v.clone()) for k, v in trace.kv()]
        out = decode(trace, "c", h, config, seeds)
    return trace, out, events, early


def count_narrowing(monkeypatch) -> list[int]:
    calls = []
    original = LatentTrace.narrowed

    def counted(self, rows, room):
        calls.append(len(rows))
        return original(self, rows, room)

    monkeypatch.setattr(LatentTrace, "narrowed", counted)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_dropping_finished_rows_changes_nothing_but_the_work(backbone, monkeypatch, temperature):
    config = DecodeConfig(max_new_tokens=NEW, temperature=temperature)
    seeds = [11, 12, 13, 14, 15]
    eos_at_different_steps(backbone, monkeypatch, lambda: free_decode(backbone, config, seeds))
    full, out_full, events_full, _ = run(backbone, False, config, seeds)
    calls = count_narrowing(monkeypatch)
    kept, out_kept, events_kept, early = run(backbone, True, config, seeds)

    assert calls, "no row finished early enough to be dropped: the test exercises nothing"
    lengths = [len(t) for t in out_full.token_ids]
    assert min(lengths) < max(lengths) - 8  # rows really finished apart
    assert out_kept.token_ids == out_full.token_ids and out_kept.texts == out_full.texts
    assert out_kept.truncated == out_full.truncated
    for a, b in zip(out_full.logprobs, out_kept.logprobs):
        assert b == pytest.approx(a, abs=1e-5)
    assert events_kept == events_full  # streaming sees the same tokens, None once a row is done
    assert kept.length == full.length and kept.summary() == full.summary()
    for name in ("attention_mask", "positions", "next_position"):
        assert torch.equal(getattr(kept, name), getattr(full, name)), name
    assert kept.n_bytes() == full.n_bytes() and kept.real_bytes() == full.real_bytes()
    real = full.attention_mask.bool()  # (B, L)
    for (k0, v0), (k1, v1), (ek, ev) in zip(full.kv(), kept.kv(), early):
        for x0, x1 in ((k0, k1), (v0, v1)):
            assert torch.allclose(x0.transpose(1, 2)[real], x1.transpose(1, 2)[real], atol=1e-5)
            # padding the dropped rows did not compute holds zeros (no read sees padding)
            pad0, pad1 = x0.transpose(1, 2)[~real], x1.transpose(1, 2)[~real]  # (n_pad, H, D)
            zeroed = (pad1 == 0).flatten(1).all(dim=1)
            assert zeroed.any() and torch.equal(pad1[~zeroed], pad0[~zeroed])
        n = ek.shape[-2]  # the entries from before decoding are back in their rows, unchanged
        assert torch.equal(k1[..., :n, :], ek) and torch.equal(v1[..., :n, :], ev)
    # The trace goes on as before: another agent reads it and gets the same logits.
    after_full, after_kept = (backbone.logits(prefill(t, "d", ["and then?"] * len(ROWS))) for t in (full, kept))
    assert torch.allclose(after_full, after_kept, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", ["single", "text_mas", "latent_mas"])
def test_every_method_gives_the_same_results_dropping_finished_rows(backbone, monkeypatch, name):
    cfg = MethodConfig(latent_steps=3, decode=DecodeConfig(max_new_tokens=NEW), upstream_max_new_tokens=NEW)
    method = get_method(name, backbone, config=cfg)
    eos_at_different_steps(backbone, monkeypatch, lambda: [r.token_ids for r in method.run_batch(ROWS, "fmt")])
    with drop_finished(False):
        before = method.run_batch(ROWS, "fmt")
    calls = count_narrowing(monkeypatch)
    after = method.run_batch(ROWS, "fmt")
    assert calls, "no row was dropped: the comparison exercises nothing"
    for a, b in zip(before, after):
        assert (a.text, a.truncated, a.token_ids) == (b.text, b.truncated, b.token_ids)
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)
        assert (a.trace_len, a.trace_bytes) == (b.trace_len, b.trace_bytes)
        assert [x.n_generated_tokens for x in a.agents] == [x.n_generated_tokens for x in b.agents]


@torch.no_grad()
def test_narrowed_refuses_what_it_cannot_share(backbone):
    from diffmas.errors import DiffmasError
    from diffmas.trace import trace_store

    with trace_store("concat"):
        trace, _ = upstream(backbone)
    assert not trace.can_narrow()
    with pytest.raises(DiffmasError, match="in-place store"):
        with trace.narrowed([0], room=4):
            pass
    grown, _ = upstream(backbone)
    with torch.enable_grad():
        assert not grown.can_narrow()  # autograd needs copy-on-write appends
    assert grown.can_narrow()
