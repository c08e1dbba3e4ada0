"""The backbone's linear layers on CPUs: a packed GEMM (MKL's or oneDNN's) for few-row products.

A decode or latent step multiplies one row per question (B rows, B the batch) by every weight
matrix of the model. For a few rows PyTorch's fp32 CPU linear re-packs the weight on every call
and reads it well below the machine's memory bandwidth (`bench/packed_linear.py` measures it).
A packed GEMM packs each weight once into the kernel's own layout and reads it close to the
bandwidth, so the memory-bound steps of small batches run faster. Two libraries in
PyTorch's x86 builds do it, and each is fastest on a different vendor's CPUs:

- MKL (`cblas_sgemm_pack`, what inductor's CPU weight prepacking calls), for 2 to 16 rows: on an
  Intel Xeon (AVX-512) it beat oneDNN's prepacked product from 4 to 16 rows.
- oneDNN (`mkldnn._linear_pointwise` on a weight reordered once, inductor's other prepacking), from
  1 row up: on an AMD EPYC MKL's few-row GEMM runs far below the bandwidth, and oneDNN's was
  faster than PyTorch's kernel at every row count measured, a batch's prompt prefill included
  (0.4x to 0.55x from 4 to 2080 rows on an AVX-512 EPYC; an earlier AVX-512 EPYC measured 0.73x
  to 1.0x at 512 rows), and one row (batch-1 steps) too, most on the LM head.

`--cpu-linear packed` (the default) takes MKL on Intel CPUs and oneDNN on other x86 CPUs;
`mkl` and `onednn` choose one, and `bench/packed_linear.py` measures all three kernels on the
machine it runs on, so the choice can be checked there. Non-x86 CPUs keep PyTorch's kernel unless
a library is named (no measurement there).

Bits. On an Intel Xeon, MKL's packed product of 2 to 16 rows gives a row the same bits whatever
the other rows, and the same bits as `F.linear` on 16 rows or more; `F.linear` on 2 to 15 rows
does not (it differs by about 1e-6 relative). That is a measured property of MKL on the embedded
model's shapes (tests/test_linear.py), not a guarantee: on an AMD EPYC it does not hold. oneDNN's
prepacked product gave a row the same bits in any call of 2 to 600 rows on an Intel Xeon, and of
2 to 4200 rows on an AMD EPYC (tests/test_linear.py checks 2 to 1100 wherever oneDNN is in the
build), so with it a question's prompt gets the same bits alone and in a batch. A library's
one-row product (a batch-1 step) may round otherwise than the same row in a larger call (oneDNN's
does on the EPYC, for the 1536-wide input of the MLP's down projection), so without autograd a
one-row call runs as the row twice: a batch-1 step gets the bits the row gets in any batch
(tests/test_trace.py checks whole traces).

Scope: fp32 weights of at least 256 KiB on the CPU, and bf16 ones of as many elements (a model
loaded with `--dtype bfloat16`): those run oneDNN's packed bf16 product (`_bf16_gemm`), for
inference only, on CPUs with bf16 instructions. Without autograd (inference, and the frozen
upstream of `upstream_grad="none"`) every library's product runs. Under autograd a weight that
takes gradients keeps PyTorch's path; a frozen one (a LoRA's base layer, the tied head: all of
DiffMAS training's products) runs oneDNN's product forward, and the input's gradient (dy W) by a
second copy, of the transposed weight, packed on the first backward; MKL's op needs the original
weight beside its packed copy, so its products train on PyTorch's path. Calls outside the
library's row range keep `F.linear`, and so do one-row products under autograd (`min_train_rows`:
one row was measured for inference only). A packed copy costs memory about the size of
the weight; it is made on a layer's first call in range, and made again when the weight's storage
or version counter changes (`load_state_dict`, in-place updates under `no_grad`). Edits through
`weight.data` bump no counter: after one (peft's merge does, on the merged copy `export_merged`
saves), call `forget_packed()`.

Memory. The packed copies double the linear weights' memory (training's transposed copies
triple it), so a model is packed only when the copies fit in a quarter of the memory available
when it loads (a 135M fp32 model: 0.5 GiB of copies; an fp32 8B model on a laptop stays unpacked),
and trains on packed products only when both sets fit there. When packed copies are dropped (their
model is garbage-collected, or `forget_packed()`), the C heap is trimmed: the copies are a few MiB
each, glibc serves such blocks from its heap once a freed block of that size has raised its mmap
threshold, and a heap does not give freed blocks back to the system by itself, so without the
trim a process that loads and drops models keeps their memory resident (and its RSS peaks stop
meaning anything; tests/test_method_cost.py measures one).
`linear_kernel("default")` turns packing off for a block.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import weakref
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from diffmas.accounting import trim_heap
from diffmas.provenance import cpu_bf16_support, cpu_vendor
from diffmas.switch import Switch

LinearKernel = Literal["packed", "mkl", "onednn", "default"]
LINEAR_KERNELS = ("packed", "mkl", "onednn", "default")
KERNEL: Switch[LinearKernel] = Switch("linear kernel", "packed", LINEAR_KERNELS)

# Weights below this many elements (256 KiB in fp32) stay plain: they sit in the caches between
# calls, where re-packing costs little, and for the tiny test models' 64-wide layers MKL's packed
# one-row product rounds differently from its many-row one (tests/test_linear.py shows both).
MIN_PACKED_WEIGHT = 64 * 1024
# A model's packed copies may take at most this share of the memory available when it loads.
MAX_PACKED_SHARE_OF_AVAILABLE = 0.25
# Trim the C heap once this many bytes of packed copies were dropped since the last trim.
TRIM_AFTER_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class PackedGemm:
    """One library's packed fp32 GEMM: `pack(weight)` once, then `run(x2d, packed, weight, bias)`
    for calls of `min_rows` to `max_rows` rows (None: no upper bound). `trains`: its product may
    also run under autograd, for a frozen weight, the input's gradient by a packed copy of the
    transposed weight (its `run` does not read the original weight, so that copy stands alone)."""

    name: str
    description: str
    min_rows: int
    max_rows: int | None
    available: Callable[[], bool]
    pack: Callable[[torch.Tensor], torch.Tensor]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
    trains: bool = False
    # Under autograd: the fewest rows a product runs packed (one-row products were measured for
    # inference only, so a one-row training product keeps PyTorch's path).
    min_train_rows: int = 2

    def takes(self, rows: int) -> bool:
        return self.min_rows <= rows and (self.max_rows is None or rows <= self.max_rows)

    def trains_on(self, rows: int) -> bool:
        """Whether a frozen weight's product of `rows` rows runs packed under autograd."""
        return self.trains and self.takes(rows) and rows >= self.min_train_rows

    def rows_text(self) -> str:
        return rows_text(self.min_rows, self.max_rows)


