"""Model families the trace must handle or refuse: final logit processing (Cohere's logit scale,
Granite's logits scaling, Gemma 2's soft-capping) and sliding-window / hybrid caches."""

from __future__ import annotations

import pytest
import torch

from diffmas.backbone import Backbone, BackboneError, prepare_tokenizer

from conftest import make_tokenizer

TINY = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _backbone(config_cls, model_cls, **kw) -> Backbone:
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **kw})).eval().requires_grad_(False)
    tok = make_tokenizer()
    prepare_tokenizer(tok)
    return Backbone(model=model, tokenizer=tok, name=config_cls.model_type)


def _families():
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    return {
        "cohere-logit_scale": (CohereConfig, CohereForCausalLM, dict(logit_scale=0.25)),
        "granite-logits_scaling": (GraniteConfig, GraniteForCausalLM, dict(logits_scaling=4.0)),
        "gemma2-softcapping": (
            Gemma2Config,
            Gemma2ForCausalLM,
            dict(final_logit_softcapping=2.0, head_dim=16, layer_types=["full_attention"] * 2),
        ),
    }


@pytest.mark.parametrize("family", ["cohere-logit_scale", "granite-logits_scaling", "gemma2-softcapping"])
def test_backbone_logits_equal_the_models_own(family):
    config_cls, model_cls, kw = _families()[family]
    bb = _backbone(config_cls, model_cls, **kw)
    ids = torch.tensor([[5, 9, 40, 77, 3]])
    with torch.no_grad():
        hidden = bb.decoder()(input_ids=ids).last_hidden_state
        expected = bb.model(input_ids=ids).logits.float()
        assert torch.allclose(bb.logits(hidden), expected, atol=1e-5)


def test_greedy_decoding_through_the_trace_matches_generate_with_softcapping():
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig, get_method
    from diffmas.roles import default_topology

    config_cls, model_cls, kw = _families()["gemma2-softcapping"]
    bb = _backbone(config_cls, model_cls, **kw)
    method = get_method(
        "single", bb, default_topology("sequential", 1), MethodConfig(decode=DecodeConfig(max_new_tokens=6))
    )
    result = method.run_batch(["Hi?"])[0]
    from diffmas.roles import render_prompt

    prompt = render_prompt(bb.tokenizer, default_topology("sequential", 1).final, "Hi?")
    ids = bb.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = bb.model(input_ids=ids).logits[0, -1].float()
    expected_logp = float(logits.log_softmax(-1).max())
    assert result.token_logprobs[0] == pytest.approx(expected_logp, abs=1e-4)


def test_sliding_window_and_hybrid_caches_are_refused():
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    with pytest.raises(BackboneError, match=r"mistral.*DynamicSlidingWindowLayer.*sliding_window=16"):
        _backbone(MistralConfig, MistralForCausalLM, sliding_window=16)
    with pytest.raises(BackboneError, match="full-attention layers only"):
        _backbone(Gemma2Config, Gemma2ForCausalLM, head_dim=16)  # alternating sliding / full layers
    with pytest.raises(BackboneError, match="full-attention layers only"):
        _backbone(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    # the same families with every layer attending fully are accepted
    assert _backbone(MistralConfig, MistralForCausalLM, sliding_window=None)
    assert _backbone(Qwen2Config, Qwen2ForCausalLM)
