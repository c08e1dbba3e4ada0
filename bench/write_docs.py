"""Build docs/benchmarks.md (tables + plots) from bench/results/*.json. No number is typed by hand:
every figure in the document is read from a result file written by a benchmark script."""

from __future__ import annotations

import json
import math

from matplotlib.figure import Figure

import _common as c
import roofline

DOCS = c.REPO / "docs"
IMG = DOCS / "img"


def load(name: str) -> dict | None:
    path = c.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(result: dict) -> str:
    m = result["machine"]
    return (
        f"_Measured {m['date']} on {m['device']}, torch {m['versions'].get('torch')}, "
        f"transformers {m['versions'].get('transformers')}, commit {m['git_commit']}._"
    )


def tagged(name: str) -> list[tuple[str, dict]]:
    """Results of runs elsewhere (e.g. a GPU), written as <name>_<tag>.json."""
    return [
        (p.stem.removeprefix(name + "_"), json.loads(p.read_text())) for p in sorted(c.RESULTS.glob(f"{name}_*.json"))
    ]


def section_inference(r: dict) -> str:
    s = r["settings"]
    split = all("generation_s" in m for m in r["methods"].values())
    rows = []
    for name, m in r["methods"].items():
        t = m["tokens_per_question"]
        rows.append(
            [name]
            + ([f"{m['generation_s']:.1f}"] if split else [])
            + [
                f"{m['wall_s']:.1f}",
                f"{m['seconds_per_question']:.2f}",
                f"{t['prompt']:.0f}",
                f"{t['latent']:.0f}",
                f"{t['generated']:.0f}",
                f"{m['trace_bytes_mean'] / 2**20:.1f}",
                f"{m['peak_memory_bytes'] / 2**20:.0f}",
                f"{m['correct']}/{s['questions']}",
            ]
        )
    agents = []
    for name, m in r["methods"].items():
        for role, a in m["tokens_per_agent"].items():
            agents.append(
                [
                    name,
                    role,
                    f"{a['n_prompt_tokens']:.0f}",
                    f"{a['n_latent_steps']:.0f}",
                    f"{a['n_generated_tokens']:.0f}",
                ]
            )
    ratio_ls, ratio_tl = r["ratios"]["latent_over_single"], r["ratios"]["text_over_latent"]
    t = r["targets"]
    return "\n\n".join(
        part
        for part in [
            "## Inference cost: single vs text_mas vs latent_mas",
            f"{s['questions']} GSM8K test questions, {s['agents']} agents, m={s['latent_steps']}, greedy, batch "
            f"{s['batch_size']}, final agent ≤ {s['max_new_tokens']} new tokens, text_mas upstream agents ≤ "
            f"{s['upstream_max_new_tokens']} each; {s['model']} in {s['dtype']}.",
            (
                "Fixed-length decoding (random weights): every decoding agent writes exactly its token budget."
                if s.get("fixed_lengths")
                else (
                    f"Every final agent writes exactly {s['max_new_tokens']} tokens (end-of-sequence suppressed "
                    "before), so the methods are compared at equal generated length; text_mas's upstream agents "
                    "stop where they stop."
                    if s.get("equal_final_lengths")
                    else ""
                )
            ),
            md_table(
                ["method"]
                + (["generation s"] if split else [])
                + [
                    "wall s",
                    "s/question",
                    "prompt tok/q",
                    "latent steps/q",
                    "generated tok/q",
                    "trace MiB/q",
                    "peak MiB",
                    "correct",
                ],
                rows,
            ),
            (
                "_generation s_: the method alone (what the ratios compare); _wall s_: end to end, answer scoring "
                "included, after one warm-up question per method."
                if split
                else "_wall s_ is end to end: it includes answer scoring and, for the first method, warm-up (this result "
                "predates the split into generation and scoring time; the ratios compare these wall times)."
            ),
            md_table(
                ["ratio (same run)", "value", "target", "verdict"],
                [
                    [
                        "latent_mas / single",
                        f"{ratio_ls:.2f}x",
                        f"≤ {t['latent_over_single_max']}x",
                        verdict(ratio_ls <= t["latent_over_single_max"]),
                    ],
                    [
                        "text_mas / latent_mas",
                        f"{ratio_tl:.2f}x",
                        f"≥ {t['text_over_latent_min']}x",
                        verdict(ratio_tl >= t["text_over_latent_min"]),
                    ],
                ],
            ),
            (
                "latent_mas / single batch by batch (in question order): "
                + ", ".join(f"{x:.2f}x" for x in r["ratios"]["latent_over_single_per_batch"])
                + "."
                if "latent_over_single_per_batch" in r["ratios"]
                else ""
            ),
            store_table(r, lambda by: _inference_stores(by, s.get("interleaved", False))),
            _why_inference(r) if not s.get("random_weights") else _why_inference_gpu(r),
            _why_floor(r),
            "Tokens per agent (mean per question):",
            md_table(["method", "agent", "prompt", "latent steps", "generated"], agents),
            machine_line(r),
        ]
        if part
    )


def _why_inference(r: dict) -> str:
    single, latent, text = (r["methods"][k] for k in ("single", "latent_mas", "text_mas"))
    prompt_ratio = latent["tokens_per_question"]["prompt"] / single["tokens_per_question"]["prompt"]
    trace_ratio = latent["trace_len_mean"] / single["trace_len_mean"]
    upstream_gen = sum(
        a["n_generated_tokens"]
        for role, a in text["tokens_per_agent"].items()
        if role != list(text["tokens_per_agent"])[-1]
    )
    upstream_latent = latent["tokens_per_question"]["latent"]
    notes = []
    if r["ratios"]["latent_over_single"] > r["targets"]["latent_over_single_max"]:
        notes.append(_why_latent_over_single(r, prompt_ratio, trace_ratio))
    if r["ratios"]["text_over_latent"] < r["targets"]["text_over_latent_min"]:
        notes.append(
            f"**Why text_mas is not ≥ 4x latent_mas here.** The upstream text agents wrote {upstream_gen:.0f} "
            f"tokens per question in all (capped at {r['settings']['upstream_max_new_tokens']} each) where "
            f"latent_mas took {upstream_latent:.0f} latent steps; the ratio is set by that exchange and grows "
            "with the upstream budget (reasoning models write thousands of tokens per agent), while SmolLM2's "
            "upstream messages are short."
        )
    return "\n\n".join(notes)


def _why_latent_over_single(r: dict, prompt_ratio: float, trace_ratio: float) -> str:
    """The measured split of latent_mas's extra time: its upstream agents, and its final agent's
    longer trace (from the per-agent wall times of the run)."""
    single, latent = r["methods"]["single"], r["methods"]["latent_mas"]
    roles = list(latent["tokens_per_agent"])
    upstream_s = sum(latent["tokens_per_agent"][x].get("wall_s_per_question", 0) for x in roles[:-1])
    final_s = latent["tokens_per_agent"][roles[-1]].get("wall_s_per_question", 0)
    single_s = next(iter(single["tokens_per_agent"].values())).get("wall_s_per_question", 0)
    target = r["targets"]["latent_over_single_max"]
    head = "**Why latent_mas costs more than the target here.**"
    if not single_s:
        return (
            f"{head} Each upstream agent prefills its own prompt, so latent_mas reads {prompt_ratio:.1f}x the "
            f"prompt tokens of the single agent, and its final agent decodes on a {trace_ratio:.1f}x longer trace."
        )
    answers = "the same prompt and answer length" if _equal_answers(r) else "the same prompt, another answer length"
    alone = [
        name
        for name, extra in (("the upstream agents", upstream_s), ("the longer trace", final_s - single_s))
        if 1 + extra / single_s > target
    ]
    return (
        f"{head} Measured per question: the upstream agents (their prompts and latent steps) take "
        f"{upstream_s:.2f} s, and the final agent {final_s:.2f} s against the single agent's {single_s:.2f} s. "
        f"So the upstream agents add {upstream_s / single_s:.2f}x the single agent's time, and the final agent's "
        f"longer trace another {(final_s - single_s) / single_s:.2f}x: for {answers}, every one of its decode "
        f"steps also reads the upstream agents' keys and values ({latent['trace_bytes_mean'] / 2**20:.1f} MiB per "
        f"question at the end against {single['trace_bytes_mean'] / 2**20:.1f} MiB; the trace is "
        f"{trace_ratio:.1f}x longer). "
        + (
            f"{alone[0].capitalize()} alone put the ratio above the target. "
            if len(alone) == 1
            else "Each alone puts the ratio above the target. "
            if alone
            else "Neither alone would put the ratio above the target; together they do. "
        )
        + f"Each upstream agent prefills its own prompt ({prompt_ratio:.1f}x the single agent's prompt tokens in all), "
        "and with a 135M model on a CPU that prefill is compute-bound: a prompt token costs about a whole forward. "
        "The in-place trace store removed the per-step copy of the whole cache (see Before / after), not these "
        "extra tokens and reads. A longer answer dilutes the upstream agents' share, not the final agent's."
    )


