"""Shared helpers for the benchmark scripts: one backbone, the GSM8K sample, JSON results.

Every script writes bench/results/<name>.json (the numbers docs/benchmarks.md is built from) and
prints a short table. Ratios are always measured within one run of one script, on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


# Published config.json shapes. `--model random:NAME` builds a model of that shape with random
# weights: paper-scale costs (time, memory, trace bytes) on a machine that has no hub access.
# Its outputs are meaningless, so the benchmarks then decode fixed lengths (DecodeConfig.ignore_eos).
RANDOM_SHAPES = {
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "qwen3-4b": dict(
        model_type="qwen3",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
    ),
    "qwen3-8b": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    "qwen3-14b": dict(
        model_type="qwen3",
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
}


@dataclass
class ModelSettings:
    """Which backbone the benchmarks run on (defaults: the embedded model, fp32, CPU or GPU)."""

    model: str = "smollm2-135m"  # embedded name, local dir, hub id, or random:<RANDOM_SHAPES key>
    dtype: str = "float32"
    device: str = "auto"
    tokenizer: str | None = None  # random:* models: tokenizer dir (default: the embedded model's)
    tag: str = ""  # suffix of the result file, e.g. "h200" -> results/<name>_h200.json

    @property
    def random_weights(self) -> bool:
        return self.model.startswith("random:")


SETTINGS = ModelSettings()
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any --threads


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = ModelSettings()
    p.add_argument(
        "--model", default=d.model, help="embedded name, local dir, hub id, or random:" + "|".join(RANDOM_SHAPES)
    )
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--device", default=d.device)
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for random:* models")
    p.add_argument("--tag", default="", help="result file suffix (results/<name>_<tag>.json)")


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse a script's arguments with `--threads` and the model's (`add_model_args`) added, and
    set up (`setup`) from them."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    add_model_args(p)
    args = p.parse_args()
    setup(args.threads, args)
    return args


def setup(
    threads: int | None = None, args: argparse.Namespace | None = None, settings: ModelSettings | None = None
) -> None:
    global SETTINGS
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    shared = REPO.parent / "shared" / "data"
    if "DIFFMAS_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["DIFFMAS_DATA_DIR"] = str(shared)
    if args is not None:
        settings = ModelSettings(args.model, args.dtype, args.device, args.tokenizer, args.tag)
    if settings is not None:
        SETTINGS = settings


def model_settings() -> dict:
    """Recorded in every result: what ran, and whether its outputs mean anything."""
    return {"model": SETTINGS.model, "dtype": SETTINGS.dtype, "random_weights": SETTINGS.random_weights}


# The variants that before/after runs compare (`variant`): "concat" is main before issue 14's
# work (transformers' concatenating cache, PyTorch's SDPA for one-position steps), "grow" the
# default, "sdpa" the default but for PyTorch's SDPA in one-position steps (the kernel's share).
VARIANTS = ("concat", "sdpa", "grow")
STORE_OF = {"concat": "concat", "sdpa": "grow", "grow": "grow"}  # each variant's trace store


@contextlib.contextmanager
def variant(name: str):
    """The trace store and the CPU one-position attention of a variant (see VARIANTS)."""
    from diffmas.attention import cpu_attention
    from diffmas.trace import trace_store

    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
    with trace_store(STORE_OF[name]), cpu_attention("kernel" if name == "grow" else "sdpa"):
        yield


def backbone():
    from diffmas import load_backbone

    if SETTINGS.random_weights:
        return random_backbone(
            SETTINGS.model.removeprefix("random:"), SETTINGS.dtype, SETTINGS.device, SETTINGS.tokenizer
        )
    return load_backbone(SETTINGS.model, dtype=SETTINGS.dtype, device=SETTINGS.device)


def random_backbone(shape: str, dtype: str, device: str, tokenizer: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from diffmas.backbone import Backbone, ensure_embedded, prepare_tokenizer, resolve_device, resolve_dtype

    if shape not in RANDOM_SHAPES:
        raise SystemExit(f"unknown random shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    dev = resolve_device(device)
    torch.manual_seed(0)
    config = AutoConfig.for_model(**RANDOM_SHAPES[shape])
    with torch.device(dev):  # initialise in place: an 8B model never touches host memory
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, dev), attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(tokenizer or ensure_embedded("smollm2-135m"))
    prepare_tokenizer(tok)
    return Backbone(model=model.eval().requires_grad_(False), tokenizer=tok, name=f"random:{shape}")


def ignore_eos() -> bool:
    """Fixed-length decoding for random weights (their EOS timing is noise)."""
    return SETTINGS.random_weights


def gsm8k(n: int):
    """The first n GSM8K test questions (the shipped copy serves n <= 20 with no data dir)."""
    from diffmas.tasks import get_task

    task = get_task("gsm8k")
    return task, task.load("test", limit=n)


def machine() -> dict:
    from diffmas.attention import kernel_status
    from diffmas.backbone import resolve_device
    from diffmas.provenance import device_description, git_commit, package_versions

    # what the default runs in one-position steps, on CPU runs only: elsewhere the kernel is unused,
    # and asking would build it inside a GPU step's time limit
    on_cpu = resolve_device(SETTINGS.device).type == "cpu"
    return {
        "device": device_description(),
        "cpu_attention": kernel_status() if on_cpu else None,
        "torch_threads": torch.get_num_threads(),
        "torch_default_threads": DEFAULT_THREADS,
        "cpu_count": os.cpu_count(),
        "bench_model": asdict(SETTINGS),
        "python": platform.python_version(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}_{SETTINGS.tag}.json" if SETTINGS.tag else f"{name}.json")
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    return path


def run_times(fn, repeats: int, device) -> list[float]:
    """Wall seconds of `repeats` calls of fn() on `device`, each timed to the end of its queued GPU work."""
    from diffmas.accounting import Stopwatch

    times = []
    for _ in range(repeats):
        clock = Stopwatch(torch.device(device)).start()
        fn()
        times.append(clock.elapsed())
    return times


def median_time(fn, repeats: int, device) -> float:
    """Median wall seconds of fn() on `device` (see `run_times`)."""
    return statistics.median(run_times(fn, repeats, device))


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
