"""The attention the backbone runs on CPUs: transformers' SDPA less one copy, and a compiled kernel
for one-position steps.

For grouped-query models (fewer KV heads than query heads) transformers' SDPA path materialises
repeated keys and values (`repeat_kv`) for every chunk of more than one position that carries a
mask, because CUDA's fused kernels fall back to the math kernel with a mask and `enable_gqa`. The
trace always carries a mask (padding, `reads`, hidden agents), so on a CPU every prompt prefill,
option scoring and training chunk copies the whole trace's keys and values `groups` times per
layer, and its backward sums them back. PyTorch's CPU flash kernel reads the KV heads directly
with `enable_gqa=True`: the same forward numbers (bitwise, tested) without the copies; in backward
the group's key/value gradients are summed inside the kernel, the same sum in another order
(`bench/training_step.py` measures the step with and without it).

One-position steps (decode and latent steps) read the whole trace's keys and values for one query
per row. On long traces that read is most of the step, and PyTorch's CPU SDPA does it at a third
to a quarter of the memory bandwidth. `--cpu-attention kernel` (the default) runs them through
`kernels/decode_attention.cpp` (compiled for this CPU at first use; split-KV, AVX-512), about 2x
SDPA's speed on the embedded model's shapes (`bench/decode_attention.py`); rounding differs from
SDPA's by about 1e-6 relative (the kernel is closer to float64, tests/test_decode_attention.py),
and its sums follow a row's visible positions, not their columns, so a row gets the same bits
alone and in any batch. bf16 models' steps run it too: it reads their bf16 keys and values and
computes in fp32, as SDPA does, with the output rounded to bf16. Steps the kernel does not cover
keep transformers' path (it packs the query heads of a KV head into one query block): under
autograd, in dtypes other than fp32 and bf16, for shapes without an AVX-512 kernel, per-head
masks, dropout, softcaps and sinks, inside `torch.compile`, and where the kernel could not be
built. Every device but the CPU keeps transformers' path too.

Packed rows (a CPU chunk of several positions, `diffmas.trace`): a batch's rows run as one
sequence of their real tokens, so every linear layer is one product over all of them; inside
`packed_rows(rows)` attention splits that sequence back into rows and runs each row's tokens over
the columns of its row of the trace that it sees (gathered, so padding and hidden columns are not
there), through the same call whatever batch the row is in.
"""

from __future__ import annotations

import functools
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from diffmas.switch import Switch, scoped

NAME = "diffmas_cpu_sdpa"  # registered with transformers' attention and mask interfaces

# The shapes kernels/decode_attention.cpp has kernels for (its `supports` decides once it is
# built; these keep the build from starting where no call could use it: tiny models, CPUs without
# AVX-512).
KERNEL_HEAD_DIMS, KERNEL_MAX_GROUPS = (64, 128), 8
# fp32 models, and bf16 ones (`--dtype bfloat16`): the kernel reads bf16 keys and values and
# computes in fp32, which SDPA does too; PyTorch's bf16 SDPA for one query took 24x the kernel's
# time (batch 4, 300 positions, the embedded model's heads; AMD EPYC, 2026-12-07).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

CpuAttention = Literal["kernel", "sdpa"]
CPU_ATTENTION: Switch[CpuAttention] = Switch("CPU attention", "kernel", ("kernel", "sdpa"))


def cpu_attention(kind: CpuAttention):
    """Run one-position steps' attention on CPUs with `kind` inside this block (kernel or sdpa)."""
    return CPU_ATTENTION.using(kind)


@functools.cache
def decode_kernel():
    """The compiled one-position kernel, or None (with one warning saying why) where it cannot be built."""
    from diffmas.kernels import load

    module, why = load("decode_attention")
    if module is None:
        warnings.warn(f"CPU decode attention kernel not built ({why}); using PyTorch's SDPA", stacklevel=2)
    return module


def kernel_status() -> str:
    """What one-position steps' attention runs on this machine (for `diffmas env`)."""
    if CPU_ATTENTION.value == "sdpa":
        return "PyTorch's SDPA (--cpu-attention sdpa)"
    if not _avx512():
        return "PyTorch's SDPA (the kernel needs AVX-512)"
    module = decode_kernel()
    if module is None:
        return "PyTorch's SDPA (the kernel could not be built)"
    if not module.supports(1, 64):  # built without AVX-512: no kernel for any shape
        return "PyTorch's SDPA (no AVX-512 kernel for this CPU)"
    dims = " and ".join(str(d) for d in KERNEL_HEAD_DIMS)
    return (
        f"diffmas kernel (--cpu-attention kernel) for fp32 and bf16 models, head dims {dims}, "
        f"up to {KERNEL_MAX_GROUPS} query heads per KV head"
    )


