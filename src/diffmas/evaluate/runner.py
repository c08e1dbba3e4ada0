"""`evaluate`: run one method on one task into a run directory, resumably.

    runs/NAME/config.json     every setting, package versions, seed, git commit
    runs/NAME/samples.jsonl   one record per (question, sample), appended and flushed per batch
    runs/NAME/summary.json    metrics, written atomically at the end

Rerunning the same command resumes: finished (id, sample) pairs are skipped, never duplicated; a
line cut short by a kill is cut off before appending and computed again. Rerunning with a larger
--limit or more --samples grows the run (only the missing records are added, config.json is
updated); a smaller one reports on that part of the run and leaves the files alone. Nothing is
written before the settings, data, model, roles and adapter have been checked. Several
processes (`accelerate launch` or `torchrun`) split the questions round-robin, each appending to
its own shard file; the main process merges the shards into samples.jsonl in question order and
writes the summary.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

from diffmas.backbone import DEFAULT_MODEL
from diffmas.errors import DiffmasError
from diffmas.jsonl import read_records
from diffmas.methods import MethodConfig
from diffmas.provenance import config_diff, dataclass_defaults, git_commit, package_versions

SAMPLES = "samples.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
# Settings that change how fast a run goes, never its results (batched == one-by-one is tested).
RUNTIME_ONLY = ("batch_size",)
# Settings a rerun may change: a larger scope grows the run, a smaller one reports on part of it.
SCOPE = ("limit", "samples")
# Compared by what the model was loaded in ("auto" depends on the machine, the model and, since bf16
# became the default on CPUs with bf16 instructions, the version): see _check_dtype.
RESOLVED = ("dtype",)


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
        if self.limit is not None and self.limit < 0:
            raise DiffmasError(f"limit must be >= 0 (0: no questions) or None (all questions), got {self.limit}")
        if self.samples < 1:
            raise DiffmasError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise DiffmasError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.samples > 1 and self.method_config.decode.greedy:
            raise DiffmasError(
                f"{self.samples} samples with greedy decoding would repeat one answer; "
                "set a temperature > 0 (e.g. --temperature 0.6 --top-p 0.95)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- run directory


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _saved_config(out: Path) -> dict | None:
    """config.json of the run in `out` (None for a new run); read only."""
    path = out / CONFIG
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunConflictError(f"{path} is not valid JSON ({exc}); restore it or choose another --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("eval"), dict):
        raise RunConflictError(
            f"{path} holds no 'eval' settings; it was not written by `diffmas eval`, choose another --out"
        )
    return saved


def _run_scope(out: Path, config: EvalConfig, saved: dict | None) -> EvalConfig:
    """The run's settings after this call: the saved ones, grown to this call's limit and samples.

    Any other difference is a RunConflictError; a smaller limit or fewer samples leave the run as it is.
    """
    if saved is None:
        return config
    ignored = RUNTIME_ONLY + SCOPE + RESOLVED
    old = {k: v for k, v in saved["eval"].items() if k not in ignored}
    new = {k: v for k, v in config.to_dict().items() if k not in ignored}
    diff = config_diff(old, new, dataclass_defaults(EvalConfig))
    if diff:
        raise RunConflictError(
            f"{out} holds a run with other settings ({'; '.join(diff)}); "
            "resume with the same settings or choose another --out"
        )
    old_limit, old_samples = _saved_scope(saved)
    limit = None if None in (old_limit, config.limit) else max(old_limit, config.limit)
    return replace(config, limit=limit, samples=max(old_samples, config.samples))


def _check_dtype(out: Path, saved: dict | None, dtype: str | None) -> None:
    """A run's records come from one dtype (`dtype`: the loaded model's, None when no record is
    computed). Resuming in another (`--dtype auto` on another machine, or a CPU run from before
    bf16 became the default there) is a RunConflictError naming the dtype to resume with."""
    if saved is None or dtype is None:
        return
    was = _saved_dtype(saved)
    if was is not None and was != dtype:
        raise RunConflictError(
            f"{out} holds answers computed in {was} and this model is loaded in {dtype}; "
            f"resume with --dtype {was} (or choose another --out)"
        )


def _saved_dtype(saved: dict) -> str | None:
    """The dtype a saved run's records were computed in. Recorded since 2026-12-08 (None: no
    record computed yet); before, "auto" was bf16 on a GPU that supports it, fp32 elsewhere."""
    if "dtype" in saved:
        return saved["dtype"]
    import torch

    from diffmas.backbone import resolve_device, resolve_dtype

    dtype = saved["eval"].get("dtype", "auto")
    if dtype != "auto":
        return str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
    device = resolve_device(saved["eval"].get("device", "auto"))  # the one it resumes on, as before
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def _method_dtype(method) -> str | None:
    """The dtype of the model a method runs on (None: no method, so no record is computed)."""
    backbone = getattr(method, "backbone", None) if method is not None else None
    return str(backbone.dtype).removeprefix("torch.") if backbone is not None else None


def _saved_scope(saved: dict) -> tuple:
    return saved["eval"].get("limit"), saved["eval"].get("samples", 1)


def _write_config(out: Path, run: EvalConfig, saved: dict | None, dtype: str | None) -> None:
    """config.json for a new run, or a grown one (its limit/samples updated, provenance kept), with
    the dtype its records are computed in (`dtype`: the loaded model's; "auto" alone does not say;
    None when this call computes no record, and then the saved one stays)."""
    if saved is None:
        payload = {"versions": package_versions(), "git_commit": git_commit(), "dtype": dtype}
    else:
        payload = {**saved, "dtype": dtype} if dtype is not None else saved
        if payload == saved and _saved_scope(saved) == _scope(run):
            return
    _write_json_atomic(out / CONFIG, {**payload, "eval": run.to_dict()})


def _scope(config: EvalConfig) -> tuple:
    return config.limit, config.samples


def has_work(config: EvalConfig, out: str | Path) -> bool:
    """Whether `evaluate(config, out)` may have records to compute, from the files alone (no data
    read): false for a finished run at least as large. Sweeps load the model only when true."""
    out = Path(out)
    saved = _saved_config(out)
    if saved is None or not (out / SUMMARY).is_file():
        return True
    limit, samples = _saved_scope(saved)
    return config.samples > samples or (limit is not None and (config.limit is None or config.limit > limit))


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


def evaluate(
    config: EvalConfig,
    out: str | Path,
    *,
    method=None,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    inspect: int = 0,
) -> dict:
    """Run (or resume, or grow) an evaluation into `out`; return the summary of what `config` asks for.

    method: an already built Method (tests, sweeps); built from the config when None.
    inspect: also inspect the first N questions (sample 0) into out/inspection/ (diffmas.inspect);
        like the records, questions already inspected are kept on a rerun.

    Everything that can be checked is checked before `out` is touched (data, settings against a
    saved run, and, when there is work to do, model, roles, device and adapter by building the
    method), so a failed command leaves `out` as it was and the corrected command just runs.
    A larger --limit or more --samples than the saved run adds only the missing records; a smaller
    one reports on that part of the run and changes nothing on disk (see docs/design.md).
    """
    from diffmas.evaluate.metrics import summarize
    from diffmas.evaluate.records import run_examples
    from diffmas.tasks import get_task

    if inspect < 0:
        raise DiffmasError(f"inspect must be >= 0 (the number of questions to inspect), got {inspect}")
    rank, world, barrier = _distributed()
    out = Path(out)
    saved = _saved_config(out)
    run = _run_scope(out, config, saved)
    # Data first: a missing file or bad row fails before anything is written.
    task = get_task(config.task)
    examples = _load(task, config)
    sandbox = _sandbox_isolation(task)  # code tasks: refused before generating when too weak
    in_run = examples if _scope(run) == _scope(config) else _load(task, run)
    # whether this call spans the whole run (then it writes summary.json and merges shards)
    whole = [ex.id for ex in in_run] == [ex.id for ex in examples] and run.samples == config.samples
    records = _finished(out)
    _check_belongs(out, records, in_run, run)
    done = {(r["id"], r["sample"]) for r in records}
    todo = [ex for ex in examples[rank::world] if any((ex.id, k) not in done for k in range(config.samples))]
    if todo and method is None:
        method = build_method(config)  # model, roles, device, adapter: all fail here, before any write
    dtype = _method_dtype(method) if todo else None
    _check_dtype(out, saved, dtype)
    # From here on `out` is written.
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _write_config(out, run, saved, dtype)
        if sandbox:
            _record_sandbox(out / CONFIG, sandbox)
    shard = _shard_path(out, rank) if world > 1 else out / SAMPLES
    read_records(shard, repair=True)  # a line cut short by a kill is cut off before appending
    if world == 1:
        shard.touch()  # a run of no questions (--limit 0) still has its samples.jsonl
    if todo:
        shard.parent.mkdir(parents=True, exist_ok=True)
        with open(shard, "a") as sink, _progress(progress and rank == 0, len(todo) * config.samples) as advance:
            for record in run_examples(
                method,
                task,
                todo,
                config.batch_size,
                config.samples,
                config.seed,
                option_likelihood=config.option_likelihood,
                skip=done,
            ):
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                advance()
                if on_record:
                    on_record(record)
    barrier()
    if rank != 0:
        return {}
    in_scope = _in_scope(out, examples, config.samples)
    summary = {
        "task": config.task,
        "method": config.method,
        "latent_steps": config.method_config.latent_steps,
        "dtype": dtype or (saved or {}).get("dtype"),  # as config.json records it (None: unknown)
        **summarize(in_scope),
    }
    if sandbox:
        summary["sandbox"] = sandbox
    if whole:
        _merge(out, in_scope)
        _write_json_atomic(out / SUMMARY, summary)
    if inspect > 0:
        _inspect(config, out, task, examples[:inspect], in_scope, method)
    if not whole:
        warnings.warn(
            f"{out} holds a larger run ({_describe(run)}); this summary covers the "
            f"{_describe(config)} asked for, and the run's files are left as they are",
            SubsetWarning,
            stacklevel=2,
        )
    return summary


def _inspect(config: EvalConfig, out: Path, task, examples, records, method) -> None:
    """`--inspect N`: the run's first N questions under the probes, each with its sample-0 seed."""
    from diffmas.evaluate.records import sample_seed
    from diffmas.inspect.runs import inspect_run_examples, is_inspected

    todo = [ex for ex in examples if not is_inspected(out, ex.id)]
    if todo:
        method = method or build_method(config)
        seeds = [sample_seed(config.seed, ex.id, 0) for ex in todo]
        inspect_run_examples(method, task, todo, out, seeds, records)


