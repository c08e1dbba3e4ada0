"""The trace-budget study: how much of the channel survives a bounded trace, with and without training.

One command, resumable (finished evaluations are skipped, a training cut short resumes from its
last checkpoint, an evaluation from its last record):

    python study/budget.py --workers 2     # every stage below, single-threaded processes side by side
    python study/write_budget.py           # docs/budget.md and its plots, from the records

Stages (each a list of evaluations, one per budget of the grid, plus the full trace):
- relay:   relay_word (K=8), m=4, reads=all (the reader sees the sender's prompt and latent steps):
           latent_mas (untrained); DiffMAS trained on the full trace, evaluated under every budget;
           DiffMAS trained under budget B and evaluated under B, for each B in `train_budgets`.
- latent:  the channel study's adapter trained with reads=latent (the reader sees latent steps
           only), under the budgets that touch latent entries (quantisation) and a prompt budget.
- arc:     ARC-Easy (the project's study task), latent_mas and the study's DiffMAS adapter (m=10,
           four agents), option likelihood and greedy answers on the study's 200 test questions.
Budgets: 8, 16, 32, 64 prompt states per agent; 10 %, 25 %, 50 % of each agent's bytes (prompt-drop,
random, window, merge); int8 / int4 (quantize); on ARC also 24 and 96 prompt states per trace (the
totals of 8 and 32 per agent for the three upstream agents; prompt-drop and random). The training
settings are the channel study's.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import claim, launch, start_worker_threads  # noqa: E402

from channel import ChannelSettings, train_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "budget"
POSITION_POLICIES = ("prompt-drop", "random", "window", "merge")
LATENT_ONLY = "prompt-drop:10%"  # at m=4 on relay_word no prompt entry fits: the latent steps alone


@dataclass
class BudgetSettings:
    model: str = "smollm2-135m"
    device: str = "cpu"
    relay_task: str = "relay_word"
    relay_m: int = 4
    sizes: list[str] = field(default_factory=lambda: ["8", "16", "32", "64", "10%", "25%", "50%"])
    arc_sizes: list[str] = field(default_factory=lambda: ["8", "32"])  # the CPU allows a smaller grid
    # per-trace budgets on ARC (three upstream agents): the same totals as 8 and 32 per agent
    arc_trace_sizes: list[str] = field(default_factory=lambda: ["24", "96"])
    arc_trace_policies: list[str] = field(default_factory=lambda: ["prompt-drop", "random"])
    bits: list[str] = field(default_factory=lambda: ["int8", "int4"])
    # trained under budget B, evaluated under B (the relay stage)
    train_budgets: list[str] = field(default_factory=lambda: ["prompt-drop:8", "random:8", "quantize:int4"])
    latent_adapter: str = "results/channel/relay_word/diffmas-full-m4/adapter"  # reads=latent, m=4
    arc_adapter: str = "results/study/adapters/diffmas"  # m=10, four agents
    arc_questions: int = 200
    arc_subset_seed: int = 0
    arc_m: int = 10
    arc_max_new_tokens: int = 40
    relay_test_examples: int = 128
    seed: int = 0
    training: ChannelSettings = field(default_factory=ChannelSettings)


def budget_grid(sizes: list[str], bits: list[str]) -> list[str]:
    """Budgets as policy:spec strings ('' is the full trace)."""
    return ["", *(f"{p}:{s}" for p in POSITION_POLICIES for s in sizes), *(f"quantize:{b}" for b in bits)]


def parse(spec: str):
    """'policy:size' (per agent) or 'policy:size:trace' (per trace); '' is the full trace."""
    from diffmas.budget import parse_budget

    if not spec:
        return None
    policy, size, *scope = spec.split(":")
    return parse_budget(policy, size, scope=scope[0] if scope else "agent")


def label(spec: str) -> str:
    return parse(spec).label if spec else "full"


@dataclass(frozen=True)
class Stage:
    group: str  # relay | latent | arc
    condition: str  # latent_mas | diffmas-full | diffmas-under-<label> | diffmas-latent
    budgets: tuple[str, ...]  # evaluated under each
    train_budget: str | None = None  # trained here under this budget ('' = full trace); None: no training

    @property
    def name(self) -> str:
        return f"{self.group}/{self.condition}"


def stages(s: BudgetSettings) -> list[Stage]:
    grid = tuple(budget_grid(s.sizes, s.bits))
    out = [
        Stage("relay", "latent_mas", grid),
        Stage("relay", "diffmas-full", grid, train_budget=""),
        Stage("arc", "latent_mas", (*budget_grid(s.arc_sizes, s.bits), *trace_scope_grid(s))),
        # under B, full, and latent steps only (10 %: no prompt entry fits): where did training put the secret?
        *(Stage("relay", f"diffmas-under-{label(b)}", ("", b, LATENT_ONLY), train_budget=b) for b in s.train_budgets),
        Stage("arc", "diffmas", tuple(budget_grid(s.arc_sizes, s.bits))),
        Stage("latent", "diffmas-latent", ("", "prompt-drop:8", "random:8", *(f"quantize:{b}" for b in s.bits))),
    ]
    return out


def trace_scope_grid(s: BudgetSettings) -> list[str]:
    return [f"{p}:{n}:trace" for p in s.arc_trace_policies for n in s.arc_trace_sizes]


def eval_dir(stage: Stage, spec: str) -> Path:
    return OUT / stage.name / label(spec)


def adapter_for(stage: Stage, s: BudgetSettings) -> Path | None:
    if stage.train_budget is not None:
        return OUT / stage.name / "adapter"
    if stage.condition == "diffmas-latent":
        return REPO / s.latent_adapter
    if stage.group == "arc" and stage.condition == "diffmas":
        return REPO / s.arc_adapter
    return None


def train_stage(stage: Stage, s: BudgetSettings, adapter: Path) -> None:
    from diffmas.train.trainer import train

    config = train_config(s.training, s.relay_task, s.relay_m, reads="all", trace_budget=parse(stage.train_budget))
    train(config, adapter, report_to=[])


def eval_one(stage: Stage, s: BudgetSettings, spec: str, adapter: Path | None) -> None:
    from diffmas.evaluate.runner import EvalConfig, evaluate
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig

    arc = stage.group == "arc"
    method = "latent_mas" if stage.condition == "latent_mas" else "diffmas"
    config = EvalConfig(
        task="arc_easy" if arc else s.relay_task,
        method=method,
        model=s.model,
        device=s.device,
        limit=s.arc_questions if arc else s.relay_test_examples,
        subset_seed=s.arc_subset_seed if arc else None,
        batch_size=16 if arc else 32,
        option_likelihood=arc,
        adapter=str(adapter.relative_to(REPO)) if adapter else None,
        seed=s.seed,
        method_config=MethodConfig(
            latent_steps=s.arc_m if arc else s.relay_m,
            reads="latent" if stage.group == "latent" else "all",
            decode=DecodeConfig(max_new_tokens=s.arc_max_new_tokens if arc else 4),
            trace_budget=parse(spec),
        ),
    )
    evaluate(config, eval_dir(stage, spec), progress=False)


def done(stage: Stage) -> bool:
    return all((eval_dir(stage, spec) / "summary.json").is_file() for spec in stage.budgets)


def run_stage(stage: Stage, s: BudgetSettings, claim_each: bool) -> None:
    """Train the stage's adapter if it has one, then its evaluations; with `claim_each`, only
    those this worker claims (evaluations of a fixed adapter are independent of each other)."""
    adapter = adapter_for(stage, s)
    if stage.train_budget is not None:
        train_stage(stage, s, adapter)
    elif adapter is not None and not (adapter / "adapter_config.json").is_file():
        print(f"skip {stage.name}: adapter {adapter} is absent (run the study that trains it)", flush=True)
        return
    for spec in stage.budgets:
        if (eval_dir(stage, spec) / "summary.json").is_file():
            continue  # finished (a stage gains budgets as the study grows)
        if claim_each and not claim(OUT, f"{stage.name}/{label(spec)}"):
            continue
        print(f"== {stage.name} / {label(spec)}", flush=True)
        eval_one(stage, s, spec, adapter)


def work(s: BudgetSettings, only: str | None) -> None:
    """Run every unfinished stage nobody else has claimed (a claim is an atomic mkdir): a stage
    that trains is claimed whole, the evaluations of the others one by one."""
    for stage in stages(s):
        if done(stage) or (only and only not in stage.name):
            continue
        if stage.train_budget is None:
            run_stage(stage, s, claim_each=True)
        elif claim(OUT, stage.name):
            run_stage(stage, s, claim_each=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1, help="Processes side by side, one thread each.")
    p.add_argument("--only", default=None, help="Run only the stages whose name contains this text.")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)  # run records name adapters relative to the repository, not by this machine's paths
    s = BudgetSettings()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.worker:
        start_worker_threads()
        return work(s, args.only)
    launch(OUT, asdict(s), __file__, ["--only", args.only] if args.only else [], args.workers)


if __name__ == "__main__":
    sys.exit(main())
