"""Inference cost: single vs text_mas vs latent_mas (4 agents, m=10) on the same GSM8K questions,
greedy, on the embedded model. Targets: latent_mas <= 1.3x single; text_mas >= 4x latent_mas.

The decode budgets and the batch size default to the library's own defaults (`DecodeConfig`,
`MethodConfig`, `EvalConfig`): the targets are stated for default settings. Each method's final
agent writes exactly `max_new_tokens` tokens (end-of-sequence suppressed before: `min_new_tokens`),
so the methods are compared at equal generated length, as the target is; text_mas's upstream
agents stop where they stop (`--natural-lengths`: the final agents too). The run also measures the
machine's peaks before and after the methods, from which the docs compute each method's floor
(`roofline.py`). Methods and stores take turns batch by batch, so a machine whose speed drifts
during the run slows them alike."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import _common as c
import roofline

METHODS = ("single", "text_mas", "latent_mas")


def summarize(records: list[dict], wall: float, batch_size: int) -> dict:
    """One method's figures over its records (in batch order): time, tokens and time per agent,
    trace, memory, correct answers."""
    roles = [a["role"] for a in records[0]["agents"]]
    per_agent = {
        role: {
            k: sum(r["agents"][i][k] for r in records) / len(records)
            for k in ("n_prompt_tokens", "n_latent_steps", "n_generated_tokens")
        }
        for i, role in enumerate(roles)
    }
    # a record's wall_s is its whole batch's generation time: count each batch once
    firsts = records[::batch_size]
    for i, role in enumerate(roles):
        per_agent[role]["wall_s_per_question"] = sum(r["agents"][i]["wall_s"] for r in firsts) / len(records)
    return {
        "wall_s": wall,  # end to end, answer scoring included
        "generation_s": sum(r["wall_s"] for r in firsts),  # the method alone: what the ratios compare
        "generation_s_per_batch": [r["wall_s"] for r in firsts],
        "seconds_per_question": wall / len(records),
        "correct": sum(r["correct"] for r in records),
        "tokens_per_question": {
            k: sum(r["n_tokens"][k] for r in records) / len(records) for k in ("prompt", "latent", "generated")
        },
        "tokens_per_agent": per_agent,
        "trace_bytes_mean": sum(r["trace_bytes"] for r in records) / len(records),
        "trace_len_mean": sum(r["trace_len"] for r in records) / len(records),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in records),
    }


def ratios_of(methods: dict) -> dict:
    """The target ratios, over the whole run and batch by batch (how much they move with the machine);
    text_over_latent only where text_mas ran."""
    single, latent = methods["single"], methods["latent_mas"]
    ratios = {
        "latent_over_single": latent["generation_s"] / single["generation_s"],
        "latent_over_single_per_batch": [
            a / b for a, b in zip(latent["generation_s_per_batch"], single["generation_s_per_batch"])
        ],
    }
    if "text_mas" in methods:
        ratios["text_over_latent"] = methods["text_mas"]["generation_s"] / latent["generation_s"]
    return ratios


def run(
    n: int,
    batch_size: int,
    max_new_tokens: int,
    upstream_max_new_tokens: int,
    m: int,
    stores=("grow",),
    equal_lengths: bool = True,
    methods=METHODS,
) -> dict:
    """stores: variants to measure (`_common.VARIANTS`: concat, sdpa, grow), every method on every
    one, batch by batch, so before/after come from one run; the top-level figures are the last's.
    equal_lengths: every final agent writes exactly max_new_tokens tokens. methods: a subset of
    METHODS holding single and latent_mas (the ratio's two)."""
    from diffmas import DecodeConfig, MethodConfig, default_topology, get_method
    from diffmas.evaluate.records import run_examples

    bb = c.backbone()
    # the machine's peaks for the floors (bench/roofline.py), before and after the methods
    peaks_before = roofline.measure_peaks(bb)
    task, examples = c.gsm8k(n)
    config = MethodConfig(
        latent_steps=m,
        decode=DecodeConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if equal_lengths else 0,
            ignore_eos=c.ignore_eos(),
        ),
        upstream_max_new_tokens=upstream_max_new_tokens,
    )
    runs = [(name, store) for name in methods for store in stores]
    method_of = {name: get_method(name, bb, default_topology("sequential"), config) for name in methods}
    for name, store in runs:
        with c.variant(store):
            # warm-up: kernels, allocator, caches, and at batch 2 the packed linear copies, which
            # would otherwise be made (and charged) inside the first method's batched run
            warm = min(2, batch_size)
            list(run_examples(method_of[name], task, examples[:warm], batch_size=warm))
    # Batch by batch, every method and store in turn: a machine whose speed drifts during the run
    # (a shared VM's neighbours) slows every method alike instead of whichever ran then.
    records = {key: [] for key in runs}
    walls = dict.fromkeys(runs, 0.0)
    for first in range(0, n, batch_size):
        batch = examples[first : first + batch_size]
        for name, store in runs:
            with c.variant(store):
                start = c.time.perf_counter()
                records[name, store] += run_examples(method_of[name], task, batch, batch_size=batch_size)
                walls[name, store] += c.time.perf_counter() - start
    by_store = {store: {} for store in stores}
    for (name, store), recs in records.items():
        by_store[store][name] = summarize(recs, walls[name, store], batch_size)
        print(f"{name} ({store} store): {walls[name, store]:.1f} s", file=c.sys.stderr, flush=True)

    methods, ratios = by_store[stores[-1]], ratios_of(by_store[stores[-1]])
    floor = {
        "shape": asdict(roofline.Shape.of(bb)),
        "peaks_before": peaks_before,
        "peaks_after": roofline.measure_peaks(bb),
    }
    return {
        "settings": {
            "questions": n,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "upstream_max_new_tokens": upstream_max_new_tokens,
            "latent_steps": m,
            "agents": 4,
            "decoding": "greedy",
            "fixed_lengths": c.ignore_eos(),
            "equal_final_lengths": equal_lengths,
            "stores": list(stores),
            "interleaved": True,  # every method and store in turn on each batch
            **c.model_settings(),
        },
        "store": stores[-1],
        "methods": methods,
        "ratios": ratios,
        "by_store": {store: {"methods": ms, "ratios": ratios_of(ms)} for store, ms in by_store.items()},
        "floor": floor,
        "load_average": list(c.os.getloadavg()),
        "targets": {"latent_over_single_max": 1.3, "text_over_latent_min": 4.0},
    }


