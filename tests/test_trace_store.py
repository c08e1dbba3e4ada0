"""The in-place growable trace store against the old concatenating one (`trace_store("concat")`,
transformers' `DynamicCache` behaviour): same logits, texts, option scores and trace bytes for
every method, batched and unbatched; the same gradients in training; in-place writes that never
reach a tensor a caller or an autograd graph holds."""

from __future__ import annotations

import pytest
import torch

from diffmas.channel import latent_steps, prefill
from diffmas.generate import DecodeConfig, decode
from diffmas.methods import MethodConfig, OptionQuery, get_method
from diffmas.roles import default_topology
from diffmas.trace import LatentTrace, packed_rows, trace_store

from conftest import make_backbone

QUESTIONS = ["What is 2+2?", "Name a colour that is a long colour name please", "Why?"]
OPTIONS = [
    OptionQuery("q one?", (" a", " bb", " ccc")),
    OptionQuery("second question", (" yes", " no")),
    OptionQuery("3", (" x y z", " w")),
]
STORES = ("concat", "grow")


def with_adapters(bb):
    """Per-role LoRA adapters with non-zero weights (diffmas runs under trained adapters)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    roles = [r.name for r in default_topology().roles]
    model = get_peft_model(bb.model, lora, adapter_name=roles[0])
    for name in roles[1:]:
        model.add_adapter(name, lora)
    bb.model = model
    return {name: name for name in roles}


def run(bb, name: str, store: str, questions, options, adapters=None):
    cfg = MethodConfig(latent_steps=3, decode=DecodeConfig(max_new_tokens=8), upstream_max_new_tokens=6)
    method = get_method(name, bb, config=cfg, adapters=adapters)
    with trace_store(store):
        return method.run_batch(questions, "fmt", options=options)


@torch.no_grad()
@pytest.mark.parametrize("name", ["single", "text_mas", "latent_mas", "diffmas"])
def test_every_method_gives_the_same_results_on_both_stores(backbone, name):
    adapters = with_adapters(backbone) if name == "diffmas" else None
    for questions, options in ((QUESTIONS, OPTIONS), *(([q], [o]) for q, o in zip(QUESTIONS, OPTIONS))):
        old, new = (run(backbone, name, store, questions, options, adapters) for store in STORES)
        for a, b in zip(old, new):
            assert a.text == b.text
            assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)
            # sums over an option's tokens (about -20): the grow store's row-by-row prompts attend
            # over their padding columns too (masked), so its fp32 sums round differently (1e-6 relative)
            assert b.option_logprobs == pytest.approx(a.option_logprobs, rel=1e-5, abs=1e-5)
            assert (a.trace_len, a.trace_bytes) == (b.trace_len, b.trace_bytes)
            assert [x.n_generated_tokens for x in a.agents] == [x.n_generated_tokens for x in b.agents]


def build(bb, store: str, rows=QUESTIONS, m=4, new=6):
    """Two agents' prompts + latent steps, a third agent's prompt and decoding, on one trace.
    Both stores run each prompt as one padded batch (`packed_rows(False)`): packed rows attend
    over each row's gathered columns, another rounding that the wide-init model amplifies past
    1e-5 over the latent steps; tests/test_trace.py compares them with the padded batch."""
    with trace_store(store):
        trace = LatentTrace(bb, len(rows))
    with packed_rows(False):
        for agent in ("a", "b"):
            h = prefill(trace, agent, [f"{agent} reads {r}" for r in rows])
            latent_steps(trace, agent, h, m)
        h = prefill(trace, "c", list(rows))
        out = decode(trace, "c", h, DecodeConfig(max_new_tokens=new, min_new_tokens=new), [0] * len(rows))
        logits = bb.logits(prefill(trace, "d", ["and then?"] * len(rows)))
    return trace, out, logits


@torch.no_grad()
def test_logits_kv_and_bytes_equal_on_both_stores(backbone):
    (old, out_old, logits_old), (new, out_new, logits_new) = (build(backbone, s) for s in STORES)
    assert torch.allclose(logits_old, logits_new, atol=1e-5), (logits_old - logits_new).abs().max()
    assert out_old.token_ids == out_new.token_ids
    assert old.n_bytes() == new.n_bytes() == old.bytes_per_entry() * old.length * old.batch_size
    for (k0, v0), (k1, v1) in zip(old.kv(), new.kv()):
        assert k0.shape == k1.shape and torch.allclose(k0, k1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)
    # the concat store holds exactly the live entries; the grow store has free columns, bounded
    assert old.capacity_bytes() == old.n_bytes()
    assert new.n_bytes() < new.capacity_bytes() <= 1.5 * new.n_bytes() + 64 * new.bytes_per_entry() * new.batch_size


@torch.no_grad()
def test_grow_store_writes_in_place_and_never_into_held_tensors(backbone):
    with trace_store("grow"):
        trace = LatentTrace(backbone, 2)
    h = prefill(trace, "a", ["one prompt", "another, longer prompt"])
    given = [(k.clone(), v.clone()) for k, v in trace.kv()]
    trace.set_kv(given)  # tensors handed in through the seam are held, not copied ...
    kept = [(k.clone(), v.clone()) for k, v in given]
    early = [(k, v) for k, v in trace.kv()]  # views, as inspection would take them
    early_copy = [(k.clone(), v.clone()) for k, v in early]
    storages = set()
    for _ in range(40):
        h = latent_steps(trace, "a", h, 1)
        storages.add(trace.kv()[0][0].untyped_storage().data_ptr())
    for (k, v), (k0, v0) in zip(given, kept):  # ... and never written to
        assert torch.equal(k, k0) and torch.equal(v, v0)
    for (k, v), (k0, v0) in zip(early, early_copy):  # earlier views still read the same entries
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert len(storages) <= 3  # 40 appends, a handful of reallocations: writes go in place
    n = early[0][0].shape[-2]
    assert torch.equal(trace.kv()[0][0][..., :n, :], early_copy[0][0])  # append-only
    trace.release()
    assert trace.n_bytes() == 0 and trace.capacity_bytes() == 0


def test_trace_store_rejects_unknown_kinds():
    from diffmas.errors import DiffmasError

    with pytest.raises(DiffmasError, match="choose one of grow, concat"):
        with trace_store("static"):
            pass


def _trained_grads(store: str, upstream_no_grad: bool, checkpointing: bool = False):
    """Gradients of a teacher-forced loss through a latent trace, under one store."""
    from diffmas.train.trajectory import teacher_forced_loss

    bb = make_backbone(tied=False)
    adapters = with_adapters(bb)
    for n, p in bb.model.named_parameters():
        p.requires_grad_("lora_" in n)
    bb.gradient_checkpointing = checkpointing
    with trace_store(store):
        trace = LatentTrace(bb, 2)
    # a frozen upstream would run packed on the grow store only (see `build`)
    with torch.no_grad() if upstream_no_grad else torch.enable_grad(), packed_rows(False):
        for agent in ("planner", "critic"):
            with bb.use_adapter(adapters[agent]):
                h = prefill(trace, agent, [f"{agent}: two plus two", f"{agent}: capital of France"])
                latent_steps(trace, agent, h, 3)
    with bb.use_adapter(adapters["solver"]):
        loss, _ = teacher_forced_loss(trace, "solver", ["answer:", "answer please:"], ["4", "Paris"])
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "upstream_no_grad, checkpointing",
    [(False, False), (True, False), (False, True)],
    ids=["full", "upstream-no-grad", "checkpointed"],
)
def test_training_gradients_equal_on_both_stores(upstream_no_grad, checkpointing):
    (loss_a, a), (loss_b, b) = (_trained_grads(s, upstream_no_grad, checkpointing) for s in STORES)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name
    reached = any("planner" in n and float(g.abs().sum()) > 0 for n, g in b.items())
    assert reached != upstream_no_grad  # gradients flow back through the latent steps unless cut


@pytest.mark.parametrize("store", STORES)
def test_training_appends_go_in_place_on_the_grow_store(store):
    """With autograd on, the grow store writes appends into its buffers too (a handful of storages
    over 40 latent steps) where the concat store makes a tensor per append; backward through all of
    them still runs (nothing attention saved was written over) and reaches the first chunk."""
    bb = make_backbone(tied=False)
    adapters = with_adapters(bb)
    for n, p in bb.model.named_parameters():
        p.requires_grad_("lora_" in n)
    with trace_store(store):
        trace = LatentTrace(bb, 2)
    storages = set()
    with bb.use_adapter(adapters["planner"]):
        h = prefill(trace, "planner", ["two plus two", "the capital of France"])
        for _ in range(40):
            h = latent_steps(trace, "planner", h, 1)
            storages.add(trace.kv()[0][0].untyped_storage().data_ptr())
    assert (len(storages) <= 3) == (store == "grow")
    h.square().sum().backward()
    grads = [p.grad for n, p in bb.model.named_parameters() if "lora_" in n and "planner" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(
        float(g.abs().sum()) > 0 for g in grads
    )
