"""Batching: latent_mas throughput (questions/s) at batch 1, 4 and 16 on the same questions.
Target: >= 4x at batch 16 over batch 1 (issue 14 acceptance; its text first asked 5x).

Variants (`--stores`), each batch size on each in turn: `concat` (the old concatenating trace
store, PyTorch's SDPA in one-position steps), `sdpa` (the default but for PyTorch's SDPA in
one-position steps instead of the compiled kernel, diffmas.attention),
`padded` (the in-place store, prompts run as one padded batch: `row_by_row(False)`), `keep`
(the in-place store, row by row, finished rows decoded on as padding: `drop_finished(False)`) and
`grow` (the default: in-place store, padded CPU prompts run row by row, finished rows dropped).

The decode budget defaults to the library's (`DecodeConfig`): the target is stated for default
settings, and a longer answer is the sequential part that batching amortises."""

from __future__ import annotations

import argparse
import contextlib

import _common as c


def run(n: int, sizes: list[int], max_new_tokens: int, m: int, stores=("grow",)) -> dict:
    """stores: variants to measure (see the module docstring), each batch size on each in turn
    (before/after in one run); the top-level figures are the last one's."""
    from diffmas import DecodeConfig, MethodConfig, get_method

    bb = c.backbone()
    task, examples = c.gsm8k(n)
    prompts = [task.prompt(ex) for ex in examples]
    method = get_method(
        "latent_mas",
        bb,
        config=MethodConfig(
            latent_steps=m, decode=DecodeConfig(max_new_tokens=max_new_tokens, ignore_eos=c.ignore_eos())
        ),
    )
    method.run_batch(prompts[:1], task.format_instruction)  # warm-up
    by_store = {store: {} for store in stores}
    for size, store in ((size, store) for size in sizes for store in stores):
        start = c.time.perf_counter()
        generated = 0
        with variant(store):
            for i in range(0, n, size):
                for r in method.run_batch(prompts[i : i + size], task.format_instruction):
                    generated += r.agents[-1].n_generated_tokens
        wall = c.time.perf_counter() - start
        by_store[store][str(size)] = {"wall_s": wall, "questions_per_s": n / wall, "generated_tokens": generated}
        print(f"batch {size} ({store} store): {wall:.1f} s", file=c.sys.stderr, flush=True)

    def speedup_of(rows: dict) -> dict:
        base = rows[str(sizes[0])]["questions_per_s"]
        return {k: v["questions_per_s"] / base for k, v in rows.items()}

    rows, speedup = by_store[stores[-1]], speedup_of(by_store[stores[-1]])
    return {
        "settings": {
            "questions": n,
            "batch_sizes": sizes,
            "max_new_tokens": max_new_tokens,
            "latent_steps": m,
            "agents": 4,
            "fixed_lengths": c.ignore_eos(),
            "stores": list(stores),
            **c.model_settings(),
        },
        "store": stores[-1],
        "batches": rows,
        "speedup_over_batch1": speedup,
        "by_store": {s: {"batches": r, "speedup_over_batch1": speedup_of(r)} for s, r in by_store.items()},
        "load_average": list(c.os.getloadavg()),
        "targets": {"speedup_at_16_min": 4.0},
    }


@contextlib.contextmanager
def variant(name: str):
    """The settings of one variant (see the module docstring)."""
    from diffmas.generate import drop_finished
    from diffmas.trace import row_by_row

    with c.variant(name if name in c.VARIANTS else "grow"), row_by_row(name != "padded"):
        with drop_finished(name != "keep"):
            yield


def main() -> None:
    from diffmas import DecodeConfig, MethodConfig

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=DecodeConfig().max_new_tokens)
    p.add_argument("--latent-steps", type=int, default=MethodConfig().latent_steps)
    p.add_argument(
        "--stores", default="grow", help="variants, e.g. concat,padded,keep,grow (before, ..., after) in one run"
    )
    args = c.parse(p)
    result = run(args.n, [1, 4, 16], args.max_new_tokens, args.latent_steps, tuple(args.stores.split(",")))
    c.write("batching", result)
    print(
        c.table(
            [
                [k, f"{v['wall_s']:.1f}", f"{v['questions_per_s']:.3f}", f"{result['speedup_over_batch1'][k]:.2f}x"]
                for k, v in result["batches"].items()
            ],
            ["batch", "wall s", "questions/s", "speedup"],
        )
    )


if __name__ == "__main__":
    main()
