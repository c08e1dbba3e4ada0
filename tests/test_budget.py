"""Trace budgets (diffmas.budget): exact budgets, bookkeeping, memory, equivalences, training.

The reference for every eviction policy is independent of the compaction code: dropping a column
must give the same logits as keeping the full trace and masking that column out (keys are stored
rotated, so where a kept entry sits in storage does not matter, only its position).
"""

from __future__ import annotations

import pytest
import torch

from diffmas.budget import (
    POLICIES,
    BudgetError,
    QuantizedLayer,
    QueryProbe,
    TraceBudget,
    apply_budget,
    dequantize,
    parse_budget,
    probe_for,
    quantize,
    row_seeds,
)
from diffmas.channel import latent_steps, prefill
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig, MethodError, asks_of, get_method
from diffmas.roles import Role, Topology
from diffmas.trace import LatentTrace

from conftest import make_backbone

ROWS = [
    ("short prompt", "x", "final short"),
    ("a much much longer prompt here, with several words in it", "yy yy", "final?"),
    ("mid length one", "a long second prompt for row three, also long", "the final agent prompt"),
]
M = 3
EVICTING = ("prompt-drop", "random", "window")


def upstream(bb, rows, budget, reads="all", m=M, agents="ab"):
    """Agents a and b (prompt + m latent steps, each fitted to `budget`); returns the trace and,
    per agent, its prompt positions before the budget applied."""
    trace = LatentTrace(bb, len(rows), reads=reads)
    seeds = row_seeds(budget, [r[:2] for r in rows])
    before = {}
    for i, name in enumerate(agents):
        with probe_for(budget, bb) as probe:
            h = prefill(trace, name, [r[i] for r in rows])
            latent_steps(trace, name, h, m)
        seg = next(s for s in trace.segments if s.agent == name and s.kind == "prompt")
        before[name] = [
            trace.positions[row, seg.start : seg.end][trace.attention_mask[row, seg.start : seg.end] == 1].tolist()
            for row in range(len(rows))
        ]
        apply_budget(trace, name, budget, probe, seeds)
    return trace, before


def final_logits(bb, trace, rows):
    return bb.logits(prefill(trace, "c", [r[2] for r in rows]))


def kept_positions(trace, agent, kind="prompt"):
    """Per row, the positions of `agent`'s real `kind` entries."""
    out = [[] for _ in range(trace.batch_size)]
    for seg in trace.segments:
        if seg.agent == agent and seg.kind == kind:
            for row in range(trace.batch_size):
                cols = trace.attention_mask[row, seg.start : seg.end] == 1
                out[row] += trace.positions[row, seg.start : seg.end][cols].tolist()
    return out


def mask_dropped(ref, keep, agents):
    """The reference for eviction: mask out of `ref` (a full trace) every prompt column of
    `agents` whose position is not in keep[row]."""
    for seg in [s for s in ref.segments if s.kind == "prompt" and s.agent in agents]:
        for row in range(ref.batch_size):
            for col in range(seg.start, seg.end):
                if int(ref.positions[row, col]) not in keep[row]:
                    ref.attention_mask[row, col] = 0


# ----------------------------------------------------------------------------- parsing


def test_parse_budget_forms_and_errors():
    assert parse_budget(None, None) is None
    assert parse_budget("prompt-drop", "32").prompt_states == 32
    assert parse_budget("window", "25%").fraction == 0.25
    assert parse_budget("merge", "64KiB").agent_bytes == 65536
    assert parse_budget("random", "2MB").agent_bytes == 2_000_000
    assert parse_budget("quantize", "int4").bits == 4
    assert parse_budget("quantize", None).bits == 8
    for policy, spec in [(None, "32"), ("window", None), ("bogus", "3"), ("quantize", "int3"), ("window", "0%")]:
        with pytest.raises(BudgetError):
            parse_budget(policy, spec)
    assert TraceBudget.from_any(parse_budget("window", "8").to_dict()) == parse_budget("window", "8")
    assert parse_budget("window", "96", scope="trace").label == "window-96-trace"
    assert parse_budget("merge", "1MiB", scope="trace").scope == "trace"
    for policy, spec, scope in [("window", "25%", "trace"), ("quantize", "int8", "trace"), ("window", "8", "row")]:
        with pytest.raises(BudgetError):
            parse_budget(policy, spec, scope=scope)
    with pytest.raises(BudgetError, match="--trace-scope needs"):
        parse_budget(None, None, scope="trace")


