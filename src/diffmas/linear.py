"""The backbone's linear layers on CPUs: MKL's packed GEMM for the few-row products of a step.

A decode or latent step multiplies one row per question (B rows, B the batch) by every weight
matrix of the model. For a few rows PyTorch's fp32 CPU linear re-packs the weight on every call
and reads it well below the machine's memory bandwidth (`bench/packed_linear.py` measures it).
MKL's packed GEMM (`cblas_sgemm_pack`, what inductor's CPU weight prepacking calls) packs each
weight once and reads it close to the bandwidth, so the memory-bound steps of batches of 2 to 16
rows run faster.

For the embedded model's weight shapes the packed product of 2 to 16 rows gives a row the same
bits whatever the other rows, and the same bits as `F.linear` on 16 rows or more; `F.linear` on
2 to 15 rows does not (it differs by about 1e-6 relative). That is a measured property of MKL on
those shapes (tests/test_linear.py), not a guarantee, and one-row products (PyTorch's
matrix-vector kernel, kept for speed) round differently from both.

Scope: fp32 weights of at least 256 KiB on the CPU, with MKL, and only calls without autograd
(inference, and the frozen upstream of `upstream_grad="none"`): MKL's packed op has no backward,
and training keeps PyTorch's own path. One-row calls and calls of more than 16 rows (prompt
prefill) keep `F.linear`. The packed copy costs memory about the size of the weight; it is
made on a layer's first few-row call, and made again when the weight's storage or version counter
changes (`load_state_dict`, in-place updates under `no_grad`). Edits through `weight.data` bump no
counter: after one (peft's merge does, on the merged copy `export_merged` saves), call
`forget_packed()`.
It is opt-in: `with linear_kernel("packed"):` (see KERNEL for why it is not the default yet).
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import torch.nn.functional as F

from diffmas.switch import Switch

LinearKernel = Literal["packed", "default"]
LINEAR_KERNELS = ("packed", "default")
# Opt-in: with packing on, a process that builds and drops backbones kept the freed memory
# resident (in one ad-hoc run, RSS 426 -> 1378 MiB over three embedded backbones, against 422
# without), and a 400 MiB allocation made afterwards was not returned to the system when freed,
# which defeats the RSS-peak accounting (tests/test_method_cost.py failed after the suite's
# earlier tests).
KERNEL: Switch[LinearKernel] = Switch("linear kernel", "default", LINEAR_KERNELS)

# Products of 2 to 16 rows go packed. One row is a matrix-vector product, which PyTorch's kernel
# runs at the bandwidth already; above 16 rows PyTorch's kernel was as fast or faster on the
# embedded model's shapes (bench/packed_linear.py), and from 16 rows on both give the same bits.
MIN_PACKED_ROWS, MAX_PACKED_ROWS = 2, 16
# Weights below this many elements (256 KiB in fp32) stay plain: they sit in the caches between
# calls, where re-packing costs little, and for the tiny test models' 64-wide layers MKL's packed
# one-row product rounds differently from its many-row one (tests/test_linear.py shows both).
MIN_PACKED_WEIGHT = 64 * 1024


def linear_kernel(kind: LinearKernel):
    """Run the backbone's CPU linear layers with the given kernel inside this block."""
    return KERNEL.using(kind)


def packing_available() -> bool:
    """MKL's packed GEMM is in this torch build (x86 builds with MKL; not on ARM or macOS)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(torch.nn.Linear):
    """nn.Linear whose few-row, autograd-free fp32 CPU calls run MKL's packed GEMM.

    Installed by class swap (`use_packed_linear`), so the module keeps its parameters, its
    state_dict and its place in the model, and peft still sees an nn.Linear to wrap.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            KERNEL.value != "packed"
            or torch.compiler.is_compiling()  # the fast path's graphs keep PyTorch's op
            or not MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS
            or weight.device.type != "cpu"
            or weight.dtype != torch.float32
            or x.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            return F.linear(x, weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, _packed(weight), weight, self.bias, rows)


# id(weight) -> (weight's (storage pointer, version) when packed, packed copy). Kept outside the
# modules, so state_dict, deepcopy and pickling never see the packed copies (a cache, not model
# state); an entry goes when its weight is garbage-collected.
_PACKS: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}


def _packed(weight: torch.Tensor) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version)
    cached = _PACKS.get(id(weight))
    if cached is None:
        weakref.finalize(weight, _PACKS.pop, id(weight), None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), MAX_PACKED_ROWS))
        _PACKS[id(weight)] = cached
    return cached[1]


def use_packed_linear(model: torch.nn.Module) -> int:
    """Swap every plain nn.Linear of a CPU fp32 model with at least MIN_PACKED_WEIGHT weights to
    PackedLinear; returns how many.

    Plain nn.Linear only: quantised or otherwise specialised linear classes keep their own forward.
    """
    if not packing_available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            if module.weight.dtype == torch.float32 and module.weight.numel() >= MIN_PACKED_WEIGHT:
                module.__class__ = PackedLinear
                swapped += 1
    return swapped


def forget_packed() -> None:
    """Drop every packed copy; each layer packs its weight again on its next few-row call."""
    _PACKS.clear()
