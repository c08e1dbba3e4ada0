"""Step time vs trace length, old store vs new, in one run: a decode step and a latent step on a
trace of L positions, with transformers' concatenating `DynamicCache` layers and PyTorch's SDPA
("concat", main before issue 14) and with the defaults ("grow": the in-place growable store and
the compiled one-position attention kernel), interleaved so both see the same machine.

The trace is synthetic: random keys and values of the model's shape put in through the storage
seam (`LatentTrace.set_kv`), all positions real. A step's cost does not depend on the values, and
prefilling 16 x 4800 real tokens would take longer than the whole benchmark on a small CPU.
Each run starts from the same L-position trace and takes `steps` steps, so the grow store's one
reallocation (when its buffer fills) is included, amortised over the run.

Target: a decode step at 2400 positions, batch 4, <= 0.9x the concat store's.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import _common as c

STORES = ("concat", "grow")


def synthetic_trace(bb, store: str, batch: int, length: int, step=None):
    """A trace of `length` real positions per row, filled with random keys/values (with `step`:
    the static store of the compiled fast path, whatever `store` says)."""
    from diffmas.trace import LatentTrace, trace_store

    with trace_store(store):
        trace = LatentTrace(bb, batch, step=step)
    gen = torch.Generator(device=bb.device).manual_seed(0)
    shape = (batch, bb.n_kv_heads, length, bb.head_dim)
    keys, values = (torch.randn(shape, generator=gen, device=bb.device).to(bb.dtype) for _ in range(2))
    # one pair shared by every layer: neither store writes into tensors handed to set_kv
    trace.set_kv([(keys, values)] * bb.n_layers)
    trace.attention_mask = torch.ones(batch, length, dtype=torch.long, device=bb.device)
    trace.next_position = torch.full((batch,), length, dtype=torch.long, device=bb.device)
    trace._record("context", "prompt", 0, length, [length] * batch)
    return trace


def step_ms(bb, store: str, kind: str, batch: int, length: int, steps: int) -> tuple[float, float]:
    """Mean ms per step over `steps` steps from a fresh `length`-position trace: (wall, CPU).
    `store` is a variant (`_common.VARIANTS`): "concat" runs PyTorch's SDPA in one-position steps
    too (main before issue 14), "grow" the defaults.

    CPU time is this process's, all threads: on a machine shared with other work it is less
    exposed to them than wall time (though not to their use of memory bandwidth and caches)."""
    from diffmas.accounting import Stopwatch
    from diffmas.channel import latent_steps
    from diffmas.generate import DecodeConfig, decode

    with c.variant(store):
        trace = synthetic_trace(bb, c.STORE_OF[store], batch, length)
        hidden = torch.randn(batch, bb.config.hidden_size, device=bb.device).to(bb.dtype)
        if kind == "latent":
            clock, cpu = Stopwatch(bb.device).start(), c.time.process_time()
            latent_steps(trace, "a", hidden, steps)
        else:
            # steps + 1 tokens with EOS suppressed: exactly `steps` decoder forwards
            config = DecodeConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1)
            clock, cpu = Stopwatch(bb.device).start(), c.time.process_time()
            decode(trace, "a", hidden, config, [0] * batch)
        wall, cpu = clock.elapsed(), c.time.process_time() - cpu
    assert trace.length == length + steps
    return wall / steps * 1000, cpu / steps * 1000


def run(lengths: list[int], batches: list[int], kinds: list[str], steps: int, repeats: int, target) -> dict:
    bb = c.backbone()
    cases = [(k, b, n) for k in kinds for b in batches for n in lengths]
    load_before = list(os.getloadavg())

    def payload(rows):
        return result_of(rows, lengths, batches, kinds, steps, repeats, target, load_before)

    rows = []
    with torch.no_grad():
        step_ms(bb, "grow", "decode", 1, 64, 2), step_ms(bb, "concat", "decode", 1, 64, 2)  # warm-up
        if target in cases:  # the target first: it gets the quietest machine if others start later
            cases.remove(target)
        cases.insert(0, target)
        for kind, batch, length in cases:
            times = {s: [] for s in STORES}
            cpu = {s: [] for s in STORES}
            for r in range(repeats):  # interleaved, alternating which store goes first
                for store in STORES if r % 2 == 0 else STORES[::-1]:
                    wall_ms, cpu_ms = step_ms(bb, store, kind, batch, length, steps)
                    times[store].append(wall_ms)
                    cpu[store].append(cpu_ms)
            med = {s: statistics.median(v) for s, v in times.items()}
            med_cpu = {s: statistics.median(v) for s, v in cpu.items()}
            row = {
                "kind": kind,
                "batch": batch,
                "length": length,
                "concat_ms": med["concat"],
                "grow_ms": med["grow"],
                "ratio_grow_over_concat": med["grow"] / med["concat"],
                # the fastest run of each: less exposed to other processes on a shared machine
                "ratio_of_fastest": min(times["grow"]) / min(times["concat"]),
                "concat_cpu_ms": med_cpu["concat"],
                "grow_cpu_ms": med_cpu["grow"],
                "ratio_cpu": med_cpu["grow"] / med_cpu["concat"],
                "load_average": list(os.getloadavg()),
                "concat_all_ms": times["concat"],
                "grow_all_ms": times["grow"],
            }
            rows.append(row)
            c.write("trace_store", payload(rows))  # after every case: a time limit keeps what was done
            print(
                f"{kind:6} b={batch:<3} L={length:<5} concat {med['concat']:7.1f} ms  grow {med['grow']:7.1f} ms"
                f"  ratio {row['ratio_grow_over_concat']:.3f}  fastest {row['ratio_of_fastest']:.3f}"
                f"  cpu {row['ratio_cpu']:.3f}  load {os.getloadavg()[0]:.1f}",
                file=c.sys.stderr,
                flush=True,
            )
    return payload(rows)


def result_of(rows, lengths, batches, kinds, steps, repeats, target, load_before) -> dict:
    hit = next(r for r in rows if (r["kind"], r["batch"], r["length"]) == target)
    return {
        "settings": {
            "lengths": lengths,
            "batches": batches,
            "kinds": kinds,
            "steps": steps,
            "repeats": repeats,
            "synthetic_trace": True,
            **c.model_settings(),
        },
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
        "target": {
            "kind": target[0],
            "batch": target[1],
            "length": target[2],
            "ratio": hit["ratio_grow_over_concat"],
            "ratio_max": 0.9,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", default="300,1200,4800")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--kinds", default="decode,latent")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = c.parse(p)
    result = run(
        [int(x) for x in args.lengths.split(",")],
        [int(x) for x in args.batches.split(",")],
        args.kinds.split(","),
        args.steps,
        args.repeats,
        ("decode", 4, 2400),
    )
    print(
        c.table(
            [
                [
                    r["kind"],
                    r["batch"],
                    r["length"],
                    f"{r['concat_ms']:.1f}",
                    f"{r['grow_ms']:.1f}",
                    f"{r['ratio_grow_over_concat']:.2f}x",
                    f"{r['ratio_of_fastest']:.2f}x",
                ]
                for r in result["rows"]
            ],
            ["step", "batch", "trace length", "concat ms", "grow ms", "grow / concat", "fastest runs"],
        )
    )


if __name__ == "__main__":
    main()
