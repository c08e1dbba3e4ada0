"""The small-scale study: does trained latent communication help at this scale?

One command (resumable: rerun it to continue after an interruption):

    python study/run_study.py --streams 2     # train 3 adapters, 6 evaluations, the m sweep
    python study/write_results.py             # docs/results.md from the run directories

Design (CPU-calibrated; the paper's recipe is in configs/paper/):
- task: ARC-Easy, where SmolLM2-135M knows more than it can say: ranking options by likelihood is
  ~50 % while answering with a letter is at chance;
- the same training examples, steps, batch, LoRA budget and schedule for every trained method:
  diffmas (shared adapter, gradients through all upstream agents), sft_single, sft_text_mas;
- evaluation on the same 200 test questions, k samples at temperature 0.6 / top-p 0.95, for
  single, single+SFT, text_mas, text_mas+SFT, latent_mas and diffmas; generated-answer accuracy
  and option-likelihood accuracy under the final agent (through the trace);
- a latent-steps sweep for diffmas at evaluation (trained at m=10), greedy;
- the untrained methods on 50 GSM8K test questions (greedy): free-form math at this size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "study"


@dataclass
class StudySettings:
    task: str = "arc_easy"
    model: str = "smollm2-135m"
    # training: identical for every trained method
    train_examples: int = 256
    train_subset_seed: int = 0
    steps: int = 32  # one epoch: 32 optimizer steps x 8 examples
    batch_size: int = 4  # trajectories per forward; x grad_accum = 8 examples per optimizer step
    grad_accum: int = 2  # (a DiffMAS batch of 8 needs ~16 GB on CPU: every latent step keeps its K/V copy)
    learning_rate: float = 1e-3  # CPU budget: few steps, so a larger rate than the paper's 5e-5 x accumulation 64
    warmup: float = 0.05
    lora_r: int = 8
    lora_alpha: int = 16
    latent_steps: int = 10
    upstream_max_new_tokens: int = 32  # text_mas upstream budget (each of 3 agents)
    upstream_temperature: float = 0.0  # text_mas upstream greedy: shared by the k samples, like latent_mas's
    # evaluation
    test_questions: int = 200
    test_subset_seed: int = 0
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 40
    eval_batch_size: int = 16
    sweep: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40])
    # the untrained methods on free-form math (GSM8K test, greedy): what the model can do at all
    gsm8k_questions: int = 50
    gsm8k_max_new_tokens: int = 256
    gsm8k_upstream_max_new_tokens: int = 128
    seed: int = 0


TRAINED = {"diffmas": "diffmas", "sft_single": "sft_single", "sft_text_mas": "sft_text_mas"}
# evaluation name -> (inference method, adapter trained by)
EVALS = {
    "single": ("single", None),
    "single_sft": ("single", "sft_single"),
    "text_mas": ("text_mas", None),
    "text_mas_sft": ("text_mas", "sft_text_mas"),
    "latent_mas": ("latent_mas", None),
    "diffmas": ("diffmas", "diffmas"),
}


def train_all(s: StudySettings, only: set[str] | None) -> None:
    from diffmas.train import TrainConfig
    from diffmas.train.trainer import train

    for name, method in TRAINED.items():
        if only and name not in only:
            continue
        out = OUT / "adapters" / name
        if (out / "training_summary.json").is_file():
            continue
        print(f"== train {name}", flush=True)
        config = TrainConfig(
            task=s.task,
            method=method,
            model=s.model,
            limit=s.train_examples,
            subset_seed=s.train_subset_seed,
            latent_steps=s.latent_steps,
            upstream_max_new_tokens=s.upstream_max_new_tokens,
            lora_r=s.lora_r,
            lora_alpha=s.lora_alpha,
            learning_rate=s.learning_rate,
            batch_size=s.batch_size,
            grad_accum=s.grad_accum,
            max_steps=s.steps,
            warmup_ratio=s.warmup,
            max_target_tokens=64,
            save_steps=8,
            seed=s.seed,
            device="cpu",
            dtype="float32",
        )
        train(config, out, report_to=[])


def eval_config(
    s: StudySettings, method: str, adapter: str | None, latent_steps: int, samples: int, temperature: float
):
    from diffmas.evaluate.runner import EvalConfig
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig

    return EvalConfig(
        task=s.task,
        method=method,
        model=s.model,
        limit=s.test_questions,
        subset_seed=s.test_subset_seed,
        samples=samples,
        seed=s.seed,
        batch_size=s.eval_batch_size,
        device="cpu",
        dtype="float32",
        adapter=str((OUT / "adapters" / adapter).relative_to(REPO)) if adapter else None,
        method_config=MethodConfig(
            latent_steps=latent_steps,
            upstream_max_new_tokens=s.upstream_max_new_tokens,
            upstream_temperature=s.upstream_temperature,
            decode=DecodeConfig(
                max_new_tokens=s.max_new_tokens,
                temperature=temperature,
                top_p=s.top_p if temperature > 0 else 1.0,
                seed=s.seed,
            ),
        ),
    )


def eval_all(s: StudySettings, only: set[str] | None) -> None:
    from diffmas.evaluate.runner import evaluate

    for name, (method, adapter) in EVALS.items():
        if only and name not in only:
            continue
        print(f"== eval {name}", flush=True)
        evaluate(eval_config(s, method, adapter, s.latent_steps, s.samples, s.temperature), OUT / "eval" / name)


def sweep(s: StudySettings) -> None:
    from diffmas.evaluate.runner import build_method, evaluate

    method = None
    for m in s.sweep:
        config = eval_config(s, "diffmas", "diffmas", m, 1, 0.0)
        out = OUT / "sweep" / f"m{m}"
        if (out / "summary.json").is_file():
            continue
        print(f"== sweep m={m}", flush=True)
        method = method or build_method(config)
        method.config = config.method_config
        evaluate(config, out, method=method)


# `--streams 2`: the study as two single-threaded processes on a 2-core machine. Each stage is a
# fresh process (its peak memory is its own: a process's RSS does not shrink after a bigger stage).
# The untrained evaluations run while DiffMAS trains; an evaluation under an adapter first waits for
# that adapter's training to finish, in whichever stream it runs.
STREAMS = [
    [
        ["--stage", "train", "--only", "diffmas"],
        ["--stage", "eval", "--only", "diffmas"],
        ["--stage", "sweep"],
        ["--stage", "eval", "--only", "single_sft"],
    ],
    [
        ["--stage", "train", "--only", "sft_single"],
        ["--stage", "train", "--only", "sft_text_mas"],
        ["--stage", "eval", "--only", "single"],
        ["--stage", "eval", "--only", "text_mas"],
        ["--stage", "eval", "--only", "latent_mas"],
        ["--stage", "eval", "--only", "text_mas_sft"],
        ["--stage", "gsm8k"],
    ],
]


def run_streams() -> None:
    """Run the streams side by side (1 thread each), each one's stages in order."""
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = []

    def needs(args) -> list[Path]:
        if args[1] not in ("eval", "sweep"):
            return []
        names = args[args.index("--only") + 1].split(",") if "--only" in args else ["diffmas"]
        return [OUT / "adapters" / EVALS[n][1] / "training_summary.json" for n in names if EVALS[n][1]]

    def chain(stages):
        try:
            for args in stages:
                while not all(p.is_file() for p in needs(args)):  # an adapter the other stream trains
                    if failed:
                        return
                    time.sleep(10)
                subprocess.run([sys.executable, __file__, *args, "--threads", "1"], env=env, check=True)
        except BaseException:
            failed.append(stages)
            raise

    with ThreadPoolExecutor(len(STREAMS)) as pool:
        list(pool.map(chain, STREAMS))


