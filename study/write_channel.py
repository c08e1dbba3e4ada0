"""docs/channel.md (and the README's summary of it) from the channel study's records.

Every number and every conclusion in the document is computed here from results/channel/ (the
per-sample records, the summaries and the training summaries); nothing is typed by hand. Stages
that have not run yet are listed as missing, not guessed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
IMG = DOCS / "img"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffmas.evaluate.compare import compare_runs  # noqa: E402
from diffmas.evaluate.information import read_channel  # noqa: E402
from diffmas.evaluate.rundir import load_run  # noqa: E402
from diffmas.tasks import get_task  # noqa: E402

from channel import OUT, ChannelSettings, Stage, stages  # noqa: E402
from markdown import pct, table  # noqa: E402

LABELS = {
    ("latent_mas", None): "latent_mas (untrained)",
    ("diffmas", "none"): "DiffMAS, reading only (grad none)",
    ("diffmas", "full"): "DiffMAS, full (encode + read)",
    ("text_mas", None): "text_mas, m tokens",
}
ALPHA = 0.05  # significance level of every test below
README_BEGIN, README_END = "<!-- channel:begin -->", "<!-- channel:end -->"


# ----------------------------------------------------------------------------- loading


class Result:
    """One finished stage: its run, accuracy, information and cost."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.run = load_run(OUT / stage.name / "eval")
        self.summary = self.run.summary
        self.task = get_task(stage.task)
        self.accuracy = self.summary["accuracy"]
        self.ci = self.summary["accuracy_ci"]
        self.chance = self.task.chance()
        reading = read_channel(self.run.records, self.chance)
        self.bits, self.bits_p, self.p_chance = reading.bits, reading.bits_p, reading.p_chance
        training = OUT / stage.name / "adapter" / "training_summary.json"
        self.training = json.loads(training.read_text()) if training.is_file() else None

    @property
    def above_chance(self) -> bool:
        return self.p_chance < ALPHA


def load(s: ChannelSettings) -> tuple[dict[Stage, Result], list[Stage]]:
    results, missing = {}, []
    for stage in stages(s):
        if (OUT / stage.name / "eval" / "summary.json").is_file():
            results[stage] = Result(stage)
        else:
            missing.append(stage)
    return results, missing


# ----------------------------------------------------------------------------- formatting


def bits(r: Result) -> str:
    return "—" if r.bits is None else f"{r.bits:.2f} (p={r.bits_p:.2g})"


def verdict(r: Result) -> str:
    return f"above chance (p={r.p_chance:.2g})" if r.above_chance else f"at chance (p={r.p_chance:.2g})"


def find(results, group, method, grad=None, m=None, task=None, adapters="shared"):
    for st, r in results.items():
        if (
            st.group == group
            and st.method == method
            and st.upstream_grad == grad
            and st.adapters == adapters
            and (m is None or st.m == m)
            and (task is None or st.task == task)
        ):
            return r
    return None


# ----------------------------------------------------------------------------- sections


def grid_section(results, s: ChannelSettings) -> str:
    conditions = list(LABELS)
    rows = []
    for m in s.ms:
        row = [m]
        for method, grad in conditions:
            r = find(results, "grid", method, grad, m)
            row.append("—" if r is None else pct(r.accuracy, r.ci))
        rows.append(row)
    chance = get_task(_word(s)).chance()
    text = [
        f"## Accuracy against m (relay_word, K={s.k}, reads=latent)",
        f"Exact-match accuracy in % [95 % CI] on {s.test_examples} held-out examples; chance "
        f"{100 * chance:.1f} %. text_mas at m sends an m-token message (no text at m=0).",
        "",
        table(["m", *[LABELS[c] for c in conditions]], rows),
        "",
        "![accuracy against m](img/channel_m.png)",
        "",
    ]
    plot_grid(results, s, chance)
    verdicts = []
    for method, grad in conditions:
        runs = [find(results, "grid", method, grad, m) for m in s.ms]
        above = [r.stage.m for r in runs if r is not None and r.above_chance]
        tested = [r.stage.m for r in runs if r is not None]
        if tested:
            verdicts.append(
                f"- {LABELS[(method, grad)]}: above chance (one-sided binomial test, p < {ALPHA}) "
                f"at m = {_list(above) or 'none'} of m = {_list(tested)}."
            )
    full = [find(results, "grid", "diffmas", "full", m) for m in s.ms]
    reached = [r.stage.m for r in full if r is not None and r.accuracy >= 0.95]
    verdicts.append(
        f"- **Smallest m at which trained DiffMAS (full) reaches ≥ 95 %: "
        f"{min(reached) if reached else 'none of those run'}.**"
    )
    return "\n".join(text + verdicts) + "\n"


