"""One-position attention: PyTorch's SDPA (transformers' path) vs the compiled kernel
(`diffmas.attention`, kernels/decode_attention.cpp), in one run, interleaved.

Two measures per case (batch B, trace length L):
- the attention alone: every layer's call on its own keys and values (views into buffers with
  spare capacity, as the grow store's), so the trace streams from memory as in a real step; the
  read rate is the keys and values read (all layers) over the time, next to the machine's
  streaming read bandwidth measured in the same run (`roofline.read_bandwidth`);
- the whole step: a decode step and a latent step on a synthetic L-position trace of the grow
  store (`trace_store.step_ms`), with the variant `sdpa` (the default store, PyTorch's SDPA)
  against `grow` (the defaults: the kernel).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import _common as c
import roofline
from trace_store import step_ms

CASES = ((1, 300), (1, 4800), (4, 2400), (8, 800), (16, 1200), (16, 4800))
KINDS = {"sdpa": "sdpa", "kernel": "grow"}  # attention -> the step variant that runs it


def layer_inputs(bb, batch: int, length: int, spare: int = 64):
    """One (query, keys, values, mask) per layer, of the backbone's shape, in its dtype."""
    gen = torch.Generator(device=bb.device).manual_seed(0)
    heads, kv, dim = bb.config.num_attention_heads, bb.n_kv_heads, bb.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=bb.device).to(bb.dtype)

    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=bb.device)
    return [
        (
            randn(batch, 1, heads, dim).transpose(1, 2),
            randn(batch, kv, length + spare, dim)[:, :, :length],
            randn(batch, kv, length + spare, dim)[:, :, :length],
            mask,
        )
        for _ in range(bb.n_layers)
    ]


def attention_s(bb, inputs, kind: str, repeats: int) -> list[float]:
    """Seconds of one call per layer (a step's attention), `repeats` times, with no warm-up of its own:
    a call right after another finds small traces in the cache, which a real step (its layers' weights
    read between the attention calls) does not."""
    from diffmas.attention import cpu_attention, cpu_sdpa

    module = bb.decoder().layers[0].self_attn
    scale = bb.head_dim**-0.5

    def call():
        for q, k, v, mask in inputs:
            cpu_sdpa(module, q, k, v, mask, scaling=scale)

    with cpu_attention(kind):
        return c.run_times(call, repeats, bb.device)


def run(cases, steps: int, repeats: int) -> dict:
    bb = c.backbone()
    load_before = list(os.getloadavg())
    read_before = roofline.read_bandwidth(bb.device)
    rows = []
    with torch.no_grad():
        for kind, s in ((k, s) for k in KINDS.values() for s in ("decode", "latent")):
            step_ms(bb, kind, s, 1, 64, 2)  # warm-up: packed weights, the kernel's build, allocator
        for batch, length in cases:
            inputs = layer_inputs(bb, batch, length)
            kv_bytes = sum(2 * k.numel() * k.element_size() for _, k, _, _ in inputs)
            op = {kind: [] for kind in KINDS}
            step = {(kind, s): [] for kind in KINDS for s in ("decode", "latent")}
            for kind in KINDS:
                attention_s(bb, inputs, kind, 1)  # warm-up: the inputs' first touch (and the kernel's build, once)
            for r in range(repeats):  # interleaved, alternating which goes first; a whole step between two calls
                for kind in KINDS if r % 2 == 0 else list(KINDS)[::-1]:
                    op[kind] += attention_s(bb, inputs, kind, 1)
                    for s in ("decode", "latent"):
                        step[kind, s].append(step_ms(bb, KINDS[kind], s, batch, length, steps)[0])
            med = {k: statistics.median(v) for k, v in op.items()}
            row = {
                "batch": batch,
                "length": length,
                "kv_bytes": kv_bytes,
                **{f"{k}_attention_ms": med[k] * 1000 for k in KINDS},
                **{f"{k}_read_bytes_per_s": kv_bytes / med[k] for k in KINDS},
                **{f"{k}_{s}_step_ms": statistics.median(v) for (k, s), v in step.items()},
                "load_average": list(os.getloadavg()),
            }
            rows.append(row)
            print(
                f"b={batch:<3} L={length:<5} attention sdpa {row['sdpa_attention_ms']:7.2f} ms "
                f"kernel {row['kernel_attention_ms']:7.2f} ms | decode step {row['sdpa_decode_step_ms']:6.1f} -> "
                f"{row['kernel_decode_step_ms']:6.1f} ms  latent {row['sdpa_latent_step_ms']:6.1f} -> "
                f"{row['kernel_latent_step_ms']:6.1f} ms",
                file=c.sys.stderr,
                flush=True,
            )
            del inputs
    return {
        "settings": {"cases": [list(x) for x in cases], "steps": steps, "repeats": repeats, **c.model_settings()},
        "read_bytes_per_s": max(read_before, roofline.read_bandwidth(bb.device)),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cases", default=",".join(f"{b}x{n}" for b, n in CASES), help="BxL,... (batch x trace length)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = c.parse(p)
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    result = run(cases, args.steps, args.repeats)
    c.write("decode_attention", result)
    print(
        c.table(
            [
                [
                    r["batch"],
                    r["length"],
                    f"{r['sdpa_read_bytes_per_s'] / 1e9:.1f}",
                    f"{r['kernel_read_bytes_per_s'] / 1e9:.1f}",
                    f"{r['kernel_decode_step_ms'] / r['sdpa_decode_step_ms']:.2f}x",
                    f"{r['kernel_latent_step_ms'] / r['sdpa_latent_step_ms']:.2f}x",
                ]
                for r in result["rows"]
            ],
            ["batch", "trace length", "sdpa GB/s", "kernel GB/s", "decode step", "latent step"],
        )
    )


if __name__ == "__main__":
    main()