def rows_text(min_rows: int, max_rows: int | None) -> str:
    """A row range in words ("2 to 16 rows", "1 row or more"): `diffmas env` and the benchmark docs."""
    if max_rows:
        return f"{min_rows} to {max_rows} rows"
    return f"{min_rows} row{'s' * (min_rows != 1)} or more"


# MKL: above 16 rows PyTorch's kernel was as fast or faster on the embedded model's shapes, and
# from 16 rows on both give the same bits; one row (a matrix-vector product) was not measured with
# MKL and keeps PyTorch's kernel. The pack's row hint is the most rows it is tuned for.
MKL = PackedGemm(
    name="mkl",
    description="MKL's packed GEMM",
    min_rows=2,
    max_rows=16,
    available=lambda: torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"),
    pack=lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, 16),
    run=lambda x, packed, w, bias: torch.ops.mkl._mkl_linear(x, packed, w, bias, x.shape[0]),
)
# oneDNN: on an AMD EPYC (AVX-512, 2026-12-04) 0.4x to 0.55x PyTorch's kernel from 4 to 2080 rows
# on every weight shape of the embedded model, so a batch's prompt prefill (hundreds or thousands
# of rows) takes it too, and its rows keep their bits in any call of 2 rows or more
# (tests/test_linear.py). One row (batch-1 decode and latent steps): faster than PyTorch's
# matrix-vector kernel on the same EPYC (2026-12-07, bench/packed_linear.py), most on the LM head;
# a one-row call may round otherwise than the row in a larger call, so `PackedLinear` runs it as two.
ONEDNN = PackedGemm(
    name="onednn",
    description="oneDNN's prepacked GEMM",
    min_rows=1,
    max_rows=None,
    available=lambda: torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"),
    pack=lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 8),
    run=lambda x, packed, w, bias: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""),
    trains=True,
)
GEMMS = {g.name: g for g in (MKL, ONEDNN)}
# The same oneDNN product on bf16 weights, inference only: under autograd bf16 keeps PyTorch's path
# (CPU training runs fp32, and the packed gradient product was measured in fp32 only).
BF16_ONEDNN = dataclasses.replace(ONEDNN, trains=False)
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def linear_kernel(kind: LinearKernel):
    """Run the backbone's CPU linear layers with the given kernel inside this block."""
    return KERNEL.using(kind)


