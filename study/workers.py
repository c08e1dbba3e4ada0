"""Side-by-side worker processes for the resumable studies (channel.py, budget.py).

A study runs its stages in `--workers N` single-threaded processes. Each worker claims a stage
with an atomic mkdir under OUT/.claims, so two never run the same one; finished stages are skipped
by the study itself, so rerunning the command resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def claim(out: Path, name: str) -> bool:
    """Whether this worker got stage `name` (False: another worker has it)."""
    claims = out / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    try:
        (claims / name.replace("/", "__")).mkdir()
    except FileExistsError:
        return False
    return True


def start_worker_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def launch(out: Path, settings: dict, script: str, worker_args: list[str], n_workers: int) -> None:
    """Check or record the study's settings, run `n_workers` copies of `script --worker ...` and
    exit non-zero if any failed."""
    settings_file = out / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        sys.exit(f"{out} holds a study with other settings; move it away or use the same options")
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    shutil.rmtree(out / ".claims", ignore_errors=True)  # claims of an interrupted run
    command = [sys.executable, str(Path(script).resolve()), "--worker", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    codes = [w.wait() for w in [subprocess.Popen(command, env=env) for _ in range(n_workers)]]
    shutil.rmtree(out / ".claims", ignore_errors=True)
    if any(codes):
        sys.exit(f"a worker failed (exit codes {codes}); rerun the same command to resume")
