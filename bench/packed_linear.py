"""PyTorch's CPU linear vs MKL's and oneDNN's packed GEMMs (`diffmas.linear`) in one run, interleaved.

1. Weight read bandwidth of one linear product of B rows, per weight shape of the model: what a
   decode or latent step of batch B does per layer (memory-bound: each weight is read once), and
   a prompt prefill's row counts beyond it.
2. A decode step and a latent step on a synthetic trace of L positions (as bench/trace_store.py),
   at batch 1, 4, 10 and 16.
3. End to end: single and latent_mas on the same GSM8K questions, greedy, fixed lengths.

Also the memory the packed copies take (resident, measured). Reported with the load average:
other processes on the machine share its memory bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import torch

import _common as c
from trace_store import step_ms


def kernels() -> tuple[str, ...]:
    """PyTorch's kernel and each packed library this torch build has (`packed` is one of them)."""
    from diffmas.linear import GEMMS

    return ("default", *(name for name, gemm in GEMMS.items() if gemm.available()))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def interleaved(fn, repeats: int) -> dict[str, list[float]]:
    """fn(kernel) -> seconds, run `repeats` times per kernel, alternating which goes first."""
    from diffmas.linear import linear_kernel

    names = kernels()
    times = {k: [] for k in names}
    for r in range(repeats):
        for kernel in names if r % 2 == 0 else names[::-1]:
            with linear_kernel(kernel):
                times[kernel].append(fn(kernel))
    return times


def summary(times: dict[str, list[float]], scale: float = 1.0) -> dict:
    med = {k: statistics.median(v) * scale for k, v in times.items()}
    return {
        "median": med,
        "ratio_over_default": {k: v / med["default"] for k, v in med.items() if k != "default"},
        "load_average": list(os.getloadavg()),
        "all": {k: [x * scale for x in v] for k, v in times.items()},
    }


def products_s(layers: list, x: torch.Tensor, kernel: str) -> float:
    start = c.time.perf_counter()
    for m in layers:
        m(x)
    return c.time.perf_counter() - start


def step_s(bb, kind: str, batch: int, length: int, steps: int, kernel: str) -> float:
    return step_ms(bb, "grow", kind, batch, length, steps)[0] / 1000


def method_s(method, prompts: list[str], instruction: str, batch: int, texts: dict, kernel: str) -> float:
    """Seconds for all prompts in batches; the answers go to texts[kernel] (compared across kernels)."""
    start = c.time.perf_counter()
    out = [r.text for i in range(0, len(prompts), batch) for r in method.run_batch(prompts[i : i + batch], instruction)]
    texts[kernel] = out
    return c.time.perf_counter() - start


def ratios(row: dict) -> str:
    return ", ".join(f"{k}/default {v:.2f}x" for k, v in row["ratio_over_default"].items())


def gemm_rows(bb, batches: list[int], repeats: int) -> list[dict]:
    """GB/s of weight read per product, for each distinct weight shape of the model's linears."""
    from diffmas.linear import PackedLinear

    by_shape: dict[tuple[int, int], list] = {}
    for m in bb.model.modules():
        if isinstance(m, PackedLinear):
            by_shape.setdefault(tuple(m.weight.shape), []).append(m)
    rows = []
    for shape, layers in sorted(by_shape.items()):
        layers = layers[:30]  # up to one per decoder layer: more bytes than the caches hold
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
        for batch in batches:
            once = functools.partial(products_s, layers, torch.randn(batch, shape[1], dtype=bb.dtype))
            with torch.no_grad():
                interleaved(once, 1)  # warm-up: packs every layer once
                times = interleaved(once, repeats)
            row = summary(times)
            row.update(
                shape=list(shape),
                layers=len(layers),
                batch=batch,
                gb_per_s={k: weight_bytes / statistics.median(v) / 1e9 for k, v in times.items()},
            )
            rows.append(row)
            print(f"linear {shape} b={batch:<3} {ratios(row)}", flush=True)
    return rows


def step_rows(bb, batches: list[int], length: int, steps: int, repeats: int) -> list[dict]:
    rows = []
    for kind in ("decode", "latent"):
        for batch in batches:
            with torch.no_grad():
                times = interleaved(functools.partial(step_s, bb, kind, batch, length, steps), repeats)
            row = summary(times, scale=1000)  # ms
            row.update(kind=kind, batch=batch, length=length)
            rows.append(row)
            print(f"{kind} b={batch:<3} L={length} {ratios(row)}", flush=True)
    return rows


