"""One DiffMAS training step (4 agents, m=10, gradients through the whole trace) vs forward +
backward of the final agent alone (sft_single) on the same examples and targets.
Target: DiffMAS step <= 3.5x the final-agent step at 8 examples per step.

Before / after, in the same run: `*_pytorch_linear` variants run PyTorch's CPU linear kernel
(`--cpu-linear default`: every product of a training step before packed products could train);
the others the default (`packed`): on CPUs where it is oneDNN's, the frozen weights' products
forward and backward by packed weights (diffmas.linear). An earlier run's before / after, the
attention kernel (transformers' SDPA with repeat_kv vs diffmas.attention), is in git history.

`diffmas_no_latent` (at the target's batch size only): the same DiffMAS step with m=0, which
splits the ratio into what the agents' prompt chunks cost and what the latent steps add.
`diffmas_concat_store` (there too): the DiffMAS step on the concatenating trace store, which
copies the whole trace on every append and keeps each copy for backward, against the default
grow store's in-place appends under autograd (diffmas.trace)."""

from __future__ import annotations

import argparse
import os

import torch

import _common as c

# The before variants' key suffix, and what they run (write_docs names it from here).
BEFORE = {
    "suffix": "_pytorch_linear",
    "kernel": "default",
    "label": "PyTorch's linear kernel",
    "what": "PyTorch's CPU linear kernel for every product (`--cpu-linear default`, what a training step ran "
    "before packed products could train)",
    "after": "the default packed products, which run the frozen weights' products forward and backward by "
    "packed weights where the default is oneDNN's (diffmas.linear)",
}


# Variants measured at the target's batch size only.
TARGET_BATCH_ONLY = ("diffmas_no_latent", "diffmas_concat_store")


def step_time(
    settings: c.ModelSettings,
    train_method: str,
    items: list[dict],
    m: int,
    repeats: int,
    checkpointing: bool = False,
    kernel: str = "packed",
    store: str = "grow",
) -> dict:
    from diffmas import MethodConfig, default_topology, get_method
    from diffmas.accounting import MemoryMeter
    from diffmas.linear import linear_kernel
    from diffmas.trace import trace_store
    from diffmas.train import TrainConfig
    from diffmas.train.adapters import add_trainable_adapters
    from diffmas.train.trajectory import TrajectoryModel

    c.setup(settings=settings)  # a fresh (spawned) process: the parent's settings come as an argument
    torch.manual_seed(0)
    bb = c.backbone()
    bb.gradient_checkpointing = checkpointing
    topo = default_topology("sequential")
    cfg = TrainConfig(task="-", method=train_method, latent_steps=m)
    mapping = add_trainable_adapters(bb, cfg, topo)
    infer = "latent_mas" if train_method == "diffmas" else "single"
    model = TrajectoryModel(get_method(infer, bb, topo, MethodConfig(latent_steps=m), mapping), train_method)
    model.train()
    batch = {k: [it[k] for it in items] for k in ("question", "target", "format")}

    def step():
        bb.model.zero_grad(set_to_none=True)
        with linear_kernel(kernel), trace_store(store):
            model(batch["question"], batch["target"], batch["format"])["loss"].backward()

    step()  # warm-up
    with MemoryMeter(bb.device) as memory:
        seconds = c.median_time(step, repeats, bb.device)
    return {
        "seconds_per_step": seconds,
        "trace_len": model.last_stats["trace_len"],
        "target_tokens": model.last_stats["n_target_tokens"],
        "peak_memory_bytes": memory.peak_bytes,
    }


def _packed_here() -> dict:
    """Which library the default kernel packs with here, and whether its products train."""
    from diffmas.linear import packed_gemm

    gemm = packed_gemm("packed")
    return {"library": gemm.name if gemm else None, "trains": bool(gemm and gemm.trains)}


def isolated(fn, *args):
    """Run one measurement in a fresh process: CPU peak RSS never goes down within a process
    (freed memory stays mapped), so sharing one would leak one variant's peak into the next."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run(sizes: list[int], m: int, repeats: int) -> dict:
    """Measure, writing the result file after every variant: a time limit keeps what was done."""
    from diffmas.tasks import get_task

    task = get_task("gsm8k")
    examples = task.load("train", limit=max(sizes))
    items = [
        {"question": task.prompt(ex), "target": task.target_text(ex), "format": task.format_instruction}
        for ex in examples
    ]
    result = {
        "settings": {
            "examples_per_step": sizes,
            "latent_steps": m,
            "agents": 4,
            "repeats": repeats,
            "lora": "r=8, alpha=16, q/k/v/o",
            "task": "gsm8k train (worked solutions)",
            **c.model_settings(),
        },
        "by_batch": {},
        "before": BEFORE,
        "packed": _packed_here(),
        "targets": {"ratio_max": 3.5, "at_examples_per_step": 8},
        "load_average_before": list(os.getloadavg()),  # what else ran on the machine
    }
    for n in sizes:
        row = result["by_batch"][str(n)] = {}
        before = BEFORE["suffix"]
        for key, method, checkpointing, kernel, store in (
            ("diffmas" + before, "diffmas", False, BEFORE["kernel"], "grow"),
            ("sft_single" + before, "sft_single", False, BEFORE["kernel"], "grow"),
            ("diffmas", "diffmas", False, "packed", "grow"),
            ("sft_single", "sft_single", False, "packed", "grow"),
            ("diffmas_checkpointed", "diffmas", True, "packed", "grow"),
            ("diffmas_no_latent", "diffmas", False, "packed", "grow"),
            ("diffmas_concat_store", "diffmas", False, "packed", "concat"),
        ):
            if key in TARGET_BATCH_ONLY and n != result["targets"]["at_examples_per_step"]:
                continue
            steps = 0 if key == "diffmas_no_latent" else m
            row[key] = isolated(step_time, c.SETTINGS, method, items[:n], steps, repeats, checkpointing, kernel, store)
            for suffix in ("", before):
                if f"sft_single{suffix}" in row:
                    row[f"ratio_diffmas_over_single{suffix}"] = (
                        row[f"diffmas{suffix}"]["seconds_per_step"] / row[f"sft_single{suffix}"]["seconds_per_step"]
                    )
            result["load_average_after"] = list(os.getloadavg())
            c.write("training_step", result)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="1,8", help="Examples per step (one batch), comma-separated.")
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = c.parse(p)
    torch.manual_seed(0)
    result = run([int(x) for x in args.sizes.split(",")], args.latent_steps, args.repeats)
    rows = [
        [
            n,
            k,
            f"{r[k]['seconds_per_step']:.2f}",
            f"{r[k]['trace_len']:.0f}",
            r[k]["target_tokens"],
            f"{r[k]['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['ratio_diffmas_over_single']:.2f}x",
        ]
        for n, r in result["by_batch"].items()
        for k in ("diffmas", "diffmas_checkpointed", "sft_single")
    ]
    print(c.table(rows, ["batch", "method", "s/step", "trace len", "target tok", "peak MiB", "ratio"]))


if __name__ == "__main__":
    main()
