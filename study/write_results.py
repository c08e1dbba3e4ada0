"""docs/results.md from the study's run directories (results/study/). Every number in the
document is computed here from the saved records and summaries; nothing is typed by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "results" / "study"
DOCS = REPO / "docs"
IMG = DOCS / "img"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from markdown import pct, table  # noqa: E402
from run_study import EVALS, GSM8K_METHODS, GSM8K_OUT, STREAMS, TRAINED  # noqa: E402

LABELS = {
    "single": "single",
    "single_sft": "single + SFT",
    "text_mas": "text_mas",
    "text_mas_sft": "text_mas + SFT",
    "latent_mas": "latent_mas",
    "diffmas": "DiffMAS",
}


def load_runs(folder: Path, names) -> dict:
    from diffmas.evaluate.rundir import load_run

    return {n: load_run(folder / n) for n in names if (folder / n / "summary.json").is_file()}


def training_section() -> str:
    rows, fig = [], Figure(figsize=(5.5, 3.2))
    ax = fig.subplots()
    for name in TRAINED:
        path = STUDY / "adapters" / name / "training_summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        curve = s["loss_curve"]
        rows.append(
            [
                name,
                s["examples"],
                s["steps"],
                f"{s['train_seconds'] / 60:.1f}",
                f"{s['seconds_per_step']:.1f}",
                f"{s['peak_memory_bytes'] / 2**30:.1f}",
                f"{curve[0][1]:.3f}",
                f"{curve[-1][1]:.3f}",
            ]
        )
        ax.plot([p[0] for p in curve], [p[1] for p in curve], label=name)
    if not rows:
        return "## Training\n\n_not run yet_"
    ax.set_xlabel("optimizer step"), ax.set_ylabel("training loss (target tokens)"), ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "study_loss.png", dpi=110)
    return "\n\n".join(
        [
            "## Training (same examples, steps, batch, LoRA and schedule for every method)",
            table(["method", "examples", "steps", "minutes", "s/step", "peak GiB", "first loss", "last loss"], rows),
            "![loss curves](img/study_loss.png)",
        ]
    )


def results_section(runs: dict) -> str:
    rows = []
    for name, run in runs.items():
        s = run.summary
        tok = s["tokens"]["per_question"]
        rows.append(
            [
                LABELS[name],
                pct(s["accuracy"], s["accuracy_ci"]),
                pct(s["majority_vote_accuracy"]),
                pct(s["self_consistency"]),
                pct(s["option_accuracy"], s["option_accuracy_ci"]),
                pct(s["option_accuracy_norm"]),
                pct(s["chance"]),
                f"{s['perplexity']:.2f}",
                f"{s['mean_entropy']:.2f}",
                f"{tok['prompt']:.0f} / {tok['latent']:.0f} / {tok['generated']:.0f}",
                f"{s['seconds_per_question']:.2f}",
                f"{s['trace_bytes']['mean'] / 2**20:.1f}",
            ]
        )
    return "\n\n".join(
        [
            "## Results on the test questions",
            "Generated-answer accuracy is pass@1 averaged over the k samples (95 % bootstrap CI over questions); "
            "option likelihood ranks each option's text by its log-likelihood under the final agent after "
            "`Question: …\\nAnswer:` — through the trace for the multi-agent methods — raw and length-normalised.",
            table(
                [
                    "method",
                    "generated acc % [CI]",
                    "majority vote %",
                    "self-consistency %",
                    "option-LL acc % [CI]",
                    "option-LL norm %",
                    "chance %",
                    "perplexity",
                    "top-25 entropy",
                    "tokens/q prompt/latent/gen",
                    "s/q",
                    "trace MiB",
                ],
                rows,
            ),
        ]
    )


def paired_section(runs: dict) -> str:
    from diffmas.evaluate.compare import compare_runs, mcnemar_p

    if "diffmas" not in runs or len(runs) < 2:
        return ""
    names = ["diffmas"] + [n for n in runs if n != "diffmas"]
    cmp = compare_runs([runs[n] for n in names], baseline=0)
    rows = []
    for name, r in zip(names, cmp["runs"]):
        if r["is_baseline"]:
            continue
        # option likelihood, paired on the first sample of each shared question
        a = _option_correct(runs["diffmas"])
        b = _option_correct(runs[name])
        shared = sorted(set(a) & set(b))
        wins = sum(a[i] and not b[i] for i in shared)
        losses = sum(b[i] and not a[i] for i in shared)
        rows.append(
            [
                f"DiffMAS vs {LABELS[name]}",
                f"{-100 * r['delta']:+.1f} [{-100 * r['delta_ci'][1]:+.1f}, {-100 * r['delta_ci'][0]:+.1f}]",
                f"{r['losses']}/{r['wins']}",
                f"{r['p_value']:.3f}",
                f"{wins}/{losses}",
                f"{mcnemar_p(wins, losses):.3f}",
            ]
        )
    return "\n\n".join(
        [
            "## Paired comparisons: DiffMAS against each method",
            f"On the {cmp['n_shared']} shared questions. Δ = DiffMAS minus the other method, percentage points of "
            "generated-answer accuracy (paired bootstrap 95 % CI); W/L = questions DiffMAS wins/loses; McNemar "
            "exact p-values (generated: first sample; option likelihood: per question).",
            table(
                ["comparison", "Δ generated acc [CI]", "W/L generated", "p generated", "W/L option-LL", "p option-LL"],
                rows,
            ),
        ]
    )


def diagnostics_section(runs: dict) -> str:
    """Why the accuracies are what they are: answer format vs choice, read off the records."""
    rows = []
    for name, run in runs.items():
        d = _diagnostics(run)
        rows.append(
            [
                LABELS[name],
                pct(d["with_letter"]),
                pct(d["acc_given_letter"]),
                f"{d['top_letter']} ({pct(d['top_share'])})",
                pct(run.summary["chance"]),
            ]
        )
    return "\n\n".join(
        [
            "## Diagnostics: format or knowledge?",
            "Share of generated answers from which a choice could be extracted, accuracy among those, and the "
            "most frequent extracted choice (its share of extracted answers): a model that only learned the "
            "format answers every question with a letter but is right at chance, often favouring one letter.",
            table(
                [
                    "method",
                    "answers with a choice %",
                    "accuracy when a choice is given %",
                    "most frequent choice",
                    "chance %",
                ],
                rows,
            ),
        ]
    )


def _diagnostics(run) -> dict:
    recs = [r for r in run.records if r.get("status") == "ok"]
    given = [r for r in recs if r.get("extracted")]
    letters = {}
    for r in given:
        letters[r["extracted"]] = letters.get(r["extracted"], 0) + 1
    top = max(letters, key=letters.get) if letters else "—"
    return {
        "with_letter": len(given) / len(recs) if recs else None,
        "acc_given_letter": sum(bool(r["correct"]) for r in given) / len(given) if given else None,
        "top_letter": top,
        "top_share": letters[top] / len(given) if given else None,
    }


def findings_section(runs: dict) -> str:
    """The answer to the study's question, stated from the numbers (nothing typed by hand)."""
    from diffmas.evaluate.compare import compare_runs

    if "diffmas" not in runs:
        return ""
    others = [n for n in ("single_sft", "text_mas_sft", "latent_mas", "single", "text_mas") if n in runs]
    cmp = compare_runs([runs["diffmas"]] + [runs[n] for n in others], baseline=0)
    lines = []
    for name, r in zip(others, cmp["runs"][1:]):
        delta, lo, hi = -r["delta"], -r["delta_ci"][1], -r["delta_ci"][0]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "not distinguishable"
        lines.append(
            f"- DiffMAS vs {LABELS[name]}: {100 * delta:+.1f} points of generated-answer accuracy "
            f"(95 % CI {100 * lo:+.1f} to {100 * hi:+.1f}; McNemar p = {r['p_value']:.3f}) — {verdict}."
        )
    s = runs["diffmas"].summary
    chance = s["chance"]
    above = s["accuracy_ci"][0] > chance
    fair = next((line for line in lines if "single + SFT" in line), "")
    helps = "— better" in fair
    head = (
        "**Trained latent communication helps at this scale:** DiffMAS beats single + SFT at equal training budget."
        if helps
        else "**At this scale, trained latent communication does not measurably help.** DiffMAS is not better "
        "than the single agent fine-tuned on the same examples, steps and LoRA budget."
    )
    chance_line = (
        f"DiffMAS's generated-answer accuracy {pct(s['accuracy'], s['accuracy_ci'])} % is "
        f"{'above' if above else 'not above'} chance ({pct(chance)} %)."
    )
    why = _why(runs)
    note = (
        "Better / worse: the paired bootstrap 95 % CI over questions excludes zero (all k samples); McNemar "
        "uses the first sample of each question only, so it can disagree near the edge."
    )
    return "\n\n".join(["## Findings", head, chance_line, "\n".join(lines), note, why])


