"""The CPU attention kernel (diffmas.attention): transformers' SDPA numbers without repeat_kv."""

from __future__ import annotations

import torch

from diffmas.attention import NAME, cpu_sdpa
from diffmas.channel import latent_steps, prefill
from diffmas.trace import LatentTrace

from conftest import TEST_DEVICE, make_backbone

PROMPTS = ["a short one", "a much longer prompt, with several more words in it"]


def run(bb, implementation: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two agents' prompts and latent steps, then a final prompt's logits, with gradients to the
    input embeddings of the first prompt (through every later chunk's attention)."""
    bb.model.set_attn_implementation(implementation)
    tok = bb.tokenizer(PROMPTS, return_tensors="pt", padding=True).to(bb.device)
    embeds = bb.embed(tok["input_ids"]).detach().requires_grad_(True)
    trace = LatentTrace(bb, len(PROMPTS))
    hidden = trace.append(embeds, tok["attention_mask"], "a", "prompt")
    latent_steps(trace, "a", hidden[:, -1], 2)
    logits = bb.logits(prefill(trace, "b", ["then the second agent reads", "and b"]))
    (grad,) = torch.autograd.grad(logits.square().sum(), embeds)
    return logits, [grad]


def test_backbones_on_a_cpu_use_it():
    bb = make_backbone(tied=True)
    expected = NAME if TEST_DEVICE == "cpu" else "sdpa"
    assert bb.model.config._attn_implementation == expected


def test_same_logits_and_gradients_as_transformers_sdpa():
    bb = make_backbone(tied=False)
    assert bb.model.config.num_key_value_heads < bb.model.config.num_attention_heads  # grouped: the case it changes
    ours, ours_grad = run(bb, NAME)
    theirs, theirs_grad = run(bb, "sdpa")
    assert torch.equal(ours, theirs)  # forward: the same kernel reads the same numbers, bitwise
    # backward: the group's key/value gradients are summed inside the kernel instead of by
    # repeat_kv's backward, another order of the same fp32 sum (this wide-init model amplifies it)
    torch.testing.assert_close(ours_grad[0], theirs_grad[0], atol=1e-4, rtol=1e-4)
    assert not torch.equal(ours_grad[0], torch.zeros_like(ours_grad[0]))


def test_multi_position_chunks_take_enable_gqa_and_single_positions_transformers_path(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[1] == q.shape[1], kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    out, _ = cpu_sdpa(module, q, k, k, mask)
    assert out.shape == (1, 3, 4, 8) and calls[-1] == (3, False, True)  # KV heads read in place
    cpu_sdpa(module, q[:, :, -1:], k, k, mask[:, :, -1:])
    assert calls[-1][2] is False  # one position: transformers' packed path, no enable_gqa
