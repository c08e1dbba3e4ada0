"""`diffmas eval`: one method on one task into a resumable run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from diffmas.cli import app
from diffmas.cli import common as c


@app.command("eval")
def eval_(
    ctx: typer.Context,
    task: str = typer.Option(..., "--task", help="Task name (diffmas tasks) or jsonl:PATH?..."),
    method: str = typer.Option("latent_mas", help="single, text_mas, latent_mas or diffmas."),
    out: Path = typer.Option(..., "--out", help="Run directory; rerun the same command to resume."),
    split: str = c.SplitOpt,
    limit: Optional[int] = c.LimitOpt,
    subset_seed: Optional[int] = c.SubsetSeedOpt,
    samples: int = c.SamplesOpt,
    batch_size: int = c.BatchSizeOpt,
    adapter: Optional[Path] = c.AdapterOpt,
    option_likelihood: bool = c.OptionLikelihoodOpt,
    data_dir: Optional[Path] = c.DataDirOpt,
    latent_steps: int = c.LatentStepsOpt,
    model: str = c.ModelOpt,
    topology: str = c.TopologyOpt,
    agents: Optional[int] = c.AgentsOpt,
    roles: Optional[Path] = c.RolesOpt,
    max_new_tokens: int = c.EvalMaxNewOpt,
    upstream_max_new_tokens: int = c.UpstreamNewOpt,
    temperature: float = c.TemperatureOpt,
    upstream_temperature: Optional[float] = c.UpstreamTemperatureOpt,
    top_p: float = c.TopPOpt,
    chat_template_kwargs: Optional[str] = c.ChatKwargsOpt,
    reads: str = c.ReadsOpt,
    trace_policy: Optional[str] = c.TracePolicyOpt,
    trace_budget: Optional[str] = c.TraceBudgetOpt,
    trace_scope: str = c.TraceScopeOpt,
    compile: str = c.CompileOpt,
    seed: int = c.SeedOpt,
    dtype: str = c.DtypeOpt,
    device: str = c.DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print summary.json instead of a table."),
    allow_weak_sandbox: bool = c.AllowWeakSandboxOpt,
    inspect: int = typer.Option(
        0, "--inspect", help="Also inspect the first N questions into OUT/inspection/ (see `diffmas inspect`)."
    ),
) -> None:
    """Evaluate a method on a task; writes config.json, samples.jsonl and summary.json."""
    c.allow_weak_sandbox(allow_weak_sandbox)
    options = c.eval_options(ctx)
    from diffmas.evaluate.runner import SubsetWarning, evaluate

    c.check_methods([method])
    options = c.with_adapter_settings(ctx, options)  # trained latent steps, topology, roles, chat kwargs, reads
    with c.warning_lines(SubsetWarning):  # a smaller --limit than the run in --out: which part is reported
        summary = evaluate(c.eval_config(**options), out, inspect=inspect)
    if not summary:  # not the main process of a sharded run
        return
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        c.console.print(c.summary_table(summary, out))