def end_to_end_rows(bb, n: int, batches: list[int], max_new_tokens: int, m: int, repeats: int) -> list[dict]:
    from diffmas import DecodeConfig, MethodConfig, get_method

    task, examples = c.gsm8k(n)
    prompts = [task.prompt(ex) for ex in examples]
    config = MethodConfig(latent_steps=m, decode=DecodeConfig(max_new_tokens=max_new_tokens, ignore_eos=True))
    rows = []
    for name in ("single", "latent_mas"):
        method = get_method(name, bb, config=config)
        for batch in batches:
            texts: dict[str, list[str]] = {}
            once = functools.partial(method_s, method, prompts, task.format_instruction, batch, texts)
            with torch.no_grad():
                method.run_batch(prompts[:1], task.format_instruction)  # warm-up
                times = interleaved(once, repeats)
            row = summary(times)
            same = {k: texts[k] == texts["default"] for k in texts if k != "default"}
            row.update(method=name, batch=batch, same_texts=same)
            rows.append(row)
            print(f"{name} b={batch} {ratios(row)}", flush=True)
    return rows


def packed_memory(bb) -> dict:
    """Resident bytes the default kernel's packed copies add (every layer packed once), and the
    weights' bytes."""
    from diffmas.linear import PackedLinear, forget_packed, linear_kernel

    forget_packed()
    layers = [m for m in bb.model.modules() if isinstance(m, PackedLinear)]
    with torch.no_grad(), linear_kernel("packed"):
        for m in layers:
            m.weight.sum()  # weights loaded from a memory-mapped file become resident on first read
        before = rss_bytes()
        for m in layers:
            m(torch.zeros(2, m.in_features, dtype=bb.dtype))
    return {
        "resident_added_bytes": rss_bytes() - before,
        "weight_bytes": sum(m.weight.numel() * m.weight.element_size() for m in layers),
        "layers": len(layers),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", default="1,4,10,16", help="Batch sizes of the steps and of the products.")
    p.add_argument("--prefill-rows", default="32,125,512,1040,2080", help="Products' row counts beyond the batches.")
    p.add_argument("--length", type=int, default=300, help="Trace length of the step measurements.")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--latent-steps", type=int, default=10)
    args = c.parse(p)
    from diffmas.linear import packed_gemm
    from diffmas.provenance import cpu_vendor

    if len(kernels()) < 2:
        raise SystemExit("packed_linear: this torch build has neither MKL's nor oneDNN's packed GEMM")
    batches = [int(x) for x in args.batches.split(",")]
    prefill_rows = [int(x) for x in args.prefill_rows.split(",") if x]
    packed = packed_gemm("packed")
    bb = c.backbone()
    result = {
        "settings": {
            "batches": batches,
            "length": args.length,
            "steps": args.steps,
            "repeats": args.repeats,
            "questions": args.questions,
            "max_new_tokens": args.max_new_tokens,
            "latent_steps": args.latent_steps,
            "prefill_rows": prefill_rows,
            "synthetic_trace": True,
            **c.model_settings(),
        },
        "kernels": list(kernels()),
        "packed_is": packed.name if packed else "default",
        "cpu_vendor": cpu_vendor(),
        "row_ranges": {name: [gemm.min_rows, gemm.max_rows] for name in kernels()[1:] if (gemm := packed_gemm(name))},
        "load_average_before": list(os.getloadavg()),
        "memory": packed_memory(bb),
    }
    result["linear"] = gemm_rows(bb, batches + prefill_rows, args.repeats)
    c.write("packed_linear", result)
    result["steps"] = step_rows(bb, batches, args.length, args.steps, args.repeats)
    c.write("packed_linear", result)
    e2e_batches = [b for b in batches if b > 1][:2] or batches
    result["end_to_end"] = end_to_end_rows(
        bb, args.questions, e2e_batches, args.max_new_tokens, args.latent_steps, max(1, args.repeats // 2)
    )
    result["load_average_after"] = list(os.getloadavg())
    c.write("packed_linear", result)


if __name__ == "__main__":
    main()
