"""`diffmas demo`: a few GSM8K test questions through single, text_mas and latent_mas."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffmas.cli import app
from diffmas.cli import common as c

DEMO_METHODS = "single,text_mas,latent_mas"


@app.command()
def demo(
    n: int = typer.Option(5, "--n", help="Number of GSM8K test questions (the first n)."),
    methods: str = typer.Option(DEMO_METHODS, help="Comma-separated methods to compare."),
    model: str = c.ModelOpt,
    latent_steps: int = c.LatentStepsOpt,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    upstream_max_new_tokens: int = typer.Option(96, "--upstream-max-new-tokens"),
    batch_size: int = typer.Option(5, "--batch-size"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with gsm8k_test.jsonl."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the records as JSON here."),
    dtype: str = c.DtypeOpt,
    device: str = c.DeviceOpt,
) -> None:
    """Answer n GSM8K questions with each method; print answers, correctness, tokens and time."""
    from diffmas.backbone import load_backbone
    from diffmas.evaluate.records import run_examples
    from diffmas.methods import get_method
    from diffmas.roles import default_topology
    from diffmas.tasks import get_task

    names = [m.strip() for m in methods.split(",") if m.strip()]
    c.check_methods(names)
    task = get_task("gsm8k")
    examples = task.load("test", data_dir=data_dir, limit=n)
    config = c.build_config(latent_steps, max_new_tokens, upstream_max_new_tokens, 0.0, 1.0, 0)
    backbone = load_backbone(model, dtype=dtype, device=device)
    records: dict[str, list[dict]] = {}
    wall: dict[str, float] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=c.console
    ) as progress:
        for name in names:
            bar = progress.add_task(f"{name:<10}", total=len(examples))
            method = get_method(name, backbone, default_topology(), config)
            start = time.perf_counter()
            records[name] = []
            for record in run_examples(method, task, examples, batch_size=batch_size):
                records[name].append(record)
                progress.advance(bar)
            wall[name] = time.perf_counter() - start
    c.console.print(_answers_table(examples, records, names))
    c.console.print(_summary_table(records, wall, names))
    if out is not None:
        out.write_text(json.dumps({"model": model, "config": config.to_dict(), "records": records}, indent=1))


def _answers_table(examples, records, names) -> Table:
    table = Table(title="GSM8K answers (✓ correct)", title_justify="left")
    table.add_column("id")
    table.add_column("gold", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for i, ex in enumerate(examples):
        cells = []
        for name in names:
            rec = records[name][i]
            mark = "[green]✓[/green]" if rec["correct"] else "[red]✗[/red]"
            cells.append(f"{rec['extracted'] or '—'} {mark}")
        table.add_row(ex.id, ex.answer, *cells)
    return table


def _summary_table(records, wall, names) -> Table:
    table = Table(title="per method (totals over questions)", title_justify="left")
    for col in (
        "method",
        "correct",
        "prompt tok",
        "latent steps",
        "generated tok",
        "wall s",
        "trace KiB/q",
        "peak mem",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name in names:
        recs = [r for r in records[name] if r["status"] == "ok"]
        tot = {k: sum(r["n_tokens"][k] for r in recs) for k in ("prompt", "latent", "generated")}
        trace_kib = sum(r["trace_bytes"] for r in recs) / max(len(recs), 1) / 1024
        peak = max((r["peak_memory_bytes"] for r in recs), default=0)
        table.add_row(
            name,
            f"{sum(r['correct'] for r in recs)}/{len(records[name])}",
            str(tot["prompt"]),
            str(tot["latent"]),
            str(tot["generated"]),
            f"{wall[name]:.1f}",
            f"{trace_kib:.0f}",
            c.mib(peak),
        )
    return table
