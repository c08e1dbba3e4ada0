"""Options shared by subcommands, and the one place that turns them into typed configs."""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from diffmas.backbone import DEFAULT_MODEL
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig, MethodError, list_methods

if TYPE_CHECKING:
    from diffmas.evaluate.runner import EvalConfig

console = Console()
err_console = Console(stderr=True)

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", help="Embedded name, local model directory or hub id.")
DtypeOpt = typer.Option(
    "auto",
    help="auto (bf16 on a GPU, and on a CPU with bf16 instructions except for training; else fp32), "
    "float32, bfloat16, float16.",
)
DeviceOpt = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ...")
LatentStepsOpt = typer.Option(10, "--latent-steps", "-m", help="Latent steps per upstream agent.")
TopologyOpt = typer.Option(
    "sequential", help="sequential, hierarchical or chain (each agent reads only the one before it)."
)
AgentsOpt = typer.Option(None, "--agents", help="Number of agents including the final one.")
RolesOpt = typer.Option(None, "--roles", help="YAML/JSON file with {kind, roles: [{name, system, user}]}.")
MaxNewOpt = typer.Option(256, "--max-new-tokens", help="Decode budget of the final agent.")
UpstreamNewOpt = typer.Option(256, "--upstream-max-new-tokens", help="Decode budget of text_mas upstream agents.")
TemperatureOpt = typer.Option(0.0, help="0 = greedy.")
UpstreamTemperatureOpt = typer.Option(
    None,
    "--upstream-temperature",
    help="text_mas upstream agents (default: --temperature); 0 = greedy, shared by the k samples of a question.",
)
TopPOpt = typer.Option(1.0, "--top-p")
ChatKwargsOpt = typer.Option(
    None,
    "--chat-template-kwargs",
    help="JSON object for the chat template, e.g. '{\"enable_thinking\": false}' (Qwen3).",
)
SeedOpt = typer.Option(0)
ReadsOpt = typer.Option(
    "all",
    "--reads",
    help="What each agent sees of earlier agents: all (the whole "
    "trace), latent (only their latent steps) or none (no communication).",
)
TracePolicyOpt = typer.Option(
    None,
    "--trace-policy",
    help="Bound each upstream agent's trace entries: prompt-drop, random, window, merge or quantize "
    "(with --trace-budget; latent_mas, diffmas).",
)
TraceBudgetOpt = typer.Option(
    None,
    "--trace-budget",
    help="Per upstream agent (or per trace, see --trace-scope): prompt states kept (32), a share of "
    "its bytes (25%), bytes (64KiB), or int8/int4 for quantize.",
)
TraceScopeOpt = typer.Option(
    "agent",
    "--trace-scope",
    help="What --trace-budget bounds: each upstream agent's entries (agent) or all upstream entries "
    "together (trace; prompt states or bytes).",
)
CompileOpt = typer.Option(
    "off",
    "--compile",
    help="Compile the one-position inference steps (decode, latent) on static, bucketed trace buffers: off, "
    "auto (CUDA graphs on a GPU, inductor on CPU), inductor, reduce-overhead, cudagraphs, aot_eager, eager.",
)

# Options of the commands that write run directories (eval, sweep); `eval_config` turns them into an EvalConfig.
SplitOpt = typer.Option("test", help="Dataset split.")
LimitOpt = typer.Option(None, help="Number of questions (default: all).")
SubsetSeedOpt = typer.Option(None, "--subset-seed", help="With --limit: a random subset.")
SamplesOpt = typer.Option(1, "--samples", "-k", help="Samples per question (needs temperature > 0).")
BatchSizeOpt = typer.Option(8, "--batch-size")
AdapterOpt = typer.Option(None, "--adapter", help="Trained adapter directory (diffmas).")
OptionLikelihoodOpt = typer.Option(True, help="Multiple choice: also rank options by likelihood.")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder with the task's data files.")
EvalMaxNewOpt = typer.Option(512, "--max-new-tokens", help="Decode budget of the final agent.")
AllowWeakSandboxOpt = typer.Option(
    False,
    "--allow-weak-sandbox",
    help="Code tasks: run generated code even where the sandbox is weaker than 'kernel' isolation "
    "(no bubblewrap, namespaces or seccomp; see `diffmas env`).",
)


def allow_weak_sandbox(allowed: bool) -> None:
    """--allow-weak-sandbox: lower the isolation that code scoring requires in this process."""
    if allowed:
        from diffmas.scoring.sandbox import require_isolation

        require_isolation("weak")


