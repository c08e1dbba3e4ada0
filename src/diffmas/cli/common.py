"""Options shared by subcommands, and the one place that turns them into typed configs."""

from __future__ import annotations

import json
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
DtypeOpt = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
DeviceOpt = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ...")
LatentStepsOpt = typer.Option(10, "--latent-steps", "-m", help="Latent steps per upstream agent.")
TopologyOpt = typer.Option("sequential", help="sequential or hierarchical.")
AgentsOpt = typer.Option(None, "--agents", help="Number of agents including the final one.")
RolesOpt = typer.Option(None, "--roles", help="YAML/JSON file with {kind, roles: [{name, system, user}]}.")
MaxNewOpt = typer.Option(256, "--max-new-tokens", help="Decode budget of the final agent.")
UpstreamNewOpt = typer.Option(256, "--upstream-max-new-tokens", help="Decode budget of text_mas upstream agents.")
TemperatureOpt = typer.Option(0.0, help="0 = greedy.")
UpstreamTemperatureOpt = typer.Option(None, "--upstream-temperature",
                                      help="text_mas upstream agents (default: --temperature); 0 = greedy, "
                                      "shared by the k samples of a question.")
TopPOpt = typer.Option(1.0, "--top-p")
ChatKwargsOpt = typer.Option(None, "--chat-template-kwargs",
                             help='JSON object for the chat template, e.g. \'{"enable_thinking": false}\' (Qwen3).')
SeedOpt = typer.Option(0)

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
    False, "--allow-weak-sandbox",
    help="Code tasks: run generated code even where the sandbox is weaker than 'kernel' isolation "
    "(no bubblewrap, namespaces or seccomp; see `diffmas env`).")


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


def build_config(latent_steps: int, max_new_tokens: int, upstream_max_new_tokens: int,
                 temperature: float, top_p: float, seed: int,
                 upstream_temperature: Optional[float] = None,
                 chat_template_kwargs: Optional[str] = None) -> MethodConfig:
    return MethodConfig(
        latent_steps=latent_steps,
        decode=DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
        upstream_max_new_tokens=upstream_max_new_tokens,
        upstream_temperature=upstream_temperature,
        chat_kwargs=parse_chat_kwargs(chat_template_kwargs),
    )


def eval_config(*, task: str, method: str, split: str, model: str, limit: Optional[int],
                subset_seed: Optional[int], samples: int, seed: int, batch_size: int, topology: str,
                agents: Optional[int], roles: Optional[Path], adapter: Optional[Path], option_likelihood: bool,
                data_dir: Optional[Path], dtype: str, device: str, latent_steps: int, max_new_tokens: int,
                upstream_max_new_tokens: int, temperature: float, top_p: float,
                upstream_temperature: Optional[float] = None,
                chat_template_kwargs: Optional[str] = None) -> EvalConfig:
    """The EvalConfig of one run, from the eval options (named as the CLI parameters)."""
    from diffmas.evaluate.runner import EvalConfig

    return EvalConfig(
        task=task, method=method, split=split, model=model, limit=limit, subset_seed=subset_seed,
        samples=samples, seed=seed, batch_size=batch_size, topology=topology, n_agents=agents,
        roles=str(roles) if roles else None, adapter=str(adapter) if adapter else None,
        option_likelihood=option_likelihood, data_dir=str(data_dir) if data_dir else None,
        dtype=dtype, device=device,
        method_config=build_config(latent_steps, max_new_tokens, upstream_max_new_tokens, temperature, top_p, seed,
                                   upstream_temperature, chat_template_kwargs),
    )


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def cost_table(result) -> Table:
    """Per-agent tokens and time, plus trace size and peak memory, for one RunResult."""
    table = Table(title=f"cost ({result.method})", title_justify="left")
    for col in ("agent", "prompt tok", "latent steps", "generated tok", "wall s"):
        table.add_column(col, justify="left" if col == "agent" else "right")
    for a in result.agents:
        table.add_row(a.role, str(a.n_prompt_tokens), str(a.n_latent_steps), str(a.n_generated_tokens),
                      f"{a.wall_s:.2f}")
    tot = result.n_tokens
    table.add_row("[b]total", str(tot["prompt"]), str(tot["latent"]), str(tot["generated"]),
                  f"{result.wall_s:.2f}", end_section=True)
    table.caption = (f"trace: {result.trace_len} positions, {mib(result.trace_bytes)} KV  |  "
                     f"peak memory: {mib(result.peak_memory_bytes)}")
    return table


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_table(summary: dict, out) -> Table:
    """The headline numbers of one eval run (summary.json)."""
    table = Table(title=f"{summary['task']} / {summary['method']} (m={summary['latent_steps']}) -> {out}",
                  title_justify="left", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    tok = summary["tokens"]["per_question"]
    rows = [
        ("questions (records, skipped)",
         f"{summary['n_questions']} ({summary['n_records']}, {summary['n_skipped']})"),
        ("accuracy [95% CI]", _pct(summary["accuracy"]) + _ci(summary["accuracy_ci"])),
    ]
    if summary.get("n_option_questions"):
        rows += [("option likelihood acc", _pct(summary["option_accuracy"]) + _ci(summary["option_accuracy_ci"])),
                 ("option likelihood acc (norm)", _pct(summary["option_accuracy_norm"])),
                 ("chance", _pct(summary["chance"]))]
    if summary.get("majority_vote_accuracy") is not None:
        rows += [("majority vote acc", _pct(summary["majority_vote_accuracy"])),
                 ("self-consistency", _pct(summary["self_consistency"]))]
    rows += [
        ("perplexity / top-25 entropy", f"{summary['perplexity'] or 0:.2f} / {summary['mean_entropy'] or 0:.2f}"),
        ("tokens / question (prompt, latent, gen)", f"{tok['prompt']:.0f}, {tok['latent']:.0f}, {tok['generated']:.0f}"),
        ("seconds / question", f"{summary['seconds_per_question']:.2f}"),
        ("latency p50 / p95 (batch)", f"{summary['latency_s']['p50']:.2f} / {summary['latency_s']['p95']:.2f} s"),
        ("trace (mean)", mib(int(summary["trace_bytes"]["mean"] or 0))),
        ("peak memory", mib(int(summary["peak_memory_bytes"] or 0))),
    ]
    if summary.get("sandbox"):  # code tasks: the isolation generated code ran under
        rows.append(("code sandbox", summary["sandbox"]["level"]))
    for name, value in rows:
        table.add_row(name, value)
    return table
