"""Looking inside the relay channel, before and after training: docs/inspection.md from real runs.

    python study/inspect_relay.py          # the runs (resumable), then the document and its images
    python study/inspect_relay.py --docs   # only docs/inspection.md and docs/img/inspection*.png, from the records

On `relay_word` (K=8, reads=latent, m=4: the reader sees only the sender's 4 latent steps) the
untrained channel (latent_mas) and the trained one (the channel study's full DiffMAS adapter,
results/channel/relay_word/diffmas-full-m4/adapter, whose weights `python study/channel.py`
writes) each answer `n_questions` held-out questions with `--inspect` on all of them
(results/inspection/relay_word/<condition>/eval/). Question `index` is also rendered as a page
(results/inspection/relay_word/<condition>/question/) and photographed in headless chromium.
Every number and conclusion in the document is computed below from those records.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
OUT = Path("results") / "inspection" / "relay_word"  # relative to REPO: no machine paths in records
DOC = Path("docs") / "inspection.md"
IMG = Path("docs") / "img"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffmas.evaluate.metrics import bootstrap_ci  # noqa: E402
from diffmas.evaluate.rundir import load_run  # noqa: E402
from diffmas.inspect.aggregate import load_inspections, question_shares  # noqa: E402
from diffmas.inspect.page import show_token, write_inspection  # noqa: E402

from markdown import pct, table  # noqa: E402


@dataclass
class InspectSettings:
    model: str = "smollm2-135m"
    device: str = "cpu"
    task: str = "relay_word?k=8"
    reads: str = "latent"  # the reader attends to the sender's latent steps only
    m: int = 4  # latent steps of the sender, as the adapter was trained
    adapter: str = "results/channel/relay_word/diffmas-full-m4/adapter"
    n_questions: int = 32  # held-out questions per condition, every one inspected
    index: int = 0  # the question shown in full
    max_new_tokens: int = 4
    batch_size: int = 8


CONDITIONS = {"latent_mas": "latent_mas (untrained)", "diffmas": "DiffMAS, full (trained)"}


# ----------------------------------------------------------------------------- runs


def run(s: InspectSettings) -> None:
    from diffmas.evaluate.runner import EvalConfig, evaluate
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig

    if not (Path(s.adapter) / "adapter_model.safetensors").is_file():
        sys.exit(f"{s.adapter} has no weights: run `python study/channel.py` (its relay_word m=4 full stage) first")
    for method in CONDITIONS:
        config = EvalConfig(
            task=s.task,
            method=method,
            model=s.model,
            limit=s.n_questions,
            batch_size=s.batch_size,
            device=s.device,
            adapter=s.adapter if method == "diffmas" else None,
            method_config=MethodConfig(
                latent_steps=s.m, reads=s.reads, decode=DecodeConfig(max_new_tokens=s.max_new_tokens)
            ),
        )
        evaluate(config, OUT / method / "eval", inspect=s.n_questions)


def shown_question(s: InspectSettings, method: str) -> dict:
    """The inspection record of question `index` (the run's records are in question order)."""
    records = load_run(OUT / method / "eval").records
    wanted = records[s.index]["id"]
    return next(r for r in load_inspections(OUT / method / "eval") if r["id"] == wanted)


def pages(s: InspectSettings) -> dict:
    """Question `index` as a page per condition, opened in headless chromium: elements checked, screenshots."""
    from diffmas.inspect.browser import dump_dom, find_chromium, screenshot

    checks = {}
    for method in CONDITIONS:
        record = shown_question(s, method)
        record["adapter"] = s.adapter if method == "diffmas" else None
        _, html_path = write_inspection(record, OUT / method / "question")
        if find_chromium() is None:
            sys.exit("chromium is needed for the screenshots: apt-get install -y chromium")
        dom = dump_dom(html_path)
        elements = ("timeline", "logit-lens", "attention-heatmap", "attention-layers", "answer")
        checks[method] = {e: f'id="{e}"' in dom for e in elements}
        name = "inspection.png" if method == "diffmas" else "inspection_untrained.png"
        screenshot(html_path, IMG / name, 1300, 1900)  # the whole page
    return checks


# ----------------------------------------------------------------------------- reading the records


def _secret_ranks(record: dict) -> dict:
    """Ranks of the secret in the sender's logit lens at its latent steps, and whether it is the
    nearest token of each realigned state the latent steps are fed (prompt end .. step m-1)."""
    steps = record["latent"][0]["steps"]
    latent = [st for st in steps if st["kind"] == "latent"]
    fed = steps[:-1]  # the last step's realigned state is never fed on
    secret = record["gold"].strip().lower()
    last = [st["lens"][-1]["watch"][0]["rank"] for st in latent]
    middle = [lens["watch"][0]["rank"] for st in latent for lens in st["lens"][:-1]]
    return {
        "last": last,
        "best_middle": min(middle) if middle else None,
        "nearest": [st["realigned_nearest"][0]["token"].strip().lower() == secret for st in fed],
    }


def read_condition(s: InspectSettings, method: str) -> dict:
    run_ = load_run(OUT / method / "eval")
    records = {r["id"]: r for r in run_.records if r["sample"] == 0}
    inspections = load_inspections(OUT / method / "eval")
    ranks = {r["id"]: _secret_ranks(r) for r in inspections}
    latent_share = {r["id"]: question_shares(r)["kinds"]["latent"] for r in inspections}
    sender_col = [[s_["label"] for s_ in r["attention"]["segments"]].index("sender/latent") for r in inspections]
    per_layer = np.array([np.array(r["attention"]["per_layer_mean"])[:, c] for r, c in zip(inspections, sender_col)])
    correct = [bool(records[i].get("correct")) for i in ranks]
    top_k = inspections[0]["inspect"]["top_k"]
    return {
        "n": len(inspections),
        "n_layers": inspections[0]["n_layers"],
        "lens_layers": inspections[0]["inspect"]["lens_layers"],
        "top_k": top_k,
        "accuracy": sum(bool(r.get("correct")) for r in records.values()) / len(records),
        "matches_run": sum(1 for r in inspections if r.get("matches_run")),
        "top1_any": sum(1 for v in ranks.values() if min(v["last"]) == 1),
        "top1_all": sum(1 for v in ranks.values() if max(v["last"]) == 1),
        "topk_any": sum(1 for v in ranks.values() if min(v["last"]) <= top_k),
        "median_rank_last": statistics.median(r for v in ranks.values() for r in v["last"]),
        "median_best_middle": statistics.median(v["best_middle"] for v in ranks.values()),
        "middle_topk": sum(1 for v in ranks.values() if v["best_middle"] <= top_k),
        "nearest_any": sum(1 for v in ranks.values() if any(v["nearest"])),
        "latent_share": latent_share,
        "latent_share_mean": float(np.mean(list(latent_share.values()))),
        "latent_share_ci": bootstrap_ci(list(latent_share.values())),
        "latent_share_by_outcome": {
            outcome: [v for v, ok in zip(latent_share.values(), correct) if ok == want]
            for outcome, want in (("correct", True), ("incorrect", False))
        },
        "per_layer": per_layer.mean(axis=0),  # (layers,) mean share of sender/latent
    }


# ----------------------------------------------------------------------------- the document


def _frac(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f} %)"