def _floors(r: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per method, per agent, the floor of its work per question (bench/roofline.py), at the best
    peaks measured in the run."""
    shape, peaks = roofline.Shape(**r["floor"]["shape"]), _peaks(r)
    rows = roofline.rows_per_batch(r["settings"]["questions"], r["settings"]["batch_size"])
    return {
        name: roofline.agent_floors(shape, m["tokens_per_agent"], rows, peaks, shared_trace=name != "text_mas")
        for name, m in r["methods"].items()
    }


def _peaks(r: dict) -> roofline.Peaks:
    return roofline.Peaks.best(r["floor"]["peaks_before"], r["floor"]["peaks_after"])


def _floor_ratio(floors: dict) -> float:
    """latent_mas / single with both methods at their floors (`_floors`)."""
    return sum(a["total_s"] for a in floors["latent_mas"].values()) / sum(
        a["total_s"] for a in floors["single"].values()
    )


def _parts(m: dict, floors: dict) -> list[tuple[str, float, float]]:
    """(part, measured s, floor s) per question: the upstream agents together, then the final agent."""
    roles = list(m["tokens_per_agent"])
    measured = {role: m["tokens_per_agent"][role]["wall_s_per_question"] for role in roles}
    parts = [(f"upstream agents ({len(roles) - 1})", roles[:-1])] if len(roles) > 1 else []
    parts.append((f"final agent ({roles[-1]})", roles[-1:]))
    return [
        (label, sum(measured[x] for x in members), sum(floors[x]["total_s"] for x in members))
        for label, members in parts
    ]


def _why_floor(r: dict) -> str:
    """Each method's measured time against the floor of its work on this machine, and what the
    latent_mas / single target asks of latent_mas's extra work."""
    methods = r["methods"]
    if "floor" not in r or not all("wall_s_per_question" in a for a in methods["single"]["tokens_per_agent"].values()):
        return ""
    floors, peaks = _floors(r), _peaks(r)

    def measured(key: str, unit: float, digits: int) -> str:
        return " / ".join(f"{r['floor'][k][key] / unit:.{digits}f}" for k in ("peaks_before", "peaks_after"))

    rows = [
        [name, label, f"{s:.2f}", f"{fl:.2f}", f"{s / fl:.1f}x"]
        for name in methods
        for label, s, fl in _parts(methods[name], floors[name])
    ]
    single = _parts(methods["single"], floors["single"])[-1]
    up, final = _parts(methods["latent_mas"], floors["latent_mas"])
    extra, extra_floor = up[1] + final[1] - single[1], up[2] + final[2] - single[2]
    target = r["targets"]["latent_over_single_max"]
    allowed = (target - 1) * single[1]
    need = (
        "below its floor, so no implementation on this machine meets the target without the single agent slowing down"
        if allowed < extra_floor
        else f"{allowed / extra_floor:.2f}x its floor"
    )
    return "\n\n".join(
        [
            "**How far each method is from its floor.** The floor is the least time a method's work could take on "
            "this machine (bench/roofline.py): every product at the fastest rate the backbone's own linear layers "
            f"reached here ({peaks.product_flops_per_s / 1e9:.0f} GFLOP/s) and every weight and trace entry read once "
            f"at the streaming read bandwidth measured here ({peaks.read_bytes_per_s / 1e9:.1f} GB/s), each the higher "
            f"of its measurements before and after the methods in this run ({measured('product_flops_per_s', 1e9, 0)} "
            f"GFLOP/s, {measured('read_bytes_per_s', 1e9, 1)} GB/s: a shared machine's speed moves); padding, Python "
            "and small operations are not in it. Seconds per question (floors from the run's mean tokens per agent):",
            md_table(["method", "part", "measured s", "floor s", "measured / floor"], rows),
            f"At their floors latent_mas would cost {_floor_ratio(floors):.2f}x the single "
            f"agent, against {r['ratios']['latent_over_single']:.2f}x measured: the single agent runs at "
            f"{single[1] / single[2]:.1f}x its floor and latent_mas's extra work at {extra / extra_floor:.1f}x its "
            + (
                "floor, so the overhead on the work both share dilutes the extra. "
                if single[1] / single[2] > extra / extra_floor
                else "floor, so the extra work is further from its floor than the work both share. "
            )
            + f"With the single agent as measured, ≤ {target}x allows latent_mas {allowed:.2f} s of "
            f"extra time per question, {need}; the extra takes {extra:.2f} s (its floor is {extra_floor:.2f} s): "
            f"the upstream agents run at {up[1] / up[2]:.2f}x their floor"
            + (
                f", and the final agent's extra time ({final[1] - single[1]:.2f} s, its longer trace) at "
                f"{(final[1] - single[1]) / (final[2] - single[2]):.1f}x the floor of its extra reads."
                if final[1] > single[1] and final[2] > single[2]
                else "."
            ),
        ]
    )


def _equal_answers(r: dict) -> bool:
    """Did the single agent and latent_mas's final agent write the same number of tokens?"""
    single, latent = (r["methods"][k]["tokens_per_question"]["generated"] for k in ("single", "latent_mas"))
    return abs(single - latent) < 0.5


def _why_inference_gpu(r: dict) -> str:
    s, text = r["settings"], r["methods"]["text_mas"]
    upstream_gen = sum(a["n_generated_tokens"] for a in list(text["tokens_per_agent"].values())[:-1])
    if r["ratios"]["text_over_latent"] >= r["targets"]["text_over_latent_min"]:
        return ""
    return (
        f"text_mas's upstream agents wrote {upstream_gen:.0f} tokens per question here (budget "
        f"{s['upstream_max_new_tokens']} each) against {r['methods']['latent_mas']['tokens_per_question']['latent']:.0f} "
        "latent steps; its cost over latent_mas grows with that budget, which for reasoning models is "
        "thousands of tokens per agent."
    )


def _step_batching_bound() -> str:
    """What one decode step gains from 16 rows on this CPU, from the trace_store run (grow store)."""
    store = load("trace_store")
    if not store:
        return ""
    ms = {(x["batch"], x["length"]): x["grow_ms"] for x in store["rows"] if x["kind"] == "decode"}
    pairs = [(n, ms[(16, n)] / ms[(1, n)]) for (b, n) in sorted(ms) if b == 1 and (16, n) in ms]
    if not pairs:
        return ""
    costs = " / ".join(f"{c:.1f}x" for _, c in pairs)
    lengths = " / ".join(str(n) for n, _ in pairs)
    gains = " / ".join(f"{16 / c:.1f}x" for _, c in pairs)
    return (
        f" Nor do the steps gain 16x: one decode step for 16 rows costs {costs} one row's at {lengths} "
        f"positions (Step time vs trace length, grow store), so decoding alone can gain at most {gains} there: "
        "the 16 rows' matrix products "
        "read the weights more slowly than one row's matrix-vector product, and attention reads every row's "
        "keys and values."
    )


def section_batching(r: dict) -> str:
    s = r["settings"]
    rows = [
        [k, f"{v['wall_s']:.1f}", f"{v['questions_per_s']:.3f}", f"{r['speedup_over_batch1'][k]:.2f}x"]
        for k, v in r["batches"].items()
    ]
    top = r["speedup_over_batch1"]["16"]
    fig = Figure(figsize=(4.5, 3))
    ax = fig.subplots()
    sizes = list(r["batches"])
    ax.plot([int(x) for x in sizes], [r["speedup_over_batch1"][k] for k in sizes], marker="o")
    ax.axhline(r["targets"]["speedup_at_16_min"], ls="--", color="grey", label="target at 16")
    ax.set_xlabel("batch size"), ax.set_ylabel("throughput vs batch 1"), ax.legend()
    fig.tight_layout()
    tag = r["machine"].get("bench_model", {}).get("tag")
    image = f"batching_{tag}.png" if tag else "batching.png"  # a tagged run's plot beside the main one's
    fig.savefig(IMG / image, dpi=110)
    parts = [
        "## Batching: latent_mas throughput",
        f"{s['questions']} GSM8K questions, {s['agents']} agents, m={s['latent_steps']}, ≤ {s['max_new_tokens']} "
        "new tokens, greedy. A batch decodes until its slowest row stops; by default rows that have "
        "finished leave the computation (`drop_finished`).",
        md_table(["batch", "wall s", "questions/s", "speedup"], rows),
        f"Target ≥ {r['targets']['speedup_at_16_min']}x at batch 16: {verdict(top >= r['targets']['speedup_at_16_min'])} "
        f"({top:.2f}x)."
        + (
            ""
            if top >= r["targets"]["speedup_at_16_min"]
            else " On a CPU the 4 agents' prompt prefill is compute-bound and gains nothing from batching (row "
            "by row it spends nothing on padding, but a row's prompt costs what it costs alone); only the "
            "sequential parts (latent steps, decoding) do, and a batch decodes until its slowest row stops, "
            "its last steps on few rows."
            + _step_batching_bound()
            + " On a GPU, where a batch-1 step leaves the device mostly idle, batching gains far more."
        ),
        store_table(r, _batching_stores),
        f"![batching](img/{image})",
        machine_line(r),
    ]
    return "\n\n".join(part for part in parts if part)  # a run of one store has no store table


def section_ratio_by_batch(r: dict) -> str:
    """latent_mas / single at each batch size, measured and at the two methods' floors."""
    s, target = r["settings"], r["targets"]["latent_over_single_max"]
    header = ["batch", "single s/q", "latent_mas s/q", "its upstream s/q", "extra s/q", "single / floor"]
    rows, sizes, singles, upstream, measured, at_floor = [], [], [], [], [], []
    for size, run in r["batches"].items():
        methods, floors = run["methods"], _floors(run)
        n = run["settings"]["questions"]
        single, latent = methods["single"]["generation_s"] / n, methods["latent_mas"]["generation_s"] / n
        shared = _parts(methods["single"], floors["single"])[-1]  # the single agent: measured and floor s/q
        upstream.append(_parts(methods["latent_mas"], floors["latent_mas"])[0][1])
        sizes.append(int(size)), singles.append(single)
        measured.append(latent / single), at_floor.append(_floor_ratio(floors))
        rows.append(
            [size, f"{single:.2f}", f"{latent:.2f}", f"{upstream[-1]:.2f}", f"{latent - single:.2f}"]
            + [f"{shared[1] / shared[2]:.1f}x", f"{latent / single:.2f}x", f"{at_floor[-1]:.2f}x"]
        )
    met = [str(x) for x, ratio in zip(sizes, measured) if ratio <= target]
    fig = Figure(figsize=(4.5, 3))
    ax = fig.subplots()
    ax.plot(sizes, measured, marker="o", label="measured")
    ax.plot(sizes, at_floor, marker="s", ls=":", label="both at their floors")
    ax.axhline(target, ls="--", color="grey", label="target")
    ax.set_xscale("log", base=2), ax.set_xticks(sizes, [str(x) for x in sizes])
    ax.set_xlabel("batch size"), ax.set_ylabel("latent_mas / single"), ax.legend()
    fig.tight_layout()
    tag = r["machine"].get("bench_model", {}).get("tag")
    image = f"ratio_by_batch_{tag}.png" if tag else "ratio_by_batch.png"  # a tagged run's plot beside the main one's
    fig.savefig(IMG / image, dpi=110)
    met_floor = [str(x) for x, ratio in zip(sizes, at_floor) if ratio <= target]
    floors = (
        f"At their floors the ratio is {min(at_floor):.2f}x to {max(at_floor):.2f}x over these sizes, ≤ {target}x at "
        + (f"batch {', '.join(met_floor)} only" if met_floor else "none")
        + ": at "
        + ("the other sizes" if met_floor else "every size")
        + " latent_mas meets the target only where the single agent runs further from its floor than latent_mas's "
        "extra work does. "
    )
    return "\n\n".join(
        [
            "## latent_mas / single against the batch size",
            f"The same {s['questions']} GSM8K questions at each batch size, single and latent_mas in turn batch by "
            f"batch (`bench/ratio_by_batch.py`: one `inference_cost` run per batch size, the sizes one after "
            f"another), m={s['latent_steps']}, every final agent writing exactly {s['max_new_tokens']} tokens. "
            "Seconds per question of generation; _its upstream_: latent_mas's upstream agents (prompts and latent "
            "steps); _extra_: latent_mas less single; _single / floor_: the single agent's time over the floor of "
            "its work (see Inference cost); _at floors_: latent_mas / single if both ran at their floors, from the "
            "same run's tokens and peaks.",
            md_table(header + ["latent / single", "at floors"], rows),
            f"latent_mas ≤ {target}x single at batch size{'s' if len(met) != 1 else ''} "
            f"{', '.join(met) if met else 'none of those measured'}. "
            + floors
            + f"From batch {sizes[0]} to {sizes[-1]} the single agent's seconds per question fell "
            f"{singles[0] / singles[-1]:.1f}-fold and latent_mas's upstream agents' {upstream[0] / upstream[-1]:.1f}-fold: "
            "batching cheapens one-position steps (a step reads every weight once for the whole batch), which are "
            "most of the single agent's work and only the latent steps of the upstream agents', whose prompts "
            "are compute-bound on a CPU and cost about the same per row at any batch size.",
            f"![latent_mas / single against the batch size](img/{image})",
            machine_line(r),
        ]
    )


def section_steps(r: dict) -> str:
    s = r["settings"]
    ratio = r["ratio_latent_over_decode"]
    return "\n\n".join(
        [
            "## One latent step vs one decode step",
            f"Trace of {s['context_tokens']} prompt tokens, batch {s['batch']}, median of {s['repeats']} runs of "
            f"{s['steps']} steps. A decode step includes the LM head, token choice and its statistics; a latent "
            "step includes the realignment.",
            md_table(
                ["step", "ms (median)"],
                [
                    ["latent", f"{r['latent_step_ms']:.1f}"],
                    ["decode", f"{r['decode_step_ms']:.1f}"],
                    ["latent / decode", f"{ratio:.2f}x"],
                ],
            ),
            f"Target ≤ {r['targets']['ratio_max']}x: {verdict(ratio <= r['targets']['ratio_max'])}.",
            machine_line(r),
        ]
    )


def _why_training_missed(r: dict, at: int, target: float) -> str:
    """The measured reason, split by the m=0 run where the result has one."""
    s, b = r["settings"], r["by_batch"].get(str(at)) or next(iter(r["by_batch"].values()))
    steps = s["latent_steps"] * (s["agents"] - 1)
    longer = b["diffmas"]["trace_len"] / b["sft_single"]["trace_len"]
    head = (
        f"**Why the target is missed.** A DiffMAS step runs the upstream agents' prompts and {steps} latent "
        f"steps with gradients: its trace is {longer:.1f}x the final agent's own context."
    )
    device = r["machine"]["device"]
    on_cpu = device.startswith("cpu")
    slow = "a CPU runs" if on_cpu else "a GPU runs, each bound by kernel launches,"
    if "diffmas_no_latent" not in b:
        return (
            f"{head} The latent steps are sequential one-position forwards and backwards, which {slow} far "
            "below its batched throughput; the extra positions are inherent to training through the trajectory."
        )
    single, full, bare = (b[k]["seconds_per_step"] for k in ("sft_single", "diffmas", "diffmas_no_latent"))
    chunks, budget = bare / single, target * single - bare
    split = (
        f"{head} Split at {at} examples per step, measured in the same run: without latent steps "
        f"(`diffmas_no_latent`, m=0) the step takes {bare:.2f} s, {chunks:.2f}x sft_single, because the "
        "agents' prompts are processed with gradients like the final agent's"
        + (", and a prompt token costs about a whole forward and backward (compute-bound on a CPU)" if on_cpu else "")
        + f"; the {steps} latent steps add {full - bare:.2f} s ({(full - bare) / single:.2f}x sft_single), "
        f"sequential one-position forwards and backwards that {slow} far below its batched throughput."
    )
    if budget <= 0:
        return (
            f"{split} The prompt chunks alone are above the target: no speed-up of the latent steps alone can meet it."
        )
    per_step = budget / steps * 1000
    steps_result = load("step_cost")
    compare = (
        f", less than one latent step's forward alone without autograd at batch 1 on this machine "
        f"({steps_result['latent_step_ms']:.1f} ms, One latent step vs one decode step)"
        if steps_result
        and steps_result["machine"]["device"] == device  # the same kind of machine, not a CPU file for a GPU run
        and steps_result["settings"].get("batch") == 1
        and steps_result["latent_step_ms"] > per_step
        else ""
    )
    return (
        f"{split} To meet the target the {steps} latent steps, forward and backward, would have to take "
        f"{budget:.2f} s in all, {per_step:.0f} ms each at {at} rows{compare}."
    )


# The training bench's before variants of runs before it named them (the attention kernel).
_TRAINING_BEFORE_OF_OLD_RUNS = {
    "suffix": "_repeat_kv",
    "label": "repeat_kv attention",
    "what": "transformers' SDPA, which copies grouped KV heads for every chunk of more than one position",
    "after": "the backbone's CPU kernel, which reads them in place",
}


def _training_before(r: dict) -> dict:
    return r.get("before", _TRAINING_BEFORE_OF_OLD_RUNS)


def _untrained_packing(r: dict) -> str:
    """Where the default packs with a library whose products do not train, say so: then before and
    after run the same products under autograd."""
    packed = r.get("packed")
    if not packed or packed["trains"]:
        return ""
    library = packed["library"] or "no library"
    return (
        f" Here the default packs with {library}, whose products do not train: under autograd both run "
        "PyTorch's kernel, so before and after differ by noise only."
    )


def _training_store_line(r: dict, at: int) -> str:
    """The trace store under autograd, when the run measured the concatenating one beside the default."""
    b = r["by_batch"].get(str(at), {})
    if "diffmas_concat_store" not in b:
        return ""
    grow, concat = b["diffmas"], b["diffmas_concat_store"]
    mib = 2**20
    return (
        "`diffmas_concat_store`: the same DiffMAS step on the concatenating trace store, which copies the whole "
        "trace on every append and keeps every copy for backward, where the default grow store appends in place "
        f"under autograd too: {concat['seconds_per_step']:.2f} s and {concat['peak_memory_bytes'] / mib:.0f} MiB "
        f"peak against {grow['seconds_per_step']:.2f} s and {grow['peak_memory_bytes'] / mib:.0f} MiB "
        f"({grow['peak_memory_bytes'] / concat['peak_memory_bytes']:.2f}x the memory, "
        f"{grow['seconds_per_step'] / concat['seconds_per_step']:.2f}x the time, one run each)."
    )


def section_training(r: dict) -> str:
    s, before = r["settings"], _training_before(r)
    suffix = before["suffix"]
    target, at = r["targets"]["ratio_max"], r["targets"].get("at_examples_per_step", 8)
    rows = [
        [
            n,
            k,
            f"{b[k]['seconds_per_step']:.2f}",
            f"{b[k]['trace_len']:.0f}",
            b[k]["target_tokens"],
            f"{b[k]['peak_memory_bytes'] / 2**20:.0f}",
        ]
        for n, b in r["by_batch"].items()
        for k in (
            "diffmas",
            "diffmas_checkpointed",
            "diffmas_no_latent",
            "diffmas_concat_store",
            "sft_single",
            "diffmas" + suffix,
            "sft_single" + suffix,
        )
        if k in b
    ]
    ratios = [
        [
            n,
            f"{b['ratio_diffmas_over_single' + suffix]:.2f}x" if "ratio_diffmas_over_single" + suffix in b else "",
            f"{b['ratio_diffmas_over_single']:.2f}x",
            f"≤ {target}x" if int(n) == at else "—",
            verdict(b["ratio_diffmas_over_single"] <= target) if int(n) == at else "—",
        ]
        for n, b in r["by_batch"].items()
        if "ratio_diffmas_over_single" in b
    ]
    why = (
        ""
        if all(b.get("ratio_diffmas_over_single", 0) <= target for n, b in r["by_batch"].items() if int(n) == at)
        else _why_training_missed(r, at, target)
    )
    parts = [
        "## Training step: DiffMAS vs the final agent alone",
        f"Examples per step {s['examples_per_step']} from {s['task']}, {s['agents']} agents, m={s['latent_steps']}, "
        f"LoRA {s['lora']}, median of {s['repeats']} forward+backward passes.",
        md_table(["examples/step", "method", "s/step", "trace length/example", "target tokens", "peak MiB"], rows),
        md_table(
            [
                "examples/step",
                f"DiffMAS / sft_single, {before['label']}",
                "DiffMAS / sft_single",
                "target",
                "verdict",
            ],
            ratios,
        ),
        f"`*{suffix}`: {before['what']} (before); the other rows run {before['after']} (after)."
        + _untrained_packing(r),
        "`diffmas_checkpointed` recomputes each trace chunk during backward (`--gradient-checkpointing`). "
        "Without it, every chunk's activations stay in memory until backward.",
        _training_store_line(r, at),
        why,
        machine_line(r),
    ]
    return "\n\n".join(part for part in parts if part)


def section_summary(results: dict[str, dict | None]) -> str:
    """Issue 14's targets, before (the concat store, today's main) and after (the grow store),
    each pair measured in one run of one script."""
    rows = []
    store = results.get("trace_store")
    if store:
        rows.append(_trace_store_row(store, ""))
    inf = results.get("inference_cost")
    if inf and {"concat", "grow"} <= set(inf.get("by_store", {})):
        before, after = inf["by_store"]["concat"]["ratios"], inf["by_store"]["grow"]["ratios"]
        t = inf["targets"]
        at_floor = (
            f" ({_floor_ratio(_floors(inf)):.2f}x at this machine's floor, see Inference cost)"
            if "floor" in inf
            else ""
        )
        rows.append(
            [
                "latent_mas / single",
                f"{before['latent_over_single']:.2f}x",
                f"{after['latent_over_single']:.2f}x",
                f"≤ {t['latent_over_single_max']}x",
                verdict(after["latent_over_single"] <= t["latent_over_single_max"]) + at_floor,
            ]
        )
        if "sdpa" in inf["by_store"]:
            sdpa = inf["by_store"]["sdpa"]["ratios"]["latent_over_single"]
            rows.append(
                [
                    "latent_mas / single (before: the defaults with PyTorch's SDPA in one-position steps; after: "
                    "the compiled kernel)",
                    f"{sdpa:.2f}x",
                    f"{after['latent_over_single']:.2f}x",
                    f"≤ {t['latent_over_single_max']}x",
                    verdict(after["latent_over_single"] <= t["latent_over_single_max"]),
                ]
            )
        rows.append(
            [
                "text_mas / latent_mas",
                f"{before['text_over_latent']:.2f}x",
                f"{after['text_over_latent']:.2f}x",
                f"≥ {t['text_over_latent_min']}x",
                verdict(after["text_over_latent"] >= t["text_over_latent_min"]),
            ]
        )
    by_batch = results.get("ratio_by_batch")
    if by_batch:
        rows.append(_by_batch_row(by_batch, "the defaults; see latent_mas / single against the batch size"))
    bat = results.get("batching")
    for before_name, label in (
        ("concat", "batch-16 throughput / batch 1"),
        ("padded", "batch-16 throughput / batch 1 (before: padded prompts; after: row by row, both grow store)"),
        ("keep", "batch-16 throughput / batch 1 (before: finished rows decoded on; after: dropped)"),
    ):
        if bat and {before_name, "grow"} <= set(bat.get("by_store", {})):
            before, after = (bat["by_store"][k]["speedup_over_batch1"]["16"] for k in (before_name, "grow"))
            target = bat["targets"]["speedup_at_16_min"]
            rows.append([label, f"{before:.2f}x", f"{after:.2f}x", f"≥ {target}x", verdict(after >= target)])
    if bat and set(bat.get("by_store", {"grow": None})) == {"grow"}:  # a run of the default alone
        rows.append(_batching_row("batch-16 throughput / batch 1 (default settings alone, no before in this run)", bat))
    rows += [
        _batching_row(f"batch-16 throughput / batch 1 (tag `{tag}`, grow store alone)", r)
        for tag, r in _same_cpu("batching", bat)
    ]
    rows += _bf16_default_rows()
    train = results.get("training_step")
    if train and "ratio_diffmas_over_single" in train["by_batch"].get("8", {}):
        rows.append(_training_row(train))
    rows += _other_cpu_rows(results)
    if not rows:
        return ""
    return "\n\n".join(
        [
            "## Before / after (issue 14)",
            '_before_: the concatenating store (`trace_store("concat")`, transformers\' `DynamicCache` '
            "behaviour; from the runs that also measured the compiled attention kernel on, with PyTorch's SDPA in "
            "one-position steps too) unless the row names another; _after_: the defaults at the run's commit: the "
            "in-place growable store, finished rows dropped from decoding, on CPUs row-by-row prompts and (from "
            "the kernel's commit on) the compiled one-position attention kernel. Each row's pair comes from one run of one script; the sections below give the "
            "full tables, the machine, its load and the commit. The packed linear layers (the CPU default) "
            "have their own before / after section (PyTorch's kernel vs MKL's and oneDNN's packed GEMMs).",
            md_table(["measure", "before", "after", "target", "verdict"], rows),
            "Rows without a tag were measured on "
            + " and ".join(sorted({r["machine"]["device"] for r in results.values() if r}))
            + " in "
            + " and ".join(sorted({results[n]["settings"]["dtype"] for n in TARGET_RECORDS if results.get(n)}))
            + f"; a tagged row names its machine (section Other machines and settings). Rows tagged `{BF16_TAG}` "
            "ran in bf16 on the same CPU: what `--dtype auto` loads for inference there since 2026-12-08 "
            "(docs/design.md, dtype); training stays fp32.",
            "The training step's before / after is a kernel: "
            + (
                f"{_training_before(train)['what']} (before) against {_training_before(train)['after']} (after)"
                if train
                else ""
            )
            + _kernel_times(train)
            + _training_verdict_clause(train),
        ]
    )


def _other_cpus(name: str, here: dict | None) -> list[tuple[str, dict]]:
    """Tagged runs of `name` at the targets' settings (the embedded model in fp32) on another CPU
    than the untagged run's: the same targets, measured on another machine."""
    device = here["machine"]["device"] if here else None
    return [
        (tag, r)
        for tag, r in _at_targets(name)
        if r["machine"]["device"].startswith("cpu") and r["machine"]["device"] != device
    ]


def _trace_store_row(store: dict, note: str) -> list[str]:
    """The decode-step target row of a trace_store result (concat vs grow in one run)."""
    t = store["target"]
    hit = next(r for r in store["rows"] if (r["kind"], r["batch"], r["length"]) == (t["kind"], t["batch"], t["length"]))
    return [
        f"{t['kind']} step, {t['length']}-position trace, batch {t['batch']} (ms){note}",
        f"{hit['concat_ms']:.1f}",
        f"{hit['grow_ms']:.1f}",
        f"after ≤ {t['ratio_max']}x before",
        f"{verdict(t['ratio'] <= t['ratio_max'])} ({t['ratio']:.2f}x)",
    ]


def _by_batch_row(by_batch: dict, note: str) -> list[str]:
    """latent_mas / single at each batch size of a ratio_by_batch result."""
    target = by_batch["targets"]["latent_over_single_max"]
    ratios = {size: run["ratios"]["latent_over_single"] for size, run in by_batch["batches"].items()}
    met = [size for size, ratio in ratios.items() if ratio <= target]
    return [
        f"latent_mas / single by batch size ({note})",
        "",
        ", ".join(f"{size}: {ratio:.2f}x" for size, ratio in ratios.items()),
        f"≤ {target}x",
        f"≤ {target}x at batch {', '.join(met)} only" if met else "**missed** at every batch size",
    ]


BF16_TAG = "cpu_bf16"
# the records behind the untagged target rows
TARGET_RECORDS = ("trace_store", "inference_cost", "ratio_by_batch", "batching", "training_step")


def _bf16_default_rows() -> list[list[str]]:
    """The inference targets re-measured in bf16 (tag `cpu_bf16`), the default dtype for inference
    on this CPU since 2026-12-08; the untagged rows are fp32's (the benchmarks pin it)."""
    note = f" (bf16, the CPU default for inference here; tag `{BF16_TAG}`)"
    rows = []
    store = load(f"trace_store_{BF16_TAG}")
    if store:
        rows.append(_trace_store_row(store, note))
    inf = load(f"inference_cost_{BF16_TAG}")
    if inf:
        rows.append(_latent_over_single_row(f"latent_mas / single{note}", inf))
    by_batch = load(f"ratio_by_batch_{BF16_TAG}")
    if by_batch:
        rows.append(_by_batch_row(by_batch, note.strip(" ()")))
    bat = load(f"batching_{BF16_TAG}")
    if bat:
        rows.append(_batching_row(f"batch-16 throughput / batch 1{note}", bat))
    return rows


def _same_cpu(name: str, here: dict | None) -> list[tuple[str, dict]]:
    """Tagged runs of `name` at the targets' settings on the untagged run's own CPU: re-checks of a
    target after the defaults changed (each tag is described in Other machines and settings)."""
    device = here["machine"]["device"] if here else None
    return [(tag, r) for tag, r in _at_targets(name) if r["machine"]["device"] == device]


def _at_targets(name: str) -> list[tuple[str, dict]]:
    """Tagged runs of `name` at the settings the targets are stated for: the embedded model in fp32."""
    return [
        (tag, r)
        for tag, r in tagged(name)
        if (r["settings"]["model"], r["settings"]["dtype"]) == (c.ModelSettings().model, "float32")
    ]


def _batching_row(label: str, r: dict) -> list[str]:
    """A summary row for a batching result's batch-16 speedup (after only)."""
    after, target = r["speedup_over_batch1"]["16"], r["targets"]["speedup_at_16_min"]
    return [label, "", f"{after:.2f}x", f"≥ {target}x", verdict(after >= target)]


def _other_cpu_rows(results: dict[str, dict | None]) -> list[list[str]]:
    """Summary rows for the targets measured on other CPUs (see `_other_cpus`)."""
    rows = [
        _latent_over_single_row(f"latent_mas / single ({r['machine']['device']}, tag `{tag}`, grow store alone)", r)
        for tag, r in _other_cpus("inference_cost", results.get("inference_cost"))
        if r["settings"].get("equal_final_lengths")
    ]
    rows += [
        _training_row(r, f"{r['machine']['device']}, tag `{tag}`; ")
        for tag, r in _other_cpus("training_step", results.get("training_step"))
        if "ratio_diffmas_over_single" in r["by_batch"].get("8", {})
    ]
    return rows


def _latent_over_single_row(label: str, r: dict) -> list[str]:
    """A summary row for an inference_cost result's latent_mas / single (after only)."""
    ratio, target = r["ratios"]["latent_over_single"], r["targets"]["latent_over_single_max"]
    return [label, "", f"{ratio:.2f}x", f"≤ {target}x", verdict(ratio <= target)]


def _training_row(r: dict, where: str = "") -> list[str]:
    """A summary row for a training_step result's ratio at batch 8, before and after."""
    b8, kind, target = r["by_batch"]["8"], _training_before(r), r["targets"]["ratio_max"]
    ratio, before = b8["ratio_diffmas_over_single"], b8.get("ratio_diffmas_over_single" + kind["suffix"])
    return [
        f"DiffMAS training step / sft_single, batch 8 ({where}before: {kind['label']})",
        f"{before:.2f}x" if before else "",
        f"{ratio:.2f}x",
        f"≤ {target}x",
        verdict(ratio <= target),
    ]


def _training_verdict_clause(train: dict | None) -> str:
    b8 = (train or {}).get("by_batch", {}).get("8", {})
    if "ratio_diffmas_over_single" not in b8:
        return "."
    if b8["ratio_diffmas_over_single"] <= train["targets"]["ratio_max"]:
        return "; the target is met."
    return "; see Training step below for the measured reason the target is missed."


def _kernel_times(train: dict | None) -> str:
    """How each training step's time moved with the kernel (a ratio alone can mislead)."""
    b8 = (train or {}).get("by_batch", {}).get("8", {})
    suffix = _training_before(train or {})["suffix"]
    keys = ("diffmas" + suffix, "diffmas", "sft_single" + suffix, "sft_single")
    if not all(k in b8 for k in keys):
        return ""
    d0, d1, s0, s1 = (b8[k]["seconds_per_step"] for k in keys)
    moved = "rose" if d1 / s1 > d0 / s0 else "fell"
    return (
        f". At batch 8 it took the DiffMAS step from {d0:.2f} to {d1:.2f} s ({d1 / d0:.2f}x) and the sft_single "
        f"step from {s0:.2f} to {s1:.2f} s ({s1 / s0:.2f}x), so the ratio {moved}"
    )


def section_trace_store(r: dict) -> str:
    s, t = r["settings"], r["target"]
    rows = [
        [
            x["kind"],
            x["batch"],
            x["length"],
            f"{x['concat_ms']:.1f}",
            f"{x['grow_ms']:.1f}",
            f"{x['ratio_grow_over_concat']:.2f}x",
            f"{x['ratio_of_fastest']:.2f}x",
            f"{x['ratio_cpu']:.2f}x" if "ratio_cpu" in x else "",
        ]
        for x in r["rows"]
    ]
    load = ", ".join(f"{x:.2f}" for x in r["load_average_before"])
    load_after = ", ".join(f"{x:.2f}" for x in r["load_average_after"])
    return "\n\n".join(
        [
            "## Step time vs trace length: concat store vs in-place store",
            _trace_store_variants(r)
            + f"One decode step (LM head, token choice and statistics, embedding, decoder forward) and one latent "
            f"step on a trace of L positions; mean over {s['steps']} steps from the same trace, median of "
            f"{s['repeats']} runs per store, the stores interleaved; {s['model']} in {s['dtype']}. The trace is "
            "synthetic (random keys/values of the model's shape through `LatentTrace.set_kv`): a step's cost does "
            "not depend on the values. The grow store's reallocation when its buffer fills is inside the runs.",
            md_table(
                ["step", "batch", "trace length", "concat ms", "grow ms", "grow / concat", "fastest runs", "CPU time"],
                rows,
            ),
            f"Target: {t['kind']} step at {t['length']} positions, batch {t['batch']}, ≤ {t['ratio_max']}x the "
            f"concat store: {verdict(t['ratio'] <= t['ratio_max'])} ({t['ratio']:.2f}x). _fastest runs_: the "
            "ratio of each store's fastest run, and _CPU time_ the ratio of this process's CPU time (median): "
            "both less exposed to other processes on a shared machine than the wall-time medians.",
            f"Load average (1, 5, 15 min) before the run: {load}; after: {load_after} (other engineers' tests "
            "may share the cores). " + threads_line(r),
            machine_line(r),
        ]
    )


def _read_bandwidths(o) -> list[float]:
    """Every streaming-sum bandwidth (`read_bytes_per_s`) recorded in a result, at any depth."""
    if isinstance(o, dict):
        return [v for k, v in o.items() if k == "read_bytes_per_s" and isinstance(v, float)] + [
            x for k, v in o.items() if k != "read_bytes_per_s" for x in _read_bandwidths(v)
        ]
    return [x for v in o for x in _read_bandwidths(v)] if isinstance(o, list) else []


def _bandwidth_spread(r: dict) -> str:
    """How far the streaming sum moved on this run's machine, over every result file it wrote."""
    runs = [json.loads(p.read_text()) for p in sorted(c.RESULTS.glob("*.json"))]
    mine = [x for x in runs if x.get("machine", {}).get("device") == r["machine"]["device"]]
    sums = [(x["machine"]["date"], _read_bandwidths(x)) for x in mine]
    values = [v for _, vs in sums for v in vs]
    dates = sorted(date for date, vs in sums if vs)
    return (
        f"the {len(values)} streaming sums in bench/results from this machine, {dates[0]} to {dates[-1]}, "
        f"read {min(values) / 1e9:.0f} to {max(values) / 1e9:.0f} GB/s"
    )


def section_decode_attention(r: dict) -> str:
    """PyTorch's SDPA vs the compiled kernel in one-position steps (bench/decode_attention.py)."""
    s, bw = r["settings"], r["read_bytes_per_s"]
    rows = [
        [
            x["batch"],
            x["length"],
            f"{x['kv_bytes'] / 2**20:.0f}",
            f"{x['sdpa_attention_ms']:.2f}",
            f"{x['kernel_attention_ms']:.2f}",
            f"{x['sdpa_read_bytes_per_s'] / 1e9:.1f}",
            f"{x['kernel_read_bytes_per_s'] / 1e9:.1f}",
            f"{x['kernel_read_bytes_per_s'] / bw:.2f}x",
            f"{x['sdpa_decode_step_ms']:.1f}",
            f"{x['kernel_decode_step_ms']:.1f}",
            f"{x['kernel_decode_step_ms'] / x['sdpa_decode_step_ms']:.2f}x",
            f"{x['kernel_latent_step_ms'] / x['sdpa_latent_step_ms']:.2f}x",
        ]
        for x in r["rows"]
    ]
    speedups = [x["sdpa_attention_ms"] / x["kernel_attention_ms"] for x in r["rows"]]
    at_sum = sum(x["kernel_read_bytes_per_s"] >= bw for x in r["rows"])
    steps = [x["kernel_decode_step_ms"] / x["sdpa_decode_step_ms"] for x in r["rows"]]
    return "\n\n".join(
        [
            "## One-position attention: PyTorch's SDPA vs the compiled kernel",
            "A decode or latent step reads every key and value of the trace once for one query per row. "
            "`diffmas.attention` runs that read on CPUs through `kernels/decode_attention.cpp` (compiled for the "
            "CPU at first use; split-KV chunks of 256 positions; AVX-512) instead of transformers' SDPA path. "
            f"_attention_: one call per layer ({s['model']} in {s['dtype']}), each on its own keys and values, "
            f"median of {s['repeats']} interleaved runs; _GB/s_: keys and values read over that time; _streaming "
            f"sum_: the best of a 512 MiB `sum` before and after, in the same run ({bw / 1e9:.1f} GB/s; "
            + _bandwidth_spread(r)
            + ", so it is a reference, not a ceiling); _step_: a decode and a "
            f"latent step on a synthetic trace of the grow store, mean over {s['steps']} steps, median of "
            f"{s['repeats']} runs, SDPA vs kernel interleaved.",
            md_table(
                [
                    "batch",
                    "trace length",
                    "K+V MiB",
                    "SDPA ms",
                    "kernel ms",
                    "SDPA GB/s",
                    "kernel GB/s",
                    "kernel / streaming sum",
                    "decode step SDPA ms",
                    "kernel ms",
                    "decode step kernel / SDPA",
                    "latent step kernel / SDPA",
                ],
                rows,
            ),
            f"The kernel's attention ran {min(speedups):.2f}x to {max(speedups):.2f}x as fast as SDPA's; a whole "
            f"decode step took {min(steps):.2f}x to {max(steps):.2f}x its time with SDPA (the rest of the step, "
            "the weights' products and the small ops, is the same in both). The kernel read as fast as the "
            f"streaming sum or faster in {at_sum} of {len(r['rows'])} cases; SDPA in "
            f"{sum(x['sdpa_read_bytes_per_s'] >= bw for x in r['rows'])}.",
            f"Load average (1, 5, 15 min) before the run: {', '.join(f'{x:.2f}' for x in r['load_average_before'])}; "
            f"after: {', '.join(f'{x:.2f}' for x in r['load_average_after'])}. " + threads_line(r),
            machine_line(r),
        ]
    )


def _trace_store_variants(r: dict) -> str:
    """What the two columns ran, for records that say (from the compiled attention kernel's commit on)."""
    attention = r["machine"].get("cpu_attention")
    if not attention:
        return ""
    return (
        "_concat_: transformers' concatenating cache with PyTorch's SDPA (main before issue 14); _grow_: the "
        f"defaults, the in-place store and, in one-position steps, {attention}. "
    )


def threads_line(r: dict) -> str:
    """How many torch threads the run used, and why when it was not torch's default."""
    threads, default = r["machine"]["torch_threads"], r["machine"].get("torch_default_threads")
    if threads == default:
        return f"Torch threads: {threads} (torch's default here)."
    if threads == 1:
        return (
            "Torch threads: 1: on cores busy with other jobs, two threads made every step many times slower "
            "(a spinning worker waits for one that is descheduled), so that run used one."
        )
    return f"Torch threads: {threads} (torch's default here: {default or 'not recorded'})."


def section_cpu_bf16(r: dict) -> str:
    sp = r["speed"]
    rows = [
        [k, f"{v['float32']:.1f}", f"{v['bfloat16']:.1f}", f"{v['ratio_bf16_over_fp32']:.2f}x"] for k, v in sp.items()
    ]
    cpu = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["cpu_bf16"].items())
    parts = [
        "## bf16 on the CPU",
        f"This CPU: {cpu} (torch CPU kernels: {r['torch_cpu_capability']}). Speed: median of "
        f"{r['settings']['repeats']} interleaved runs per dtype.",
        md_table(["", "fp32", "bf16", "bf16 / fp32"], rows),
    ]
    acc = r.get("accuracy") or {}
    if acc:
        arows = []
        for key, row in acc.items():
            a, b = row["float32"], row["bfloat16"]
            arows.append(
                [
                    f"{row['task']} ({key.removeprefix(row['task']).strip('_') or 'answer'}, {row['method']}, "
                    f"n={a['n']})",
                    f"{a['accuracy']:.3f} [{a['accuracy_ci'][0]:.3f}, {a['accuracy_ci'][1]:.3f}]",
                    f"{b['accuracy']:.3f} [{b['accuracy_ci'][0]:.3f}, {b['accuracy_ci'][1]:.3f}]",
                    f"{row['agreement']:.2f}",
                    "yes" if row["bf16_within_fp32_ci"] else "**no**",
                    f"{a['wall_s']:.0f} / {b['wall_s']:.0f}",
                ]
            )
        parts.append(
            md_table(
                [
                    "task",
                    "fp32 acc [95% CI]",
                    "bf16 acc [95% CI]",
                    "same prediction",
                    "bf16 in fp32 CI",
                    "wall s fp32 / bf16",
                ],
                arows,
            )
        )
    faster = all(v["ratio_bf16_over_fp32"] < 1 for v in sp.values())
    within = bool(acc) and all(row["bf16_within_fp32_ci"] for row in acc.values())
    complete = len(acc) == 2
    invariant = _bf16_batch_invariant(load("batch_invariance"))
    parts.append(
        f"bf16 faster on both measures: {'yes' if faster else 'no'}; accuracy inside fp32's CI on every task: "
        + ("yes" if within else "no" if complete else "not measured on every task")
        + "; no answer depends on its batch in bf16 (section Answers alone and in a batch): "
        + {True: "yes", False: "no", None: "not measured"}[invariant]
        + (
            ". All three hold: `--dtype auto` is bf16 for inference on CPUs like this one (since 2026-12-08; "
            "training stays fp32)"
            if faster and within and invariant
            else ". The CPU default is fp32 unless all three hold"
        )
        + "; see docs/design.md (dtype). The accuracy runs' wall times are sequential, not interleaved: "
        "they are not a speed measure. GSM8K with a 135M model is near the floor, so its CI check is weak; "
        "ARC-Easy's per-question agreement is the sharper test."
    )
    parts.append(machine_line(r))
    return "\n\n".join(parts)


