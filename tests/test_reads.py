"""Who reads what: reads=all|latent|none, per-role private inputs and the chain topology.

The reference for `reads=latent` is an independent manual forward: one plain decoder pass over the
concatenated embeddings with a hand-built 4-D mask in which a position sees earlier positions of
its own agent and only the *latent* positions of other agents.
"""

from __future__ import annotations

import pytest
import torch

from diffmas.channel import latent_steps, prefill, tokenize
from diffmas.errors import DiffmasError
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig, MethodError, asks_of, get_method
from diffmas.roles import Role, Topology, default_topology
from diffmas.trace import LatentTrace

from conftest import make_backbone

ROWS = [
    ("short", "x", "final short"),
    ("a much much longer prompt here, with several words", "yy yy", "final?"),
    ("mid length one", "a long second prompt for row three", "the final agent prompt"),
]
M = (3, 2)


def build(bb, rows, reads, kind="sequential", m=M):
    """Agents a and b (prompt + latent steps) then c's prompt; returns c's logits and the trace."""
    topo = Topology(kind, tuple(Role(n, "s", "{question}") for n in "abc"))
    trace = LatentTrace(bb, len(rows), reads=reads)
    for i, name in enumerate("ab"):
        hidden = topo.hidden_from(i)
        h = prefill(trace, name, [r[i] for r in rows], hidden)
        latent_steps(trace, name, h, m[i], hidden)
    h = prefill(trace, "c", [r[2] for r in rows], topo.hidden_from(2))
    return bb.logits(h), trace


def capture_realigned(bb):
    """Record every realigned latent input while the context is open."""
    captured, cls = [], type(bb.realigner)
    orig = cls.__call__

    class Spy:
        def __enter__(self):
            cls.__call__ = lambda self_, hidden: captured.append(orig(self_, hidden)) or captured[-1]
            return captured

        def __exit__(self, *exc):
            cls.__call__ = orig

    return Spy()


@torch.no_grad()
def test_reads_latent_equals_manual_masked_forward(backbone):
    row = ROWS[1]
    with capture_realigned(backbone) as captured:
        logits, trace = build(backbone, [row], "latent")
    ids = lambda s: tokenize(backbone.tokenizer, [s], backbone.device)[0]
    pieces = [
        backbone.embed(ids(row[0])),
        *[c[:, None] for c in captured[:3]],
        backbone.embed(ids(row[1])),
        *[c[:, None] for c in captured[3:]],
        backbone.embed(ids(row[2])),
    ]
    owner, kind = [], []
    for agent, n_prompt, n_latent in (
        ("a", pieces[0].shape[1], 3),
        ("b", pieces[4].shape[1], 2),
        ("c", pieces[-1].shape[1], 0),
    ):
        owner += [agent] * (n_prompt + n_latent)
        kind += ["prompt"] * n_prompt + ["latent"] * n_latent
    n = len(owner)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            allowed[i, j] = owner[i] == owner[j] or kind[j] == "latent"
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min).to(backbone.device)
    embeds = torch.cat(pieces, dim=1)
    assert embeds.shape[1] == trace.length == n
    manual = backbone.model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float()
    assert torch.allclose(logits, manual, atol=1e-4), (logits - manual).abs().max()
    # the mask matters: reading the whole trace gives other logits
    assert not torch.allclose(logits, build(backbone, [row], "all")[0], atol=1e-3)


def _scramble(trace, columns):
    """Overwrite the cached keys and values of `columns` with noise (the trace's entries, in place)."""
    for layer in trace.cache.layers:
        for t in (layer.keys, layer.values):
            t[..., columns, :] = torch.randn_like(t[..., columns, :]) * 10


@torch.no_grad()
def test_reads_latent_ignores_an_upstream_prompt_but_not_its_latent_steps(backbone):
    for reads, should_change in (("latent", False), ("all", True)):
        before, trace = build(backbone, ROWS, reads)
        prompt_cols = [
            c for s in trace.segments if s.kind == "prompt" and s.agent in "ab" for c in range(s.start, s.end)
        ]
        _scramble(trace, prompt_cols)
        after = backbone.logits(prefill(trace, "c", [r[2] for r in ROWS]))
        # `after` wrote c's prompt a second time: compare against a clean trace that did the same
        _, clean = build(backbone, ROWS, reads)
        expected = backbone.logits(prefill(clean, "c", [r[2] for r in ROWS]))
        assert torch.allclose(after, expected, atol=1e-4) != should_change, reads
    # scrambling a's *latent* columns does change what c reads under reads=latent
    before, trace = build(backbone, ROWS, "latent")
    seg = next(s for s in trace.segments if s.agent == "a" and s.kind == "latent")
    _scramble(trace, list(range(seg.start, seg.end)))
    after = backbone.logits(prefill(trace, "c", [r[2] for r in ROWS]))
    _, clean = build(backbone, ROWS, "latent")
    assert not torch.allclose(after, backbone.logits(prefill(clean, "c", [r[2] for r in ROWS])), atol=1e-3)


@torch.no_grad()
def test_reads_none_final_agent_equals_single(backbone):
    decode = DecodeConfig(max_new_tokens=6)
    questions = ["What is one plus one?", "Name a colour.", "Why?"]
    for kind in ("sequential", "hierarchical"):
        topo = default_topology(kind, 3)
        alone = get_method("single", backbone, topo, MethodConfig(decode=decode)).run_batch(questions, "fmt")
        cfg = MethodConfig(latent_steps=3, decode=decode, reads="none")
        latent = get_method("latent_mas", backbone, topo, cfg).run_batch(questions, "fmt")
        for a, b in zip(alone, latent):
            assert a.text == b.text
            assert torch.allclose(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs), atol=1e-4)
    # and the communication is real under the other settings
    full = get_method("latent_mas", backbone, topo, MethodConfig(latent_steps=3, decode=decode)).run_batch(
        questions, "fmt"
    )
    assert any(abs(a.token_logprobs[0] - b.token_logprobs[0]) > 1e-3 for a, b in zip(alone, full))


