"""The inspection record as a self-contained HTML page: plain HTML and inline SVG, no script, no
network, so the file can be opened anywhere or mailed alone.

Sections (element ids, which the browser test checks): `timeline` (the trace, coloured by agent
and kind), `logit-lens` (per latent step the lens tokens and the nearest tokens of the realigned
state), `attention-heatmap` (the final agent's attention share per segment over decoded tokens),
`attention-layers` (the same per layer) and `answer`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

JSON_FILE = "inspection.json"
HTML_FILE = "index.html"
# lightness per kind: the prompt pale, latent steps saturated, generated tokens in between
KIND_LIGHTNESS = {"prompt": 82, "latent": 42, "generated": 62}

_CSS = """body{font-family:system-ui,sans-serif;max-width:1280px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3;text-align:left}.tok{font-family:ui-monospace,monospace;white-space:pre}
.hit{background:#ffe08a;font-weight:bold}.note{color:#555;font-size:13px}
pre#answer{background:#f6f8fa;padding:.8em;border:1px solid #ddd;white-space:pre-wrap}
svg text{font-family:ui-monospace,monospace}"""


def write_inspection(record: dict, out_dir: str | Path, indent: int | None = 1) -> tuple[Path, Path]:
    """Write DIR/inspection.json (floats to 6 decimals: enough for shares that sum to 1 within
    1e-5, and a third of the size) and DIR/index.html; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / JSON_FILE, out_dir / HTML_FILE
    json_path.write_text(json.dumps(_rounded(record), indent=indent) + "\n")
    html_path.write_text(render_page(record))
    return json_path, html_path


def _rounded(value, digits: int = 6):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def render_page(record: dict) -> str:
    colors = agent_colors([s["agent"] for s in record["trace"]["segments"]])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>diffmas inspection: {_esc(record['question'][:60])}</title><style>{_CSS}</style></head><body>",
        "<h1>diffmas trace inspection</h1>",
        _header(record),
        "<h2>Trace timeline</h2>",
        _timeline(record, colors),
        "<h2>Latent steps: logit lens and nearest tokens</h2>",
        _lens_tables(record),
        "<h2>Where the final agent looks: attention share per segment</h2>",
        _heatmap(record),
        _layer_heatmap(record),
        "<h2>Final answer</h2>",
        f"<pre id='answer'>{_esc(record['answer']['text'])}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- pieces


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def show_token(token: str) -> str:
    """A token made visible: spaces as ␣, newlines as ⏎, other control characters as \\xNN."""
    out = token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)


def agent_colors(agents: list[str]) -> dict[str, int]:
    """A hue per agent, in order of first appearance."""
    order = list(dict.fromkeys(agents))
    return {a: int(360 * i / max(len(order), 1) + 210) % 360 for i, a in enumerate(order)}


def _fill(hue: int, kind: str) -> str:
    return f"hsl({hue},62%,{KIND_LIGHTNESS.get(kind, 70)}%)"


def _header(record: dict) -> str:
    s = record["settings"]
    rows = [
        ("question", record["question"]),
        *((f"private input ({role})", text) for role, text in record.get("private", {}).items()),
        ("method", record["method"]),
        ("model", record["model"]),
        ("agents", " → ".join(s["roles"]) + f" ({s['topology']})"),
        ("latent steps m / reads", f"{s['latent_steps']} / {s['reads']}"),
        *((("adapters", json.dumps(s["adapters"])),) if s.get("adapters") else ()),
        *((("gold answer", record["gold"]),) if record.get("gold") is not None else ()),
    ]
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<table id='settings'>{body}</table>"


