"""docs/budget.md (and its plots) from the trace-budget study's records (results/budget/).

Every number and conclusion is computed here from the per-sample records and summaries; evaluations
that have not run are listed as missing. "Holds" means: the budget's accuracy is within one point
of the full trace's on the same questions, or the paired 95 % bootstrap interval of the difference
contains 0 (the budget cannot be told apart from the full trace at this sample size).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
DOCS, IMG = REPO / "docs", REPO / "docs" / "img"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget import LATENT_ONLY, BudgetSettings, Stage, eval_dir, label, parse, stages  # noqa: E402

from diffmas.evaluate.information import above_chance_p  # noqa: E402
from diffmas.evaluate.metrics import bootstrap_ci  # noqa: E402
from diffmas.evaluate.rundir import load_run  # noqa: E402
from diffmas.tasks import get_task  # noqa: E402

from markdown import pct, table  # noqa: E402

ONE_POINT = 0.01
ALPHA = 0.05
CONDITIONS = {
    "latent_mas": "latent_mas (untrained)",
    "diffmas-full": "DiffMAS trained on the full trace",
    "diffmas": "DiffMAS (the study's adapter, trained on the full trace)",
    "diffmas-latent": "DiffMAS trained with reads=latent (the channel study's adapter)",
}


class Cell:
    """One evaluation: a stage under one budget."""

    def __init__(self, stage: Stage, spec: str, entry: float):
        self.stage, self.spec, self.label = stage, spec, label(spec)
        self.budget = parse(spec)
        self.run = load_run(eval_dir(stage, spec))
        self.summary = self.run.summary
        recs = {r["id"]: r for r in self.run.records if r.get("sample", 0) == 0}
        self.ids = sorted(recs)
        self.correct = {q: float(bool(recs[q].get("correct"))) for q in self.ids}
        self.option = {
            q: float(bool(recs[q]["option_likelihood"]["correct"]))
            for q in self.ids
            if recs[q].get("option_likelihood")
        }
        self.trace_bytes = float(np.mean([recs[q]["trace_bytes"] for q in self.ids]))
        self.upstream_bytes = float(np.mean([_upstream_bytes(recs[q], entry) for q in self.ids]))
        self.seconds = self.summary.get("seconds_per_question")
        self.peak = self.summary.get("peak_memory_bytes")

    @property
    def policy(self) -> str:
        """The policy, and its scope where that is the whole trace (e.g. prompt-drop per trace)."""
        if not self.budget:
            return "full"
        return self.budget.policy + (" per trace" if self.budget.scope == "trace" else "")

    def accuracy(self, metric: str) -> float:
        values = list((self.option if metric == "option" else self.correct).values())
        return float(np.mean(values)) if values else float("nan")


def _upstream_bytes(record: dict, entry: float) -> float:
    """Bytes the upstream agents leave: the trace less the final agent's own unpacked entries (its
    prompt and every generated token but the last, which is sampled and never fed back)."""
    final = record["agents"][-1]
    own = final["n_prompt_tokens"] + max(final["n_generated_tokens"] - 1, 0)
    return record["trace_bytes"] - own * entry


def paired(a: Cell, base: Cell, metric: str) -> dict:
    """Accuracy difference a - base on shared questions, its paired bootstrap interval and verdict."""
    x, y = (a.option, base.option) if metric == "option" else (a.correct, base.correct)
    shared = [q for q in y if q in x]
    diff = np.array([x[q] - y[q] for q in shared])
    lo, hi = bootstrap_ci(diff, 1000, 0)
    delta = float(diff.mean())
    return {"delta": delta, "ci": (lo, hi), "holds": delta >= -ONE_POINT or lo <= 0 <= hi, "n": len(shared)}


def verdict(p: dict) -> str:
    """A budget against the full trace, from `paired`: improves, holds or drops."""
    return "improves" if p["ci"][0] > 0 else "holds" if p["holds"] else "drops"


def chance_p(cell: Cell, metric: str) -> float:
    values = cell.option if metric == "option" else cell.correct
    chance = cell.summary.get("chance") or get_task(cell.run.setting("task")).chance()
    return above_chance_p(int(sum(values.values())), len(values), chance)


def above_chance(cell: Cell, metric: str) -> bool:
    return chance_p(cell, metric) < ALPHA


def load(s: BudgetSettings):
    cells, missing = {}, []
    for stage in stages(s):
        for spec in stage.budgets:
            if (eval_dir(stage, spec) / "summary.json").is_file() and (eval_dir(stage, "") / "summary.json").is_file():
                cells[(stage.name, spec)] = Cell(stage, spec, entry_bytes(stage))
            else:
                missing.append(f"{stage.name} / {label(spec)}")
    return cells, missing


def entry_bytes(stage: Stage) -> float:
    """Bytes of one unpacked trace entry (same model and dtype everywhere), from a full-trace record."""
    records = load_run(eval_dir(stage, "")).records
    rec = next(r for r in records if r["trace_len"])
    return rec["trace_bytes"] / rec["trace_len"]


def stage_table(cells, stage: Stage, metrics: list[str]) -> tuple[str, dict]:
    base = cells.get((stage.name, ""))
    if base is None:
        return "_The full-trace evaluation has not run yet._", {}
    rows, verdicts = [], {}
    for spec in stage.budgets:
        cell = cells.get((stage.name, spec))
        if cell is None:
            continue
        row = [cell.label, pct(cell.upstream_bytes / base.upstream_bytes), pct(cell.trace_bytes / base.trace_bytes)]
        for metric in metrics:
            row.append(pct(cell.accuracy(metric)))
            if spec:
                p = paired(cell, base, metric)
                verdicts[(spec, metric)] = (cell, p)
                row.append(f"{100 * p['delta']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]")
                row.append(verdict(p).replace("drops", "**drops**"))
            else:
                row += ["—", "—"]
        row += [f"{cell.seconds:.2f}" if cell.seconds else "—", f"{cell.peak / 2**30:.2f}" if cell.peak else "—"]
        rows.append(row)
    header = ["budget", "upstream KV, % of full", "whole trace, % of full"]
    for metric in metrics:
        name = "option acc." if metric == "option" else "accuracy"
        header += [f"{name}, %", "Δ vs full [95 % CI], pts", "verdict"]
    header += ["s / question", "peak GiB"]
    return table(header, rows), verdicts


def smallest(verdicts: dict, metric: str) -> list[list[str]]:
    """Per policy, the smallest budget (by upstream bytes) that holds, and the random control's
    verdict at the same budget."""
    out = []
    for policy in dict.fromkeys(cell.policy for cell, _ in verdicts.values()):
        tried = [(cell, p) for (spec, m), (cell, p) in verdicts.items() if m == metric and cell.policy == policy]
        held = [(cell, p) for cell, p in tried if p["holds"]]
        if not tried:
            continue
        if not held:
            out.append([policy, "none of " + ", ".join(c.label for c, _ in tried), "—", "—"])
            continue
        best, _ = min(held, key=lambda t: t[0].upstream_bytes)
        out.append([policy, best.label, f"{best.upstream_bytes / 2**10:.0f} KiB", _random_at(verdicts, best, metric)])
    return out


def _random_at(verdicts: dict, cell: Cell, metric: str) -> str:
    """The random control's verdict at this cell's budget (same size and scope)."""
    if cell.budget.policy in ("random", "quantize"):
        return "—"
    spec = ":".join(["random", *cell.spec.split(":")[1:]])
    found = verdicts.get((spec, metric))
    if found is None:
        return "not run"
    other, p = found
    return f"{verdict(p)} ({pct(other.accuracy(metric))} %)"


def scope_section(cells, stage: Stage, s: BudgetSettings, metric: str) -> str:
    """Per agent vs per trace at the same total of prompt states."""
    base = cells.get((stage.name, ""))
    n_upstream = len(base.run.records[0]["agents"]) - 1 if base else 1  # every agent but the final one
    rows = []
    for policy in s.arc_trace_policies:
        for total in s.arc_trace_sizes:
            per_agent = f"{policy}:{int(total) // n_upstream}"
            a, b = cells.get((stage.name, per_agent)), cells.get((stage.name, f"{policy}:{total}:trace"))
            if a is None or b is None:
                rows.append([policy, total, "not run", "not run", "", ""])
                continue
            p = paired(b, a, metric)
            rows.append(
                [
                    policy,
                    total,
                    f"{pct(a.accuracy(metric))} ({a.upstream_bytes / 2**10:.0f} KiB)",
                    f"{pct(b.accuracy(metric))} ({b.upstream_bytes / 2**10:.0f} KiB)",
                    f"{100 * p['delta']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]",
                    "better" if p["ci"][0] > 0 else "worse" if p["ci"][1] < 0 else "no difference",
                ]
            )
    header = [
        "policy",
        "prompt states in all",
        "per agent, % (upstream KV)",
        "per trace, % (upstream KV)",
        "Δ per trace − per agent [95 % CI], pts",
        "verdict",
    ]
    return table(header, rows)


def plot(cells, stage_list: list[Stage], metric: str, path: Path, title: str) -> None:
    fig = Figure(figsize=(4.2 * len(stage_list), 3.4))
    for i, stage in enumerate(stage_list):
        ax = fig.add_subplot(1, len(stage_list), i + 1)
        base = cells.get((stage.name, ""))
        if base is None:
            continue
        for policy in dict.fromkeys(c.policy for (name, spec), c in cells.items() if name == stage.name and spec):
            pts = sorted(
                (c.upstream_bytes / base.upstream_bytes, c.accuracy(metric))
                for (name, spec), c in cells.items()
                if name == stage.name and spec and c.policy == policy
            )
            if pts:
                style = "--" if policy.startswith("random") else ":" if policy.endswith("per trace") else "-"
                ax.plot(*zip(*pts), marker="o", label=policy, linestyle=style)
        if stage.condition == "diffmas-full":  # the adapters trained under a budget, evaluated under it
            under = [
                c
                for (name, spec), c in cells.items()
                if spec and name.startswith(f"{stage.group}/diffmas-under-") and name.endswith(c.label)
            ]
            if under:
                xs = [c.upstream_bytes / base.upstream_bytes for c in under]
                ax.scatter(xs, [c.accuracy(metric) for c in under], marker="*", s=120, color="black", zorder=5)
                ax.scatter([], [], marker="*", color="black", label="trained under that budget")
        ax.axhline(base.accuracy(metric), color="black", linewidth=0.8, label="full trace")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xscale("log")
        ax.set_xlabel("upstream KV kept (share of full)")
        ax.set_ylabel("option accuracy" if metric == "option" else "accuracy")
        ax.set_title(CONDITIONS.get(stage.condition, stage.condition), fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def trained_section(cells, s: BudgetSettings) -> str:
    """Train under B / evaluate under B, against train full / evaluate under B."""
    full = next(st for st in stages(s) if st.name == "relay/diffmas-full")
    rows = []
    for spec in s.train_budgets:
        under = next(st for st in stages(s) if st.condition == f"diffmas-under-{label(spec)}")
        a, b = cells.get((under.name, spec)), cells.get((full.name, spec))
        base = cells.get((full.name, ""))
        if a is None or b is None or base is None:
            rows.append([label(spec), "not run", "", "", "", "", ""])
            continue
        p = paired(a, b, "correct")
        alone = cells.get((under.name, LATENT_ONLY))
        rows.append(
            [
                label(spec),
                pct(b.accuracy("correct")),
                pct(a.accuracy("correct")),
                pct(alone.accuracy("correct")) if alone else "not run",
                pct(cells[(full.name, LATENT_ONLY)].accuracy("correct")) if (full.name, LATENT_ONLY) in cells else "—",
                f"{100 * p['delta']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]",
                "recovers" if p["ci"][0] > 0 else ("no difference" if p["ci"][0] <= 0 <= p["ci"][1] else "worse"),
            ]
        )
    header = [
        "budget B",
        "trained full, eval under B",
        "trained under B, eval under B",
        "trained under B, latent steps only",
        "trained full, latent steps only",
        "Δ under B [95 % CI]",
        "verdict",
    ]
    return table(header, rows)


README_BEGIN, README_END = "<!-- budget:begin -->", "<!-- budget:end -->"


def headline(cells, by_name) -> list[str]:
    """README lines: per trained relay channel, the smallest budget that holds per policy."""
    lines = []
    for name, what in (
        ("relay/diffmas-full", "relay_word (K=8, m=4, reads=all), DiffMAS trained on the full trace"),
        ("arc/latent_mas", "ARC-Easy option likelihood, latent_mas"),
    ):
        metric = "option" if name.startswith("arc") else "correct"
        base = cells.get((name, ""))
        if base is None:
            continue
        _, verdicts = stage_table(cells, by_name[name], [metric])
        rows = smallest(verdicts, metric)
        found = "; ".join(f"{budget} ({kib})" for _, budget, kib, _ in rows)
        if not above_chance(base, metric):
            lines.append(
                f"- {what}: the full trace ({pct(base.accuracy(metric))} %) is not above chance, so holding it "
                f"is vacuous; smallest budgets that do — {found}."
            )
            continue
        lines.append(
            f"- {what} ({pct(base.accuracy(metric))} % on the full trace): smallest budget that holds — {found}."
        )
    return lines


def write_readme(lines: list[str]) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or not lines:
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = [README_BEGIN, *lines, "", "Every policy and budget: [docs/budget.md](docs/budget.md).", README_END]
    readme.write_text(head + "\n".join(block) + tail)


def main() -> None:
    s = BudgetSettings()
    cells, missing = load(s)
    IMG.mkdir(parents=True, exist_ok=True)
    by_name = {st.name: st for st in stages(s)}
    parts = [
        "# Bounded traces: how much of the channel survives a trace budget",
        "",
        "Generated by `study/write_budget.py` from the records of `study/budget.py` (results/budget/);",
        "rerun both to refresh. Model: the embedded SmolLM2-135M on 2 CPU cores, one thread per worker,",
        "two workers, beside other jobs (times are comparable within a table only).",
        "",
        "Each upstream agent's entries are fitted to the budget right after it writes them, before any",
        "later agent reads them; the final agent's own entries are never touched. Budgets: prompt states",
        f"kept per agent ({', '.join(x for x in s.sizes if '%' not in x)}), a share of each agent's bytes",
        f"({', '.join(x for x in s.sizes if '%' in x)}), and int8 / int4 for quantize. *Upstream KV* is",
        "what the upstream agents leave (the whole trace less the final agent's own entries), as a share",
        "of the full trace's; *holds*: within one point of the full trace's accuracy on the same",
        "questions, or a paired 95 % bootstrap interval of the difference that contains 0; *improves*:",
        "that interval lies above 0. Peak memory is the process's resident peak during the run (reset",
        "per run), model weights included; trace bytes are the measure of what a budget saves.",
        "",
    ]
    sections = [
        ("relay/latent_mas", "Relay (relay_word, K=8, m=4, reads=all): untrained", ["correct"]),
        ("relay/diffmas-full", "Relay: DiffMAS trained on the full trace, evaluated under each budget", ["correct"]),
        ("latent/diffmas-latent", "Relay, reads=latent: the channel study's adapter", ["correct"]),
        ("arc/latent_mas", "ARC-Easy (200 questions, m=10, four agents): latent_mas", ["option", "correct"]),
        ("arc/diffmas", "ARC-Easy: DiffMAS (the study's adapter)", ["option", "correct"]),
    ]
    summary_rows = []
    for name, title, metrics in sections:
        stage = by_name[name]
        text, verdicts = stage_table(cells, stage, metrics)
        parts += [f"## {title}", "", text, ""]
        for metric in metrics:
            rows = smallest(verdicts, metric)
            if not rows:
                continue
            base = cells.get((name, ""))
            what = "option accuracy" if metric == "option" else "accuracy"
            informative = above_chance(base, metric)
            parts += [f"Smallest budget that holds ({what}), per policy, and the random control there:", ""]
            parts += [table(["policy", "budget", "upstream KV", "random at that budget"], rows), ""]
            if not informative:
                parts += [
                    f"The full trace's {what} is not above chance (exact binomial p = {chance_p(base, metric):.2g}): "
                    "holding it is no evidence that a budget keeps a channel, so these smallest budgets say "
                    "only that a budget does not do worse than an uninformative trace.",
                    "",
                ]
            chance_note = "yes" if informative else "no (vacuous)"
            summary_rows += [[name, what, *r[:3], chance_note] for r in rows]
        if name == "arc/latent_mas":
            parts += [
                "Per agent or per trace, at the same total of prompt states (per trace: the policy chooses",
                "among all upstream prompt entries after each agent; see docs/design.md):",
                "",
                scope_section(cells, stage, s, "option"),
                "",
            ]
    parts += [
        "## Training under the budget (relay, reads=all)",
        "",
        "The same LoRA training (the channel study's settings) with the budget applied inside the",
        "trajectory, evaluated under the same budget, against the adapter trained on the full trace.",
        f"*Latent steps only*: evaluated under {label(LATENT_ONLY)}, where no prompt entry fits and only",
        "the latent steps stay: how much of the secret each training put into the latent channel.",
        "",
        trained_section(cells, s),
        "",
    ]
    relay = [by_name["relay/latent_mas"], by_name["relay/diffmas-full"]]
    plot(cells, relay, "correct", IMG / "budget_relay.png", "relay_word K=8, m=4, reads=all")
    arc = [by_name["arc/latent_mas"], by_name["arc/diffmas"]]
    plot(cells, arc, "option", IMG / "budget_arc.png", "ARC-Easy, option likelihood")
    parts += ["![relay](img/budget_relay.png)", "", "![arc](img/budget_arc.png)", ""]
    parts += [
        "## Every smallest budget at a glance",
        "",
        table(["stage", "metric", "policy", "budget", "upstream KV", "full trace above chance"], summary_rows),
        "",
    ]
    if missing:
        parts += ["## Not run yet", "", *(f"- {m}" for m in missing), ""]
    write_readme(headline(cells, by_name))
    (DOCS / "budget.md").write_text("\n".join(parts))
    print(f"wrote {DOCS / 'budget.md'} ({len(cells)} evaluations, {len(missing)} missing)")


if __name__ == "__main__":
    main()