@functools.cache
def packed_gemm(kind: LinearKernel, dtype: torch.dtype = torch.float32) -> PackedGemm | None:
    """The packed GEMM a kernel setting runs for weights of `dtype`, or None for PyTorch's own
    kernel. fp32: `packed` is MKL on Intel CPUs, oneDNN on other x86 ones (see the module's
    docstring), none elsewhere; a named library that this torch build lacks: none. bf16: oneDNN's
    (MKL's packed GEMM is fp32 only), for `packed` only on CPUs with bf16 instructions."""
    if dtype == torch.bfloat16:
        return _bf16_gemm(kind)
    if dtype != torch.float32:
        return None
    if kind == "packed":
        if not _x86():
            return None
        kind = "mkl" if cpu_vendor() == "GenuineIntel" else "onednn"
    gemm = GEMMS.get(kind)
    return gemm if gemm is not None and gemm.available() else None


def _bf16_gemm(kind: LinearKernel) -> PackedGemm | None:
    """bf16 weights: PyTorch's bf16 CPU linear re-packs the weight on every call too, and on an AMD
    EPYC with avx512_bf16 (2026-12-07) it was slower than the fp32 packed product at 1 to 8 rows
    (the LM head: 4.4 vs 4.3 ms at one row), while oneDNN's packed bf16 product took 0.33x to 0.9x
    the fp32 one's time. Bits as in fp32: a row's are the same in any call of several rows, and a
    one-row call of the down projection (1536-wide input) rounds otherwise (so it runs as two).
    Without bf16 instructions oneDNN converts in software, which was not measured: `packed` leaves
    those CPUs on PyTorch's kernel, `onednn` still takes oneDNN."""
    if kind not in ("packed", "onednn") or not ONEDNN.available():
        return None
    if kind == "packed" and not (_x86() and any(cpu_bf16_support().values())):
        return None
    return BF16_ONEDNN


def _x86() -> bool:
    """Both libraries' packed products were measured on x86 CPUs only."""
    return platform.machine().lower() in ("x86_64", "amd64")


def packing_available() -> bool:
    """The default kernel (`packed`) runs a packed GEMM on this machine and torch build."""
    return packed_gemm("packed") is not None


