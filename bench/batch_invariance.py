"""Does a question's answer depend on the batch it runs in? fp32 vs bf16 on the CPU, embedded model.

The runner's contract is that batch size is a runtime-only setting: a run resumed with another
`--batch-size` reproduces its answers. bf16 became the CPU default for inference only once it held
there (docs/design.md, dtype): bf16 rounds about 65,000 times more coarsely than fp32, so any
rounding difference between a row alone and the same row in a batch flips more answers. This
script measures it on the real paths: each dtype runs the same questions at batch 1 and at
`--batch-size`, through `run_examples` (the eval runner's loop), and counts the answers that differ:

- ARC-Easy by option likelihood (the single agent): predicted option, and the largest difference
  of an option's log-likelihood;
- GSM8K by generated answer (latent_mas, 256 tokens): the whole final text, and the extracted
  answer.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import _common as c

CASES = (  # (key, task, method, max new tokens)
    ("arc_easy_option_likelihood", "arc_easy", "single", 1),
    ("gsm8k", "gsm8k", "latent_mas", 256),
)


def records(bb, task_name: str, n: int, method_name: str, max_new_tokens: int, batch: int) -> list[dict]:
    from diffmas import DecodeConfig, MethodConfig, get_method
    from diffmas.evaluate.records import run_examples
    from diffmas.tasks import get_task

    task = get_task(task_name)
    method = get_method(method_name, bb, config=MethodConfig(decode=DecodeConfig(max_new_tokens=max_new_tokens)))
    with torch.no_grad():
        return list(run_examples(method, task, task.load("test", limit=n), batch_size=batch, option_likelihood=True))


def compare(alone: list[dict], batched: list[dict]) -> dict:
    """How many of the questions got another answer in the batch than alone."""
    pairs = list(zip(alone, batched))
    out = {"n": len(pairs)}
    if all("option_likelihood" in r for r in alone + batched):
        a = [r["option_likelihood"] for r in alone]
        b = [r["option_likelihood"] for r in batched]
        out["different_predictions"] = sum(x["pred"] != y["pred"] for x, y in zip(a, b))
        out["max_logprob_difference"] = max(
            abs(p - q) for x, y in zip(a, b) for p, q in zip(x["logprobs"], y["logprobs"])
        )
    else:
        out["different_texts"] = sum(x["text"] != y["text"] for x, y in pairs)
        out["different_answers"] = sum(x["extracted"] != y["extracted"] for x, y in pairs)
        out["accuracy_alone"] = statistics.mean(float(x["correct"]) for x, _ in pairs)
        out["accuracy_batched"] = statistics.mean(float(y["correct"]) for _, y in pairs)
    return out


def main() -> None:
    from cpu_bf16 import DTYPES, load

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arc-n", type=int, default=100, help="ARC-Easy test questions (first n)")
    p.add_argument("--gsm8k-n", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="the batch compared with batch 1")
    args = c.parse(p)
    sizes = {"arc_easy_option_likelihood": args.arc_n, "gsm8k": args.gsm8k_n}
    from diffmas.provenance import cpu_bf16_support

    result = {
        "settings": {
            "arc_easy_n": sizes["arc_easy_option_likelihood"],
            "gsm8k_n": sizes["gsm8k"],
            "batch_size": args.batch_size,
            **c.model_settings(),
            "dtype": "float32 vs bfloat16",
        },
        "cpu_bf16": cpu_bf16_support(),
        "cases": {},
    }
    for dtype in DTYPES:
        bb = load(dtype)
        for key, task, method, new in CASES:
            alone = records(bb, task, sizes[key], method, new, batch=1)
            batched = records(bb, task, sizes[key], method, new, batch=args.batch_size)
            row = result["cases"].setdefault(key, {"task": task, "method": method, "max_new_tokens": new})
            row[dtype] = compare(alone, batched)
            print(key, dtype, row[dtype], file=c.sys.stderr, flush=True)
        del bb
    c.write("batch_invariance", result)


if __name__ == "__main__":
    main()