def _why(runs: dict) -> str:
    """What the records say about why: answer format vs knowledge, and what the trace does to it."""
    diag = {n: _diagnostics(r) for n, r in runs.items()}
    trained = [n for n in ("diffmas", "single_sft", "text_mas_sft") if n in diag]
    untrained = [n for n in ("single", "text_mas", "latent_mas") if n in diag]
    if not trained or not untrained:
        return ""
    fmt = lambda names, key: ", ".join(f"{LABELS[n]} {pct(diag[n][key])} %" for n in names)
    opt = {n: r.summary["option_accuracy"] for n, r in runs.items() if r.summary.get("option_accuracy") is not None}
    best = max(opt, key=opt.get)
    return "\n\n".join(
        [
            "**Why.** Training taught the answer format, not the knowledge: the trained methods give a choice in "
            f"{fmt(trained, 'with_letter')} of answers (untrained: {fmt(untrained, 'with_letter')}), but when they "
            f"give one they are right {fmt(trained, 'acc_given_letter')} of the time — at chance "
            f"({pct(runs['diffmas'].summary['chance'])} %).",
            "The knowledge the model has shows in option likelihood, which needs no answer format: it is highest "
            f"for {LABELS[best]} ({pct(opt[best])} %); the others: "
            f"{', '.join(f'{LABELS[n]} {pct(opt[n])} %' for n in opt if n != best)}." + _option_story(opt),
        ]
    )