def main() -> None:
    from diffmas import DecodeConfig, MethodConfig
    from diffmas.evaluate.runner import EvalConfig

    method, run_defaults = MethodConfig(), EvalConfig(task="gsm8k")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=run_defaults.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=DecodeConfig().max_new_tokens)
    p.add_argument("--upstream-max-new-tokens", type=int, default=method.upstream_max_new_tokens)
    p.add_argument("--latent-steps", type=int, default=method.latent_steps)
    p.add_argument(
        "--natural-lengths",
        action="store_true",
        help="let the final agents stop at end-of-sequence (default: exactly --max-new-tokens each)",
    )
    p.add_argument(
        "--stores", default="grow", help="variants (_common.VARIANTS), e.g. concat,sdpa,grow (before, ..., after)"
    )
    args = c.parse(p)
    result = run(
        args.n,
        args.batch_size,
        args.max_new_tokens,
        args.upstream_max_new_tokens,
        args.latent_steps,
        tuple(args.stores.split(",")),
        equal_lengths=not args.natural_lengths,
    )
    c.write("inference_cost", result)
    rows = [
        [
            name,
            f"{m['generation_s']:.1f}",
            f"{m['wall_s']:.1f}",
            f"{m['tokens_per_question']['prompt']:.0f}",
            f"{m['tokens_per_question']['latent']:.0f}",
            f"{m['tokens_per_question']['generated']:.0f}",
            f"{m['trace_bytes_mean'] / 2**20:.1f}",
            f"{m['peak_memory_bytes'] / 2**20:.0f}",
            m["correct"],
        ]
        for name, m in result["methods"].items()
    ]
    print(
        c.table(
            rows,
            ["method", "generation s", "wall s", "prompt/q", "latent/q", "gen/q", "trace MiB", "peak MiB", "correct"],
        )
    )
    print({k: round(v, 2) for k, v in result["ratios"].items() if not isinstance(v, list)})


if __name__ == "__main__":
    main()
