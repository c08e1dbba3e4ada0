"""bf16 vs fp32 on the CPU, through the public API, on the embedded model: speed (prompt prefill of
4 x 300 tokens, a batch-4 decode step) and accuracy (ARC-Easy by option likelihood, GSM8K by
generated answer), both dtypes in one run, speed measurements interleaved.

bf16 may become the CPU default only if it is faster and both accuracies stay inside fp32's
bootstrap CI. The result also records which bf16 instructions the CPU has (`diffmas env`).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import _common as c

DTYPES = ("float32", "bfloat16")


def load(dtype: str):
    from diffmas import load_backbone

    return load_backbone(c.SETTINGS.model, dtype=dtype, device=c.SETTINGS.device)


def speed(backbones: dict, repeats: int, steps: int) -> dict:
    from diffmas.channel import prefill
    from diffmas.generate import DecodeConfig, decode
    from diffmas.trace import LatentTrace

    prompt = "word " * 300

    def prefill_ms(bb):
        trace = LatentTrace(bb, 4)
        start = c.time.perf_counter()
        prefill(trace, "a", [prompt] * 4)
        return (c.time.perf_counter() - start) * 1000

    def decode_ms(bb):
        trace = LatentTrace(bb, 4)
        h = prefill(trace, "a", [prompt] * 4)
        config = DecodeConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1)
        start = c.time.perf_counter()
        decode(trace, "a", h, config, [0] * 4)
        return (c.time.perf_counter() - start) / steps * 1000

    out = {}
    with torch.no_grad():
        for name, fn in (("prefill_4x300_ms", prefill_ms), ("decode_step_b4_ms", decode_ms)):
            times = {d: [] for d in backbones}
            for d in backbones:
                fn(backbones[d])  # warm-up
            for r in range(repeats):
                for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
                    times[d].append(fn(backbones[d]))
            out[name] = {d: statistics.median(v) for d, v in times.items()}
            out[name]["all"] = times
            out[name]["ratio_bf16_over_fp32"] = out[name]["bfloat16"] / out[name]["float32"]
            print(name, {d: round(out[name][d], 1) for d in DTYPES}, file=c.sys.stderr, flush=True)
    return out


def accuracy(bb, task_name: str, n: int, method_name: str, max_new_tokens: int, batch: int) -> dict:
    from diffmas import DecodeConfig, MethodConfig, get_method
    from diffmas.evaluate.metrics import bootstrap_ci
    from diffmas.evaluate.records import run_examples
    from diffmas.tasks import get_task

    task = get_task(task_name)
    examples = task.load("test", limit=n)
    method = get_method(method_name, bb, config=MethodConfig(decode=DecodeConfig(max_new_tokens=max_new_tokens)))
    start = c.time.perf_counter()
    records = list(run_examples(method, task, examples, batch_size=batch, option_likelihood=True))
    wall = c.time.perf_counter() - start
    if task.answer_type == "choice":
        scores = [float(r["option_likelihood"]["correct"]) for r in records]
        preds = [r["option_likelihood"]["pred"] for r in records]
    else:
        scores = [float(r.get("correct", False)) for r in records]
        preds = [r.get("extracted") for r in records]
    return {
        "n": len(records),
        "accuracy": statistics.mean(scores),
        "accuracy_ci": list(bootstrap_ci(scores)),
        "wall_s": wall,
        "preds": preds,
        "scores": scores,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--arc-n", type=int, default=300, help="ARC-Easy test questions (first n)")
    p.add_argument("--gsm8k-n", type=int, default=50)
    p.add_argument("--gsm8k-method", default="latent_mas")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-accuracy", action="store_true")
    c.add_model_args(p)
    args = p.parse_args()
    c.setup(args.threads, args)
    from diffmas.provenance import cpu_bf16_support

    result = {
        "settings": {
            "repeats": args.repeats,
            "steps": args.steps,
            "arc_easy_n": args.arc_n,
            "gsm8k_n": args.gsm8k_n,
            "gsm8k_method": args.gsm8k_method,
            "max_new_tokens": args.max_new_tokens,
            **c.model_settings(),
            "dtype": "float32 vs bfloat16",
        },
        "cpu_bf16": cpu_bf16_support(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_before": list(os.getloadavg()),
    }
    backbones = {d: load(d) for d in DTYPES}
    result["speed"] = speed(backbones, args.repeats, args.steps)
    c.write("cpu_bf16", result)
    if not args.skip_accuracy:
        result["accuracy"] = {}
        for key, task, n, method, new in (
            ("arc_easy_option_likelihood", "arc_easy", args.arc_n, "single", 1),
            ("gsm8k", "gsm8k", args.gsm8k_n, args.gsm8k_method, args.max_new_tokens),
        ):
            row = result["accuracy"][key] = {"task": task, "method": method, "max_new_tokens": new}
            with torch.no_grad():
                for d in DTYPES:
                    row[d] = accuracy(backbones[d], task, n, method, new, batch=10)
                    print(key, d, row[d]["accuracy"], row[d]["accuracy_ci"], file=c.sys.stderr, flush=True)
            a, b = row["float32"], row["bfloat16"]
            lo, hi = a["accuracy_ci"]
            row["bf16_within_fp32_ci"] = lo <= b["accuracy"] <= hi
            row["agreement"] = statistics.mean(float(x == y) for x, y in zip(a["preds"], b["preds"]))
            c.write("cpu_bf16", result)
    result["load_average_after"] = list(os.getloadavg())
    c.write("cpu_bf16", result)
    s = result["speed"]
    print(
        c.table(
            [
                [k, f"{v['float32']:.1f}", f"{v['bfloat16']:.1f}", f"{v['ratio_bf16_over_fp32']:.2f}x"]
                for k, v in s.items()
            ],
            ["", "fp32", "bf16", "bf16 / fp32"],
        )
    )


if __name__ == "__main__":
    main()
