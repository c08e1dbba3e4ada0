"""`diffmas report RUN_DIR ... --out DIR`: Markdown + HTML report with plots over finished runs."""

from __future__ import annotations

from pathlib import Path

import typer

from diffmas.cli import app
from diffmas.cli import common as c
from diffmas.cli.compare import load_runs


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories written by `diffmas eval`."),
    out: Path = typer.Option(..., "--out", help="Folder for report.md, report.html and the PNG plots."),
) -> None:
    """Write a report over runs: summary tables, paired comparisons, accuracy and cost plots."""
    from diffmas.evaluate.report import write_report

    md_path = write_report(load_runs(run_dirs), out)
    c.console.print(f"wrote {md_path} and {md_path.with_suffix('.html')}")
    for png in sorted(out.glob("*.png")):
        c.console.print(f"  {png}")