def store_table(r: dict, render) -> str:
    """Before (concat) / after (grow) rows of a result that measured both stores."""
    by = r.get("by_store", {})
    if not {"concat", "grow"} <= set(by):
        return ""
    return render(by)


# Variants of before / after runs (bench/_common.py VARIANTS), in column order.
VARIANT_LABELS = {
    "concat": "concat store",
    "sdpa": "grow store, SDPA",
    "padded": "grow store, padded prompts",
    "keep": "grow store, row by row, finished rows kept",
    "grow": "defaults",
}
VARIANT_TEXT = (
    "_concat store_: transformers' concatenating cache, with PyTorch's SDPA in one-position steps (main before "
    "issue 14); _grow store, SDPA_: the defaults but for PyTorch's SDPA in one-position steps instead of the "
    "compiled kernel (diffmas.attention), so the kernel's share is the last two columns' difference; "
    "_defaults_: the in-place store and everything else at its default"
)


def _variants(by: dict) -> list[str]:
    return [k for k in VARIANT_LABELS if k in by]


def _inference_stores(by: dict, interleaved: bool) -> str:
    names = _variants(by)
    gen = {n: by[n]["methods"] for n in names}
    rows = [
        [name]
        + [f"{gen[n][name]['generation_s']:.1f}" for n in names]
        + [f"{gen['grow'][name]['generation_s'] / gen['concat'][name]['generation_s']:.2f}x"]
        for name in gen["grow"]
    ]
    rows += [
        [k.replace("_over_", " / ")] + [f"{by[n]['ratios'][k]:.2f}x" for n in names] + [""]
        for k in ("latent_over_single", "text_over_latent")
    ]
    order = (
        "every method and variant in turn on each batch of questions"
        if interleaved
        else "one run per method and store, not repeated, one after the other"
    )
    legend = f" ({VARIANT_TEXT})" if "sdpa" in by else ""
    return (
        f"Before / after, same run, generation seconds ({order}, on a machine shared with other work: see the "
        f"load average in the result file){legend}:\n\n"
        + md_table(["method"] + [VARIANT_LABELS[n] for n in names] + ["defaults / concat"], rows)
    )


