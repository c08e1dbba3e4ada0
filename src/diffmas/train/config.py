"""TrainConfig: every setting of a training run; saved with the adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from diffmas.backbone import DEFAULT_MODEL
from diffmas.budget import TraceBudget
from diffmas.errors import DiffmasError

TRAIN_METHODS = ("diffmas", "sft_single", "sft_text_mas")


class TrainConfigError(DiffmasError):
    """Invalid training settings."""


@dataclass
class TrainConfig:
    task: str  # registry name or jsonl:PATH
    method: str = "diffmas"  # diffmas | sft_single | sft_text_mas
    split: str = "train"
    model: str = DEFAULT_MODEL
    limit: int | None = None  # number of training examples (None: all)
    subset_seed: int | None = None  # with limit: a random subset
    targets: str | None = None  # JSONL of {id, target}: teacher traces instead of the task's targets
    data_dir: str | None = None
    # -- the multi-agent system being trained
    latent_steps: int = 10  # m per upstream agent (diffmas)
    topology: str = "sequential"
    n_agents: int | None = None
    roles: str | None = None  # YAML/JSON roles file
    adapters: Literal["shared", "per-role"] = "shared"  # one LoRA for all agents, or one per role
    upstream_grad: Literal["full", "none"] = "full"  # backprop through upstream agents, or stop-gradient
    reads: Literal["all", "latent", "none"] = "all"  # what agents see of earlier agents (MethodConfig.reads)
    # diffmas: train under this trace budget (a TraceBudget or its dict); None: the full trace.
    # Recorded with the adapter but not inherited at inference: evaluating under another budget is a
    # normal experiment (train full, evaluate under B).
    trace_budget: TraceBudget | None = None
    upstream_max_new_tokens: int = 256  # sft_text_mas: the frozen model's upstream text budget
    chat_kwargs: dict = field(default_factory=dict)  # chat-template args (e.g. enable_thinking); eval must match
    # -- LoRA (paper: r=8, alpha=16)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # -- optimisation (paper: AdamW, lr 5e-5, cosine, gradient accumulation 64)
    learning_rate: float = 5e-5
    batch_size: int = 1  # trajectories per device per forward
    grad_accum: int = 64
    max_steps: int = -1  # optimizer steps; -1: derived from epochs
    epochs: float = 1.0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    max_target_tokens: int = 512  # longer targets are cut
    gradient_checkpointing: bool = False  # recompute trace chunks in backward: less memory, more time
    seed: int = 0
    save_steps: int = 50  # checkpoint every N optimizer steps (resume from the last)
    logging_steps: int = 1
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        self.trace_budget = TraceBudget.from_any(self.trace_budget)
        if self.trace_budget is not None and (self.method != "diffmas" or self.gradient_checkpointing):
            raise TrainConfigError("a trace budget trains diffmas without gradient checkpointing")
        if self.method not in TRAIN_METHODS:
            raise TrainConfigError(f"unknown training method {self.method!r}; choose one of {', '.join(TRAIN_METHODS)}")
        if self.adapters not in ("shared", "per-role"):
            raise TrainConfigError(f"adapters must be 'shared' or 'per-role', got {self.adapters!r}")
        if self.reads not in ("all", "latent", "none"):
            raise TrainConfigError(f"reads must be 'all', 'latent' or 'none', got {self.reads!r}")
        if self.upstream_grad not in ("full", "none"):
            raise TrainConfigError(f"upstream_grad must be 'full' or 'none', got {self.upstream_grad!r}")
        if self.adapters == "per-role" and self.method != "diffmas":
            raise TrainConfigError(
                f"per-role adapters only make sense for diffmas ({self.method} trains "
                "the final agent alone); use --adapters shared"
            )
        if self.latent_steps < 0 or self.lora_r < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise TrainConfigError("latent_steps >= 0, lora_r >= 1, batch_size >= 1 and grad_accum >= 1 are required")

    @property
    def apply_to(self) -> str:
        """Which agents run under the trained adapter at inference: all, final, or per-role."""
        if self.method == "diffmas":
            return "per-role" if self.adapters == "per-role" else "all"
        return "final"  # the controls train the final agent only; upstream agents stay frozen

    def to_dict(self) -> dict:
        return asdict(self)