def _option_story(opt: dict) -> str:
    single = opt.get("single")
    if single is None:
        return ""
    traced = [n for n in ("text_mas", "latent_mas", "text_mas_sft", "diffmas") if n in opt]
    parts = []
    if traced and all(opt[n] < single for n in traced):
        parts.append("every upstream trace, text or latent, placed before the question lowers it")
    if "single_sft" in opt and opt["single_sft"] < single:
        parts.append("so does an adapter trained on the answer format alone")
    return (
        (
            " " + "; ".join(parts).capitalize() + ": at 135M parameters the extra context is noise to the "
            "final agent, not a message it can use."
        )
        if parts
        else ""
    )


def _option_correct(run) -> dict:
    out = {}
    for r in run.records:
        if r.get("sample", 0) == 0 and "option_likelihood" in r:
            out[r["id"]] = bool(r["option_likelihood"]["correct"])
    return out


def sweep_section(settings: dict) -> str:
    runs = load_runs(STUDY / "sweep", [f"m{m}" for m in settings["sweep"]])
    if not runs:
        return "## Latent-steps sweep\n\n_not run yet_"
    rows, xs, acc, opt = [], [], [], []
    for name, run in runs.items():
        s, m = run.summary, int(name[1:])
        tok = s["tokens"]["per_question"]
        rows.append(
            [
                m,
                pct(s["accuracy"], s["accuracy_ci"]),
                pct(s["option_accuracy"], s["option_accuracy_ci"]),
                f"{tok['latent']:.0f}",
                f"{s['seconds_per_question']:.2f}",
                f"{s['trace_bytes']['mean'] / 2**20:.1f}",
            ]
        )
        xs.append(m), acc.append(100 * s["accuracy"]), opt.append(100 * s["option_accuracy"])
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(xs, acc, marker="o", label="generated answer")
    ax.plot(xs, opt, marker="s", label="option likelihood")
    ax.set_xlabel("latent steps m at evaluation (trained at m=10)"), ax.set_ylabel("accuracy %"), ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "study_sweep.png", dpi=110)
    return "\n\n".join(
        [
            "## Latent-steps sweep (DiffMAS trained at m=10, evaluated greedy at each m)",
            table(["m", "generated acc % [CI]", "option-LL acc % [CI]", "latent steps/q", "s/q", "trace MiB"], rows),
            "![sweep](img/study_sweep.png)",
        ]
    )