def _batching_stores(by: dict) -> str:
    names = _variants(by)
    rows = [
        [k]
        + [f"{by[n]['batches'][k]['wall_s']:.1f}" for n in names]
        + [f"{by[n]['speedup_over_batch1'][k]:.2f}x" for n in names]
        for k in by["grow"]["batches"]
    ]
    header = (
        ["batch"] + [f"wall s, {VARIANT_LABELS[n]}" for n in names] + [f"speedup, {VARIANT_LABELS[n]}" for n in names]
    )
    return (
        "Before / after, same run (_padded prompts_: `row_by_row(False)`, each agent's prompt one padded "
        "batch; _row by row_: the default on CPUs, each row's prompt alone on its real tokens; _finished rows "
        "kept_: `drop_finished(False)`, a batch computes every row until its slowest stops; _defaults_: row by row, "
        "finished rows dropped: decoding goes on over the unfinished rows alone"
        + (f"; {VARIANT_TEXT}" if "sdpa" in by else "")
        + "):\n\n"
        + md_table(header, rows)
    )


def section_trace(r: dict) -> str:
    rows = [
        [
            x["agents"],
            x["latent_steps"],
            x["prompt_tokens"],
            x["length"],
            x["bytes"],
            x["formula_bytes"],
            "yes" if x["matches"] else "NO",
        ]
        for x in r["measured"]
    ]
    ext = r["extrapolation_bf16"]
    lengths = list(next(iter(ext.values()))["mib_at_length"])
    ext_rows = [
        [
            name,
            r["paper_model_shapes"][name][0],
            r["paper_model_shapes"][name][1],
            r["paper_model_shapes"][name][2],
            v["bytes_per_position_bf16"],
        ]
        + [f"{v['mib_at_length'][n]:.0f}" for n in lengths]
        for name, v in ext.items()
    ]
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for m in sorted({x["latent_steps"] for x in r["measured"]}):
        pts = [
            x
            for x in r["measured"]
            if x["latent_steps"] == m and x["prompt_tokens"] == r["measured"][-1]["prompt_tokens"]
        ]
        ax.plot([x["agents"] for x in pts], [x["bytes"] / 2**20 for x in pts], marker="o", label=f"m={m}")
    ax.set_xlabel("agents"), ax.set_ylabel("trace MiB (fp32, SmolLM2-135M)"), ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "trace_growth.png", dpi=110)
    return "\n\n".join(
        [
            "## Trace growth",
            f"Measured on SmolLM2-135M (fp32, {r['smollm2_bytes_per_position_fp32']} bytes per trace position). "
            "The trace grows linearly: length = agents × (prompt + m) (+ the final agent's prompt and answer).",
            f"All measured sizes equal layers × 2 × kv_heads × head_dim × length × dtype size: "
            f"{'yes' if r['all_match_formula'] else 'NO'}.",
            md_table(["agents", "m", "prompt tok/agent", "length", "bytes", "formula", "equal"], rows),
            "![trace growth](img/trace_growth.png)",
            "Extrapolated to paper-scale models (bf16, batch 1; shapes from the published config.json):",
            md_table(
                ["model", "layers", "kv heads", "head dim", "bytes/position"] + [f"MiB at {n}" for n in lengths],
                ext_rows,
            ),
            machine_line(r),
        ]
    )


