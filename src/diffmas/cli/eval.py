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
    task: str = typer.Option(..., "--task", help="Task name (diffmas tasks) or jsonl:PATH?..."),
    method: str = typer.Option("latent_mas", help="single, text_mas, latent_mas or diffmas."),
    out: Path = typer.Option(..., "--out", help="Run directory; rerun the same command to resume."),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, help="Number of questions (default: all)."),
    subset_seed: Optional[int] = typer.Option(None, "--subset-seed", help="With --limit: a random subset."),
    samples: int = typer.Option(1, "--samples", "-k", help="Samples per question (needs temperature > 0)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Trained adapter directory (diffmas)."),
    option_likelihood: bool = typer.Option(True, help="Multiple choice: also rank options by likelihood."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the task's data files."),
    latent_steps: int = c.LatentStepsOpt,
    model: str = c.ModelOpt,
    topology: str = c.TopologyOpt,
    agents: Optional[int] = c.AgentsOpt,
    roles: Optional[Path] = c.RolesOpt,
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    upstream_max_new_tokens: int = c.UpstreamNewOpt,
    temperature: float = c.TemperatureOpt,
    top_p: float = c.TopPOpt,
    seed: int = c.SeedOpt,
    dtype: str = c.DtypeOpt,
    device: str = c.DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print summary.json instead of a table."),
) -> None:
    """Evaluate a method on a task; writes config.json, samples.jsonl and summary.json."""
    from diffmas.evaluate.runner import EvalConfig, evaluate

    c.check_methods([method])
    config = EvalConfig(
        task=task, method=method, split=split, model=model, limit=limit, subset_seed=subset_seed,
        samples=samples, seed=seed, batch_size=batch_size, topology=topology, n_agents=agents,
        roles=str(roles) if roles else None, adapter=str(adapter) if adapter else None,
        option_likelihood=option_likelihood, data_dir=str(data_dir) if data_dir else None,
        dtype=dtype, device=device,
        method_config=c.build_config(latent_steps, max_new_tokens, upstream_max_new_tokens, temperature, top_p, seed),
    )
    summary = evaluate(config, out)
    if not summary:  # not the main process of a sharded run
        return
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        c.console.print(c.summary_table(summary, out))
