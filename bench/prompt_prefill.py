"""Prompt prefill on a CPU: one padded batch, one forward a row, and packed rows, in one run.

A CPU's prompt prefill is compute-bound: every padding column costs what a real token costs, and
the linear products are most of the time. Three ways to run a batch's prompt chunk, interleaved:

- `padded`: the chunk as one padded batch (`row_by_row(False)`);
- `rows`: each row alone on its real tokens, one decoder forward a row (`packed_rows(False)`);
- `packed` (the default): the rows' real tokens one after another as one sequence, so each linear
  product covers all of them, and attention splits them back into rows (`diffmas.trace`).

The chunks are latent_mas's own: the four default agents' prompts on GSM8K questions, each agent
taking its m latent steps after its prompt, so later prompts attend over a real trace. Per chunk
and variant: the median time over the repeats; the rows' real tokens and the chunk's padded
width; the linear products' rate (2 FLOPs per weight and real token, over the whole prompt's
time) next to the fastest product measured in the same run (`roofline.measure_peaks`). Each
batch is also built once a question alone (`packed`, batch 1), and each row's hidden states and
real keys and values in the batch are checked against its own, bit for bit: batch size is a
runtime-only setting (`diffmas.trace`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics

import torch

import _common as c
import roofline

VARIANTS = ("padded", "rows", "packed")
BATCH_SIZES = (4, 8, 16)


@contextlib.contextmanager
def variant(name: str):
    from diffmas.trace import packed_rows, row_by_row

    with row_by_row(name != "padded"), packed_rows(name == "packed"):
        yield


def build(bb, method, asks, m: int) -> tuple[list[float], list[tuple[int, int]], tuple]:
    """Every agent's prompt and m latent steps on one trace. Returns each prompt's seconds, its
    (real tokens, padded tokens), and (the prompts' hidden states, the trace)."""
    from diffmas.channel import latent_steps, prefill
    from diffmas.trace import LatentTrace

    trace, hidden, seconds, tokens = LatentTrace(bb, len(asks)), [], [], []
    roles = method.topology.roles
    for i, role in enumerate(roles):
        prompts = method.prompts(role, asks, "")
        start = c.time.perf_counter()
        h = prefill(trace, role.name, prompts)
        seconds.append(c.time.perf_counter() - start)
        seg = trace.segments[-1]
        tokens.append((sum(seg.n_tokens), (seg.end - seg.start) * len(seg.n_tokens)))
        hidden.append(h)
        if i < len(roles) - 1:
            latent_steps(trace, role.name, h, m)
    return seconds, tokens, (hidden, trace)


def same_bits_alone(bb, method, asks, m: int, batched: tuple) -> bool:
    """Does every row of a batch (`packed`) have the bits it gets alone: hidden states, and the
    keys and values of its real columns?"""
    hidden, trace = batched
    for b, ask in enumerate(asks):
        with variant("packed"):
            _, _, (h_alone, alone) = build(bb, method, [ask], m)
        if not all(torch.equal(x[b], y[0]) for x, y in zip(hidden, h_alone)):
            return False
        real, real_alone = trace.attention_mask[b].bool(), alone.attention_mask[0].bool()
        for (k, v), (k1, v1) in zip(trace.kv(), alone.kv()):
            if not (
                torch.equal(k[b][:, real], k1[0][:, real_alone]) and torch.equal(v[b][:, real], v1[0][:, real_alone])
            ):
                return False
    return True


@torch.no_grad()
def run(n: int, batch_sizes, m: int, repeats: int) -> dict:
    from diffmas import MethodConfig, default_topology, get_method
    from diffmas.methods import asks_of

    bb = c.backbone()
    peaks_before = roofline.measure_peaks(bb)
    shape = roofline.Shape.of(bb)
    task, examples = c.gsm8k(n)
    method = get_method("latent_mas", bb, default_topology("sequential"), MethodConfig(latent_steps=m))
    roles = [r.name for r in method.topology.roles]
    with variant("packed"):
        build(bb, method, asks_of([e.question for e in examples[:2]]), m)  # warm-up
    batches, checks = {}, []
    for size in batch_sizes:
        groups = [asks_of([e.question for e in examples[i : i + size]]) for i in range(0, n, size)]
        times = {(v, g): [] for v in VARIANTS for g in range(len(groups))}  # per repeat: each prompt's seconds
        tokens = {}
        for r in range(repeats):
            for g, asks in enumerate(groups):
                built = {}
                for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:  # alternate which goes first
                    with variant(v):
                        seconds, tokens[g], built[v] = build(bb, method, asks, m)
                    times[v, g].append(seconds)
                if r == 0:
                    checks.append(same_bits_alone(bb, method, asks, m, built["packed"]))
        agents = []
        for i, role in enumerate(roles):
            real = sum(tokens[g][i][0] for g in range(len(groups)))
            width = sum(tokens[g][i][1] for g in range(len(groups)))
            seconds = {
                v: sum(statistics.median(run[i] for run in times[v, g]) for g in range(len(groups))) for v in VARIANTS
            }
            agents.append(
                {
                    "agent": role,
                    "real_tokens": real,
                    "padded_tokens": width,
                    **{f"{v}_s": s for v, s in seconds.items()},
                    **{f"{v}_product_flops_per_s": 2 * shape.product_params * real / s for v, s in seconds.items()},
                }
            )
            print(
                f"batch {size} {role}: "
                + ", ".join(f"{v} {seconds[v]:.2f} s" for v in VARIANTS)
                + f" ({real} tokens, {width} padded)",
                file=c.sys.stderr,
                flush=True,
            )
        batches[str(size)] = {"agents": agents, "load_average": list(c.os.getloadavg())}
    return {
        "settings": {
            "questions": n,
            "batch_sizes": list(batch_sizes),
            "latent_steps": m,
            "repeats": repeats,
            "variants": list(VARIANTS),
            **c.model_settings(),
        },
        "shape": dataclasses.asdict(shape),
        "peaks": [peaks_before, roofline.measure_peaks(bb)],
        "packed_same_bits_as_alone": all(checks),
        "checks": len(checks),
        "batches": batches,
        "load_average": list(c.os.getloadavg()),
    }


def main() -> None:
    from diffmas import MethodConfig

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=16, help="GSM8K questions (the same at every batch size)")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--latent-steps", type=int, default=MethodConfig().latent_steps)
    p.add_argument("--repeats", type=int, default=3)
    args = c.parse(p)
    sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    result = run(args.n, sizes, args.latent_steps, args.repeats)
    c.write("prompt_prefill", result)
    rows = [
        [size, a["agent"], a["real_tokens"], a["padded_tokens"]]
        + [f"{a[f'{v}_s']:.2f}" for v in VARIANTS]
        + [f"{a['packed_s'] / a['rows_s']:.2f}x"]
        for size, b in result["batches"].items()
        for a in b["agents"]
    ]
    print(c.table(rows, ["batch", "agent", "real", "padded", *(f"{v} s" for v in VARIANTS), "packed / rows"]))
    print(f"packed gave every row its bits alone in every check: {result['packed_same_bits_as_alone']}")


if __name__ == "__main__":
    main()