def section_fast_path(r: dict) -> str:
    """The opt-in fast path (`--compile`): eager vs compiled one-position steps, and the memory-bound floor."""
    s, bandwidth = r["settings"], r.get("bandwidth_assumed")
    rows = [
        [
            x["kind"],
            x["batch"],
            x["length"],
            f"{x['eager_ms']:.1f}",
            f"{x['fast_ms']:.1f}",
            f"{x['fast_over_eager']:.2f}x",
            f"{x['floor_ms']:.2f}" if x.get("floor_ms") else "—",
            f"{x['fast_ms'] / x['floor_ms']:.2f}x" if x.get("floor_ms") else "—",
            f"{x['first_call_s'][0]:.0f}",
        ]
        for x in r["rows"]
    ]
    target = r.get("target", {})
    met = target.get("met")
    verdict_line = (
        f"Target: decode step ≤ {target.get('decode_fast_over_floor_max')}x the memory-bound floor: "
        + ("not checkable here (no bandwidth assumed for this device)" if met is None else verdict(met))
        + "."
    )
    return "\n\n".join(
        [
            "## Fast path (`--compile`)",
            f"One-position steps on a synthetic trace, eager vs `--compile {s['compile']}` (static bucketed store), "
            f"{s['steps']} steps after {s['warmup_steps']} warm-up, median of {s['repeats']} runs; "
            f"{s['model']} in {s['dtype']}. "
            + (
                f"Floor: bytes read per step (weights + KV) / {bandwidth}."
                if bandwidth
                else "No floor: no bandwidth assumed."
            )
            + (f" _{r['note']}_" if r.get("note") else ""),
            md_table(
                [
                    "step",
                    "batch",
                    "trace length",
                    "eager ms",
                    "fast ms",
                    "fast / eager",
                    "floor ms",
                    "fast / floor",
                    "first call s",
                ],
                rows,
            ),
            verdict_line,
            machine_line(r),
        ]
    )