def _word(s: ChannelSettings) -> str:
    return "relay_word" if s.k == 8 else f"relay_word?k={s.k}"


def _list(values) -> str:
    return ", ".join(str(v) for v in values)


def plot_grid(results, s: ChannelSettings, chance: float) -> None:
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    for (method, grad), label in LABELS.items():
        points = [(m, find(results, "grid", method, grad, m)) for m in s.ms]
        points = [(m, r) for m, r in points if r is not None]
        if not points:
            continue
        xs = [math.log2(m + 1) for m, _ in points]
        ys = [100 * r.accuracy for _, r in points]
        err = [[100 * (r.accuracy - r.ci[0]) for _, r in points], [100 * (r.ci[1] - r.accuracy) for _, r in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(100 * chance, color="grey", linestyle="--", label="chance")
    ax.set_xticks([math.log2(m + 1) for m in s.ms], [str(m) for m in s.ms])
    ax.set_xlabel("m (latent steps, or text tokens)")
    ax.set_ylabel("exact-match accuracy, %")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8)
    ax.set_title(f"relay_word K={s.k}, reads=latent, SmolLM2-135M")
    IMG.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(IMG / "channel_m.png", dpi=120)


def bits_section(results, s: ChannelSettings) -> str:
    rows = []
    for m in s.ms:
        row = [m]
        for method, grad in LABELS:
            r = find(results, "grid", method, grad, m)
            row.append("—" if r is None else bits(r))
        full = find(results, "grid", "diffmas", "full", m)
        row.append(f"{full.bits / m:.2f}" if full is not None and m else "—")
        rows.append(row)
    return (
        "\n".join(
            [
                "## Information: bits through the channel",
                f"Mutual information between the secret and the extracted answer, in bits (plug-in with the "
                f"Miller–Madow correction) and its permutation p-value (answers shuffled across "
                f"examples, 500 times: what the estimate's small-sample bias alone gives); the secret carries log2 {s.k} = "
                f"{math.log2(s.k):.0f} bits. Bits per step = full DiffMAS's bits / m. Bits count wrong answers too: "
                "a reader that is wrong in a way that depends on the secret still carries information.",
                "",
                table(["m", *LABELS.values(), "bits per latent step (full)"], rows),
            ]
        )
        + "\n"
    )


def paired_section(results, s: ChannelSettings, other: tuple[str, str | None], title: str, intro: str) -> str:
    rows, wins = [], []
    for m in s.ms:
        full = find(results, "grid", "diffmas", "full", m)
        base = find(results, "grid", *other, m)
        if full is None or base is None:
            continue
        cmp = compare_runs([base.run, full.run])["runs"][1]
        rows.append(
            [m, pct(base.accuracy), pct(full.accuracy), pct(cmp["delta"], cmp["delta_ci"]), f"{cmp['p_value']:.2g}"]
        )
        if cmp["delta_ci"][0] > 0:
            wins.append(m)
        elif cmp["delta_ci"][1] < 0:
            wins.append(f"-{m}")
    if not rows:
        return f"## {title}\nNot run yet.\n"
    better = [w for w in wins if not str(w).startswith("-")]
    worse = [str(w)[1:] for w in wins if str(w).startswith("-")]
    conclusion = (
        f"Full DiffMAS is better (paired 95 % CI above 0) at m = {_list(better) or 'none'}"
        + (f", worse at m = {_list(worse)}" if worse else "")
        + f", of m = {_list(r[0] for r in rows)}."
    )
    return (
        "\n".join(
            [
                f"## {title}",
                intro,
                "",
                table(
                    ["m", LABELS[other], LABELS[("diffmas", "full")], "Δ (full − other) [95 % CI]", "McNemar p"], rows
                ),
                "",
                f"**{conclusion}**",
            ]
        )
        + "\n"
    )


def probe_section(results, s: ChannelSettings, group: str, title: str, intro: str, key) -> str:
    rows = []
    for st, r in sorted(((st, r) for st, r in results.items() if st.group == group), key=lambda x: key(x[0])):
        rows.append(
            [
                key(st),
                LABELS.get((st.method, st.upstream_grad), st.method),
                pct(r.accuracy, r.ci),
                pct(r.chance),
                bits(r),
                verdict(r),
            ]
        )
    if not rows:
        return f"## {title}\nNot run yet.\n"
    return (
        "\n".join(
            [
                f"## {title}",
                intro,
                "",
                table(["setting", "condition", "accuracy % [95 % CI]", "chance %", "bits", "vs chance"], rows),
            ]
        )
        + "\n"
    )


def roles_section(results, s: ChannelSettings) -> str:
    shared = find(results, "grid", "diffmas", "full", s.probe_m)
    per_role = find(results, "roles", "diffmas", "full", s.probe_m, adapters="per-role")
    if shared is None or per_role is None:
        return "## Shared vs per-role adapters\nNot run yet.\n"
    cmp = compare_runs([shared.run, per_role.run])["runs"][1]
    return (
        "\n".join(
            [
                f"## Shared vs per-role adapters (m={s.probe_m})",
                "",
                table(
                    ["adapters", "accuracy % [95 % CI]", "bits"],
                    [
                        ["one shared LoRA", pct(shared.accuracy, shared.ci), bits(shared)],
                        ["one LoRA per role", pct(per_role.accuracy, per_role.ci), bits(per_role)],
                    ],
                ),
                "",
                f"Per-role minus shared: {pct(cmp['delta'], cmp['delta_ci'])} points, McNemar p = {cmp['p_value']:.2g}.",
            ]
        )
        + "\n"
    )


def cost_section(results, s: ChannelSettings) -> str:
    rows = []
    for st, r in results.items():
        t = r.training
        rows.append(
            [
                st.name,
                f"{t['train_seconds'] / 60:.1f}" if t else "—",
                f"{t['seconds_per_step']:.2f}" if t else "—",
                f"{t['final_loss']:.3f}" if t else "—",
                f"{r.summary['trace_bytes']['mean'] / 1024:.0f}",
                f"{r.summary['seconds_per_question']:.3f}",
            ]
        )
    trained = [r.training["train_seconds"] for r in results.values() if r.training]
    return (
        "\n".join(
            [
                "## Cost",
                f"Training: {s.steps} steps × {s.batch_size} examples, lr {s.learning_rate}, LoRA r={s.lora_r} "
                f"α={s.lora_alpha} on q/k/v/o, one CPU thread per process ({len(trained)} trainings, "
                f"{sum(trained) / 60:.0f} min in all). Trace: KB per question (KV bytes of the largest trace built).",
                "",
                table(["stage", "train min", "s/step", "final loss", "trace KB/question", "eval s/question"], rows),
            ]
        )
        + "\n"
    )


def missing_section(missing: list[Stage]) -> str:
    if not missing:
        return ""
    return "## Not run yet\n" + "\n".join(f"- {st.name}" for st in missing) + "\n"


def headline(results, s: ChannelSettings) -> list[str]:
    """The few numbers the README shows."""
    lines = []
    m = s.probe_m
    untrained = find(results, "grid", "latent_mas", None, m)
    none = find(results, "grid", "diffmas", "none", m)
    full = find(results, "grid", "diffmas", "full", m)
    if untrained and none and full:
        lines.append(
            f"- relay_word, K={s.k}, m={m}, reads=latent ({s.test_examples} held-out examples, chance "
            f"{100 * full.chance:.1f} %): untrained {pct(untrained.accuracy)} %, reading-only training "
            f"{pct(none.accuracy)} %, full DiffMAS {pct(full.accuracy, full.ci)} % "
            f"({full.bits:.2f} of {math.log2(s.k):.0f} bits)."
        )
    zero = find(results, "grid", "diffmas", "full", 0)
    if zero:
        lines.append(f"- With no latent step (m=0) trained DiffMAS is {verdict(zero)}: {pct(zero.accuracy)} %.")
    reached = [
        st.m
        for st, r in results.items()
        if st.group == "grid" and st.method == "diffmas" and st.upstream_grad == "full" and r.accuracy >= 0.95
    ]
    if reached:
        lines.append(f"- Smallest m with ≥ 95 %: {min(reached)}.")
    return lines


def write_readme(lines: list[str]) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = "\n".join(
        [
            README_BEGIN,
            *lines,
            "",
            "Details, plots and every condition: [docs/channel.md](docs/channel.md).",
            README_END,
        ]
    )
    readme.write_text(head + block + tail)


def main() -> None:
    settings_file = OUT / "settings.json"
    if not settings_file.is_file():
        sys.exit(f"no study in {OUT}: run python study/channel.py first")
    s = ChannelSettings(**json.loads(settings_file.read_text()))
    results, missing = load(s)
    parts = [
        "# The channel: does information pass through trained latent steps?",
        "Generated by `python study/write_channel.py` from the records of `python study/channel.py` "
        "(results/channel/); every number and conclusion below is computed from them.",
        "",
        f"Setup: {s.model}, `reads={s.reads}` everywhere (the reader attends to the sender's latent steps, never "
        "its prompt), greedy decoding, the first word / digits / number of the answer scored against the secret "
        "(`diffmas.tasks.relay`). Train and test use disjoint (name, secret) pairs.",
        "",
        grid_section(results, s),
        bits_section(results, s),
        paired_section(
            results,
            s,
            ("diffmas", "none"),
            "Does encoding need to be learned? full vs reading only",
            "Paired over the same test examples: full DiffMAS (gradients through the sender's latent steps) "
            "against the same LoRA trained with the sender under stop-gradient.",
        ),
        paired_section(
            results,
            s,
            ("text_mas", None),
            "Latent vs text at equal slots",
            "m latent steps of trained DiffMAS against an untrained text message of at most m tokens.",
        ),
        probe_section(
            results,
            s,
            "k",
            f"Capacity: the K sweep (m={s.probe_m})",
            "relay_word with K secrets (log2 K bits); K=8 is in the table above.",
            key=lambda st: int(st.task.split("k=")[1]) if "k=" in st.task else s.k,
        ),
        probe_section(
            results,
            s,
            "hops",
            f"Hops: relay_chain (m={s.probe_m} per agent)",
            "Each agent reads only its predecessor's latent steps, so the secret must cross every hop; "
            "1 hop is relay_word above.",
            key=lambda st: int(st.task.split("hops=")[1]),
        ),
        roles_section(results, s),
        probe_section(
            results,
            s,
            "sum",
            "Combining agents: relay_sum (hierarchical)",
            "Three holders each hold a digit; the aggregator reads all of them and answers the sum.",
            key=lambda st: st.task,
        ),
        probe_section(
            results, s, "code", "Beyond one word: relay_code (4 digits, exact match)", "", key=lambda st: st.task
        ),
        cost_section(results, s),
        missing_section(missing),
    ]
    (DOCS / "channel.md").write_text("\n".join(parts))
    write_readme(headline(results, s))
    print(f"wrote {DOCS / 'channel.md'} ({len(results)} stages, {len(missing)} missing)")


if __name__ == "__main__":
    main()
