"""Shared helpers for the benchmark scripts: one backbone, the GSM8K sample, JSON results.

Every script writes bench/results/<name>.json (the numbers docs/benchmarks.md is built from) and
prints a short table. Ratios are always measured within one run of one script, on one machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def setup(threads: int | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    shared = REPO.parent / "shared" / "data"
    if "DIFFMAS_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["DIFFMAS_DATA_DIR"] = str(shared)


def backbone(name: str = "smollm2-135m", dtype: str = "float32", device: str = "auto"):
    from diffmas import load_backbone

    return load_backbone(name, dtype=dtype, device=device)


def gsm8k(n: int):
    """The first n GSM8K test questions (the shipped copy serves n <= 20 with no data dir)."""
    from diffmas.tasks import get_task

    task = get_task("gsm8k")
    return task, task.load("test", limit=n)


def machine() -> dict:
    from diffmas.provenance import device_description, git_commit, package_versions

    return {"device": device_description(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "versions": package_versions(), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    return path


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