@pytest.mark.parametrize("reads", ["all", "latent", "none"])
@pytest.mark.parametrize("kind", ["sequential", "hierarchical", "chain"])
@torch.no_grad()
def test_batched_equals_one_by_one_under_every_setting(backbone, reads, kind):
    batched, _ = build(backbone, ROWS, reads, kind)
    single = torch.cat([build(backbone, [r], reads, kind)[0] for r in ROWS])
    assert torch.allclose(batched, single, atol=1e-4), (batched - single).abs().max()


@torch.no_grad()
def test_chain_reader_sees_only_its_predecessor(untied_backbone):
    bb = untied_backbone
    # three agents a -> b -> c: under chain, c does not read a at all (a's entries reach c only
    # through b's latent steps, which were computed before the scramble)
    for kind, should_change in (("chain", False), ("sequential", True)):
        _, trace = build(bb, ROWS, "latent", kind)
        a_cols = [col for s in trace.segments if s.agent == "a" for col in range(s.start, s.end)]
        _scramble(trace, a_cols)
        after = bb.logits(
            prefill(
                trace,
                "c",
                [r[2] for r in ROWS],
                Topology(kind, tuple(Role(n, "s", "{question}") for n in "abc")).hidden_from(2),
            )
        )
        _, clean = build(bb, ROWS, "latent", kind)
        hidden = Topology(kind, tuple(Role(n, "s", "{question}") for n in "abc")).hidden_from(2)
        expected = bb.logits(prefill(clean, "c", [r[2] for r in ROWS], hidden))
        assert torch.allclose(after, expected, atol=1e-4) != should_change, kind
    assert Topology("chain", tuple(Role(n, "s", "{question}") for n in "abcd")).hidden_from(3) == ("a", "b")


def test_reads_is_validated():
    with pytest.raises(MethodError, match="reads='some'"):
        MethodConfig(reads="some")
    with pytest.raises(DiffmasError, match="choose one of all, latent, none"):
        LatentTrace(make_backbone(True), 1, reads="x")


@torch.no_grad()
def test_private_inputs_reach_their_role_only(tied_backbone):
    bb = tied_backbone
    topo = Topology("sequential", (Role("sender", "s", "{private} / {question}"), Role("reader", "s", "{question}")))
    method = get_method("latent_mas", bb, topo, MethodConfig(latent_steps=2, decode=DecodeConfig(max_new_tokens=3)))

    asks = asks_of(["Q?"], [{"sender": "the secret is 7", "reader": "ignored"}])
    assert "the secret is 7 / Q?" in method.prompts(topo.roles[0], asks, "")[0]
    assert "ignored" not in method.prompts(topo.roles[1], asks, "")[0]  # no {private} in its template
    # same question, different private inputs: not shared as one upstream, and the answers differ
    out = method.run_batch(["Q?", "Q?"], "", privates=[{"sender": "aaaa"}, {"sender": "zzzz zzzz zz"}])
    assert out[0].agents[0].n_prompt_tokens != out[1].agents[0].n_prompt_tokens
    assert out[0].token_logprobs != out[1].token_logprobs
    with pytest.raises(MethodError, match="private inputs"):
        method.run_batch(["Q?"], "", privates=[{}, {}])


def test_text_mas_reads_none_drops_the_messages(tied_backbone):
    topo = default_topology("sequential", 2)
    cfg = dict(upstream_max_new_tokens=4, decode=DecodeConfig(max_new_tokens=2))
    with torch.no_grad():
        seen = get_method("text_mas", tied_backbone, topo, MethodConfig(**cfg)).build_upstream(asks_of(["Q?"]))
        blind = get_method("text_mas", tied_backbone, topo, MethodConfig(**cfg, reads="none")).build_upstream(
            asks_of(["Q?"])
        )
    assert "Messages from earlier agents" in seen.contexts[0] and blind.contexts[0] == ""


def _sender_gradient(reads: str, m: int) -> float:
    """Sum |grad| of the sender's own LoRA after one trajectory loss (per-role adapters)."""
    from diffmas.train import TrainConfig
    from diffmas.train.adapters import add_trainable_adapters, lora_parameters
    from diffmas.train.trajectory import TrajectoryModel

    torch.manual_seed(0)
    bb = make_backbone(False)
    topo = Topology("sequential", (Role("sender", "s", "{private} {question}"), Role("reader", "s", "{question}")))
    cfg = TrainConfig(task="x", latent_steps=m, adapters="per-role", reads=reads, device="cpu")
    mapping = add_trainable_adapters(bb, cfg, topo)
    method = get_method("latent_mas", bb, topo, MethodConfig(latent_steps=m, reads=reads), mapping)
    model = TrajectoryModel(method, "diffmas", "full")
    loss = model(["Q?", "Q?"], ["tiger", "lion"], ["fmt"] * 2, privates=[{"sender": "tiger"}, {"sender": "lion"}])
    loss["loss"].backward()
    return sum(
        float(p.grad.abs().sum())
        for n, p in lora_parameters(bb.model, "sender").items()
        if "lora_B" in n and p.grad is not None
    )


def test_training_gradient_reaches_the_sender_only_through_what_the_reader_reads():
    assert _sender_gradient("latent", 2) > 0  # through the latent steps
    assert _sender_gradient("all", 0) > 0  # through the sender's prompt entries
    assert _sender_gradient("latent", 0) == 0  # nothing to read: no path back
    assert _sender_gradient("none", 2) == 0