def cost_section(runs: dict, settings: dict) -> str:
    """What the study cost on this machine: training time plus generation time of every evaluation,
    per stream of `run_study.py --streams 2` (the streams run side by side)."""
    stream_of = {}
    for i, stream in enumerate(STREAMS):
        for args in stream:
            names = args[args.index("--only") + 1].split(",") if "--only" in args else [args[1]]
            stream_of.update({(args[1], n): i for n in names})
    rows, totals = [], [0.0] * len(STREAMS)
    for name in TRAINED:
        path = STUDY / "adapters" / name / "training_summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            minutes = (summary["train_seconds"] + summary.get("upstream_text_seconds", 0)) / 60
            i = stream_of[("train", name)]
            unknown = name == "sft_text_mas" and "upstream_text_seconds" not in summary
            rows.append(
                [f"train {name}" + (" (its upstream texts: not recorded)" if unknown else ""), i + 1, f"{minutes:.1f}"]
            )
            totals[i] += minutes
    sweeps = load_runs(STUDY / "sweep", [f"m{m}" for m in settings["sweep"]])
    stages = (
        [(f"eval {n}", ("eval", n), r) for n, r in runs.items()]
        + [(f"sweep {n}", ("sweep", "sweep"), r) for n, r in sweeps.items()]
        + [(f"gsm8k {n}", ("gsm8k", "gsm8k"), r) for n, r in load_runs(GSM8K_OUT, GSM8K_METHODS).items()]
    )
    for label, key, run in stages:
        minutes, i = _generation_minutes(run), stream_of[key]
        rows.append([label, i + 1, f"{minutes:.1f}"])
        totals[i] += minutes
    rows += [[f"**stream {i + 1} total**", i + 1, f"**{t:.1f}**"] for i, t in enumerate(totals)]
    wall = max(totals)  # the streams run side by side
    return "\n\n".join(
        [
            "## What the study cost",
            "Minutes of training and of generation (each record's share of its batch's time; model loading and "
            "scoring excluded), measured on the machine that ran it: 2 CPU cores, the two streams of "
            "`run_study.py --streams 2` side by side, one thread each, so the longer stream sets the wall-clock "
            f"time: about {wall / 60:.1f} hours against the 2-hour target (plus model loading, scoring and, for "
            "sft_text_mas, its upstream texts where not recorded). The measured run ran the same stages in a "
            "different order; each stage's own time does not depend on the order.",
            table(["stage", "stream", "minutes"], rows),
        ]
    )


def _generation_minutes(run) -> float:
    return sum(r["wall_s"] / r["batch_size"] for r in run.records if r.get("status") == "ok") / 60


def gsm8k_section(settings: dict) -> str:
    runs = load_runs(GSM8K_OUT, GSM8K_METHODS)
    if not runs:
        return ""
    from diffmas.evaluate.compare import compare_runs

    cmp = compare_runs(list(runs.values()), baseline=0)
    rows = []
    for (name, run), c in zip(runs.items(), cmp["runs"]):
        s = run.summary
        tok = s["tokens"]["per_question"]
        delta = (
            "baseline"
            if c["is_baseline"]
            else (
                f"{100 * c['delta']:+.1f} [{100 * c['delta_ci'][0]:+.1f}, "
                f"{100 * c['delta_ci'][1]:+.1f}], p = {c['p_value']:.3f}"
            )
        )
        rows.append(
            [
                LABELS[name],
                pct(s["accuracy"], s["accuracy_ci"]),
                delta,
                f"{s['perplexity']:.2f}",
                f"{tok['prompt']:.0f} / {tok['latent']:.0f} / {tok['generated']:.0f}",
                f"{s['seconds_per_question']:.2f}",
                f"{s['trace_bytes']['mean'] / 2**20:.1f}",
                f"{s['peak_memory_bytes'] / 2**20:.0f}",
                pct(s["truncated_rate"]),
            ]
        )
    return "\n\n".join(
        [
            f"## Free-form math: GSM8K, untrained methods ({cmp['n_shared']} test questions, greedy)",
            f"Final agent ≤ {settings['gsm8k_max_new_tokens']} new tokens, text_mas upstream agents ≤ "
            f"{settings['gsm8k_upstream_max_new_tokens']} each, m = {settings['latent_steps']}; answers checked with "
            "math-verify. Δ vs single in points (paired bootstrap 95 % CI, exact McNemar p).",
            table(
                [
                    "method",
                    "accuracy % [CI]",
                    "Δ vs single",
                    "perplexity",
                    "tokens/q prompt/latent/gen",
                    "s/q",
                    "trace MiB",
                    "peak MiB",
                    "hit the token limit %",
                ],
                rows,
            ),
        ]
    )


def settings_section(settings: dict) -> str:
    rows = [[k, v] for k, v in settings.items()]
    return "\n\n".join(["## Settings", table(["setting", "value"], rows)])


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    settings = json.loads((STUDY / "settings.json").read_text())
    runs = load_runs(STUDY / "eval", EVALS)
    parts = [
        "# Results: does trained latent communication help at this scale?",
        "Produced by `python study/run_study.py` then `python study/write_results.py` (both resumable; "
        "per-sample records under `results/study/`). Every number below is computed from those files.",
        findings_section(runs),
        settings_section(settings),
        training_section(),
        results_section(runs) if runs else "_no evaluations yet_",
        paired_section(runs),
        diagnostics_section(runs) if runs else "",
        sweep_section(settings),
        gsm8k_section(settings),
        cost_section(runs, settings),
    ]
    discussion = DOCS / "results_discussion.md"
    if discussion.is_file():
        parts.append(discussion.read_text())
    (DOCS / "results.md").write_text("\n\n".join(p for p in parts if p) + "\n")
    print(f"wrote {DOCS / 'results.md'}")


if __name__ == "__main__":
    main()
