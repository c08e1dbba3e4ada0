"""A Markdown + HTML report over one or more runs: summary tables, paired comparisons and plots.

`write_report(runs, out_dir)` recomputes every metric from the records (`summarize`), so a killed
run without `summary.json` is reported like a finished one, and writes into `out_dir`:
`report.md` (images as relative links), `report.html` (the same content, images embedded, so the
file can be moved alone) and the plots as PNG files:

- `accuracy_vs_latent_steps.png`: one line per task/method (and model) with several m values;
- `accuracy_vs_cost.png`: one numbered point per run against tokens and seconds per question;
- `agent_tokens.png`: stacked prompt / latent / generated tokens per role, one panel per run.

Plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas: no pyplot state, no
display needed, and the process-wide backend is left alone.
"""

from __future__ import annotations

import base64
import html
import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from diffmas.evaluate.compare import CompareError, compare_runs
from diffmas.evaluate.metrics import summarize
from diffmas.evaluate.rundir import Run
from diffmas.inspect.aggregate import report_blocks as attention_blocks

STEPS_PNG = "accuracy_vs_latent_steps.png"
COST_PNG = "accuracy_vs_cost.png"
TOKENS_PNG = "agent_tokens.png"
KIND_COLORS = {"prompt": "#8da0cb", "latent": "#fc8d62", "generated": "#66c2a5"}


def write_report(runs: Sequence[Run], out_dir: str | Path, n_boot: int = 1000, seed: int = 0) -> Path:
    """Write report.md, report.html and the PNG plots into out_dir; return the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(run.records, n_boot=n_boot, seed=seed) for run in runs]
    blocks = [
        ("h1", "diffmas report"),
        (
            "p",
            f"{len(runs)} run(s). Accuracy is pass@1 in %: the mean over questions of the share of "
            "correct samples, skipped samples counted as wrong, with a 95 % bootstrap interval over "
            "questions. Costs are per answered sample (one question, one sample).",
        ),
        ("h2", "Summary"),
        _summary_table(runs, summaries),
        ("h2", "Details"),
        _details_table(runs, summaries),
        ("h2", "Paired comparison"),
        *_comparisons(runs, n_boot, seed),
        ("h2", "Accuracy vs latent steps"),
        _plot_block(out_dir, STEPS_PNG, _plot_steps(runs, summaries), "accuracy vs latent steps"),
        ("h2", "Accuracy vs cost"),
        _plot_block(out_dir, COST_PNG, _plot_cost(runs, summaries), "accuracy vs cost"),
        ("h2", "Tokens per agent"),
        _plot_block(out_dir, TOKENS_PNG, _plot_tokens(runs, summaries), "tokens per agent"),
        *attention_blocks(runs),  # runs evaluated with --inspect N; nothing otherwise
        ("h2", "Runs"),
        _provenance_table(runs),
    ]
    md_path = out_dir / "report.md"
    md_path.write_text(_to_markdown(blocks))
    (out_dir / "report.html").write_text(_to_html(blocks, out_dir))
    return md_path


# ----------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _pct_ci(x: float | None, ci: list[float] | None) -> str:
    return "—" if x is None else f"{_pct(x)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _summary_table(runs, summaries) -> tuple:
    options = any(s["n_option_questions"] for s in summaries)
    header = ["run", "task", "method", "m", "k", "n", "accuracy [95% CI]"]
    header += ["option acc", "option acc (norm)", "chance"] if options else []
    header += ["perplexity", "tokens/q", "s/q", "trace KiB", "peak MiB"]
    rows = []
    for run, s in zip(runs, summaries):
        m = "—" if run.latent_steps is None else str(run.latent_steps)
        row = [
            run.name,
            run.task or "—",
            run.method or "—",
            m,
            str(s["n_samples_per_question"]),
            str(s["n_questions"]),
            _pct_ci(s["accuracy"], s["accuracy_ci"]),
        ]
        if options:
            row += [
                _pct_ci(s["option_accuracy"], s["option_accuracy_ci"]),
                _pct_ci(s["option_accuracy_norm"], s["option_accuracy_norm_ci"]),
                _pct(s["chance"]),
            ]
        per_q = s["tokens"]["per_question"]
        row += [
            _num(s["perplexity"], ".3f"),
            _num(per_q and per_q["total"], ".0f"),
            _num(s["seconds_per_question"], ".3f"),
            _num(s["trace_bytes"] and s["trace_bytes"]["mean"] / 1024, ".1f"),
            _num(s["peak_memory_bytes"] and s["peak_memory_bytes"] / 2**20, ".1f"),
        ]
        rows.append(row)
    return ("table", header, rows, 3)


def _details_table(runs, summaries) -> tuple:
    voting = any(s["n_samples_per_question"] > 1 for s in summaries)
    header = [
        "run",
        "records",
        "skipped",
        "accuracy answered",
        "truncated %",
        "entropy",
        "latency p50 s",
        "latency p95 s",
    ]
    header += ["majority vote", "self-consistency", "agreement"] if voting else []
    rows = []
    for run, s in zip(runs, summaries):
        lat = s["latency_s"] or {"p50": None, "p95": None}
        row = [
            run.name,
            str(s["n_records"]),
            str(s["n_skipped"]),
            _pct(s["accuracy_answered"]),
            _pct(s["truncated_rate"]),
            _num(s["mean_entropy"], ".3f"),
            _num(lat["p50"], ".3f"),
            _num(lat["p95"], ".3f"),
        ]
        if voting:
            row += [_pct(s["majority_vote_accuracy"]), _pct(s["self_consistency"]), _pct(s["answer_agreement"])]
        rows.append(row)
    return ("table", header, rows, 1)


def _comparisons(runs, n_boot, seed) -> list[tuple]:
    """One paired comparison per task and split with several runs, against its first run."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.setting("split")), []).append(run)
    blocks = []
    for (task, split), group in groups.items():
        if len(group) < 2:
            continue
        try:
            result = compare_runs(group, n_boot=n_boot, seed=seed)
        except CompareError as exc:
            blocks.append(("p", f"{task} / {split}: not compared: {exc}"))
            continue
        blocks.append(
            (
                "p",
                f"{task} / {split}: {result['n_shared']} questions shared by all runs, "
                f"against {result['baseline']}. Δ is in accuracy points with a paired "
                f"bootstrap 95 % interval; p is an exact McNemar test on the "
                f"{result['mcnemar_on']}.",
            )
        )
        rows = []
        for e in result["runs"]:
            paired = (
                ["baseline", "—", "—"]
                if e["is_baseline"]
                else [
                    f"{100 * e['delta']:+.1f} [{100 * e['delta_ci'][0]:+.1f}, {100 * e['delta_ci'][1]:+.1f}]",
                    f"{e['wins']}/{e['losses']}/{e['ties']}",
                    f"{e['p_value']:.3g}",
                ]
            )
            rows.append(
                [e["name"], e["method"] or "—", _pct_ci(e["accuracy"], e["accuracy_ci"]), *paired, str(e["n_dropped"])]
            )
        blocks.append(
            ("table", ["run", "method", "accuracy [95% CI]", "Δ vs baseline", "W/L/T", "p", "dropped"], rows, 2)
        )
    return blocks or [("p", "No task has two runs to compare.")]