def _verdict_lens(c: dict) -> str:
    shows = c["top1_any"] / c["n"] >= 0.5
    where = (
        "only at the last layer"
        if c["middle_topk"] / c["n"] < 0.5
        else f"already at an intermediate layer in {_frac(c['middle_topk'], c['n'])}"
    )
    if shows:
        return (
            f"yes: the secret is the last-layer lens's top token at one or more of its latent steps in "
            f"{_frac(c['top1_any'], c['n'])} questions (at every step in {_frac(c['top1_all'], c['n'])}), "
            f"{where} (median best rank over layers {', '.join(map(str, c['lens_layers'][:-1]))}: "
            f"{c['median_best_middle']:.0f})"
        )
    return (
        f"no: the secret is the last-layer lens's top token at a latent step in only "
        f"{_frac(c['top1_any'], c['n'])} questions (in the top {c['top_k']} in {_frac(c['topk_any'], c['n'])}; "
        f"median rank {c['median_rank_last']:.0f})"
    )


def _verdict_hidden(c: dict) -> str:
    """Spelled out or hidden: does the trained channel's state name the secret in vocabulary space?"""
    spelled, near = c["top1_all"] / c["n"], c["nearest_any"] / c["n"]
    if spelled >= 0.5 and near >= 0.5:
        return (
            "The trained channel does not hide the secret in directions no token names: it spells the secret out. "
            f"Every latent step decodes to the secret through the output head in {_frac(c['top1_all'], c['n'])} "
            "questions, and a realigned embedding the steps are fed is nearest to the secret's own token in "
            f"{_frac(c['nearest_any'], c['n'])}. The intermediate layers do not name it (median best rank "
            f"{c['median_best_middle']:.0f}): it becomes a vocabulary direction only at the end of each step."
        )
    if spelled < 0.5 and c["accuracy"] >= 0.5:
        return (
            f"The trained channel carries the secret (accuracy {pct(c['accuracy'])} %) without naming it: the "
            f"last-layer lens shows it at every step in only {_frac(c['top1_all'], c['n'])} questions."
        )
    return "The trained channel neither names the secret consistently nor carries it reliably."