def _kernel_takes(query, key, value, attention_mask, dropout, kwargs) -> bool:
    """Whether the compiled kernel runs this call (see the module's docstring for what it covers)."""
    if CPU_ATTENTION.value != "kernel" or query.shape[2] != 1 or dropout or torch.compiler.is_compiling():
        return False
    # sinks and windows too: the kernel keeps to the calls it was tested on
    if _needs_transformers(kwargs) or any(kwargs.get(k) is not None for k in ("s_aux", "sliding_window")):
        return False
    if query.dtype not in KERNEL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    if key.stride() != value.stride() or key.stride(-1) != 1 or query.stride(-1) != 1:
        return False
    if attention_mask is not None and (
        attention_mask.dtype not in (torch.bool, query.dtype)
        or attention_mask.dim() != 4
        or attention_mask.shape[1:3] != (1, 1)
        or attention_mask.shape[0] not in (1, query.shape[0])
        or attention_mask.shape[3] != key.shape[2]
    ):
        return False
    groups, rest = divmod(query.shape[1], key.shape[1])
    return not rest and kernel_has(groups, query.shape[3])


def kernel_has(groups: int, head_dim: int) -> bool:
    """Whether the compiled kernel runs heads of this shape here (`groups` query heads per KV head;
    building it on first use)."""
    if CPU_ATTENTION.value != "kernel" or groups > KERNEL_MAX_GROUPS or head_dim not in KERNEL_HEAD_DIMS:
        return False
    if not _avx512():
        return False
    module = decode_kernel()
    return module is not None and module.supports(groups, head_dim)


def _needs_transformers(kwargs) -> bool:
    """Arguments only transformers' own SDPA path handles: a position bias, a softcap (it refuses
    one), a paged cache."""
    return any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache"))


@functools.cache
def _avx512() -> bool:
    from diffmas.provenance import cpu_flags

    return "avx512f" in cpu_flags()


@dataclass(frozen=True)
class PackedRows:
    """Where a packed chunk's rows are: row b's tokens are positions `spans[b]` of the packed
    sequence; they attend over columns `columns[b]` (an index tensor: the columns the row sees) of
    row b of the keys and values attention is handed (the trace's buffers up to the chunk's end) through
    `masks[b]`, (1, 1, n_b, columns) bool, or causally where it is None (what transformers does for
    a row that sees all its keys)."""

    spans: tuple[tuple[int, int], ...]
    columns: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor | None, ...]


# A context variable, not a global: a server's threads each run their own traces.
_PACKED: ContextVar[PackedRows | None] = ContextVar("diffmas_packed_rows", default=None)


def packed_rows(rows: PackedRows):
    """Attention of the decoder forward inside this block splits its query into `rows`."""
    return scoped(_PACKED, rows)


def current_packed_rows() -> PackedRows | None:
    """The rows of the packed forward running now, or None (hooks that read per-row positions)."""
    return _PACKED.get()


def cpu_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' `sdpa_attention_forward`, with `enable_gqa` for multi-position chunks and the
    compiled kernel for one-position steps; inside `packed_rows`, row by row."""
    # compiled graphs (the static store) never run packed, and dynamo cannot trace a ContextVar
    rows = None if torch.compiler.is_compiling() else _PACKED.get()
    if rows is None:
        return _attend(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if kwargs.get("sliding_window") is not None:  # the backbone refuses sliding windows (check_cache_layers)
        raise RuntimeError("packed rows reached a sliding-window layer")
    outs = []
    for b, ((s, e), cols, mask) in enumerate(zip(rows.spans, rows.columns, rows.masks)):
        k, v = key[b : b + 1, :, cols], value[b : b + 1, :, cols]
        outs.append(_attend(module, query[:, :, s:e], k, v, mask, dropout, scaling, is_causal, **kwargs)[0])
    return torch.cat(outs, dim=1), None


def _attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _kernel_takes(query, key, value, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.float()  # the kernel adds fp32 scores (no copy in fp32)
        out = decode_kernel().decode_attention(query.float(), key, value, attention_mask, scale)
        return out.to(query.dtype), None
    q_length, kv_length = query.shape[2], key.shape[2]
    grouped = query.shape[1] != key.shape[1]
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if q_length == 1 or not grouped or _needs_transformers(kwargs) or (causal and kv_length != q_length):
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