class SubsetWarning(UserWarning):
    """A rerun asked for part of a larger run: its summary covers that part only."""


def _describe(config: EvalConfig) -> str:
    limit = "all questions" if config.limit is None else f"limit {config.limit}"
    return f"{limit}, {config.samples} sample{'s' if config.samples != 1 else ''} each"


def _load(task, config: EvalConfig) -> list:
    return task.load(config.split, data_dir=config.data_dir, limit=config.limit, seed=config.subset_seed)


def _finished(out: Path) -> list[dict]:
    """Records already written for this run: the merged file and every shard file (read only)."""
    records = read_records(out / SAMPLES)
    for path in sorted((out / "shards").glob("rank*.jsonl")) if (out / "shards").is_dir() else ():
        records += read_records(path)
    return records


def _check_belongs(out: Path, records: list[dict], examples, run: EvalConfig) -> None:
    """Every saved record is one of the run's (question, sample) pairs; otherwise the data or the
    subset draw changed under the run, and growing it would mix two selections."""
    ids = {ex.id for ex in examples}
    foreign = [r for r in records if r.get("id") not in ids or not 0 <= r.get("sample", -1) < run.samples]
    if foreign:
        draw = (
            " or the --subset-seed draw (diffmas 0.1 drew subsets differently)" if run.subset_seed is not None else ""
        )
        raise RunConflictError(
            f"{out} holds {len(foreign)} records outside this run's questions (first: id {foreign[0].get('id')!r}, "
            f"sample {foreign[0].get('sample')!r}): the data file{draw} changed since the run was written; "
            "finish it with the version and data that wrote it, or choose another --out"
        )