def _provenance_table(runs) -> tuple:
    header = ["run", "path", "model", "split", "samples", "temperature", "seed", "git commit"]
    rows = []
    for run in runs:
        values = [run.setting(key) for key in ("model", "split", "samples", "temperature", "seed")]
        commit = run.setting("git_commit")
        rows.append(
            [
                run.name,
                str(run.path),
                *("—" if v is None else str(v) for v in values),
                str(commit)[:12] if commit else "—",
            ]
        )
    return ("table", header, rows, len(header))


# ----------------------------------------------------------------------------- plots


def _plot_block(out_dir: Path, name: str, figure: Figure | str, alt: str) -> tuple:
    """Save a figure as out_dir/name and return an image block, or a note when there is no plot."""
    if isinstance(figure, str):
        return ("p", figure)
    FigureCanvasAgg(figure)
    figure.savefig(out_dir / name, dpi=120, bbox_inches="tight")  # keeps legends placed outside the axes
    return ("img", name, alt)


def _err(acc: float, ci: list[float]) -> list[float]:
    """Error bar lengths (below, above) in points; a percentile interval may miss its mean slightly."""
    return [max(0.0, 100 * (acc - ci[0])), max(0.0, 100 * (ci[1] - acc))]


def _plot_steps(runs, summaries) -> Figure | str:
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for run, s in zip(runs, summaries):
        if run.latent_steps is not None and s["accuracy"] is not None:
            key = (run.task, run.method, run.setting("model"))
            groups.setdefault(key, []).append((run.latent_steps, s))
    groups = {key: pts for key, pts in groups.items() if len({m for m, _ in pts}) > 1}
    if not groups:
        return "No plot: no task/method has runs at several latent_steps values."
    several_models = len({key[2] for key in groups}) > 1
    all_steps = [m for pts in groups.values() for m, _ in pts]
    dodge = 0.01 * (max(all_steps) - min(all_steps))  # keeps error bars of groups at one m apart
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for g, ((task, method, model), points) in enumerate(groups.items()):
        points.sort(key=lambda p: p[0])
        steps = [m + dodge * (g - (len(groups) - 1) / 2) for m, _ in points]
        acc = [100 * s["accuracy"] for _, s in points]
        yerr = np.array([_err(s["accuracy"], s["accuracy_ci"]) for _, s in points]).T  # (2, n)
        label = f"{task} · {method}" + (f" · {model}" if several_models else "")
        ax.errorbar(steps, acc, yerr=yerr, marker="o", capsize=3, label=label)
    ax.set_xlabel("latent steps per upstream agent (m)")
    ax.set_ylabel("accuracy % (95% CI)")
    ax.set_title("Accuracy vs latent steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_cost(runs, summaries) -> Figure | str:
    """Points are numbered (long run names overlap when runs cost about the same) and keyed in a
    legend on the right; colour is the method, marker shape the task."""
    points = [(i, run, s) for i, (run, s) in enumerate(zip(runs, summaries), start=1) if s["accuracy"] is not None]
    if not any(s["tokens"]["per_question"] for _, _, s in points):
        return "No plot: no run has answered samples."
    methods = list(dict.fromkeys(run.method for _, run, _ in points))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    tasks = list(dict.fromkeys(run.task for _, run, _ in points))
    markers = {t: "osD^vP*X"[i % 8] for i, t in enumerate(tasks)}
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, xlabel, cost in (
        (
            axes[0],
            "tokens per question (prompt + latent + generated)",
            lambda s: s["tokens"]["per_question"] and s["tokens"]["per_question"]["total"],
        ),
        (axes[1], "seconds per question", lambda s: s["seconds_per_question"]),
    ):
        xs = []
        for i, run, s in points:
            x, y = cost(s), 100 * s["accuracy"]
            if x is None:
                continue
            xs.append(x)
            ax.errorbar(
                [x],
                [y],
                yerr=np.array([_err(s["accuracy"], s["accuracy_ci"])]).T,
                fmt=markers[run.task],
                color=colors[run.method],
                capsize=2,
                elinewidth=0.8,
                alpha=0.85,
            )
            ax.annotate(str(i), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=8, weight="bold")
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy % (95% CI)")
    axes[0].legend(
        [Line2D([], [], marker="o", ls="", color=colors[m]) for m in methods],
        methods,
        fontsize=8,
        title="method",
        title_fontsize=8,
    )
    fig.legend(
        [Line2D([], [], marker=markers[run.task], ls="", color=colors[run.method]) for _, run, _ in points],
        [f"{i}  {run.name}" for i, run, _ in points],
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        title="run" + (" (marker: task)" if len(tasks) > 1 else ""),
        title_fontsize=8,
        frameon=False,
    )
    fig.suptitle("Accuracy vs cost (one point per run)")
    fig.tight_layout()
    return fig


def _plot_tokens(runs, summaries) -> Figure | str:
    if not any(s["tokens"]["per_role"] for s in summaries):
        return "No plot: no run has answered samples with per-agent records."
    n_cols = min(len(runs), 4)
    n_rows = math.ceil(len(runs) / n_cols)
    fig = Figure(figsize=(3.2 * n_cols + 0.8, 3.6 * n_rows + 0.6))
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, sharey=True, squeeze=False)).ravel()
    for ax, run, s in zip(axes, runs, summaries):
        roles = s["tokens"]["per_role"]
        ax.set_title("\n".join(textwrap.wrap(run.name, 30)[:2]), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if not roles:
            ax.text(0.5, 0.5, "no answered samples", ha="center", va="center", transform=ax.transAxes)
            continue
        x = np.arange(len(roles))
        bottom = np.zeros(len(roles))
        for kind, color in KIND_COLORS.items():
            heights = np.array([r[kind] for r in roles.values()])
            ax.bar(x, heights, bottom=bottom, color=color, label=kind, width=0.7)
            bottom += heights
        tilt = len(roles) > 3  # long role lists overlap when upright
        ax.set_xticks(x, list(roles), rotation=30 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    for row in range(n_rows):
        axes[row * n_cols].set_ylabel("mean tokens per question")
    handles = [Patch(color=color) for color in KIND_COLORS.values()]
    fig.legend(handles, list(KIND_COLORS), loc="upper right", ncols=3, fontsize=8)
    fig.suptitle("Tokens per agent (mean per question)", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


# ----------------------------------------------------------------------------- rendering


def _to_markdown(blocks) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            _, header, rows, n_text = block
            cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
            lines = [
                "| " + " | ".join(map(cell, header)) + " |",
                "|" + "|".join("---" if i < n_text else "---:" for i in range(len(header))) + "|",
            ]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}img{max-width:100%}"""


def _to_html(blocks, out_dir: Path) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>diffmas report</title>"
        f"<style>{_CSS}</style></head><body>"
    ]
    esc = html.escape
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{esc(block[1])}</p>")
        elif kind == "img":
            data = base64.b64encode((out_dir / block[1]).read_bytes()).decode()
            out.append(f"<p><img src='data:image/png;base64,{data}' alt='{esc(block[2])}'></p>")
        elif kind == "table":
            _, header, rows, n_text = block
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            out += [
                "<tr>"
                + "".join(
                    f"<td style='text-align:{'left' if i < n_text else 'right'}'>{esc(str(c))}</td>"
                    for i, c in enumerate(row)
                )
                + "</tr>"
                for row in rows
            ]
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
