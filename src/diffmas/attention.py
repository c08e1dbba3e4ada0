"""The attention kernel the backbone runs on CPUs: transformers' SDPA, less one copy.

For grouped-query models (fewer KV heads than query heads) transformers' SDPA path materialises
repeated keys and values (`repeat_kv`) for every chunk of more than one position that carries a
mask, because CUDA's fused kernels fall back to the math kernel with a mask and `enable_gqa`. The
trace always carries a mask (padding, `reads`, hidden agents), so on a CPU every prompt prefill,
option scoring and training chunk copies the whole trace's keys and values `groups` times per
layer, and its backward sums them back. PyTorch's CPU flash kernel reads the KV heads directly
with `enable_gqa=True`: the same forward numbers (bitwise, tested) without the copies; in backward
the group's key/value gradients are summed inside the kernel, the same sum in another order
(`bench/training_step.py` measures the step with and without it).

One-position steps keep transformers' path (it packs the query heads of a KV head into one
query block, as fast as `enable_gqa` there), and so does every device but the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "diffmas_cpu_sdpa"  # registered with transformers' attention and mask interfaces


def cpu_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' `sdpa_attention_forward`, with `enable_gqa` for multi-position chunks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_length, kv_length = query.shape[2], key.shape[2]
    grouped = query.shape[1] != key.shape[1]
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or kwargs.get("cache")
    if q_length == 1 or not grouped or special or (causal and kv_length != q_length):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_cpu_sdpa(model: torch.nn.Module) -> None:
    """Switch a model loaded with SDPA on a CPU to `cpu_sdpa` (same masks: transformers' SDPA mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return
    AttentionInterface.register(NAME, cpu_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