def _in_scope(out: Path, examples, samples: int) -> list[dict]:
    """One record per asked (id, sample), in question order."""
    by_key = {}
    for r in _finished(out):
        by_key.setdefault((r["id"], r["sample"]), r)
    ordered = [by_key[(ex.id, k)] for ex in examples for k in range(samples) if (ex.id, k) in by_key]
    if len(ordered) != len(examples) * samples:
        missing = len(examples) * samples - len(ordered)
        raise DiffmasError(f"{missing} records are missing from {out}; rerun the same command to finish")
    return ordered


def _merge(out: Path, ordered: list[dict]) -> None:
    """Fold the shards of a multi-process run into samples.jsonl, in question order."""
    if not (out / "shards").is_dir():
        return
    tmp = out / f".{SAMPLES}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    os.replace(tmp, out / SAMPLES)
    for path in (out / "shards").glob("rank*.jsonl"):
        path.unlink()
    (out / "shards").rmdir()


def build_method(config: EvalConfig):
    """Backbone (+ adapter) + topology + method, from the config."""
    from diffmas.roles import build_topology
    from diffmas.tasks import get_task

    topology = build_topology(config.topology, config.n_agents, config.roles, get_task(config.task))
    return load_method(
        config.method,
        topology,
        config.method_config,
        model=config.model,
        dtype=config.dtype,
        device=config.device,
        adapter=config.adapter,
    )


def load_method(
    name: str,
    topology,
    method_config: MethodConfig,
    *,
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    adapter: str | Path | None = None,
):
    """A method on a freshly loaded backbone, under a trained adapter when given. The adapter's
    files are checked before the model is loaded, its fit to the model after."""
    from diffmas.backbone import load_backbone
    from diffmas.methods import check_budget, get_method
    from diffmas.train.adapters import attach_checked, check_adapter_dir

    check_budget(name, method_config)
    if adapter:
        check_adapter_dir(adapter)
    backbone = load_backbone(model, dtype=dtype, device=device)
    adapters = attach_checked(backbone, adapter, topology) if adapter else None
    return get_method(name, backbone, topology, method_config, adapters)


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
        raise DiffmasError(
            f"WORLD_SIZE is {world} but accelerate set up {state.num_processes} process(es) "
            f"({state.distributed_type}); launch with torchrun or `accelerate launch`"
        )
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
