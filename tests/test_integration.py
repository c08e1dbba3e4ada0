"""Integration: the embedded SmolLM2-135M model (converted from its GGUF once, then cached)."""

from __future__ import annotations

import os

import pytest
import torch

from diffmas import DecodeConfig, MethodConfig, get_method, load_backbone
from diffmas.backbone import EMBEDDED_MODELS, ensure_embedded

pytestmark = pytest.mark.integration

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"
FORMAT = "Give the final answer inside \\boxed{}."


@pytest.fixture(scope="module")
def smollm():
    # conftest pins one thread for the tiny models; a 135M model does use the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    yield load_backbone("smollm2-135m", dtype="float32", device="cpu")
    torch.set_num_threads(threads)


def test_embedded_model_shape(smollm):
    assert smollm.tied and smollm.n_layers == 30 and smollm.n_kv_heads == 3 and smollm.head_dim == 64
    assert smollm.realigner.matrix is None
    # last-layer hidden states are far larger than input embeddings: the rescale matters
    assert 2.0 < smollm.realigner.target_norm < 5.0


@pytest.mark.parametrize("name", ["single", "text_mas", "latent_mas"])
def test_each_method_answers(smollm, name):
    cfg = MethodConfig(latent_steps=4, decode=DecodeConfig(max_new_tokens=48), upstream_max_new_tokens=24)
    result = get_method(name, smollm, config=cfg).run_batch([QUESTION], FORMAT)[0]
    assert result.text.strip(), "empty answer"
    assert any(ch.isdigit() for ch in result.text)
    final = result.agents[-1]
    assert final.n_generated_tokens == len(result.token_logprobs) <= 48
    # a coherent model is confident about most of its own tokens
    assert sum(result.token_logprobs) / len(result.token_logprobs) > -2.5
    if name == "latent_mas":
        assert [a.n_latent_steps for a in result.agents] == [4, 4, 4, 0]


def test_cached_conversion_matches_gguf(smollm):
    """The safetensors cache reproduces the GGUF model's logits."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = EMBEDDED_MODELS["smollm2-135m"]
    src = importlib.util.find_spec(spec.package).submodule_search_locations[0]
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = smollm.model(ids).logits
        b = gguf(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert (ensure_embedded("smollm2-135m") / "model.safetensors").is_file()
