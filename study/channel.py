"""The channel study: does a trained latent channel carry information to the decoder?

One command, resumable (rerun it after an interruption; finished stages are skipped, a stage cut
short resumes from its last checkpoint or record):

    python study/channel.py --workers 2      # every stage below, two single-threaded processes
    python study/write_channel.py            # docs/channel.md and its plots, from the records

Every stage runs with `reads=latent`: the reader attends to the sender's *latent steps* only, never
to its prompt, so an answer above chance is information that crossed the channel. Conditions, on
`relay_word` (K=8) for m in `ms`:
- latent_mas: the untrained channel;
- diffmas / upstream_grad none: a shared LoRA trained with the sender under stop-gradient (only
  reading is learned);
- diffmas / full: the same LoRA trained through the trajectory (encoding and reading jointly);
- text_mas with an upstream decode budget of m tokens: the text channel with as many slots.
Then, at m = `probe_m`: per-role adapters; the K sweep (capacity); the hop curve (`relay_chain`,
each agent reading only its predecessor); `relay_sum` (three holders, one aggregator) and
`relay_code` (4 digits). The same script runs a larger backbone with `--model` (and a GPU with
`--device cuda`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import claim, launch, start_worker_threads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "channel"


@dataclass
class ChannelSettings:
    model: str = "smollm2-135m"
    device: str = "cpu"
    reads: str = "latent"
    ms: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    probe_m: int = 4  # m of the per-role, K, hop, sum and code stages
    k: int = 8  # relay_word's K in the m grid
    k_sweep: list[int] = field(default_factory=lambda: [2, 32, 128])
    hops: list[int] = field(default_factory=lambda: [2, 3])  # relay_chain (1 hop is relay_word)
    # training: the same for every trained stage
    steps: int = 80  # optimizer steps of `batch_size` examples (one pass over steps x batch examples)
    batch_size: int = 8
    # Few steps on a CPU: a larger rate than the paper's 5e-5 x accumulation 64, with warmup and a
    # cosine decay. Measured at m=4 (K=8): with 1e-3 decayed over 100 steps the loss was still at
    # chance level at the end; 3e-3 held constant learned (100 % held-out) on one draw of the data
    # and diverged at the moment it learned on another (loss 1.2 -> 11 at step 50); 3e-3 with 10
    # warmup steps and a cosine decay over 80 learned on that draw (loss 0.002 at step 70).
    learning_rate: float = 3e-3
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    lora_r: int = 8
    lora_alpha: int = 16
    # evaluation: greedy, on held-out pairs
    test_examples: int = 128
    max_new_tokens: int = 4
    eval_batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class Stage:
    group: str  # which table it belongs to: grid, roles, k, hops, sum, code
    task: str  # task spec, e.g. relay_word?k=8
    method: str  # latent_mas | text_mas | diffmas
    m: int  # latent steps per upstream agent (text_mas: upstream decode budget)
    upstream_grad: str | None = None  # diffmas: full | none
    adapters: str = "shared"

    @property
    def name(self) -> str:
        """Directory name under results/channel/."""
        task = self.task.replace("?", "-").replace("=", "").replace("&", "-")
        how = self.method if self.method != "diffmas" else f"diffmas-{self.upstream_grad}"
        if self.adapters != "shared":
            how += f"-{self.adapters}"
        return f"{task}/{how}-m{self.m}"

    @property
    def trained(self) -> bool:
        return self.method == "diffmas"


def stages(s: ChannelSettings) -> list[Stage]:
    """Every stage: the m grid, then the probes at m = probe_m (see `work` for the order they run in)."""
    word = f"relay_word?k={s.k}" if s.k != 8 else "relay_word"
    grid = [
        Stage("grid", word, method, m, grad)
        for m in s.ms
        for method, grad in (("latent_mas", None), ("diffmas", "full"), ("diffmas", "none"), ("text_mas", None))
        if not (method == "text_mas" and m == 0)
    ]  # a text message needs at least one token
    m = s.probe_m
    probes = [Stage("roles", word, "diffmas", m, "full", "per-role")]
    probes += [
        Stage("k", f"relay_word?k={k}", method, m, grad)
        for k in s.k_sweep
        for method, grad in (("latent_mas", None), ("diffmas", "full"))
    ]
    probes += [
        Stage("hops", f"relay_chain?hops={h}", method, m, grad)
        for h in s.hops
        for method, grad in (("latent_mas", None), ("diffmas", "full"))
    ]
    probes += [
        Stage(g, t, method, m, grad)
        for g, t in (("sum", "relay_sum"), ("code", "relay_code"))
        for method, grad in (("latent_mas", None), ("diffmas", "full"))
    ]
    return grid + probes


def train_config(s: ChannelSettings, task: str, m: int, **overrides):
    """The study's training settings for one relay task (shared with study/budget.py)."""
    from diffmas.train import TrainConfig

    return TrainConfig(
        **{
            "task": task,
            "model": s.model,
            "device": s.device,
            "limit": s.steps * s.batch_size,
            "latent_steps": m,
            "reads": s.reads,
            "lora_r": s.lora_r,
            "lora_alpha": s.lora_alpha,
            "learning_rate": s.learning_rate,
            "lr_scheduler": s.lr_scheduler,
            "warmup_ratio": s.warmup_steps,
            "batch_size": s.batch_size,
            "grad_accum": 1,
            "max_steps": s.steps,
            "save_steps": max(s.steps // 4, 1),
            "logging_steps": 5,
            "seed": s.seed,
            **overrides,
        }
    )


def run_stage(stage: Stage, s: ChannelSettings) -> None:
    from diffmas.evaluate.runner import EvalConfig, evaluate
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig

    folder = OUT / stage.name
    adapter = folder / "adapter"
    if stage.trained:
        from diffmas.train.trainer import train

        config = train_config(s, stage.task, stage.m, upstream_grad=stage.upstream_grad, adapters=stage.adapters)
        train(config, adapter, report_to=[])
    evaluate(
        EvalConfig(
            task=stage.task,
            method=stage.method,
            model=s.model,
            device=s.device,
            limit=s.test_examples,
            batch_size=s.eval_batch_size,
            adapter=str(adapter.relative_to(REPO)) if stage.trained else None,
            seed=s.seed,
            method_config=MethodConfig(
                latent_steps=stage.m,
                reads=s.reads,
                upstream_max_new_tokens=max(stage.m, 1),
                upstream_temperature=0.0,
                decode=DecodeConfig(max_new_tokens=s.max_new_tokens),
            ),
        ),
        folder / "eval",
        progress=False,
    )


def done(stage: Stage) -> bool:
    return (OUT / stage.name / "eval" / "summary.json").is_file()


def run_order(s: ChannelSettings) -> list[Stage]:
    """Cheap evaluations first, then trainings by how much each answers: the probe m, the m=0
    control and m=1 of the grid, one probe of each kind, then the rest of the grid and probes.
    An interrupted study thus leaves the most telling table cells filled."""
    every = stages(s)
    ranked_m = [s.probe_m, 0, 1, *sorted(m for m in s.ms if m not in (s.probe_m, 0, 1))]

    def rank(st: Stage) -> tuple:
        if not st.trained:
            return (0,)
        if st.group == "grid":
            position = ranked_m.index(st.m)
            return (1, 0 if position < 3 else 2, position, st.upstream_grad != "full")
        first_of_group = st == next(x for x in every if x.group == st.group and x.trained)
        return (1, 1 if first_of_group else 3, 0)

    return sorted(every, key=rank)


def work(s: ChannelSettings, only: str | None) -> None:
    """Run every unfinished stage nobody else has claimed (a claim is an atomic mkdir)."""
    for stage in run_order(s):
        if done(stage) or (only and only not in stage.name) or not claim(OUT, stage.name):
            continue
        print(f"== {stage.name}", flush=True)
        run_stage(stage, s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1, help="Processes side by side, one thread each.")
    p.add_argument("--only", default=None, help="Run only the stages whose name contains this text.")
    p.add_argument("--model", default=None, help="Backbone (default: the embedded SmolLM2-135M).")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="Training steps per trained stage.")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)  # run records name adapters relative to the repository, not by this machine's paths
    s = ChannelSettings(
        **{k: v for k, v in (("model", args.model), ("device", args.device), ("steps", args.steps)) if v is not None}
    )
    OUT.mkdir(parents=True, exist_ok=True)
    if args.worker:
        start_worker_threads()
        return work(s, args.only)
    given = (("only", args.only), ("model", args.model), ("device", args.device), ("steps", args.steps))
    launch(OUT, asdict(s), __file__, [a for k, v in given if v is not None for a in ("--" + k, str(v))], args.workers)


if __name__ == "__main__":
    sys.exit(main())
