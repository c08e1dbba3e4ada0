"""`diffmas compare RUN_DIR RUN_DIR ...`: paired accuracy comparison of runs on their shared questions."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from diffmas.cli import app
from diffmas.cli import common as c


def load_runs(run_dirs: list[Path]) -> list:
    """Read run directories; a cut-off last sample line is dropped with a one-line warning on stderr."""
    from diffmas.evaluate.rundir import TruncatedRunWarning
    from diffmas.evaluate.rundir import load_runs as load

    with c.warning_lines(TruncatedRunWarning):
        return load(run_dirs)


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories written by `diffmas eval`."),
    baseline: int = typer.Option(0, help="Position of the baseline among RUN_DIRS (0 = the first)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full comparison as JSON."),
) -> None:
    """Compare runs with a baseline on the questions they share: accuracy, Δ, wins/losses, McNemar p."""
    from diffmas.evaluate.compare import compare_runs

    result = compare_runs(load_runs(run_dirs), baseline=baseline)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    c.console.print(_table(result))


def _pct_ci(x: float, ci: list[float], sign: str = "") -> str:
    return f"{100 * x:{sign}.1f} [{100 * ci[0]:{sign}.1f}, {100 * ci[1]:{sign}.1f}]"


def _table(result: dict) -> Table:
    table = Table(
        title=f"accuracy % on {result['n_shared']} shared questions vs {result['baseline']}",
        title_justify="left",
        caption=f"95 % bootstrap intervals; p: exact McNemar on the {result['mcnemar_on']}",
        caption_justify="left",
    )
    for col in ("run", "method", "m", "n", "accuracy [CI]", "Δ [CI]", "W/L", "p"):
        table.add_column(col, justify="left" if col in ("run", "method") else "right", no_wrap=col == "run")
    for e in result["runs"]:
        paired = (
            ["baseline", "—", "—"]
            if e["is_baseline"]
            else [_pct_ci(e["delta"], e["delta_ci"], "+"), f"{e['wins']}/{e['losses']}", f"{e['p_value']:.3g}"]
        )
        n = str(result["n_shared"]) + (f" (-{e['n_dropped']})" if e["n_dropped"] else "")
        table.add_row(
            e["name"], str(e["method"]), str(e["latent_steps"]), n, _pct_ci(e["accuracy"], e["accuracy_ci"]), *paired
        )
    return table
