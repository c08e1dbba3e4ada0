"""`evaluate`: run one method on one task into a run directory, resumably.

    runs/NAME/config.json     every setting, package versions, seed, git commit
    runs/NAME/samples.jsonl   one record per (question, sample), appended and flushed per batch
    runs/NAME/summary.json    metrics, written atomically at the end

Rerunning the same command resumes: finished (id, sample) pairs are skipped, never duplicated; a
line cut short by a kill is cut off before appending. Several processes (`accelerate launch` or
`torchrun`) split the questions round-robin, each appending to its own shard file; the main
process merges the shards into samples.jsonl in question order and writes the summary.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

from diffmas.backbone import DEFAULT_MODEL
from diffmas.errors import DiffmasError
from diffmas.methods import MethodConfig
from diffmas.provenance import config_diff, dataclass_defaults, git_commit, package_versions

SAMPLES = "samples.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
# Settings that change how fast a run goes, never its results (batched == one-by-one is tested).
RUNTIME_ONLY = ("batch_size",)


class RunConflictError(DiffmasError):
    """The output directory holds a run with different settings."""


@dataclass
class EvalConfig:
    task: str  # registry name or jsonl:PATH
    method: str = "latent_mas"
    split: str = "test"
    model: str = DEFAULT_MODEL
    limit: int | None = None  # number of questions (None: all)
    subset_seed: int | None = None  # with limit: a random subset drawn with this seed (None: the first)
    samples: int = 1  # k samples per question (use temperature > 0 for k > 1)
    seed: int = 0  # base seed; each (question, sample) derives its own
    batch_size: int = 8
    topology: str = "sequential"
    n_agents: int | None = None
    roles: str | None = None  # YAML/JSON roles file
    adapter: str | None = None  # trained adapter directory (diffmas)
    option_likelihood: bool = True  # multiple choice: also rank options by likelihood
    data_dir: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    method_config: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self):
        if isinstance(self.method_config, dict):
            self.method_config = MethodConfig(**self.method_config)
        if self.samples < 1:
            raise DiffmasError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise DiffmasError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.samples > 1 and self.method_config.decode.greedy:
            raise DiffmasError(f"{self.samples} samples with greedy decoding would repeat one answer; "
                               "set a temperature > 0 (e.g. --temperature 0.6 --top-p 0.95)")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- run directory


def _read_records(path: Path, repair: bool = False) -> list[dict]:
    """Complete JSON lines of `path`; with repair, a line cut short by a kill is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _check_or_write_config(out: Path, config: EvalConfig, is_main: bool) -> None:
    path = out / CONFIG
    wanted = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_ONLY}
    if path.is_file():
        saved = json.loads(path.read_text()).get("eval", {})
        saved = {k: v for k, v in saved.items() if k not in RUNTIME_ONLY}
        diff = config_diff(saved, wanted, dataclass_defaults(EvalConfig))
        if diff:
            raise RunConflictError(
                f"{out} holds a run with other settings ({'; '.join(diff)}); "
                "resume with the same settings or choose another --out")
        return
    if is_main:
        _write_json_atomic(path, {"eval": config.to_dict(), "versions": package_versions(),
                                  "git_commit": git_commit()})


def _sandbox_isolation(task) -> dict | None:
    """Code tasks: the sandbox's isolation level and layers (SandboxError when below the
    required level, see scoring.sandbox.require_isolation); None for other tasks."""
    if task.answer_type != "code":
        return None
    from diffmas.scoring.sandbox import check_isolation

    return check_isolation().to_dict()


def _record_sandbox(path: Path, sandbox: dict) -> None:
    """config.json keeps the isolation the code ran under, apart from the settings compared on
    resume (a run may be resumed on another machine: the latest is recorded)."""
    saved = json.loads(path.read_text())
    if saved.get("sandbox") != sandbox:
        _write_json_atomic(path, {**saved, "sandbox": sandbox})


def _shard_path(out: Path, rank: int) -> Path:
    return out / "shards" / f"rank{rank}.jsonl"


# ----------------------------------------------------------------------------- evaluate


