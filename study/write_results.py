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

from run_study import EVALS, TRAINED  # noqa: E402

LABELS = {"single": "single", "single_sft": "single + SFT", "text_mas": "text_mas", "text_mas_sft": "text_mas + SFT",
          "latent_mas": "latent_mas", "diffmas": "DiffMAS"}


def pct(x, ci=None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


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
        rows.append([name, s["examples"], s["steps"], f"{s['train_seconds'] / 60:.1f}", f"{s['seconds_per_step']:.1f}",
                     f"{s['peak_memory_bytes'] / 2**30:.1f}", f"{curve[0][1]:.3f}", f"{curve[-1][1]:.3f}"])
        ax.plot([p[0] for p in curve], [p[1] for p in curve], label=name)
    if not rows:
        return "## Training\n\n_not run yet_"
    ax.set_xlabel("optimizer step"), ax.set_ylabel("training loss (target tokens)"), ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "study_loss.png", dpi=110)
    return "\n\n".join(["## Training (same examples, steps, batch, LoRA and schedule for every method)",
                        table(["method", "examples", "steps", "minutes", "s/step", "peak GiB", "first loss",
                               "last loss"], rows), "![loss curves](img/study_loss.png)"])


def results_section(runs: dict) -> str:
    rows = []
    for name, run in runs.items():
        s = run.summary
        tok = s["tokens"]["per_question"]
        rows.append([LABELS[name], pct(s["accuracy"], s["accuracy_ci"]), pct(s["majority_vote_accuracy"]),
                     pct(s["self_consistency"]), pct(s["option_accuracy"], s["option_accuracy_ci"]),
                     pct(s["option_accuracy_norm"]), pct(s["chance"]), f"{s['perplexity']:.2f}",
                     f"{s['mean_entropy']:.2f}", f"{tok['prompt']:.0f} / {tok['latent']:.0f} / {tok['generated']:.0f}",
                     f"{s['seconds_per_question']:.2f}", f"{s['trace_bytes']['mean'] / 2**20:.1f}"])
    return "\n\n".join([
        "## Results on the test questions",
        "Generated-answer accuracy is pass@1 averaged over the k samples (95 % bootstrap CI over questions); "
        "option likelihood ranks each option's text by its log-likelihood under the final agent after "
        "`Question: …\\nAnswer:` — through the trace for the multi-agent methods — raw and length-normalised.",
        table(["method", "generated acc % [CI]", "majority vote %", "self-consistency %", "option-LL acc % [CI]",
               "option-LL norm %", "chance %", "perplexity", "top-25 entropy", "tokens/q prompt/latent/gen",
               "s/q", "trace MiB"], rows),
    ])


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
        rows.append([f"DiffMAS vs {LABELS[name]}", f"{-100 * r['delta']:+.1f} [{-100 * r['delta_ci'][1]:+.1f}, "
                     f"{-100 * r['delta_ci'][0]:+.1f}]", f"{r['losses']}/{r['wins']}", f"{r['p_value']:.3f}",
                     f"{wins}/{losses}", f"{mcnemar_p(wins, losses):.3f}"])
    return "\n\n".join([
        "## Paired comparisons: DiffMAS against each method",
        f"On the {cmp['n_shared']} shared questions. Δ = DiffMAS minus the other method, percentage points of "
        "generated-answer accuracy (paired bootstrap 95 % CI); W/L = questions DiffMAS wins/loses; McNemar "
        "exact p-values (generated: first sample; option likelihood: per question).",
        table(["comparison", "Δ generated acc [CI]", "W/L generated", "p generated", "W/L option-LL", "p option-LL"],
              rows),
    ])


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
        rows.append([m, pct(s["accuracy"], s["accuracy_ci"]), pct(s["option_accuracy"], s["option_accuracy_ci"]),
                     f"{tok['latent']:.0f}", f"{s['seconds_per_question']:.2f}", f"{s['trace_bytes']['mean'] / 2**20:.1f}"])
        xs.append(m), acc.append(100 * s["accuracy"]), opt.append(100 * s["option_accuracy"])
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(xs, acc, marker="o", label="generated answer")
    ax.plot(xs, opt, marker="s", label="option likelihood")
    ax.set_xlabel("latent steps m at evaluation (trained at m=10)"), ax.set_ylabel("accuracy %"), ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "study_sweep.png", dpi=110)
    return "\n\n".join([
        "## Latent-steps sweep (DiffMAS trained at m=10, evaluated greedy at each m)",
        table(["m", "generated acc % [CI]", "option-LL acc % [CI]", "latent steps/q", "s/q", "trace MiB"], rows),
        "![sweep](img/study_sweep.png)",
    ])


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
        settings_section(settings), training_section(), results_section(runs) if runs else "_no evaluations yet_",
        paired_section(runs), sweep_section(settings),
    ]
    discussion = DOCS / "results_discussion.md"
    if discussion.is_file():
        parts.append(discussion.read_text())
    (DOCS / "results.md").write_text("\n\n".join(p for p in parts if p) + "\n")
    print(f"wrote {DOCS / 'results.md'}")


if __name__ == "__main__":
    main()