GSM8K_METHODS = ("single", "text_mas", "latent_mas")
GSM8K_OUT = REPO / "results" / "gsm8k50"


def gsm8k(s: StudySettings) -> None:
    from diffmas.evaluate.runner import EvalConfig, evaluate
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig

    for method in GSM8K_METHODS:
        print(f"== gsm8k {method}", flush=True)
        config = EvalConfig(
            task="gsm8k",
            method=method,
            model=s.model,
            limit=s.gsm8k_questions,
            batch_size=10,
            method_config=MethodConfig(
                latent_steps=s.latent_steps,
                upstream_max_new_tokens=s.gsm8k_upstream_max_new_tokens,
                decode=DecodeConfig(max_new_tokens=s.gsm8k_max_new_tokens),
            ),
        )
        evaluate(config, GSM8K_OUT / method)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "train", "eval", "sweep", "gsm8k"], default="all")
    p.add_argument("--only", default="", help="Comma-separated names of the trainings/evaluations to run.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--streams",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: run the stages as two single-threaded processes side by side (2-core machines).",
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)  # run records name adapters relative to the repository
    shared = REPO.parent / "shared" / "data"
    if "DIFFMAS_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["DIFFMAS_DATA_DIR"] = str(shared)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    s = StudySettings()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "settings.json").write_text(json.dumps(asdict(s), indent=2) + "\n")
    if args.streams == 2:
        return run_streams()
    only = {x for x in args.only.split(",") if x} or None
    if args.stage in ("all", "train"):
        train_all(s, only)
    if args.stage in ("all", "eval"):
        eval_all(s, only)
    if args.stage in ("all", "sweep"):
        sweep(s)
    if args.stage in ("all", "gsm8k"):
        gsm8k(s)


if __name__ == "__main__":
    sys.exit(main())