def section_packed_linear(r: dict) -> str:
    """PyTorch's CPU linear vs MKL's and oneDNN's packed GEMMs (diffmas.linear), interleaved in one run."""
    s, mem, libs = r["settings"], r["memory"], r["kernels"][1:]
    names = [f"{k} (packed here)" if k == r["packed_is"] else k for k in libs]

    def ratio_cells(x: dict) -> list[str]:
        return [f"{x['ratio_over_default'][k]:.2f}x" for k in libs]

    gemm = [
        ["×".join(str(d) for d in x["shape"]), x["batch"]]
        + [f"{x['gb_per_s'][k]:.1f}" for k in r["kernels"]]
        + ratio_cells(x)
        for x in r["linear"]
    ]
    steps = [
        [x["kind"], x["batch"], x["length"]] + [f"{x['median'][k]:.1f}" for k in r["kernels"]] + ratio_cells(x)
        for x in r.get("steps", [])
    ]
    e2e = [
        [x["method"], x["batch"]]
        + [f"{x['median'][k]:.1f}" for k in r["kernels"]]
        + ratio_cells(x)
        + [", ".join(k for k in libs if not x["same_texts"][k]) or "all"]
        for x in r.get("end_to_end", [])
    ]
    gbs = [f"{k} GB/s" for k in r["kernels"]]
    ms = [f"{k} ms" for k in r["kernels"]]
    secs = [f"{k} s" for k in r["kernels"]]
    over = [f"{k} / default" for k in names]
    from diffmas.linear import rows_text

    ranges = "; ".join(f"{k} {rows_text(lo, hi)}" for k, (lo, hi) in r["row_ranges"].items())
    best = _fastest_by_rows(r)
    load = ", ".join(f"{x:.2f}" for x in r["load_average_before"])
    load_after = ", ".join(f"{x:.2f}" for x in r.get("load_average_after", []))
    return "\n\n".join(
        [
            "## Linear products: PyTorch's kernel vs MKL's and oneDNN's packed GEMMs",
            "Decode and latent steps multiply one row per question by every weight, a prompt's prefill one row "
            'per token. `diffmas.linear` (the CPU default, `--cpu-linear packed`; `linear_kernel("default")` '
            "is PyTorch's kernel) runs the products in a library's row range on weights packed once, by MKL on "
            "Intel CPUs and by oneDNN on other x86 ones (oneDNN's also under autograd, for frozen weights: "
            "training, see Training step); PyTorch's fp32 kernel re-packs the weight on every call. Row ranges: "
            f"{ranges}. This "
            f"machine's CPU vendor: {r['cpu_vendor'] or 'unknown'}, so `packed` is {r['packed_is']} here. "
            f"All kernels interleaved in one run, median of {s['repeats']} runs each; {s['model']} in {s['dtype']}.",
            "Weight read bandwidth of one product, every layer of a shape in turn (GB/s of weights; rows "
            "outside a library's range are PyTorch's call under every setting, so they measure the noise):",
            md_table(["weight (out×in)", "rows", *gbs, *over], gemm),
            f"Fastest kernel per row count, over the weight shapes (geometric mean of the ratios): {best}.",
            f"Steps on a synthetic trace of {s['length']} positions (ms per step, mean of {s['steps']}):",
            md_table(["step", "batch", "trace length", *ms, *over], steps),
            f"End to end: {s['questions']} GSM8K questions, greedy, {s['max_new_tokens']} new tokens (EOS "
            f"suppressed), m={s['latent_steps']}; seconds for all questions; _same texts_: the libraries "
            "whose every answer is identical to PyTorch's kernel's:",
            md_table(["method", "batch", *secs, *over, "same texts"], e2e),
            f"Memory: the default kernel's packed copies of {mem['layers']} layers added "
            f"{mem['resident_added_bytes'] / 2**20:.0f} MiB resident, for "
            f"{mem['weight_bytes'] / 2**20:.0f} MiB of weights. Load average before: {load}; after: {load_after}.",
            machine_line(r),
        ]
    )


