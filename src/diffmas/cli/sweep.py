"""`diffmas sweep`: one method on one task at several latent step counts m, one run directory each.

    OUT/m0, OUT/m5, ...   a `diffmas eval` run directory per m (each resumable on its own)
    OUT/report/           report.md, report.html and plots over all of them

The backbone is loaded once and shared by every m: the method reads `config.latent_steps` at each
batch and keeps nothing derived from it, so swapping its config between runs is all a new m needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffmas.cli import app
from diffmas.cli import common as c
from diffmas.errors import DiffmasError


def parse_steps(text: str, option: str = "--latent-steps", minimum: int = 0) -> list[int]:
    """'0,5,10' -> [0, 5, 10]: distinct integers >= minimum, in the given order (the first is the baseline)."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DiffmasError(f"{option} takes comma-separated integers such as 0,5,10, got {text!r}") from None
    if not steps or min(steps) < minimum or len(set(steps)) != len(steps):
        raise DiffmasError(f"{option} needs distinct integers >= {minimum} such as 0,5,10, got {text!r}")
    return steps


def check_latent_method(name: str) -> None:
    """Only methods with latent steps (latent_mas and its subclasses) change with m."""
    from diffmas.methods import METHODS, LatentMAS

    latent = [n for n, cls in METHODS.items() if issubclass(cls, LatentMAS)]
    if name not in latent:
        raise DiffmasError(
            f"method {name!r} does not use latent steps, so a sweep over m would repeat one run; "
            f"choose one of {', '.join(latent)}"
        )


@app.command()
def sweep(
    ctx: typer.Context,
    task: str = typer.Option(..., "--task", help="Task name (diffmas tasks) or jsonl:PATH?..."),
    method: str = typer.Option("latent_mas", help="latent_mas or diffmas."),
    latent_steps: str = typer.Option(
        "0,5,10,20,40", "--latent-steps", "-m", help="Comma-separated latent step counts; the first is the baseline."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for one run directory per m (m0, m5, ...) and report/."),
    agents_sweep: Optional[str] = typer.Option(
        None, "--agents-sweep", help="Also sweep the number of agents, e.g. 2,3,4 (runs a{n}-m{m})."
    ),
    split: str = c.SplitOpt,
    limit: Optional[int] = c.LimitOpt,
    subset_seed: Optional[int] = c.SubsetSeedOpt,
    samples: int = c.SamplesOpt,
    batch_size: int = c.BatchSizeOpt,
    adapter: Optional[Path] = c.AdapterOpt,
    option_likelihood: bool = c.OptionLikelihoodOpt,
    data_dir: Optional[Path] = c.DataDirOpt,
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
    allow_weak_sandbox: bool = c.AllowWeakSandboxOpt,
) -> None:
    """Evaluate a method at several latent step counts (model loaded once); compare them and write a report."""
    c.allow_weak_sandbox(allow_weak_sandbox)
    # Every option but the sweep's own m goes into each run's EvalConfig (agents: unless swept).
    options = c.eval_options(ctx, "latent_steps")
    from diffmas.evaluate import runner
    from diffmas.roles import build_topology
    from diffmas.tasks import get_task

    steps = parse_steps(latent_steps)
    if agents_sweep and roles:
        raise DiffmasError("--agents-sweep builds the default roles; it cannot be combined with --roles")
    c.check_methods([method])
    check_latent_method(method)
    # an adapter's trained topology, roles, chat kwargs, reads and (unless swept) agents; m is swept
    options = c.with_adapter_settings(ctx, options)
    agents = options.pop("agents")
    counts = parse_steps(agents_sweep, "--agents-sweep", minimum=1) if agents_sweep else [agents]
    grid = [(n, m) for n in counts for m in steps]
    configs = [c.eval_config(**options, agents=n, latent_steps=m) for n, m in grid]
    run_dirs = [out / (f"a{n}-m{m}" if agents_sweep else f"m{m}") for n, m in grid]
    built = None  # the method, built on the first run that still has work
    summaries = []
    for config, run_dir in zip(configs, run_dirs):
        if built is None and runner.has_work(config, run_dir):
            built = runner.build_method(config)
        if built is not None:
            # same backbone; this run's m and agents (methods read both at every batch)
            built.config = config.method_config
            built.topology = build_topology(config.topology, config.n_agents, config.roles, get_task(config.task))
        with c.warning_lines(runner.SubsetWarning):
            summaries.append(runner.evaluate(config, run_dir, method=built))
    if not all(summaries):  # not the main process of a sharded run
        return
    _print_and_report(run_dirs, summaries, out / "report")


def _print_and_report(run_dirs: list[Path], summaries: list[dict], report_dir: Path) -> None:
    from diffmas.cli.compare import compare, load_runs
    from diffmas.evaluate.report import write_report

    if len(run_dirs) > 1:
        compare(run_dirs, baseline=0, as_json=False)  # the `diffmas compare` table
    else:
        c.console.print(c.summary_table(summaries[0], run_dirs[0]))
    md_path = write_report(load_runs(run_dirs), report_dir)
    c.console.print(f"wrote {md_path} and {md_path.with_suffix('.html')}")
