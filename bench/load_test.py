"""Load test of `diffmas serve` on loopback: 1, 4, 16 and 64 concurrent clients, a fixed number of
requests each level, no retries; it stops by itself (every request has a timeout, every level a
deadline). Writes results/serve_load.json: throughput, p50/p95/p99 latency, 429 rejections, errors.

The server is a `diffmas serve` subprocess (so the clients never share its interpreter), on the
embedded model unless --model says otherwise. Only addresses on this machine are contacted.

    python load_test.py                      # the default levels on the embedded model
    python load_test.py --clients 1,4 --requests 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import httpx

from diffmas.tasks.data import smoke_questions

import _common as c

QUESTIONS = smoke_questions(8)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def one_request(client: httpx.AsyncClient, i: int, args) -> dict:
    body = {
        "model": "diffmas",
        "messages": [
            {"role": "system", "content": "Put the final answer in \\boxed{}."},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        ],
        "max_tokens": args.max_tokens,
    }
    start = time.perf_counter()
    try:
        response = await client.post("/v1/chat/completions", json=body, timeout=args.request_timeout)
    except httpx.HTTPError as exc:
        return {"status": "error", "error": type(exc).__name__, "latency_s": time.perf_counter() - start}
    latency = time.perf_counter() - start
    if response.status_code == 200:
        cost = response.json()["diffmas"]
        return {"status": 200, "latency_s": latency, "batch_size": cost["batch_size"], "tokens": cost["tokens"]}
    return {"status": response.status_code, "latency_s": latency}


async def level(url: str, clients: int, args) -> dict:
    """`clients` workers share a counter of `args.requests` requests; each sends its next request
    as soon as its previous one is answered (closed loop)."""
    counter = iter(range(args.requests))
    records: list[dict] = []

    async def worker(client):
        for i in counter:
            records.append(await one_request(client, i, args))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(clients))), args.level_timeout)
        wall = time.perf_counter() - start
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    return {
        "clients": clients,
        "requests": len(records),
        "ok": len(ok),
        "rejected_429": sum(r["status"] == 429 for r in records),
        "errors": sum(r["status"] not in (200, 429) for r in records),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall,
        "generated_tokens_per_s": sum(r["tokens"]["generated"] for r in ok) / wall,
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "mean": statistics.fmean(latencies) if latencies else None,
        },
        "mean_batch_size": statistics.fmean(r["batch_size"] for r in ok) if ok else None,
    }


def start_server(args) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "diffmas", "serve", "--model", args.model, "--dtype", "float32",
        "--method", args.method, "--latent-steps", str(args.latent_steps), "--port", str(args.port),
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", str(args.max_queue), "--max-new-tokens", str(args.max_tokens), "--agents", str(args.agents),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(c.REPO / "src")}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"diffmas serve exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.terminate()
            raise SystemExit("diffmas serve did not start within 300 s")
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="latent_mas")
    # small defaults: a 2-core CPU answers a 4-agent question in ~10 s; these keep the run to minutes
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--latent-steps", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--level-timeout", type=float, default=900.0)
    p.add_argument("--port", type=int, default=8431)
    args = p.parse_args()
    c.setup()
    server = start_server(args)
    url = f"http://127.0.0.1:{args.port}"
    try:
        levels = []
        for n in (int(x) for x in args.clients.split(",")):
            result = asyncio.run(level(url, n, args))
            levels.append(result)
            lat = {k: "-" if v is None else f"{v:.2f}" for k, v in result["latency_s"].items()}
            print(
                f"{n:>3} clients: {result['ok']}/{result['requests']} ok, {result['rejected_429']} x 429, "
                f"{result['errors']} errors, {result['throughput_rps']:.2f} req/s, "
                f"p50 {lat['p50']} s, p95 {lat['p95']} s, p99 {lat['p99']} s, batch {result['mean_batch_size']}",
                flush=True,
            )
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(timeout=120)
    settings = {k: getattr(args, k) for k in ("model", "method", "agents", "latent_steps", "max_tokens", "requests")}
    server_settings = {k: getattr(args, k) for k in ("max_batch_size", "max_wait_ms", "max_queue")}
    c.write(
        "serve_load",
        {
            "settings": settings,
            "server": server_settings,
            "levels": levels,
            "metrics_excerpt": [line for line in metrics.splitlines() if line.startswith("diffmas_requests_total")],
        },
    )


if __name__ == "__main__":
    main()
