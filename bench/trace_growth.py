"""Trace growth: KV-trace bytes vs agents x latent steps x prompt length, measured on the embedded
model and checked against layers x 2 x kv_heads x head_dim x length x dtype size, then
extrapolated to paper-scale models (shapes from their published config.json files)."""

from __future__ import annotations

import argparse

import torch

import _common as c

# Published config.json values (num_hidden_layers, num_key_value_heads, head_dim).
PAPER_MODELS = {
    name: (
        c.RANDOM_SHAPES[key]["num_hidden_layers"],
        c.RANDOM_SHAPES[key]["num_key_value_heads"],
        c.RANDOM_SHAPES[key]["head_dim"],
    )
    for name, key in (("Qwen3-4B", "qwen3-4b"), ("Qwen3-8B", "qwen3-8b"), ("Qwen3-14B", "qwen3-14b"))
}


def bytes_per_position(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return layers * 2 * kv_heads * head_dim * dtype_bytes


def measure(agents_list, steps_list, prompt_list) -> list[dict]:
    from diffmas.channel import latent_steps, prefill
    from diffmas.trace import LatentTrace

    bb = c.backbone()
    rows = []
    with torch.no_grad():
        for agents in agents_list:
            for m in steps_list:
                for words in prompt_list:
                    trace = LatentTrace(bb, 1)
                    for a in range(agents):
                        h = prefill(trace, f"agent{a}", ["word " * words])
                        latent_steps(trace, f"agent{a}", h, m)
                    formula = bytes_per_position(bb.n_layers, bb.n_kv_heads, bb.head_dim, 4) * trace.length
                    rows.append(
                        {
                            "agents": agents,
                            "latent_steps": m,
                            "prompt_tokens": trace.length // agents - m,
                            "length": trace.length,
                            "bytes": trace.n_bytes(),
                            "formula_bytes": formula,
                            "matches": trace.n_bytes() == formula,
                        }
                    )
    return rows


def extrapolate(lengths: list[int]) -> dict:
    table = {}
    for name, (layers, kv, hd) in PAPER_MODELS.items():
        per = bytes_per_position(layers, kv, hd, 2)  # bf16
        table[name] = {"bytes_per_position_bf16": per, "mib_at_length": {str(n): per * n / 2**20 for n in lengths}}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    c.setup(args.threads)
    rows = measure([1, 2, 4, 8], [0, 10, 40], [50, 200])
    # a 4-agent trace: 3 upstream x (prompt + m) + final prompt + decode; lengths for typical settings
    lengths = [1_000, 4_000, 16_000, 32_000]
    result = {
        "settings": {"model": "smollm2-135m", "dtype": "float32", "batch": 1},
        "smollm2_bytes_per_position_fp32": rows[0]["bytes"] // rows[0]["length"],
        "measured": rows,
        "all_match_formula": all(r["matches"] for r in rows),
        "extrapolation_bf16": extrapolate(lengths),
        "paper_model_shapes": PAPER_MODELS,
    }
    c.write("trace_growth", result)
    print(
        c.table(
            [[r["agents"], r["latent_steps"], r["prompt_tokens"], r["length"], r["bytes"], r["matches"]] for r in rows],
            ["agents", "m", "prompt/agent", "length", "bytes", "= formula"],
        )
    )
    print(
        c.table(
            [
                [k, v["bytes_per_position_bf16"]] + [f"{x:.0f}" for x in v["mib_at_length"].values()]
                for k, v in result["extrapolation_bf16"].items()
            ],
            ["model", "B/pos"] + [f"MiB@{n}" for n in lengths],
        )
    )


if __name__ == "__main__":
    main()
