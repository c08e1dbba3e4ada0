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
    from diffmas.inspect.aggregate import attention_change

    runs = load_runs(run_dirs)
    result = compare_runs(runs, baseline=baseline)
    attention = attention_change(runs, baseline)  # runs evaluated with --inspect N; None otherwise
    if as_json:
        print(json.dumps({**result, "attention": attention} if attention else result, indent=2))
        return
    c.console.print(_table(result))
    if attention:
        c.console.print(_attention_table(attention))


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


def _attention_table(change: dict) -> Table:
    """The final agent's attention share per agent and kind (inspected questions), Δ vs the baseline."""
    from diffmas.inspect.aggregate import KINDS

    inspected = [e for e in change["runs"] if e["attention"]]
    agents = list(dict.fromkeys(a for e in inspected for a in e["attention"]["all"]["agents"]))
    table = Table(
        title=f"final agent's attention share % (inspected questions) vs {change['baseline']}",
        title_justify="left",
        caption="mean over decoded tokens, layers and heads; Δ in points against the baseline",
        caption_justify="left",
    )
    for col in ("run", "n", *agents, *KINDS):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=col == "run")
    for e in inspected:
        share, delta = e["attention"]["all"], e.get("delta")
        cells = [_share_cell(share, delta, "agents", a) for a in agents]
        cells += [_share_cell(share, delta, "kinds", k) for k in KINDS]
        table.add_row(e["name"], str(share["n"]), *cells)
    return table


def _share_cell(share: dict, delta: dict | None, part: str, key: str) -> str:
    text = f"{100 * share[part].get(key, 0.0):.1f}"
    return text + (f" ({100 * delta[part].get(key, 0.0):+.1f})" if delta else "")