def _prefill_bits(r: dict) -> str:
    """What the prompt-prefill run's bit checks found: each batch's rows against each row alone."""
    if r["packed_same_bits_as_alone"]:
        return (
            f"In all {r['checks']} checks (each batch once) every row got the hidden states and keys and values it "
            "gets alone, bit for bit."
        )
    return f"**Some rows did not get their bits alone in the {r['checks']} checks.**"


def section_prompt_prefill(r: dict) -> str:
    """A CPU prompt prefill as one padded batch, one forward a row, and packed rows (bench/prompt_prefill.py)."""
    s = r["settings"]
    peak = max(p["product_flops_per_s"] for p in r["peaks"])
    rows, packed_over_rows, packed_over_padded = [], [], []
    for size, b in r["batches"].items():
        for a in b["agents"]:
            packed_over_rows.append(a["packed_s"] / a["rows_s"])
            packed_over_padded.append(a["packed_s"] / a["padded_s"])
            rows.append(
                [size, a["agent"], a["real_tokens"], a["padded_tokens"]]
                + [f"{a[f'{v}_s']:.2f}" for v in s["variants"]]
                + [f"{packed_over_rows[-1]:.2f}x", f"{packed_over_padded[-1]:.2f}x"]
                + [f"{a[f'{v}_product_flops_per_s'] / 1e9:.0f}" for v in ("rows", "packed")]
            )
    bits = _prefill_bits(r)
    load = ", ".join(f"{x:.2f}" for x in r["load_average"])
    return "\n\n".join(
        [
            "## Prompt prefill on a CPU: padded batch, one forward a row, packed rows",
            "A CPU's prompt prefill is compute-bound, so padding costs what a real token costs. _padded_: a batch's "
            "prompt chunk as one padded batch (`row_by_row(False)`); _rows_: each row alone on its real tokens, one "
            "decoder forward a row (`packed_rows(False)`); _packed_ (the default): the rows' real tokens one after "
            "another as one sequence, so every linear product covers all of them, with attention split back into "
            "rows (`diffmas.trace`, `diffmas.attention.packed_rows`). The chunks are latent_mas's: the "
            f"{len(next(iter(r['batches'].values()))['agents'])} default agents' prompts on {s['questions']} GSM8K "
            f"questions, each upstream agent taking m={s['latent_steps']} latent steps after its prompt, so later "
            f"prompts attend over a real trace; seconds for all questions (the sum over batches of each chunk's "
            f"median over {s['repeats']} interleaved repeats); {s['model']} in {s['dtype']}. _GFLOP/s_: the linear "
            "products' FLOPs (2 per weight and real token) over the whole prefill's time, attention and small ops "
            f"included; the fastest single product measured in the same run: {peak / 1e9:.0f} GFLOP/s.",
            md_table(
                [
                    "batch",
                    "agent",
                    "real tokens",
                    "padded tokens",
                    *(f"{v} s" for v in s["variants"]),
                    "packed / rows",
                    "packed / padded",
                    "rows GFLOP/s",
                    "packed GFLOP/s",
                ],
                rows,
            ),
            f"Packed rows took {min(packed_over_rows):.2f}x to {max(packed_over_rows):.2f}x the time of one forward a "
            f"row, and {min(packed_over_padded):.2f}x to {max(packed_over_padded):.2f}x that of the padded batch. "
            + bits,
            f"Load average (1, 5, 15 min) after the run: {load}. " + threads_line(r),
            machine_line(r),
        ]
    )


