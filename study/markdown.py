"""Markdown pieces shared by the study writers (write_results.py, write_channel.py)."""

from __future__ import annotations


def pct(x, ci=None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
