"""Attention shares over the inspected questions of eval runs (`diffmas eval --inspect N`).

Per run: the final agent's attention share per agent (its segments summed), per kind (prompt,
latent, generated) and per segment, averaged over decoded tokens and layers for each question,
then over questions, split by whether the run's answer was correct. Between runs (`diffmas
compare`, `diffmas report`): the same shares side by side with their change against a baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from diffmas.inspect.page import JSON_FILE
from diffmas.inspect.runs import INSPECTION_DIR

KINDS = ("prompt", "latent", "generated")


def load_inspections(run_dir: str | Path) -> list[dict]:
    """The inspection records of a run directory (none: [])."""
    root = Path(run_dir) / INSPECTION_DIR
    if not root.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(root.glob(f"*/{JSON_FILE}"))]


def question_shares(record: dict) -> dict:
    """One question's shares (mean over decoded tokens and layers): by agent, by kind, by segment."""
    att = record["attention"]
    by_agent: dict[str, float] = {}
    by_kind = dict.fromkeys(KINDS, 0.0)
    for seg, share in zip(att["segments"], att["mean"]):
        by_agent[seg["agent"]] = by_agent.get(seg["agent"], 0.0) + share
        by_kind[seg["kind"]] += share
    return {
        "agents": by_agent,
        "kinds": by_kind,
        "segments": {s["label"]: v for s, v in zip(att["segments"], att["mean"])},
    }


def _mean(rows: list[dict]) -> dict:
    """Mean of dicts of shares (a key missing from a question counts 0 there)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: sum(row.get(k, 0.0) for row in rows) / len(rows) for k in keys}


def _summary(shares: list[dict]) -> dict | None:
    if not shares:
        return None
    return {
        "n": len(shares),
        **{part: _mean([s[part] for s in shares]) for part in ("agents", "kinds", "segments")},
    }


def run_attention(run) -> dict | None:
    """A run's inspected questions: {"n_inspected", "all", "correct", "incorrect"} (None: no inspections).

    Correctness is the run's own record of sample 0 where there is one, else the inspection's.
    """
    inspections = [r for r in load_inspections(run.path) if r.get("attention", {}).get("tokens")]
    if not inspections:
        return None
    correct_of = {
        r["id"]: bool(r.get("correct")) for r in run.records if r.get("sample") == 0 and r.get("status") == "ok"
    }
    groups: dict[str, list[dict]] = {"correct": [], "incorrect": []}
    everything = []
    for record in inspections:
        shares = question_shares(record)
        ok = correct_of.get(record.get("id"), bool(record.get("correct")))
        groups["correct" if ok else "incorrect"].append(shares)
        everything.append(shares)
    return {
        "n_inspected": len(inspections),
        "matches_run": sum(1 for r in inspections if r.get("matches_run")),
        "all": _summary(everything),
        **{name: _summary(rows) for name, rows in groups.items()},
    }


def attention_change(runs: Sequence, baseline: int = 0) -> dict | None:
    """Shares of every run with inspections and their change against `runs[baseline]` (by agent
    and by kind, over all inspected questions). None when no run has inspections."""
    found = [(run, run_attention(run)) for run in runs]
    if not any(a for _, a in found):
        return None
    base = found[baseline][1]
    entries = []
    for i, (run, att) in enumerate(found):
        entry = {"name": run.name, "method": run.method, "is_baseline": i == baseline, "attention": att}
        if att and base and i != baseline:
            entry["delta"] = {
                part: {
                    k: att["all"][part].get(k, 0.0) - base["all"][part].get(k, 0.0)
                    for k in dict.fromkeys([*base["all"][part], *att["all"][part]])
                }
                for part in ("agents", "kinds")
            }
        entries.append(entry)
    return {"baseline": runs[baseline].name, "runs": entries}


# ----------------------------------------------------------------------------- report blocks


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def report_blocks(runs: Sequence) -> list[tuple]:
    """Blocks for `evaluate.report` (h2, p, table): shares by outcome per run, and the change
    between runs; [] when no run was inspected."""
    change = attention_change(runs)
    if change is None:
        return []
    inspected = [e for e in change["runs"] if e["attention"]]
    agents = list(dict.fromkeys(a for e in inspected for a in e["attention"]["all"]["agents"]))
    header = ["run", "answers", "n", *(f"{a} %" for a in agents), *(f"{k} %" for k in KINDS)]
    rows = []
    for e in inspected:
        for outcome in ("all", "correct", "incorrect"):
            group = e["attention"][outcome]
            if group is None:
                continue
            rows.append(
                [
                    e["name"],
                    outcome,
                    str(group["n"]),
                    *(_pct(group["agents"].get(a)) for a in agents),
                    *(_pct(group["kinds"].get(k)) for k in KINDS),
                ]
            )
    blocks = [
        ("h2", "Attention share of the final agent (inspected questions)"),
        (
            "p",
            "Share of the final agent's attention that goes to each agent's segments and to each kind of "
            "entry, averaged over decoded tokens, layers and heads, then over the questions inspected with "
            "`diffmas eval --inspect N` (eager attention, inspected pass only); split by the run's answer.",
        ),
        ("table", header, rows, 2),
    ]
    others = [e for e in change["runs"] if e.get("delta")]
    if others:
        delta_rows = [
            [
                e["name"],
                *(_signed(e["delta"]["agents"].get(a)) for a in agents),
                *(_signed(e["delta"]["kinds"].get(k)) for k in KINDS),
            ]
            for e in others
        ]
        blocks += [
            ("p", f"Change against {change['baseline']} (all inspected questions), in points."),
            ("table", ["run", *(f"Δ {k}" for k in [*agents, *KINDS])], delta_rows, 1),
        ]
    return blocks


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}"