def _timeline(record: dict, colors: dict[str, int]) -> str:
    """One rectangle per segment, its width proportional to its entries (with a floor, so a few
    latent steps stay visible next to long prompts)."""
    segments = record["trace"]["segments"]
    width, floor, height = 1240, 34, 46
    total = sum(s["n_tokens"] for s in segments) or 1
    spare = width - floor * len(segments)
    widths = [floor + max(spare, 0) * s["n_tokens"] / total for s in segments]
    x, rects = 0.0, []
    for seg, w in zip(segments, widths):
        title = (
            f"{seg['agent']} / {seg['kind']}: columns {seg['start']}..{seg['end'] - 1}, "
            f"{seg['n_tokens']} entries, {seg['n_bytes'] / 1024:.1f} KiB"
        )
        label = f"{seg['agent']} {seg['kind']} {seg['n_tokens']}" if w > 110 else str(seg["n_tokens"])
        rects.append(
            f"<g class='segment' data-agent='{_esc(seg['agent'])}' data-kind='{seg['kind']}'>"
            f"<title>{_esc(title)}</title>"
            f"<rect x='{x:.1f}' y='0' width='{w - 1:.1f}' height='{height}' "
            f"fill='{_fill(colors[seg['agent']], seg['kind'])}'/>"
            f"<text x='{x + 4:.1f}' y='{height / 2 + 4}' font-size='11' "
            f"fill='{'#fff' if KIND_LIGHTNESS.get(seg['kind'], 70) < 50 else '#222'}'>{_esc(label)}</text></g>"
        )
        x += w
    svg = f"<svg id='timeline' width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>{''.join(rects)}</svg>"
    rows = "".join(
        f"<tr><td><span style='display:inline-block;width:12px;height:12px;"
        f"background:{_fill(colors[s['agent']], s['kind'])}'></span> "
        f"{_esc(s['agent'])}</td><td>{s['kind']}</td><td>{s['start']}..{s['end'] - 1}</td>"
        f"<td style='text-align:right'>{s['n_tokens']}</td>"
        f"<td style='text-align:right'>{s['n_bytes'] / 1024:.1f}</td></tr>"
        for s in segments
    )
    t = record["trace"]
    caption = (
        f"<p class='note'>{t['n_real']} entries, {t['n_bytes'] / 1024:.1f} KiB of keys and values "
        f"({t['bytes_per_entry']} bytes per entry).</p>"
    )
    table = (
        "<table id='segments'><tr><th>agent</th><th>kind</th><th>columns</th><th>entries</th><th>KiB</th></tr>"
        f"{rows}</table>"
    )
    return svg + caption + table


def _watched(record: dict) -> set[str]:
    return {w.strip().lower() for w in record["inspect"].get("watch", [])}


def _tok_cell(tokens: list[dict], value: str, watched: set[str], n: int = 3) -> str:
    lines = []
    for t in tokens[:n]:
        hit = " hit" if t["token"].strip().lower() in watched and t["token"].strip() else ""
        lines.append(f"<span class='tok{hit}'>{_esc(show_token(t['token']))}</span> {t[value]:.2f}")
    return "<br>".join(lines)


def _lens_tables(record: dict) -> str:
    if not record["latent"]:
        return "<div id='logit-lens'><p>No latent steps in this run (m = 0 or a text method).</p></div>"
    watched = _watched(record)
    out = [
        "<div id='logit-lens'><p class='note'>Per column: the top tokens of the logit lens (the residual "
        "stream after layer L through the final norm and the output head; the last layer is the "
        "model's own next-token distribution) with their probabilities, and the tokens whose input "
        "embeddings are nearest (cosine) to the state realigned into embedding space, which is what "
        "the next latent step is fed. Step 0 is the agent's last prompt position."
        + (f" Watched: {_esc(', '.join(sorted(watched)))} (highlighted; rank at each layer below)." if watched else "")
        + "</p>"
    ]
    for agent in record["latent"]:
        steps = agent["steps"]
        head = "".join(
            f"<th>{'prompt end' if s['kind'] == 'prompt_end' else 'step ' + str(s['step'])}</th>" for s in steps
        )
        rows = []
        for i, layer in enumerate(record["inspect"]["lens_layers"]):
            cells = "".join(f"<td>{_tok_cell(s['lens'][i]['top'], 'p', watched)}</td>" for s in steps)
            rows.append(f"<tr><th>lens, layer {layer}</th>{cells}</tr>")
            if watched and "watch" in steps[0]["lens"][i]:
                ranks = "".join(
                    "<td>" + ", ".join(f"{_esc(w['word'])}: #{w['rank']}" for w in s["lens"][i]["watch"]) + "</td>"
                    for s in steps
                )
                rows.append(f"<tr><th class='note'>watched rank, layer {layer}</th>{ranks}</tr>")
        cells = "".join(f"<td>{_tok_cell(s['realigned_nearest'], 'cos', watched)}</td>" for s in steps)
        rows.append(f"<tr><th>realigned ≈ (cosine)</th>{cells}</tr>")
        out.append(
            f"<h3>{_esc(agent['agent'])}</h3><table class='lens' data-agent='{_esc(agent['agent'])}'>"
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table>"
        )
    out.append("</div>")
    return "".join(out)


