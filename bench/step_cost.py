"""One latent step vs one ordinary decode step, at the same trace length, on the embedded model.

latent step: realign the last hidden state, one decoder forward of one position.
decode step: LM head, token choice with its statistics, embedding, one decoder forward — what the
decode loop does per token. Target: latent / decode <= 1.1x.
"""

from __future__ import annotations

import argparse

import torch

import _common as c


def run(context: int, steps: int, repeats: int, batch: int) -> dict:
    from diffmas.accounting import Stopwatch
    from diffmas.channel import latent_steps, prefill
    from diffmas.generate import DecodeConfig, decode
    from diffmas.trace import LatentTrace

    bb = c.backbone()
    prompt = "word " * context

    def fresh():
        trace = LatentTrace(bb, batch)
        return trace, prefill(trace, "a", [prompt] * batch)

    def latent_run():
        trace, h = fresh()
        clock = Stopwatch(bb.device).start()
        latent_steps(trace, "a", h, steps)
        return clock.elapsed()  # waits for the GPU: latent steps never read a result back

    # steps + 1 tokens, EOS suppressed: exactly `steps` forwards (the last token is not fed back)
    config = DecodeConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1)

    def decode_run():
        trace, h = fresh()
        clock = Stopwatch(bb.device).start()
        decode(trace, "a", h, config, [0] * batch)
        return clock.elapsed()

    with torch.no_grad():
        latent_run(), decode_run()  # warm-up
        lat = sorted(latent_run() / steps for _ in range(repeats))
        dec = sorted(decode_run() / steps for _ in range(repeats))
    med = lambda xs: xs[len(xs) // 2]
    return {
        "settings": {
            "context_tokens": context,
            "steps": steps,
            "repeats": repeats,
            "batch": batch,
            **c.model_settings(),
        },
        "latent_step_ms": med(lat) * 1000,
        "decode_step_ms": med(dec) * 1000,
        "ratio_latent_over_decode": med(lat) / med(dec),
        "latent_all_ms": [x * 1000 for x in lat],
        "decode_all_ms": [x * 1000 for x in dec],
        "targets": {"ratio_max": 1.1},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--context", type=int, default=300)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    args = c.parse(p)
    result = run(args.context, args.steps, args.repeats, args.batch)
    c.write("step_cost", result)
    print(
        c.table(
            [
                ["latent step", f"{result['latent_step_ms']:.1f}"],
                ["decode step", f"{result['decode_step_ms']:.1f}"],
                ["ratio", f"{result['ratio_latent_over_decode']:.3f}"],
            ],
            ["", "ms (median)"],
        )
    )


if __name__ == "__main__":
    main()
