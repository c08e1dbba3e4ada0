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
those shapes on Intel CPUs (tests/test_linear.py), not a guarantee: on an AMD EPYC it does not hold
(rows differ by rounding with the batch), and one-row products (PyTorch's
matrix-vector kernel, kept for speed) round differently from both.

Scope: fp32 weights of at least 256 KiB on the CPU, with MKL, and only calls without autograd
(inference, and the frozen upstream of `upstream_grad="none"`): MKL's packed op has no backward,
and training keeps PyTorch's own path. One-row calls and calls of more than 16 rows (prompt
prefill) keep `F.linear`. The packed copy costs memory about the size of the weight; it is
made on a layer's first few-row call, and made again when the weight's storage or version counter
changes (`load_state_dict`, in-place updates under `no_grad`). Edits through `weight.data` bump no
counter: after one (peft's merge does, on the merged copy `export_merged` saves), call
`forget_packed()`.

Memory. The packed copies double the linear weights' memory, so a model is packed only when the
copies fit in a quarter of the memory available when it loads (a 135M fp32 model: 0.5 GiB of
copies; an fp32 8B model on a laptop stays unpacked). When packed copies are dropped (their model
is garbage-collected, or `forget_packed()`), the C heap is trimmed: the copies are a few MiB each,
glibc serves such blocks from its heap once a freed block of that size has raised its mmap
threshold, and a heap does not give freed blocks back to the system by itself, so without the
trim a process that loads and drops models keeps their memory resident (and its RSS peaks stop
meaning anything; tests/test_method_cost.py measures one).
`linear_kernel("default")` turns packing off for a block.
"""

from __future__ import annotations

import os
import weakref
from typing import Literal

import torch
import torch.nn.functional as F

from diffmas.accounting import trim_heap
from diffmas.switch import Switch

LinearKernel = Literal["packed", "default"]
LINEAR_KERNELS = ("packed", "default")
KERNEL: Switch[LinearKernel] = Switch("linear kernel", "packed", LINEAR_KERNELS)

# Products of 2 to 16 rows go packed. One row is a matrix-vector product, which PyTorch's kernel
# runs at the bandwidth already; above 16 rows PyTorch's kernel was as fast or faster on the
# embedded model's shapes (bench/packed_linear.py), and from 16 rows on both give the same bits.
MIN_PACKED_ROWS, MAX_PACKED_ROWS = 2, 16
# Weights below this many elements (256 KiB in fp32) stay plain: they sit in the caches between
# calls, where re-packing costs little, and for the tiny test models' 64-wide layers MKL's packed
# one-row product rounds differently from its many-row one (tests/test_linear.py shows both).
MIN_PACKED_WEIGHT = 64 * 1024
# A model's packed copies may take at most this share of the memory available when it loads.
MAX_PACKED_SHARE_OF_AVAILABLE = 0.25
# Trim the C heap once this many bytes of packed copies were dropped since the last trim.
TRIM_AFTER_BYTES = 32 * 2**20


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


# id(weight) -> (weight's (storage pointer, version) when packed, packed copy, its bytes). Kept
# outside the modules, so state_dict, deepcopy and pickling never see the packed copies (a cache,
# not model state); an entry goes when its weight is garbage-collected.
_PACKS: dict[int, tuple[tuple[int, int], torch.Tensor, int]] = {}
_dropped_bytes = 0  # packed bytes freed since the heap was last trimmed


def _packed(weight: torch.Tensor) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version)
    cached = _PACKS.get(id(weight))
    if cached is None:
        weakref.finalize(weight, _drop, id(weight))
    if cached is None or cached[0] != key:
        with torch.no_grad():
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), MAX_PACKED_ROWS)
        _PACKS[id(weight)] = cached = (key, packed, weight.numel() * weight.element_size())
    return cached[1]


def _drop(weight_id: int) -> None:
    """A packed weight was garbage-collected: free its copy, and trim the heap now and then."""
    global _dropped_bytes
    entry = _PACKS.pop(weight_id, None)
    if entry is not None:
        _dropped_bytes += entry[2]
        del entry
        if _dropped_bytes >= TRIM_AFTER_BYTES:
            _trim_heap()


def _trim_heap() -> None:
    global _dropped_bytes
    _dropped_bytes = 0
    trim_heap()


def available_memory_bytes() -> int | None:
    """The system's available memory (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def use_packed_linear(model: torch.nn.Module, available_bytes: int | None = None) -> int:
    """Swap every plain nn.Linear of a CPU fp32 model with at least MIN_PACKED_WEIGHT weights to
    PackedLinear; returns how many (0 when their packed copies would not fit in
    MAX_PACKED_SHARE_OF_AVAILABLE of `available_bytes`, by default the memory available now).

    Plain nn.Linear only: quantised or otherwise specialised linear classes keep their own forward.
    """
    if not packing_available():
        return 0
    layers = [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
        and module.weight.numel() >= MIN_PACKED_WEIGHT
    ]
    packed_bytes = sum(w.numel() * w.element_size() for w in _unique_weights(layers))
    available = available_memory_bytes() if available_bytes is None else available_bytes
    if available is not None and packed_bytes > MAX_PACKED_SHARE_OF_AVAILABLE * available:
        return 0
    for module in layers:
        module.__class__ = PackedLinear
    return len(layers)


def _unique_weights(layers: list[torch.nn.Linear]) -> list[torch.Tensor]:
    """Each weight once (a tied LM head shares the embedding's)."""
    return list({id(m.weight): m.weight for m in layers}.values())


def forget_packed() -> None:
    """Drop every packed copy; each layer packs its weight again on its next few-row call."""
    _PACKS.clear()
    _trim_heap()