def check_methods(names: list[str]) -> None:
    """Fail before loading a model when a method name is wrong."""
    import difflib

    for name in names:
        if name not in list_methods():
            close = difflib.get_close_matches(name, list_methods(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MethodError(f"unknown method {name!r}{hint}; choose one of {', '.join(list_methods())}")


def parse_chat_kwargs(text: Optional[str]) -> dict:
    """--chat-template-kwargs: a JSON object, or one clear error."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MethodError(f"--chat-template-kwargs is not valid JSON ({exc.msg}): {text!r}") from exc
    if not isinstance(value, dict):
        raise MethodError(f"--chat-template-kwargs must be a JSON object, got {text!r}")
    return value


def build_config(
    latent_steps: int,
    max_new_tokens: int,
    upstream_max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    upstream_temperature: Optional[float] = None,
    chat_template_kwargs: Optional[str] = None,
    reads: str = "all",
    trace_policy: Optional[str] = None,
    trace_budget: Optional[str] = None,
    trace_scope: str = "agent",
    compile: str = "off",
) -> MethodConfig:
    from diffmas.budget import parse_budget

    return MethodConfig(
        latent_steps=latent_steps,
        decode=DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
        upstream_max_new_tokens=upstream_max_new_tokens,
        upstream_temperature=upstream_temperature,
        chat_kwargs=parse_chat_kwargs(chat_template_kwargs),
        reads=reads,
        trace_budget=parse_budget(trace_policy, trace_budget, seed, trace_scope),
        compile=compile,
    )


def eval_options(ctx: typer.Context, *skip: str) -> dict:
    """The command's values of `eval_config`'s parameters, by name, less `skip` (click keeps every
    parsed option in ctx.params: one list of names, `eval_config`'s, for eval and sweep)."""
    names = set(inspect.signature(eval_config).parameters) - set(skip)
    return {k: v for k, v in ctx.params.items() if k in names}


def eval_config(
    *,
    task: str,
    method: str,
    split: str,
    model: str,
    limit: Optional[int],
    subset_seed: Optional[int],
    samples: int,
    seed: int,
    batch_size: int,
    topology: str,
    agents: Optional[int],
    roles: Optional[Path],
    adapter: Optional[Path],
    option_likelihood: bool,
    data_dir: Optional[Path],
    dtype: str,
    device: str,
    latent_steps: int,
    max_new_tokens: int,
    upstream_max_new_tokens: int,
    temperature: float,
    top_p: float,
    upstream_temperature: Optional[float] = None,
    chat_template_kwargs: Optional[str] = None,
    reads: str = "all",
    trace_policy: Optional[str] = None,
    trace_budget: Optional[str] = None,
    trace_scope: str = "agent",
    compile: str = "off",
) -> EvalConfig:
    """The EvalConfig of one run, from the eval options (named as the CLI parameters)."""
    from diffmas.evaluate.runner import EvalConfig

    return EvalConfig(
        task=task,
        method=method,
        split=split,
        model=model,
        limit=limit,
        subset_seed=subset_seed,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        topology=topology,
        n_agents=agents,
        roles=str(roles) if roles else None,
        adapter=str(adapter) if adapter else None,
        option_likelihood=option_likelihood,
        data_dir=str(data_dir) if data_dir else None,
        dtype=dtype,
        device=device,
        method_config=build_config(
            latent_steps,
            max_new_tokens,
            upstream_max_new_tokens,
            temperature,
            top_p,
            seed,
            upstream_temperature,
            chat_template_kwargs,
            reads,
            trace_policy,
            trace_budget,
            trace_scope,
            compile,
        ),
    )


@contextlib.contextmanager
def warning_lines(category: type[Warning]):
    """Warnings of `category` raised inside print as one `warning: ...` line on stderr, when they
    happen and without Python's source-line dump; other warnings are shown as usual."""
    show = warnings.showwarning

    def one_line(message, kind, filename, lineno, file=None, line=None):
        if issubclass(kind, category):
            err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            show(message, kind, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", category)
        warnings.showwarning = one_line
        yield


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def cost_table(result) -> Table:
    """Per-agent tokens and time, plus trace size and peak memory, for one RunResult."""
    table = Table(title=f"cost ({result.method})", title_justify="left")
    for col in ("agent", "prompt tok", "latent steps", "generated tok", "wall s"):
        table.add_column(col, justify="left" if col == "agent" else "right")
    for a in result.agents:
        table.add_row(
            a.role, str(a.n_prompt_tokens), str(a.n_latent_steps), str(a.n_generated_tokens), f"{a.wall_s:.2f}"
        )
    tot = result.n_tokens
    table.add_row(
        "[b]total",
        str(tot["prompt"]),
        str(tot["latent"]),
        str(tot["generated"]),
        f"{result.wall_s:.2f}",
        end_section=True,
    )
    table.caption = (
        f"trace: {result.trace_len} positions, {mib(result.trace_bytes)} KV  |  "
        f"peak memory: {mib(result.peak_memory_bytes)}"
    )
    return table


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x, fmt: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"


def _mib_or_dash(n_bytes) -> str:
    return "—" if n_bytes is None else mib(int(n_bytes))


def summary_table(summary: dict, out) -> Table:
    """The headline numbers of one eval run (summary.json). A run without an answered record
    (--limit 0, or every question skipped) has no costs: those rows show "—"."""
    table = Table(
        title=f"{summary['task']} / {summary['method']} (m={summary['latent_steps']}) -> {out}",
        title_justify="left",
        show_header=False,
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    tok = summary["tokens"]["per_question"] or {}
    latency = summary["latency_s"] or {}
    rows = [
        ("questions (records, skipped)", f"{summary['n_questions']} ({summary['n_records']}, {summary['n_skipped']})"),
        ("dtype", summary.get("dtype") or "—"),
        ("accuracy [95% CI]", _pct(summary["accuracy"]) + _ci(summary["accuracy_ci"])),
    ]
    if summary.get("accuracy_strict") is not None:  # multiple choice: lm-eval's strict-match beside it
        rows.append(
            ("accuracy, strict extraction", _pct(summary["accuracy_strict"]) + _ci(summary["accuracy_strict_ci"]))
        )
    if summary.get("n_option_questions"):
        rows += [
            ("option likelihood acc", _pct(summary["option_accuracy"]) + _ci(summary["option_accuracy_ci"])),
            ("option likelihood acc (norm)", _pct(summary["option_accuracy_norm"])),
            ("chance", _pct(summary["chance"])),
        ]
    if summary.get("majority_vote_accuracy") is not None:
        rows += [
            ("majority vote acc", _pct(summary["majority_vote_accuracy"])),
            ("self-consistency", _pct(summary["self_consistency"])),
        ]
    rows += [
        (
            "perplexity / top-25 entropy",
            f"{_num(summary['perplexity'], '.2f')} / {_num(summary['mean_entropy'], '.2f')}",
        ),
        (
            "tokens / question (prompt, latent, gen)",
            ", ".join(_num(tok.get(kind), ".0f") for kind in ("prompt", "latent", "generated")),
        ),
        ("seconds / question", _num(summary["seconds_per_question"], ".2f")),
        *(
            [("option scoring s / question (apart)", _num(summary["option_seconds_per_question"], ".2f"))]
            if summary.get("option_seconds_per_question") is not None
            else []
        ),
        ("latency p50 / p95 (batch)", f"{_num(latency.get('p50'), '.2f')} / {_num(latency.get('p95'), '.2f', ' s')}"),
        ("trace (mean)", _mib_or_dash((summary["trace_bytes"] or {}).get("mean"))),
        ("peak memory", _mib_or_dash(summary["peak_memory_bytes"])),
    ]
    if summary.get("sandbox"):  # code tasks: the isolation generated code ran under
        rows.append(("code sandbox", summary["sandbox"]["level"]))
    for name, value in rows:
        table.add_row(name, value)
    return table


# CLI option -> the TrainConfig field an adapter records it as (diffmas.train.adapters.TRAINED_SETTINGS)
_ADAPTER_OPTIONS = {
    "latent_steps": "latent_steps",
    "topology": "topology",
    "agents": "n_agents",
    "roles": "roles",
    "chat_template_kwargs": "chat_kwargs",
    "reads": "reads",
}


def trained_agent_settings(
    ctx: typer.Context,
    adapter: Optional[Path],
    latent_steps: int,
    topology: str,
    agents: Optional[int],
    roles: Optional[Path],
    chat_template_kwargs: Optional[str],
    reads: str,
) -> dict:
    """The agent settings of `run`, `serve` and `inspect` (keys named as the options), the adapter's trained
    ones where the command line leaves them unset (see `with_adapter_settings`)."""
    options = {
        "adapter": adapter,
        "latent_steps": latent_steps,
        "topology": topology,
        "agents": agents,
        "roles": roles,
        "chat_template_kwargs": chat_template_kwargs,
        "reads": reads,
    }
    return with_adapter_settings(ctx, options)


def with_adapter_settings(ctx: typer.Context, options: dict) -> dict:
    """The command's options with the adapter's trained settings for those not set on the command
    line, and a warning for each set to another value than the adapter was trained with."""
    if not options.get("adapter"):
        return options
    import warnings

    from diffmas.train.adapters import AdapterSettingsWarning, check_adapter_dir, reconcile_settings, trained_settings

    names = [o for o in _ADAPTER_OPTIONS if o in options]

    def as_field(option: str, value):
        if option == "chat_template_kwargs":
            return json.loads(value) if value else {}
        return str(value) if option == "roles" and value is not None else value

    current = {_ADAPTER_OPTIONS[o]: as_field(o, options[o]) for o in names}
    given = {
        _ADAPTER_OPTIONS[o]: current[_ADAPTER_OPTIONS[o]]
        for o in names
        if getattr(ctx.get_parameter_source(o), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
    }
    # check_adapter_dir: a damaged adapter is one clear line here, before its settings are read
    trained = trained_settings(check_adapter_dir(options["adapter"]), list(current))
    settings, notes = reconcile_settings(trained, given, current, list(current))
    for note in notes:
        warnings.warn(f"{options['adapter']}: {note}", AdapterSettingsWarning, stacklevel=2)
    out = dict(options)
    for o in names:
        value = settings[_ADAPTER_OPTIONS[o]]
        if o == "chat_template_kwargs":
            value = json.dumps(value) if value else None
        elif o == "roles" and value is not None:
            value = Path(value)
        out[o] = value
    return out