def evaluate(config: EvalConfig, out: str | Path, *, method=None, progress: bool = True,
             on_record: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) an evaluation into `out`; return the summary.

    method: an already built Method (tests, sweeps); built from the config when None.
    """
    from diffmas.evaluate.metrics import summarize
    from diffmas.evaluate.records import run_examples
    from diffmas.tasks import get_task

    rank, world, barrier = _distributed()
    # Data first: a missing file or bad row fails before anything is written.
    task = get_task(config.task)
    examples = task.load(config.split, data_dir=config.data_dir, limit=config.limit, seed=config.subset_seed)
    sandbox = _sandbox_isolation(task)  # code tasks: refused before generating when too weak
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_config(out, config, rank == 0)
    if sandbox and rank == 0:
        _record_sandbox(out / CONFIG, sandbox)
    mine = examples[rank::world]
    shard = _shard_path(out, rank) if world > 1 else out / SAMPLES
    shard.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["id"], r["sample"]) for r in _finished(out, world, rank, repair=True)}
    todo = [ex for ex in mine if any((ex.id, k) not in done for k in range(config.samples))]
    if todo:
        method = method or build_method(config)
        with open(shard, "a") as sink, _progress(progress and rank == 0, len(todo) * config.samples) as advance:
            for record in run_examples(method, task, todo, config.batch_size, config.samples, config.seed,
                                       option_likelihood=config.option_likelihood, skip=done):
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                advance()
                if on_record:
                    on_record(record)
    barrier()
    if rank != 0:
        return {}
    records = _merge(out, examples, config.samples, world)
    summary = {"task": config.task, "method": config.method, "latent_steps": config.method_config.latent_steps,
               **summarize(records)}
    if sandbox:
        summary["sandbox"] = sandbox
    _write_json_atomic(out / SUMMARY, summary)
    return summary


def _finished(out: Path, world: int, rank: int, repair: bool) -> list[dict]:
    """Records already written for this run: the merged file and every shard file."""
    records = _read_records(out / SAMPLES, repair=repair and world == 1)
    shard_dir = out / "shards"
    if shard_dir.is_dir():
        for path in sorted(shard_dir.glob("rank*.jsonl")):
            records += _read_records(path, repair=repair and path == _shard_path(out, rank))
    return records


def _merge(out: Path, examples, samples: int, world: int) -> list[dict]:
    """One record per (id, sample), in question order; shards folded into samples.jsonl."""
    by_key = {}
    for r in _finished(out, world, 0, repair=False):
        by_key.setdefault((r["id"], r["sample"]), r)
    ordered = [by_key[(ex.id, k)] for ex in examples for k in range(samples) if (ex.id, k) in by_key]
    if len(ordered) != len(examples) * samples:
        missing = len(examples) * samples - len(ordered)
        raise DiffmasError(f"{missing} records are missing from {out}; rerun the same command to finish")
    if world > 1 or (out / "shards").is_dir():
        tmp = out / f".{SAMPLES}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
        os.replace(tmp, out / SAMPLES)
        for path in (out / "shards").glob("rank*.jsonl"):
            path.unlink()
        (out / "shards").rmdir()
    return ordered


def build_method(config: EvalConfig):
    """Backbone (+ adapter) + topology + method, from the config."""
    from diffmas.backbone import load_backbone
    from diffmas.methods import get_method
    from diffmas.roles import build_topology

    topology = build_topology(config.topology, config.n_agents, config.roles)
    backbone = load_backbone(config.model, dtype=config.dtype, device=config.device)
    adapters = None
    if config.adapter:
        from diffmas.train.adapters import attach_adapter

        adapters = attach_adapter(backbone, config.adapter, topology)
    return get_method(config.method, backbone, topology, config.method_config, adapters)


def _distributed():
    """(rank, world size, barrier): from accelerate/torchrun's environment when launched by them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None
    import torch
    from accelerate import PartialState

    # cpu=True without a GPU: otherwise accelerate ignores WORLD_SIZE on a CPU-only machine, every
    # process believes it is alone and each one evaluates every question into samples.jsonl.
    # The barrier after the shards waits for the slowest one: with long generations that is hours,
    # far beyond the process group's default timeout (NCCL 10 min, gloo 30 min).
    hours = float(os.environ.get("DIFFMAS_SHARD_WAIT_HOURS", "48"))
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=hours))
    if state.num_processes != world:
        raise DiffmasError(f"WORLD_SIZE is {world} but accelerate set up {state.num_processes} process(es) "
                           f"({state.distributed_type}); launch with torchrun or `accelerate launch`")
    return state.process_index, state.num_processes, state.wait_for_everyone


class _progress:
    """A rich progress bar, or nothing (other ranks, tests)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.bar.start()
        task_id = self.bar.add_task("eval", total=self.total)
        return lambda: self.bar.advance(task_id)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