def _fastest_by_rows(r: dict) -> str:
    """For each row count: the kernel with the lowest geometric-mean time ratio over the shapes,
    among PyTorch's and the libraries whose range holds that many rows (outside it a library's
    setting runs PyTorch's call, and its ratio is noise)."""
    by_rows: dict[int, dict[str, list[float]]] = {}
    for x in r["linear"]:
        rows = x["batch"]
        in_range = [k for k, (lo, hi) in r["row_ranges"].items() if lo <= rows <= (hi or rows)]
        ratios = by_rows.setdefault(rows, {"default": [], **{k: [] for k in in_range}})
        for k in ratios:
            ratios[k].append(1.0 if k == "default" else x["ratio_over_default"][k])
    out = []
    for rows, ratios in sorted(by_rows.items()):
        geo = {k: math.exp(sum(math.log(v) for v in vs) / len(vs)) for k, vs in ratios.items()}
        fastest = min(geo, key=geo.get)
        label = f"{rows} row{'s' if rows != 1 else ''}"
        out.append(
            f"{label} PyTorch's (no library's range)"
            if len(geo) == 1
            else f"{label} {fastest} ({geo[fastest]:.2f}x default)"
        )
    return ", ".join(out)


def section_elsewhere() -> str:
    """Runs on other machines (bench/gpu.sh): the same tables, one per result file."""
    out = []
    for name, render in (
        ("trace_store", section_trace_store),
        ("step_cost", section_steps),
        ("inference_cost", section_inference),
        ("ratio_by_batch", section_ratio_by_batch),
        ("training_step", section_training),
        ("batching", section_batching),
        ("fast_path", section_fast_path),
        ("packed_linear", section_packed_linear),
    ):
        for tag, result in tagged(name):
            body = render(result).split("\n", 1)[1]  # drop the CPU section's heading
            out.append(f"### {name} — {tag}\n{body}")
    if not out:
        return ""
    intro = (
        "## Other machines and settings\n\nRun with `bash bench/gpu.sh TAG` (results `bench/results/<name>_<TAG>.json`). "
        "`random:<shape>` models have the published config.json shape and random weights: their costs "
        "(time, memory, trace bytes) are those of the real model, their outputs are meaningless, so they "
        "decode fixed lengths and their accuracy columns mean nothing. Tag `cpu_bf16`: this CPU, the "
        "embedded model in bf16 (`--dtype bfloat16`; what `--dtype auto` loads for inference here since "
        "2026-12-08, see docs/design.md, dtype), the defaults otherwise. Tag `natural_lengths`: this CPU, the "
        "final agents stopping at end-of-sequence (`--natural-lengths`), so the methods' answers differ in length. "
        "A tag whose device line names another CPU is that machine at the default settings (the Before / after "
        "table above lists its targets)."
    )
    return "\n\n".join([intro] + out)


def _bf16_batch_invariant(r: dict | None) -> bool | None:
    """Whether no bf16 answer differed alone and in a batch (None: not measured)."""
    if not r:
        return None
    cases = [case["bfloat16"] for case in r["cases"].values() if case.get("bfloat16")]
    if not cases:
        return None
    return all(not v.get("different_predictions", v.get("different_answers", 0)) for v in cases)


def _contract_line(differing: dict) -> str:
    """What the batch-invariance counts say about the contract, per dtype measured."""
    broken = [d for d, n in differing.items() if n]
    if broken:
        return f"{' and '.join(broken)} broke the contract here (docs/design.md, dtype)."
    return "No answer depended on the batch, in either dtype (docs/design.md, dtype, says how)."


def section_batch_invariance(r: dict) -> str:
    """Answers alone vs in a batch, per dtype: the contract bf16 had to keep to become the CPU default."""
    dtypes = ("float32", "bfloat16")
    rows, differing, total = [], dict.fromkeys(dtypes, 0), dict.fromkeys(dtypes, 0)
    for case in r["cases"].values():
        for d in dtypes:
            v = case.get(d)
            if v is None:
                continue
            if "different_predictions" in v:
                differ, what = v["different_predictions"], "predicted option"
                detail = f"largest log-likelihood difference {v['max_logprob_difference']:.2g}"
            else:
                differ, what = v["different_answers"], "extracted answer"
                detail = (
                    f"{v['different_texts']} of {v['n']} final texts differ; accuracy alone "
                    f"{v['accuracy_alone']:.3f}, batched {v['accuracy_batched']:.3f}"
                )
            differing[d] += differ
            total[d] += v["n"]
            rows.append([f"{case['task']} ({case['method']}, {what})", d, f"{differ} of {v['n']}", detail])
    verdict = "; ".join(f"{d}: {differing[d]} of {total[d]} answers differed" for d in dtypes if total[d])
    return "\n\n".join(
        [
            "## Answers alone and in a batch: fp32 vs bf16",
            "The runner's contract: batch size is a runtime-only setting (a run resumed with another "
            "`--batch-size` reproduces its answers). Each dtype runs the same questions at batch 1 and at "
            f"batch {r['settings']['batch_size']} through the eval runner's loop (`bench/batch_invariance.py`), "
            "the embedded model on this CPU.",
            md_table(["task (method, answer compared)", "dtype", "answers that differ", "detail"], rows),
            f"Measured: {verdict}. {_contract_line(differing)}",
            machine_line(r),
        ]
    )


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Benchmarks",
        "Generated by `make bench` (`bench/*.py` → `bench/results/*.json` → this file via "
        "`bench/write_docs.py`). Re-run to refresh; every number below comes from those JSON files.",
    ]
    names = (
        "trace_store",
        "inference_cost",
        "batching",
        "step_cost",
        "training_step",
        "trace_growth",
        "cpu_bf16",
        "packed_linear",
        "decode_attention",
        "ratio_by_batch",
        "prompt_prefill",
        "batch_invariance",
    )
    results = {name: load(name) for name in names}
    summary = section_summary(results)
    if summary:
        parts.append(summary)
    for name, render in (
        ("trace_store", section_trace_store),
        ("packed_linear", section_packed_linear),
        ("decode_attention", section_decode_attention),
        ("prompt_prefill", section_prompt_prefill),
        ("inference_cost", section_inference),
        ("ratio_by_batch", section_ratio_by_batch),
        ("batching", section_batching),
        ("step_cost", section_steps),
        ("training_step", section_training),
        ("trace_growth", section_trace),
        ("cpu_bf16", section_cpu_bf16),
        ("batch_invariance", section_batch_invariance),
    ):
        result = results[name]
        parts.append(render(result) if result else f"## {name}\n\n_not run yet: `python bench/{name}.py`_")
    parts.append(section_elsewhere())
    (DOCS / "benchmarks.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