def test_budget_is_refused_where_there_is_no_latent_trace(tied_backbone):
    for method in ("single", "text_mas"):
        with pytest.raises(MethodError, match="latent channel"):
            get_method(method, tied_backbone, config=MethodConfig(trace_budget=TraceBudget("window", 4)))


# ----------------------------------------------------------------------------- exact budgets, bookkeeping


@pytest.mark.parametrize("policy", ["prompt-drop", "random", "window", "merge"])
@pytest.mark.parametrize("size", [0, 5, "50%", "600B"])
def test_each_policy_keeps_exactly_its_budget(backbone, policy, size):
    budget = parse_budget(policy, str(size))
    trace, before = upstream(backbone, ROWS, budget)
    entry = trace.bytes_per_entry()
    for agent in "ab":
        prompt, latent = kept_positions(trace, agent), kept_positions(trace, agent, "latent")
        for row in range(len(ROWS)):
            n = len(before[agent][row])
            assert len(latent[row]) == M  # latent steps are never dropped
            assert len(prompt[row]) == budget.prompt_kept(n, M, entry)
            assert len(prompt[row]) == {0: 0, 5: min(5, n), "50%": max(0, min(n, (n + M) // 2 - M))}.get(
                size, max(0, min(n, 600 // entry - M))
            )
            if policy != "merge":  # evicted entries keep their original positions
                assert set(prompt[row]) <= set(before[agent][row])
            assert prompt[row] == sorted(prompt[row])  # order kept
    _check_bookkeeping(trace)


def _check_bookkeeping(trace):
    """Segments tile the trace; their counts match the mask; positions are -1 exactly on padding."""
    assert trace.segments[0].start == 0 and trace.segments[-1].end == trace.length
    for a, b in zip(trace.segments, trace.segments[1:]):
        assert a.end == b.start
    for seg in trace.segments:
        assert seg.n_tokens == trace.attention_mask[:, seg.start : seg.end].sum(dim=1).tolist()
    assert torch.equal(trace.positions == -1, trace.attention_mask == 0)
    assert trace.kv()[0][0].shape[2] == trace.length
    assert trace.next_position.tolist() == [int(p.max()) + 1 for p in trace.positions]


@pytest.mark.parametrize("policy", ["prompt-drop", "random", "window", "merge"])
@pytest.mark.parametrize("size", [0, 5, 11, "8KiB"])
def test_a_per_trace_budget_bounds_all_upstream_agents_together(backbone, policy, size):
    """Scope trace: after each agent, the prompt entries of all agents so far fit one budget."""
    budget = parse_budget(policy, str(size), scope="trace")
    after_a, _ = upstream(backbone, ROWS, budget, agents="a")
    trace, before = upstream(backbone, ROWS, budget)
    k = size if isinstance(size, int) else 8192 // trace.bytes_per_entry() - 2 * M  # 2 agents × M latent
    for row in range(len(ROWS)):
        n_a, n_b = len(before["a"][row]), len(before["b"][row])
        assert len(kept_positions(after_a, "a")[row]) == max(0, min(n_a, k + (M if size == "8KiB" else 0)))
        kept = kept_positions(trace, "a")[row] + kept_positions(trace, "b")[row]
        assert len(kept) == max(0, min(n_a + n_b, k))
        assert all(len(kept_positions(trace, name, "latent")[row]) == M for name in "ab")
        if policy != "merge":
            assert set(kept) <= set(before["a"][row] + before["b"][row])
    _check_bookkeeping(trace)
    assert trace.n_bytes() == trace.length * len(ROWS) * trace.bytes_per_entry()


def test_per_trace_window_keeps_the_traces_first_entries_and_its_most_recent(tied_backbone):
    budget = TraceBudget("window", prompt_states=7, sinks=2, scope="trace")
    after_a, _ = upstream(tied_backbone, ROWS, budget, agents="a")
    trace, before = upstream(tied_backbone, ROWS, budget)
    for row in range(len(ROWS)):
        survivors = kept_positions(after_a, "a")[row] + before["b"][row]
        expected = survivors[:2] + survivors[-5:] if len(survivors) > 7 else survivors
        assert kept_positions(trace, "a")[row] + kept_positions(trace, "b")[row] == expected


def test_one_upstream_agent_has_the_same_budget_per_agent_or_per_trace(tied_backbone):
    per_agent, _ = upstream(tied_backbone, ROWS, TraceBudget("prompt-drop", prompt_states=4), agents="a")
    per_trace, _ = upstream(tied_backbone, ROWS, TraceBudget("prompt-drop", prompt_states=4, scope="trace"), agents="a")
    assert kept_positions(per_agent, "a") == kept_positions(per_trace, "a")


@pytest.mark.parametrize("policy", EVICTING)
def test_per_trace_eviction_equals_masking_the_dropped_entries(backbone, policy):
    """The reference masks what each eviction dropped when it happened: a's entries after a wrote
    (what b read), then both agents' after b wrote (what the final agent reads)."""
    budget = TraceBudget(policy, prompt_states=6, sinks=2, scope="trace")
    after_a, _ = upstream(backbone, ROWS, budget, m=2, agents="a")
    bounded, _ = upstream(backbone, ROWS, budget, m=2)
    ref = LatentTrace(backbone, len(ROWS))
    for i, (name, kept) in enumerate([("a", [after_a]), ("b", [bounded])]):
        h = prefill(ref, name, [r[i] for r in ROWS])
        latent_steps(ref, name, h, 2)
        for trace in kept:
            keep = [a + b for a, b in zip(kept_positions(trace, "a"), kept_positions(trace, "b"))]
            mask_dropped(ref, keep, "ab")
    torch.testing.assert_close(
        final_logits(backbone, bounded, ROWS), final_logits(backbone, ref, ROWS), atol=1e-4, rtol=0
    )


def test_window_keeps_sinks_and_the_most_recent(tied_backbone):
    trace, before = upstream(tied_backbone, ROWS, TraceBudget("window", prompt_states=6, sinks=2))
    for row, original in enumerate(before["a"]):
        assert kept_positions(trace, "a")[row] == original[:2] + original[-4:]


def test_merge_pools_contiguous_groups(tied_backbone):
    full, _ = upstream(tied_backbone, ROWS[:1], None)
    merged, before = upstream(tied_backbone, ROWS[:1], TraceBudget("merge", prompt_states=3))
    n = len(before["a"][0])
    bounds = [round(i * n / 3) for i in range(4)]
    seg_full = next(s for s in full.segments if s.agent == "a" and s.kind == "prompt")
    seg = next(s for s in merged.segments if s.agent == "a" and s.kind == "prompt")
    keys_full, keys = full.kv()[1][0][0, :, seg_full.start : seg_full.end], merged.kv()[1][0][0, :, seg.start : seg.end]
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        torch.testing.assert_close(keys[:, j], keys_full[:, lo:hi].mean(dim=1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("policy", POLICIES[:4])
def test_unlimited_budget_equals_the_full_trace(backbone, policy):
    full, _ = upstream(backbone, ROWS, None)
    bounded, _ = upstream(backbone, ROWS, TraceBudget(policy, prompt_states=10_000))
    assert bounded.length == full.length and torch.equal(bounded.attention_mask, full.attention_mask)
    torch.testing.assert_close(
        final_logits(backbone, bounded, ROWS), final_logits(backbone, full, ROWS), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("policy", EVICTING)
def test_eviction_equals_masking_the_dropped_entries(backbone, policy):
    """Independent reference: the full trace with the dropped columns masked out."""
    budget = TraceBudget(policy, prompt_states=4, sinks=2)
    bounded, _ = upstream(backbone, ROWS, budget, m=2)
    # The reference runs the same agents; agent b must see a's kept entries only, so mask as we go.
    ref = LatentTrace(backbone, len(ROWS))
    for i, name in enumerate("ab"):
        h = prefill(ref, name, [r[i] for r in ROWS])
        latent_steps(ref, name, h, 2)
        mask_dropped(ref, kept_positions(bounded, name), [name])
    # 1e-4: attention sums over a different number of columns (masked vs absent), so fp32 rounding
    # differs; a wrong kept set or position moves these logits far more (the unlimited test holds 1e-5)
    torch.testing.assert_close(
        final_logits(backbone, bounded, ROWS), final_logits(backbone, ref, ROWS), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "budget",
    [
        *(TraceBudget(p, prompt_states=4) for p in POLICIES[:4]),
        TraceBudget("quantize", bits=4),
        *(TraceBudget(p, prompt_states=7, scope="trace") for p in POLICIES[:4]),
    ],
    ids=lambda b: b.label,
)
def test_batched_equals_one_by_one(untied_backbone, budget):
    topo = Topology("sequential", tuple(Role(n, "s", "{question}") for n in "abc"))
    config = MethodConfig(latent_steps=2, decode=DecodeConfig(max_new_tokens=6), trace_budget=budget)
    method = get_method("latent_mas", untied_backbone, topo, config)
    questions = [r[1] for r in ROWS]
    batched = method.run_batch(questions)
    for q, r in zip(questions, batched):
        alone = method.run_batch([q])[0]
        assert alone.text == r.text
        torch.testing.assert_close(
            torch.tensor(alone.token_logprobs), torch.tensor(r.token_logprobs), atol=1e-4, rtol=0
        )


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("policy", POLICIES[:4])
def test_evicted_entries_are_gone_from_memory(tied_backbone, policy):
    full, _ = upstream(tied_backbone, ROWS, None)
    bounded, _ = upstream(tied_backbone, ROWS, TraceBudget(policy, prompt_states=3))
    per_column = len(ROWS) * bounded.bytes_per_entry()
    assert bounded.n_bytes() == bounded.length * per_column
    assert full.n_bytes() - bounded.n_bytes() == (full.length - bounded.length) * per_column > 0


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_quantized_trace_holds_packed_bytes_and_stays_close(backbone, bits):
    full, _ = upstream(backbone, ROWS, None)
    packed, _ = upstream(backbone, ROWS, TraceBudget("quantize", bits=bits))
    assert all(isinstance(layer, QuantizedLayer) for layer in packed.cache.layers)
    bb = backbone
    scale_bytes = torch.finfo(bb.dtype).bits // 8
    per_entry = bb.n_layers * 2 * bb.n_kv_heads * (bb.head_dim * bits // 8 + 2 * scale_bytes)
    assert packed.n_bytes() == packed.length * len(ROWS) * per_entry  # every upstream column packed
    # head_dim 16 here: int8 keeps (16 + 8) / 64 of fp32's bytes, int4 (8 + 8) / 64
    assert packed.n_bytes() / full.n_bytes() == per_entry / full.bytes_per_entry()
    # agent a's entries match the full trace's to half a quantisation step (b's were computed on a
    # quantised trace, so they differ by more)
    end = max(s.end for s in packed.segments if s.agent == "a")
    for (k, v), (fk, fv) in zip(packed.kv(), full.kv()):
        for got, want in ((k[:, :, :end], fk[:, :, :end]), (v[:, :, :end], fv[:, :, :end])):
            step = (want.amax(-1, keepdim=True) - want.amin(-1, keepdim=True)) / (2**bits - 1)
            assert ((got - want).abs() <= step / 2 + 1e-6).all()
    # the final agent's entries go to the unpacked tail and are read with the packed prefix
    logits = final_logits(bb, packed, ROWS)
    assert packed.cache.layers[0].keys.shape[2] > 0 and torch.isfinite(logits).all()


def test_quantize_roundtrip_int4_packs_two_codes_a_byte():
    x = torch.randn(2, 3, 5, 8)
    codes, scale, low = quantize(x, 4)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 4
    back = dequantize(codes, scale, low, 4)
    assert ((back - x).abs() <= scale / 2 + 1e-6).all()


def test_packed_inference_equals_the_training_path(untied_backbone):
    """Inference stores codes; autograd keeps fake-quantised values: the numbers must agree.
    Inference runs its prompts as one padded batch, as autograd does (`packed_rows(False)`): packed
    rows attend over gathered columns, another rounding, compared with the batch in test_trace."""
    from diffmas.trace import packed_rows

    budget = TraceBudget("quantize", bits=4)
    with torch.no_grad(), packed_rows(False):
        packed, _ = upstream(untied_backbone, ROWS, budget)
        want = final_logits(untied_backbone, packed, ROWS)
    with torch.enable_grad():
        unpacked, _ = upstream(untied_backbone, ROWS, budget)
        got = final_logits(untied_backbone, unpacked, ROWS)
    assert not any(isinstance(layer, QuantizedLayer) for layer in unpacked.cache.layers)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def test_prompt_drop_scores_are_the_models_own_attention(tied_backbone):
    """The probe's queries reproduce eager attention: at the last latent step, the recorded query
    against the trace's keys gives the attention weights the model itself computed."""
    bb = tied_backbone
    bb.base_model().set_attn_implementation("eager")
    captured = []
    attn = bb.decoder().layers[1].self_attn
    handle = attn.register_forward_hook(lambda mod, args, out: captured.append(out[1]))
    try:
        trace = LatentTrace(bb, 2)
        probe = QueryProbe(bb)
        with probe.recording():
            h = prefill(trace, "a", [r[0] for r in ROWS[:2]])
            latent_steps(trace, "a", h, 2)
    finally:
        handle.remove()
        bb.base_model().set_attn_implementation("sdpa")
    real = captured[-1][:, :, -1, :]  # (B, Hq, L): the last latent step's weights
    keys = trace.kv()[1][0].repeat_interleave(real.shape[1] // trace.kv()[1][0].shape[1], dim=1)
    query = probe.queries[1][-1]  # (B, Hq, 1, D)
    logits = (query @ keys.transpose(2, 3))[:, :, 0] * attn.scaling
    mine = logits.masked_fill(trace.attention_mask[:, None] == 0, float("-inf")).softmax(-1)
    torch.testing.assert_close(mine, real.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("way", ["packed", "one-forward-a-row", "padded"])
@torch.no_grad()  # inference: where prompts run row by row
def test_prompt_drop_probe_reads_every_way_a_prompt_runs(tied_backbone, way):
    """The probe takes each row's last prompt token: from a packed sequence (rows one after
    another), from one forward a row, or from the padded batch's last column; the scores agree."""
    from diffmas.trace import packed_rows, row_by_row

    rows = [(r[0] + " ") * 12 for r in ROWS]  # over 32 tokens a row, so prompts run row by row
    ways = {"packed": (True, True), "one-forward-a-row": (True, False), "padded": (False, False)}

    def scores(by_row: bool, packed: bool):
        trace = LatentTrace(tied_backbone, len(rows))
        with (
            row_by_row(by_row),
            packed_rows(packed),
            probe_for(TraceBudget("prompt-drop", prompt_states=3), tied_backbone) as probe,
        ):
            h = prefill(trace, "a", rows)
            latent_steps(trace, "a", h, 2)
        one_row_queries = any(q.shape[0] == 1 for q in probe.queries[0])
        assert one_row_queries == (not packed and by_row)  # one forward a row records a query a row
        return probe.attention(trace, trace.attention_mask) * trace.attention_mask

    got, want = scores(*ways[way]), scores(*ways["padded"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prompt_drop_keeps_what_the_queries_attend_to_most(tied_backbone):
    budget = TraceBudget("prompt-drop", prompt_states=3)
    trace = LatentTrace(tied_backbone, 2)
    with probe_for(budget, tied_backbone) as probe:
        h = prefill(trace, "a", [r[1] for r in ROWS[:2]])
        latent_steps(trace, "a", h, 2)
    visible = trace.attention_mask.clone()
    seg = next(s for s in trace.segments if s.kind == "latent")
    visible[:, seg.start : seg.end] = 0
    scores = probe.attention(trace, visible)
    prompt = next(s for s in trace.segments if s.kind == "prompt")
    want = []
    for row in range(2):
        cols = [c for c in range(prompt.start, prompt.end) if trace.attention_mask[row, c]]
        top = sorted(cols, key=lambda c: -float(scores[row, c]))[:3]
        want.append(sorted(int(trace.positions[row, c]) for c in top))
    apply_budget(trace, "a", budget, probe)
    assert kept_positions(trace, "a") == want


def test_random_eviction_depends_on_the_seed_not_the_batch(tied_backbone):
    a, _ = upstream(tied_backbone, ROWS, TraceBudget("random", prompt_states=4, seed=1))
    b, _ = upstream(tied_backbone, ROWS, TraceBudget("random", prompt_states=4, seed=2))
    assert kept_positions(a, "a") != kept_positions(b, "a")
    alone, _ = upstream(tied_backbone, ROWS[1:2], TraceBudget("random", prompt_states=4, seed=1))
    assert kept_positions(alone, "a")[0] == kept_positions(a, "a")[1]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "budget",
    [
        TraceBudget("prompt-drop", prompt_states=2),
        TraceBudget("quantize", bits=4),
        TraceBudget("merge", prompt_states=3, scope="trace"),
    ],
    ids=lambda b: b.label,
)
def test_gradients_reach_the_sender_through_a_bounded_trace(budget):
    from diffmas.train import TrainConfig
    from diffmas.train.adapters import add_trainable_adapters, lora_parameters
    from diffmas.train.trajectory import TrajectoryModel

    torch.manual_seed(0)
    bb = make_backbone(False)
    topo = Topology("sequential", (Role("sender", "s", "{private} {question}"), Role("reader", "s", "{question}")))
    cfg = TrainConfig(task="x", latent_steps=2, adapters="per-role", trace_budget=budget, device="cpu")
    mapping = add_trainable_adapters(bb, cfg, topo)
    method = get_method("latent_mas", bb, topo, MethodConfig(latent_steps=2, trace_budget=budget), mapping)
    loss = TrajectoryModel(method, "diffmas", "full")(
        ["Q?", "Q?"], ["tiger", "lion"], ["fmt"] * 2, privates=[{"sender": "tiger"}, {"sender": "lion"}]
    )["loss"]
    loss.backward()
    grads = [p.grad for n, p in lora_parameters(bb.model, "sender").items() if "lora_B" in n]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_budget_with_gradient_checkpointing_is_refused():
    from diffmas.train import TrainConfig
    from diffmas.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="gradient checkpointing"):
        TrainConfig(task="x", trace_budget=TraceBudget("window", 4), gradient_checkpointing=True)
    with pytest.raises(TrainConfigError):
        TrainConfig(task="x", method="sft_single", trace_budget=TraceBudget("window", 4))


def test_asks_budget_seeds_follow_the_ask(tied_backbone):
    asks = asks_of(["q1", "q2"], [{"a": "x"}, {"a": "y"}])
    assert row_seeds(TraceBudget("random", 3), [a.key() for a in asks]) != row_seeds(
        TraceBudget("random", 3, seed=5), [a.key() for a in asks]
    )


@torch.no_grad()
def test_run_records_report_the_packed_bytes(tied_backbone):
    topo = Topology("sequential", tuple(Role(n, "s", "{question}") for n in "abc"))

    def run(budget):
        config = MethodConfig(latent_steps=2, decode=DecodeConfig(max_new_tokens=3), trace_budget=budget)
        return get_method("latent_mas", tied_backbone, topo, config).run_batch([r[1] for r in ROWS])

    full, packed = run(None), run(TraceBudget("quantize", bits=8))
    bb = tied_backbone
    packed_entry = bb.n_layers * 2 * bb.n_kv_heads * (bb.head_dim + 2 * 4)
    for f, p in zip(full, packed):
        assert p.trace_len == f.trace_len
        upstream = sum(a.n_prompt_tokens + a.n_latent_steps for a in p.agents[:-1])
        final = p.trace_len - upstream
        assert p.trace_bytes == upstream * packed_entry + final * (f.trace_bytes // f.trace_len)


@pytest.mark.parametrize("budget", [TraceBudget("quantize", bits=4), TraceBudget("prompt-drop", prompt_states=3)])
@torch.no_grad()
def test_option_likelihood_under_a_budget_batched_equals_one_by_one(untied_backbone, budget):
    """Option scoring copies the bounded trace per option (packed layers select their own rows)."""
    from diffmas.methods import OptionQuery

    topo = Topology("sequential", tuple(Role(n, "s", "{question}") for n in "abc"))
    config = MethodConfig(latent_steps=2, decode=DecodeConfig(max_new_tokens=2), trace_budget=budget)
    method = get_method("latent_mas", untied_backbone, topo, config)
    questions = [r[1] for r in ROWS]
    options = [OptionQuery(q, (" yes", " no", " maybe not")) for q in questions]
    batched = method.run_batch(questions, options=options)
    for q, o, r in zip(questions, options, batched):
        alone = method.run_batch([q], options=[o])[0]
        torch.testing.assert_close(
            torch.tensor(alone.option_logprobs), torch.tensor(r.option_logprobs), atol=1e-4, rtol=0
        )
    if budget.policy == "quantize":  # the copies are packed too, not unpacked
        up = method.build_upstream(asks_of(questions))
        assert all(isinstance(layer, QuantizedLayer) for layer in up.trace.expand(3).cache.layers)


def test_a_run_saved_before_the_scope_field_stays_resumable():
    """Run configs written before `TraceBudget.scope` existed compare as scope 'agent', the
    behaviour they ran with; another scope is still a conflict."""
    from diffmas.evaluate.runner import EvalConfig
    from diffmas.provenance import config_diff, dataclass_defaults

    config = MethodConfig(trace_budget=parse_budget("window", "8"))
    new = EvalConfig(task="t", method="latent_mas", method_config=config).to_dict()
    old = {**new, "method_config": {**new["method_config"], "trace_budget": dict(new["method_config"]["trace_budget"])}}
    del old["method_config"]["trace_budget"]["scope"]
    defaults = dataclass_defaults(EvalConfig)
    assert config_diff(old, new, defaults) == []
    new["method_config"]["trace_budget"]["scope"] = "trace"
    assert config_diff(old, new, defaults) == ["method_config.trace_budget.scope: 'agent' -> 'trace'"]
