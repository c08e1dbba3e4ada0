"""HF vs vLLM backend on the same questions: are the greedy answers equal, how long does each take
per question, and the throughput ratio. Writes results/serve_backends.json.

The vLLM server is started here from its own environment (`make vllm`) on the embedded model's
converted directory (fp32, eager), and stopped at the end. Each backend runs the questions as
one batch after a one-question warm-up that is not timed.

    python backend_compare.py --vllm-python ../.venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

from diffmas.tasks.data import smoke_questions

import _common as c

QUESTIONS = smoke_questions()
FORMAT = "Put the final answer in \\boxed{}."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(backend, method, questions) -> tuple[list, float]:
    start = time.perf_counter()
    results = backend.run_batch(method, questions, format=FORMAT)
    return results, time.perf_counter() - start


def compare(name: str, bb, hf, vllm, args) -> dict:
    from diffmas import DecodeConfig, MethodConfig, default_topology, get_method

    config = MethodConfig(
        latent_steps=args.latent_steps,
        decode=DecodeConfig(max_new_tokens=args.max_tokens),
        upstream_max_new_tokens=args.max_tokens,
    )
    method = get_method(name, bb, default_topology("sequential"), config)
    questions = QUESTIONS[: args.questions]
    for backend in (hf, vllm):
        backend.run_batch(method, questions[:1], format=FORMAT)  # warm-up, not timed
    hf_out, hf_s = timed(hf, method, questions)
    vllm_out, vllm_s = timed(vllm, method, questions)
    equal = [a.text == b.text for a, b in zip(hf_out, vllm_out)]
    row = {
        "method": name,
        "questions": len(questions),
        "answers_equal": sum(equal),
        "hf_seconds_per_question": hf_s / len(questions),
        "vllm_seconds_per_question": vllm_s / len(questions),
        "throughput_ratio_vllm_over_hf": hf_s / vllm_s,
        "generated_tokens": sum(r.n_tokens["generated"] for r in hf_out),
        "answers": [{"hf": a.text, "vllm": b.text} for a, b in zip(hf_out, vllm_out)],
    }
    print(
        f"{name}: {row['answers_equal']}/{len(questions)} equal, HF {row['hf_seconds_per_question']:.2f} s/q, "
        f"vLLM {row['vllm_seconds_per_question']:.2f} s/q, ratio {row['throughput_ratio_vllm_over_hf']:.2f}x",
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True, help="python of the vLLM environment (make vllm)")
    p.add_argument("--methods", default="latent_mas,text_mas")
    p.add_argument("--questions", type=int, default=len(QUESTIONS))
    p.add_argument("--latent-steps", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()
    c.setup()
    from diffmas.backbone import ensure_embedded
    from diffmas.backends import get_backend
    from diffmas.backends.vllm import start_server, stop_server

    bb = c.backbone()
    log = Path(tempfile.gettempdir()) / "diffmas-bench-vllm.log"
    started = time.perf_counter()
    process, url = start_server(args.vllm_python, str(ensure_embedded("smollm2-135m")), free_port(), str(log))
    startup_s = time.perf_counter() - started
    try:
        hf, vllm = get_backend("hf"), get_backend("vllm", url)
        rows = [compare(name, bb, hf, vllm, args) for name in args.methods.split(",")]
    finally:
        stop_server(process)
    settings = {"latent_steps": args.latent_steps, "max_tokens": args.max_tokens, "model_settings": c.model_settings()}
    c.write("serve_backends", {"settings": settings, "vllm_startup_s": startup_s, "methods": rows})


if __name__ == "__main__":
    main()
