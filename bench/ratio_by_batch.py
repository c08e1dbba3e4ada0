"""latent_mas / single against the batch size: the same questions, both methods at each batch size.

The issue-14 target (latent_mas <= 1.3x single) is a ratio of two times that share most of their
work: the final agent's prompt and decoding. The ratio moves with how efficiently that shared work
runs, and batching changes that efficiency most: a one-position step reads every weight once for
the whole batch, while a prompt's prefill costs the same per row at any batch size on a CPU. This
script runs `inference_cost.run` (single and latent_mas only, interleaved batch by batch, each
final agent writing exactly `--max-new-tokens` tokens) at several batch sizes, one after another;
docs/benchmarks.md puts each size's measured ratio beside the ratio of the two methods' floors
(bench/roofline.py), from the same records.
"""

from __future__ import annotations

import argparse

import inference_cost

import _common as c

BATCH_SIZES = (1, 4, 8, 16)


def run(n: int, batch_sizes, max_new_tokens: int, m: int) -> dict:
    """One `inference_cost.run` per batch size, single and latent_mas only."""
    from diffmas import MethodConfig

    upstream = MethodConfig().upstream_max_new_tokens  # text_mas's only: not run here
    batches = {}
    for size in batch_sizes:
        result = inference_cost.run(n, size, max_new_tokens, upstream, m, methods=("single", "latent_mas"))
        batches[str(size)] = result
        ratio = result["ratios"]["latent_over_single"]
        print(f"batch {size}: latent_mas / single {ratio:.2f}x", file=c.sys.stderr, flush=True)
    return {
        "settings": {
            "questions": n,
            "batch_sizes": list(batch_sizes),
            "max_new_tokens": max_new_tokens,
            "latent_steps": m,
            **c.model_settings(),
        },
        "batches": batches,
        "load_average": list(c.os.getloadavg()),
        "targets": {"latent_over_single_max": 1.3},
    }


def main() -> None:
    from diffmas import DecodeConfig, MethodConfig

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=16, help="questions (the same at every batch size)")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--max-new-tokens", type=int, default=DecodeConfig().max_new_tokens)
    p.add_argument("--latent-steps", type=int, default=MethodConfig().latent_steps)
    args = c.parse(p)
    sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    result = run(args.n, sizes, args.max_new_tokens, args.latent_steps)
    c.write("ratio_by_batch", result)
    rows = [
        [size, f"{r['methods']['single']['generation_s']:.1f}", f"{r['methods']['latent_mas']['generation_s']:.1f}"]
        + [f"{r['ratios']['latent_over_single']:.2f}x"]
        for size, r in result["batches"].items()
    ]
    print(c.table(rows, ["batch", "single s", "latent_mas s", "latent / single"]))


if __name__ == "__main__":
    main()