def _question_table(record: dict) -> str:
    steps = record["latent"][0]["steps"]
    rows = []
    for st in steps:
        last = st["lens"][-1]
        top = ", ".join(f"`{show_token(t['token'])}` {t['p']:.2f}" for t in last["top"][:3])
        near = ", ".join(f"`{show_token(t['token'])}` {t['cos']:.2f}" for t in st["realigned_nearest"][:3])
        middle = min(lens["watch"][0]["rank"] for lens in st["lens"][:-1])
        name = "prompt end" if st["kind"] == "prompt_end" else f"step {st['step']}"
        rows.append([name, top, last["watch"][0]["rank"], middle, near])
    header = [
        "sender column",
        "last-layer lens (top 3, p)",
        "secret rank",
        "best rank, other layers",
        "realigned ≈ (cos)",
    ]
    return table(header, rows)


def _attention_rows(record: dict) -> str:
    att = record["attention"]
    labels = [s["label"] for s in att["segments"]]
    header = ["decoded token", *labels]
    rows = [[f"`{show_token(t['token'])}`", *(f"{100 * v:.1f}" for v in t["mean"])] for t in att["tokens"]]
    rows.append(["**mean**", *(f"{100 * v:.1f}" for v in att["mean"])])
    return table(header, rows)


def plot_layers(conditions: dict, m: int) -> Path:
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for method, c in conditions.items():
        layers = np.arange(1, len(c["per_layer"]) + 1)
        ax.plot(layers, 100 * c["per_layer"], marker="o", ms=3, label=CONDITIONS[method])
    ax.set_xlabel("reader layer")
    ax.set_ylabel("attention share to sender latent steps (%)")
    ax.set_title(f"Reader's attention on the sender's {m} latent steps, per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    path = IMG / "inspection_layers.png"
    fig.savefig(path, dpi=120)
    return path


def write_doc(s: InspectSettings, checks: dict | None) -> None:
    conditions = {method: read_condition(s, method) for method in CONDITIONS}
    shown = {method: shown_question(s, method) for method in CONDITIONS}
    before, after = conditions["latent_mas"], conditions["diffmas"]
    shared = sorted(set(before["latent_share"]) & set(after["latent_share"]))
    diff = [after["latent_share"][q] - before["latent_share"][q] for q in shared]
    diff_ci = bootstrap_ci(diff)
    plot_layers(conditions, s.m)
    q = shown["diffmas"]
    n_prompt = next(
        seg["n_tokens"] for seg in q["trace"]["segments"] if seg["agent"] == "reader" and seg["kind"] == "prompt"
    )
    n_layers = before["n_layers"]
    lines = [
        "# Inside the latent channel: inspecting the relay before and after training",
        "Generated by `python study/inspect_relay.py` from the inspection records in "
        "`results/inspection/relay_word/`; every number and conclusion below is computed from them.",
        "",
        f"Setup: {s.model}, task `{s.task}` (chance {100 / 8:.1f} %), `reads={s.reads}` (the reader attends "
        f"to the sender's {s.m} latent steps only, never to its prompt), m={s.m}, greedy decoding, "
        f"{s.n_questions} held-out questions per condition, each inspected (`diffmas eval --inspect "
        f"{s.n_questions}`). Untrained: `latent_mas`; trained: `diffmas` with the channel study's adapter "
        f"`{s.adapter}` (trained with m={s.m}, reads=latent; see [channel.md](channel.md)). Logit lens at "
        f"layers {', '.join(map(str, before['lens_layers']))} of {n_layers}; the last is the model's own "
        "next-token distribution at the latent step's position.",
        "",
        "## Answers",
        "",
        "- Questions whose inspected answer is the one the ordinary (fast-attention) run recorded: "
        + "; ".join(f"{CONDITIONS[m_]}: {c['matches_run']}/{c['n']}" for m_, c in conditions.items())
        + ".",
        "- Accuracy: " + "; ".join(f"{CONDITIONS[m_]}: {pct(c['accuracy'])} %" for m_, c in conditions.items()) + ".",
        "",
        "## Does the sender's logit lens show the secret word?",
        "",
        table(
            [
                "condition",
                "secret top-1 (last layer) at ≥1 latent step",
                "at every step",
                f"in top {before['top_k']}",
                "median rank (last layer)",
                "median best rank (other layers)",
                "secret = nearest token of a fed embedding",
            ],
            [
                [
                    CONDITIONS[m_],
                    _frac(c["top1_any"], c["n"]),
                    _frac(c["top1_all"], c["n"]),
                    _frac(c["topk_any"], c["n"]),
                    f"{c['median_rank_last']:.0f}",
                    f"{c['median_best_middle']:.0f}",
                    _frac(c["nearest_any"], c["n"]),
                ]
                for m_, c in conditions.items()
            ],
        ),
        "",
        *(f"- **{CONDITIONS[m_]}: {_verdict_lens(c)}.**" for m_, c in conditions.items()),
        f"- {_verdict_hidden(after)}",
        "",
        "Tokens are shown as decoded, a leading space as ␣ (`␣child` and `child` are two vocabulary entries).",
        "",
        "## How much of the reader's attention goes to the latent steps?",
        "",
        "Share of the reader's attention (all heads and layers, mean over its decoded tokens, then over "
        "questions) on the sender's latent steps; the rest goes to the reader's own prompt and tokens "
        "(the sender's prompt is masked under reads=latent and gets exactly 0).",
        "",
        table(
            [
                "condition",
                "latent-step share % [95 % CI]",
                "correct answers: n, share %",
                "wrong answers: n, share %",
                "layer with the largest share",
            ],
            [
                [
                    CONDITIONS[m_],
                    pct(c["latent_share_mean"], c["latent_share_ci"]),
                    *(
                        f"{len(v)}, {pct(float(np.mean(v))) if v else '—'}"
                        for v in (c["latent_share_by_outcome"]["correct"], c["latent_share_by_outcome"]["incorrect"])
                    ),
                    f"{int(np.argmax(c['per_layer'])) + 1} ({pct(float(np.max(c['per_layer'])))} %)",
                ]
                for m_, c in conditions.items()
            ],
        ),
        "",
        f"- **Trained − untrained, paired over {len(shared)} questions: {100 * np.mean(diff):+.1f} points "
        f"[{100 * diff_ci[0]:+.1f}, {100 * diff_ci[1]:+.1f}]"
        + (
            " — training makes the reader look at the latent steps more."
            if diff_ci[0] > 0
            else " — training makes the reader look at the latent steps less."
            if diff_ci[1] < 0
            else " — no clear change."
        )
        + "**",
        f"- For scale: at its first token the reader sees {s.m} latent steps and its own {n_prompt} prompt "
        f"entries (question {s.index}); attending uniformly it would give the latent steps "
        f"{pct(s.m / (s.m + n_prompt))} %.",
        "",
        "![latent-step share per layer](img/inspection_layers.png)",
        "",
        f"## One question in full (question {s.index}: {q['private'].get('sender', '')!r} → {q['question']!r})",
        "",
    ]
    for method in CONDITIONS:
        record = shown[method]
        lines += [
            f"### {CONDITIONS[method]}: answer `{record['answer']['text'].strip()}` "
            f"({'correct' if record['correct'] else 'wrong'}; secret `{record['gold']}`)",
            "",
            _question_table(record),
            "",
            "Reader's attention share (%) per segment while it chooses each token:",
            "",
            _attention_rows(record),
            "",
        ]
    lines += [
        "Page of the trained run (`diffmas inspect --task 'relay_word?k=8' --index 0 --method diffmas --adapter "
        f"{s.adapter} --out DIR`; here `results/inspection/relay_word/diffmas/question/index.html`), "
        "photographed in headless chromium:",
        "",
        "![inspection page](img/inspection.png)",
        "",
    ]
    if checks:
        ok = all(all(v.values()) for v in checks.values())
        lines += [
            "Opened in headless chromium (`--dump-dom`): "
            + (
                "every section (timeline, logit lens, both heat maps, answer) is present on both pages."
                if ok
                else f"missing elements: {checks}"
            ),
            "",
        ]
    lines += [
        "## Reading an inspection",
        "",
        "- `trace.segments`: per agent and kind (prompt / latent / generated) its columns, entries and the KV "
        "bytes it holds (read from the stored keys and values).",
        "- `latent[agent].steps`: step 0 is the agent's last prompt position (the state its first latent step "
        "is made from), then one entry per latent step: `lens` (per layer: top-k tokens and probabilities, "
        "entropy, rank and probability of each watched word — the gold answer is watched automatically) and "
        "`realigned_nearest` (tokens whose input embeddings are nearest, by cosine, to the realigned state "
        "the next step is fed).",
        "- `attention`: per decoded token of the final agent, the share of its attention per segment for each "
        "layer (heads averaged) and their mean; `per_layer_mean` and `mean` over tokens. Shares sum to 1.",
        "- Settings of this document: " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()) + ".",
        "",
    ]
    DOC.write_text("\n".join(lines))
    write_readme(s, before, after, len(shared), diff, diff_ci)


