"""`diffmas train`: LoRA adapters trained through the multi-agent trajectory (or a control)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from diffmas.cli import app
from diffmas.cli import common as c


@app.command()
def train(
    task: str = typer.Option(..., "--task", help="Task with a training split, or jsonl:PATH?..."),
    out: Path = typer.Option(..., "--out", help="Adapter directory; rerun the same command to resume."),
    method: str = typer.Option("diffmas", help="diffmas, sft_single or sft_text_mas."),
    split: str = typer.Option("train"),
    limit: Optional[int] = typer.Option(None, help="Number of training examples (default: all)."),
    subset_seed: Optional[int] = typer.Option(None, "--subset-seed", help="With --limit: a random subset."),
    targets: Optional[Path] = typer.Option(None, "--targets", help="JSONL of {id, target} (teacher traces)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    latent_steps: int = c.LatentStepsOpt,
    model: str = c.ModelOpt,
    topology: str = c.TopologyOpt,
    agents: Optional[int] = c.AgentsOpt,
    roles: Optional[Path] = c.RolesOpt,
    adapters: str = typer.Option("shared", help="shared (one LoRA) or per-role (one per agent)."),
    upstream_grad: str = typer.Option(
        "full",
        "--upstream-grad",
        help="full: backprop through upstream agents' latent steps; none: stop-gradient upstream.",
    ),
    lora_r: int = typer.Option(8, "--lora-r"),
    lora_alpha: int = typer.Option(16, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
    target_modules: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--target-modules"),
    lr: float = typer.Option(5e-5, "--lr"),
    batch_size: int = typer.Option(1, "--batch-size", help="Trajectories per device per forward."),
    grad_accum: int = typer.Option(64, "--grad-accum"),
    max_steps: int = typer.Option(-1, "--max-steps", help="Optimizer steps (-1: from --epochs)."),
    epochs: float = typer.Option(1.0),
    warmup: float = typer.Option(0.0, help="Warmup steps (int) or ratio of total steps (< 1)."),
    lr_scheduler: str = typer.Option(
        "cosine",
        "--lr-scheduler",
        help="cosine, linear, constant, constant_with_warmup, ... (transformers' scheduler names).",
    ),
    max_target_tokens: int = typer.Option(512, "--max-target-tokens"),
    save_steps: int = typer.Option(50, "--save-steps"),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute trace chunks in backward (less memory)."
    ),
    chat_template_kwargs: Optional[str] = c.ChatKwargsOpt,
    reads: str = c.ReadsOpt,
    trace_policy: Optional[str] = c.TracePolicyOpt,
    trace_budget: Optional[str] = c.TraceBudgetOpt,
    trace_scope: str = c.TraceScopeOpt,
    seed: int = c.SeedOpt,
    dtype: str = c.DtypeOpt,
    device: str = c.DeviceOpt,
) -> None:
    """Train LoRA adapters; writes a peft adapter directory with diffmas_config.json."""
    from diffmas.budget import parse_budget
    from diffmas.train import TrainConfig
    from diffmas.train.trainer import train as run_training

    config = TrainConfig(
        task=task,
        method=method,
        split=split,
        model=model,
        limit=limit,
        subset_seed=subset_seed,
        targets=str(targets) if targets else None,
        data_dir=str(data_dir) if data_dir else None,
        latent_steps=latent_steps,
        topology=topology,
        n_agents=agents,
        roles=str(roles) if roles else None,
        adapters=adapters,
        upstream_grad=upstream_grad,
        reads=reads,
        trace_budget=parse_budget(trace_policy, trace_budget, seed, trace_scope),
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=[m.strip() for m in target_modules.split(",") if m.strip()],
        learning_rate=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        epochs=epochs,
        warmup_ratio=warmup,
        lr_scheduler=lr_scheduler,
        max_target_tokens=max_target_tokens,
        save_steps=save_steps,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        chat_kwargs=c.parse_chat_kwargs(chat_template_kwargs),
        dtype=dtype,
        device=device,
    )
    summary = run_training(config, out)
    if summary:
        shown = {k: v for k, v in summary.items() if k != "loss_curve"}
        c.console.print_json(json.dumps(shown))
