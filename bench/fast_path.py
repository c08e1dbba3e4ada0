"""Decode and latent step time, eager vs the compiled fast path (`--compile`), against the
memory-bound floor, at trace lengths 300 / 1200 / 4800.

Eager: today's default (the in-place growable store, transformers' eager modules). Fast: the
static, bucketed store with the one-position step compiled (`diffmas.fast_path`; `--compile auto`
is CUDA graphs on a GPU). Traces are synthetic, as in trace_store.py (random keys/values of the
model's shape). Every run takes `--warmup` untimed steps on its trace first: compiling (once per
bucket and batch size) and, with CUDA graphs, recording the graph for the new trace's buffers are
reported apart (`first_call_s`), not in the step time.

Memory-bound floor of one step: the bytes it must read (the decoder's weights, plus the LM head
for a decode step or the realignment matrix for a latent step, plus the trace's live keys and
values: batch x L x kv_bytes_per_entry) over the device's memory bandwidth. The bandwidth is an
assumption, recorded with the result: 4.8 TB/s for an H200 (its HBM3e spec), 3.35 TB/s for an
H100 SXM, else `--bandwidth-gbs` (no floor without one). GPU target: decode step <= 2x the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import _common as c
from roofline import weight_bytes
from trace_store import synthetic_trace

KINDS = ("decode", "latent")
# Spec-sheet memory bandwidths (GB/s) by device name: assumptions, recorded in every result.
BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0}
TARGET_MAX_OVER_FLOOR = 2.0


def take_steps(trace, kind: str, hidden: torch.Tensor, n: int) -> None:
    """n one-position steps of `kind` on the trace (decode: EOS suppressed, n forwards)."""
    from diffmas.channel import latent_steps
    from diffmas.generate import DecodeConfig, decode

    if kind == "latent":
        latent_steps(trace, "a", hidden, n)
    else:
        decode(trace, "a", hidden, DecodeConfig(max_new_tokens=n + 1, min_new_tokens=n + 1), [0] * len(hidden))


def step_ms(bb, step, kind: str, batch: int, length: int, steps: int, warmup: int) -> tuple[float, float]:
    """(ms per step over `steps` steps after `warmup` ones, seconds of the warm-up) on a fresh
    `length`-position trace; step None: the eager path."""
    from diffmas.accounting import Stopwatch

    trace = synthetic_trace(bb, "grow", batch, length, step)
    hidden = torch.randn(batch, bb.config.hidden_size, device=bb.device).to(bb.dtype)
    clock = Stopwatch(bb.device).start()
    take_steps(trace, kind, hidden, warmup)
    first = clock.elapsed()
    clock.start()
    take_steps(trace, kind, hidden, steps)
    return clock.elapsed() / steps * 1000, first


def bandwidth(bb, given: float | None) -> dict | None:
    """The bandwidth assumed for the floor (GB/s) and where it comes from, or None."""
    if given:
        return {"gb_per_s": given, "source": "--bandwidth-gbs"}
    if bb.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(bb.device)
    hit = next((k for k in BANDWIDTH_GBS if k in name), None)
    if hit is None:
        return None
    return {"gb_per_s": BANDWIDTH_GBS[hit], "source": f"{hit} spec-sheet HBM bandwidth (assumed), device {name!r}"}


def floor_row(bb, kind: str, batch: int, length: int, bw: dict | None) -> dict:
    from diffmas.trace import bucket_capacity

    kv = batch * length * bb.kv_bytes_per_entry
    read = weight_bytes(bb, kind) + kv
    return {
        "weight_bytes": read - kv,
        "kv_bytes": kv,
        "kv_bytes_read_fast": batch * bucket_capacity(length) * bb.kv_bytes_per_entry,  # the whole bucket
        "floor_ms": read / (bw["gb_per_s"] * 1e9) * 1000 if bw else None,
    }


def run(args) -> dict:
    from diffmas.fast_path import static_step

    bb = c.backbone()
    step = static_step(bb, args.compile)
    bw = bandwidth(bb, args.bandwidth_gbs)
    lengths, batches = [int(x) for x in args.lengths.split(",")], [int(x) for x in args.batches.split(",")]
    cases = [(k, b, n) for b in batches for n in lengths for k in args.kinds.split(",")]
    load_before = list(os.getloadavg())
    rows = []
    with torch.no_grad():
        for kind, batch, length in cases:
            eager, fast, first = [], [], []
            for r in range(args.repeats):  # interleaved, alternating which goes first
                for which in ("eager", "fast") if r % 2 == 0 else ("fast", "eager"):
                    ms, warm_s = step_ms(bb, step if which == "fast" else None, kind, batch, length, args.steps, 2)
                    (fast if which == "fast" else eager).append(ms)
                    if which == "fast":
                        first.append(warm_s)
            row = {"kind": kind, "batch": batch, "length": length, **floor_row(bb, kind, batch, length, bw)}
            row.update(
                eager_ms=statistics.median(eager),
                fast_ms=statistics.median(fast),
                fast_over_eager=statistics.median(fast) / statistics.median(eager),
                first_call_s=first,  # the fast path's 2 warm-up steps per run: compile (first run), graph recording
                eager_all_ms=eager,
                fast_all_ms=fast,
                load_average=list(os.getloadavg()),
            )
            if row["floor_ms"]:
                row["eager_over_floor"] = row["eager_ms"] / row["floor_ms"]
                row["fast_over_floor"] = row["fast_ms"] / row["floor_ms"]
            rows.append(row)
            c.write("fast_path", payload(args, bw, load_before, rows))  # after every case: a time limit keeps them
            floor = f"  floor {row['floor_ms']:.2f} ms" if row["floor_ms"] else ""
            print(
                f"{kind:6} b={batch:<3} L={length:<5} eager {row['eager_ms']:8.2f} ms  fast {row['fast_ms']:8.2f} ms"
                f"  fast/eager {row['fast_over_eager']:.2f}{floor}  load {os.getloadavg()[0]:.1f}",
                file=c.sys.stderr,
                flush=True,
            )
    return payload(args, bw, load_before, rows)


def payload(args, bw, load_before, rows) -> dict:
    decode = [r for r in rows if r["kind"] == "decode" and r.get("fast_over_floor") is not None]
    return {
        "settings": {
            "lengths": args.lengths,
            "batches": args.batches,
            "kinds": args.kinds,
            "steps": args.steps,
            "warmup_steps": 2,
            "repeats": args.repeats,
            "compile": args.compile,
            "synthetic_trace": True,
            **c.model_settings(),
        },
        "bandwidth_assumed": bw,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "note": args.note,
        "rows": rows,
        "target": {
            "decode_fast_over_floor_max": TARGET_MAX_OVER_FLOOR,
            "met": all(r["fast_over_floor"] <= TARGET_MAX_OVER_FLOOR for r in decode) if decode else None,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", default="300,1200,4800")
    p.add_argument("--batches", default="1")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", default="auto", help="the fast path's mode (see diffmas.fast_path.COMPILE_MODES)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the floor, GB/s")
    p.add_argument("--note", default="", help="recorded with the result, e.g. the machine's load")
    args = c.parse(p)
    result = run(args)
    print(
        c.table(
            [
                [
                    r["kind"],
                    r["batch"],
                    r["length"],
                    f"{r['eager_ms']:.2f}",
                    f"{r['fast_ms']:.2f}",
                    f"{r['fast_over_eager']:.2f}x",
                    "—" if r["floor_ms"] is None else f"{r['floor_ms']:.2f}",
                    "—" if r["floor_ms"] is None else f"{r['fast_over_floor']:.2f}x",
                ]
                for r in result["rows"]
            ],
            ["step", "batch", "trace length", "eager ms", "fast ms", "fast / eager", "floor ms", "fast / floor"],
        )
    )


if __name__ == "__main__":
    main()