README_BEGIN, README_END = "<!-- inspection:begin -->", "<!-- inspection:end -->"


def write_readme(s: InspectSettings, before: dict, after: dict, n_shared: int, diff: list[float], diff_ci) -> None:
    """The README's two-line summary between its inspection markers."""
    readme = Path("README.md")
    text = readme.read_text()
    if README_BEGIN not in text:
        return
    summary = "\n".join(
        [
            README_BEGIN,
            f"- `{s.task}` (m={s.m}, reads={s.reads}, {before['n']} held-out questions): the secret is the sender's "
            f"last-layer logit-lens top token at every latent step in {_frac(before['top1_all'], before['n'])} "
            f"questions untrained and {_frac(after['top1_all'], after['n'])} trained; "
            f"{_verdict_hidden(after).split('.')[0].split(':')[-1].strip()}.",
            f"- The reader's attention on the {s.m} latent steps: {pct(before['latent_share_mean'])} % untrained, "
            f"{pct(after['latent_share_mean'])} % trained (paired Δ over {n_shared} questions "
            f"{100 * float(np.mean(diff)):+.1f} [{100 * diff_ci[0]:+.1f}, {100 * diff_ci[1]:+.1f}] points).",
            "",
            "Details: [docs/inspection.md](docs/inspection.md).",
            README_END,
        ]
    )
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + summary + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", action="store_true", help="only write the document from the records")
    args = parser.parse_args()
    os.chdir(REPO)
    import torch

    torch.set_num_threads(1)  # a shared CPU: one thread per process, as the channel study
    settings = InspectSettings()
    if not args.docs:
        run(settings)
    checks = pages(settings)
    write_doc(settings, checks)
    print(f"wrote {DOC}, {IMG / 'inspection.png'}, {IMG / 'inspection_untrained.png'}, {IMG / 'inspection_layers.png'}")


if __name__ == "__main__":
    main()