def _shade(share: float) -> str:
    """White to dark blue; the square root spreads the small shares most segments get."""
    level = min(max(share, 0.0), 1.0) ** 0.5
    return f"hsl(215,70%,{98 - 60 * level:.0f}%)"


def _grid(grid_id: str, rows: list[str], cols: list[str], values: list[list[float]], title: str) -> str:
    """An SVG heat map: values[r][c] in [0, 1], row and column labels, the value in each cell."""
    cell_w, cell_h, left, top = (46 if len(cols) < 24 else 36), 22, 180, 110
    width, height = left + cell_w * len(cols) + 10, top + cell_h * len(rows) + 10
    parts = [f"<svg id='{grid_id}' width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>"]
    parts.append(f"<text x='0' y='14' font-size='12' font-weight='bold'>{_esc(title)}</text>")
    for c, label in enumerate(cols):
        x = left + c * cell_w + cell_w / 2
        parts.append(
            f"<text x='{x:.0f}' y='{top - 6}' font-size='10' "
            f"transform='rotate(-45 {x:.0f} {top - 6})'>{_esc(label)}</text>"
        )
    for r, label in enumerate(rows):
        y = top + r * cell_h
        parts.append(f"<text x='{left - 6}' y='{y + 15}' font-size='11' text-anchor='end'>{_esc(label)}</text>")
        for c, value in enumerate(values[r]):
            x = left + c * cell_w
            ink = "#fff" if value > 0.45 else "#222"
            shown = f"{100 * value:.0f}" if value >= 0.095 else f"{100 * value:.1f}"
            parts.append(
                f"<g class='cell'><title>{_esc(label)} ← {_esc(cols[c])}: {100 * value:.2f} %</title>"
                f"<rect x='{x}' y='{y}' width='{cell_w - 1}' height='{cell_h - 1}' fill='{_shade(value)}'/>"
                f"<text x='{x + cell_w / 2:.0f}' y='{y + 15}' font-size='10' text-anchor='middle' fill='{ink}'>"
                f"{shown}</text></g>"
            )
    parts.append("</svg>")
    return f"<div class='grid'>{''.join(parts)}</div>"  # a block each: inline SVGs would share a baseline


def _heatmap(record: dict) -> str:
    att = record["attention"]
    if not att["tokens"]:
        return "<p id='attention-heatmap'>No decoded tokens.</p>"
    labels = [s["label"] for s in att["segments"]]
    cols = [f"{t['index']}:{show_token(t['token'])}" for t in att["tokens"]] + ["mean"]
    values = [[t["mean"][r] for t in att["tokens"]] + [att["mean"][r]] for r in range(len(labels))]
    note = (
        "<p class='note'>Share (%) of the final agent's attention that goes to each segment while it "
        "chooses each token (heads and layers averaged; each column sums to 100 %). "
        "Eager attention, for this inspected pass only.</p>"
    )
    return note + _grid("attention-heatmap", labels, cols, values, "attention share per decoded token (%)")


def _layer_heatmap(record: dict) -> str:
    att = record["attention"]
    if not att["tokens"]:
        return ""
    labels = [s["label"] for s in att["segments"]]
    layers = [f"L{i + 1}" for i in range(len(att["per_layer_mean"]))]
    values = [[row[r] for row in att["per_layer_mean"]] for r in range(len(labels))]  # (segments, layers)
    return _grid("attention-layers", labels, layers, values, "attention share per layer, mean over decoded tokens (%)")