class PackedLinear(torch.nn.Linear):
    """nn.Linear whose CPU calls in a library's row range run a packed GEMM (`packed_gemm`): fp32
    weights by the kernel setting's library, bf16 ones by oneDNN's (inference only).

    Installed by class swap (`use_packed_linear`), so the module keeps its parameters, its
    state_dict and its place in the model, and peft still sees an nn.Linear to wrap.
    """

    # Set False by `use_packed_linear` when a second, transposed copy per weight would not fit.
    packs_gradient: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the fast path's graphs keep PyTorch's op
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.weight, self.bias
        gemm = packed_gemm(KERNEL.value, weight.dtype)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        run_rows = 2 if rows == 1 else rows  # without autograd a one-row product runs as two (below)
        if gemm is None or not gemm.takes(run_rows) or weight.device.type != "cpu" or x.dtype != weight.dtype:
            return F.linear(x, weight, bias)
        trained = weight.requires_grad or _requires_grad(bias)
        tracked = torch.is_grad_enabled() and (x.requires_grad or trained)
        # Under autograd a trained weight (or bias) keeps PyTorch's path; a frozen one (a LoRA's
        # base layer, the tied head) runs packed both ways where the library and the memory allow.
        if tracked and (trained or not (gemm.trains_on(rows) and self.packs_gradient)):
            return F.linear(x, weight, bias)
        x2d = x.reshape(rows, x.shape[-1])
        if tracked:
            out = _FrozenWeightProduct.apply(x2d, weight, bias, gemm)
        elif rows == 1:
            # the row twice: a library's one-row kernel may round otherwise than the same row
            # among several, and a batch-1 step must give a row the bits a batch gives it
            out = gemm.run(x2d.expand(2, -1).contiguous(), _packed(weight, gemm), weight, bias)[:1]
        else:
            out = gemm.run(x2d, _packed(weight, gemm), weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def _requires_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad


class _FrozenWeightProduct(torch.autograd.Function):
    """x Wᵀ + b for a weight and bias that take no gradient: the forward product by the packed
    weight, the input's gradient (dy W) by a packed copy of Wᵀ, made on the first backward."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemm: PackedGemm):
        ctx.save_for_backward(weight)
        ctx.gemm = gemm
        return gemm.run(x2d, _packed(weight, gemm), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = ctx.gemm.run(grad_out.contiguous(), _packed(weight, ctx.gemm, transposed=True), None, None)
        return grad_x, None, None, None


# id(weight) -> {library: (weight's (storage pointer, version) when packed, packed copy, bytes)}.
# Kept outside the modules, so state_dict, deepcopy and pickling never see the packed copies (a
# cache, not model state); an entry goes when its weight is garbage-collected. A weight can hold
# one copy per library, so a benchmark switching kernels does not re-pack on every switch.
_PACKS: dict[int, dict[str, tuple[tuple[int, int], torch.Tensor, int]]] = {}
_dropped_bytes = 0  # packed bytes freed since the heap was last trimmed


def _packed(weight: torch.Tensor, gemm: PackedGemm, transposed: bool = False) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version)
    copies = _PACKS.get(id(weight))
    if copies is None:
        weakref.finalize(weight, _drop, id(weight))
        copies = _PACKS[id(weight)] = {}
    name = gemm.name + (".T" if transposed else "")
    cached = copies.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            source = weight.detach()
            packed = gemm.pack(source.t().contiguous() if transposed else source)
        copies[name] = cached = (key, packed, weight.numel() * weight.element_size())
    return cached[1]


def _drop(weight_id: int) -> None:
    """A packed weight was garbage-collected: free its copies, and trim the heap now and then."""
    global _dropped_bytes
    copies = _PACKS.pop(weight_id, None)
    if copies is not None:
        _dropped_bytes += sum(entry[2] for entry in copies.values())
        del copies
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
    """Swap every plain nn.Linear of a CPU fp32 or bf16 model with at least MIN_PACKED_WEIGHT weights to
    PackedLinear; returns how many (0 when their packed copies would not fit in
    MAX_PACKED_SHARE_OF_AVAILABLE of `available_bytes`, by default the memory available now).
    The layers pack their gradient's products too only when twice the copies fit there.

    Plain nn.Linear only: quantised or otherwise specialised linear classes keep their own forward.
    """
    if not any(gemm.available() for gemm in GEMMS.values()):
        return 0
    layers = [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype in PACKED_DTYPES
        and module.weight.numel() >= MIN_PACKED_WEIGHT
    ]
    packed_bytes = sum(w.numel() * w.element_size() for w in _unique_weights(layers))
    available = available_memory_bytes() if available_bytes is None else available_bytes
    budget = None if available is None else MAX_PACKED_SHARE_OF_AVAILABLE * available
    if budget is not None and packed_bytes > budget:
        return 0
    for module in layers:
        module.__class__ = PackedLinear
        if budget is not None and 2 * packed_bytes > budget:
            module.packs_gradient = False
    return len(layers)


def _unique_weights(layers: list[torch.nn.Linear]) -> list[torch.Tensor]:
    """Each weight once (a tied LM head shares the embedding's)."""
    return list({id(m.weight): m.weight for m in layers}.values())


def forget_packed() -> None:
    """Drop every packed copy; each layer packs its weight again on its next call in range."""
    _PACKS.clear()
    _trim_heap()
