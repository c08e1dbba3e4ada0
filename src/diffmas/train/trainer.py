"""`train`: the transformers Trainer around the trajectory loss.

The Trainer does what it is good at — AdamW, the cosine schedule, gradient accumulation,
checkpoints with optimizer/scheduler/RNG state, resume, TensorBoard logging, DDP under
`accelerate launch` / `torchrun`. diffmas supplies the loss (`TrajectoryModel`), the collator, and
how adapters are saved (a standard peft directory + diffmas_config.json) and restored.

    adapters/NAME/                    the final adapter (peft, safetensors) + diffmas_config.json
    adapters/NAME/training_summary.json
    adapters/NAME/checkpoints/checkpoint-N/   resumable checkpoints (rerun the command to resume)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from diffmas.accounting import MemoryMeter
from diffmas.errors import DiffmasError
from diffmas.provenance import config_diff, dataclass_defaults
from diffmas.train.adapters import DIFFMAS_CONFIG, load_adapter_weights, write_metadata
from diffmas.train.config import TrainConfig

TRAIN_CONFIG = "train_config.json"
SUMMARY = "training_summary.json"


class TrainRunConflictError(DiffmasError):
    """The output directory holds a training run with other settings."""


class _Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(rows: list[dict]) -> dict:
    """Strings only: tokenisation happens inside the trajectory, per agent."""
    return {
        "questions": [r["question"] for r in rows],
        "targets": [r["target"] for r in rows],
        "formats": [r["format"] for r in rows],
        "contexts": [r.get("context", "") for r in rows],
        "ids": [r["id"] for r in rows],
        "privates": [r.get("private", {}) for r in rows],
    }


class TrajectoryTrainer(Trainer):
    """Trainer whose model is a TrajectoryModel and whose checkpoints are peft adapters."""

    def __init__(self, *args, backbone, topology, mapping, train_config, data_hash, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone, self.topology, self.mapping = backbone, topology, mapping
        self.train_config, self.data_hash = train_config, data_hash
        self._window = {"tokens": 0, "trace": 0.0, "n": 0, "start": time.perf_counter()}
        # compute_loss divides by the target tokens of the whole optimizer step (num_items_in_batch),
        # so the Trainer must not divide by the accumulation steps again
        self.model_accepts_loss_kwargs = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their target-token count (all processes).

        The Trainer counts `labels`, which the string batches here do not have; without a count
        each micro-batch's mean would weigh the same however many target tokens it has.
        """
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        model = self.accelerator.unwrap_model(self.model)
        count = torch.tensor(sum(model.count_target_tokens(b["targets"]) for b in batches), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        stats = self.accelerator.unwrap_model(model).last_stats
        self._window["tokens"] += stats["n_target_tokens"]
        self._window["trace"] += stats["trace_len"]
        self._window["n"] += 1
        loss = _step_loss(out, num_items_in_batch, self._token_averaging_processes())
        return (loss, out) if return_outputs else loss

    def _token_averaging_processes(self) -> int:
        """DDP averages gradients over processes; a loss divided by the tokens of all of them is scaled back."""
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return self.accelerator.num_processes
        return 1

    def log(self, logs: dict, start_time: float | None = None) -> None:
        w = self._window
        if w["n"] and "loss" in logs:
            elapsed = max(time.perf_counter() - w["start"], 1e-9)
            logs["target_tokens_per_s"] = round(w["tokens"] / elapsed, 2)
            logs["trace_len"] = round(w["trace"] / w["n"], 1)
            self._window = {"tokens": 0, "trace": 0.0, "n": 0, "start": time.perf_counter()}
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # the base model as the user named it (a hub id, their path, or an embedded name), not the
        # converted directory it was loaded from: adapter files carry no path of this machine
        for peft_config in self.backbone.model.peft_config.values():
            peft_config.base_model_name_or_path = self.backbone.name
        self.backbone.model.save_pretrained(output_dir)  # adapters only, safetensors
        write_metadata(output_dir, self.backbone, self.train_config, self.topology, self.mapping, self.data_hash)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(self.backbone.model, resume_from_checkpoint, self.mapping)


def _step_loss(out: dict, num_items_in_batch, n_processes: int = 1) -> torch.Tensor:
    """This micro-batch's share of the step loss: its summed cross-entropy over the target tokens of
    the whole optimizer step, so that accumulated micro-batches add up to the mean over tokens
    (the batch's own mean when the count is unknown, e.g. outside `train`)."""
    if num_items_in_batch is None:
        return out["loss"]
    return out["loss_sum"] / num_items_in_batch * n_processes


class _StopAt(TrainerCallback):
    """Stop after a given optimizer step (used to simulate an interruption in tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    backbone=None,
    stop_after: int | None = None,
    report_to: list[str] | None = None,
) -> dict:
    """Train (or resume) into `out`; return the training summary.

    backbone: an already loaded (bare) backbone; loaded from config.model when None.
    stop_after: stop (with a checkpoint) after this many optimizer steps, as if interrupted.
    """
    from diffmas.backbone import load_backbone
    from diffmas.methods import MethodConfig, get_method
    from diffmas.roles import build_topology
    from diffmas.tasks import get_task
    from diffmas.train.adapters import add_trainable_adapters
    from diffmas.train.data import attach_text_contexts, data_hash, load_items
    from diffmas.train.trajectory import TrajectoryModel

    out = Path(out)
    # Everything that can fail on the user's input fails before `out` is touched, so that the
    # corrected command starts cleanly instead of meeting a half-written run.
    saved = _check_config(out, config)
    topology = build_topology(config.topology, config.n_agents, config.roles, get_task(config.task))
    items = load_items(config)
    digest = data_hash(items)
    _check_data(out, saved, digest)
    if saved is not None and (out / SUMMARY).is_file():
        # finished with these settings and data: rerunning the command (a resumed study) changes nothing
        return json.loads((out / SUMMARY).read_text())
    torch.manual_seed(config.seed)  # LoRA initialisation
    backbone = backbone or load_backbone(
        config.model, dtype=config.dtype, device=process_device(config.device), training=True
    )
    _check_target_modules(backbone, config)
    backbone.gradient_checkpointing = config.gradient_checkpointing
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, config, digest)
    context_start = time.perf_counter()
    if config.method == "sft_text_mas":  # the frozen model writes the upstream text once (cached on disk)
        frozen = get_method(
            "text_mas",
            backbone,
            topology,
            MethodConfig(
                upstream_max_new_tokens=config.upstream_max_new_tokens,
                chat_kwargs=config.chat_kwargs,
                reads=config.reads,
            ),
        )
        attach_text_contexts(items, frozen, out / "text_mas_contexts.jsonl", batch_size=max(config.batch_size, 4))
    context_seconds = time.perf_counter() - context_start
    mapping = add_trainable_adapters(backbone, config, topology)
    infer = "latent_mas" if config.method == "diffmas" else "single"
    method = get_method(
        infer,
        backbone,
        topology,
        MethodConfig(
            latent_steps=config.latent_steps,
            chat_kwargs=config.chat_kwargs,
            reads=config.reads,
            trace_budget=config.trace_budget,
        ),
        mapping,
    )
    model = TrajectoryModel(method, config.method, config.upstream_grad, config.max_target_tokens)
    model.train()

    trainer = TrajectoryTrainer(
        model=model,
        args=_training_args(config, out, report_to),
        train_dataset=_Items(items),
        data_collator=collate,
        backbone=backbone,
        topology=topology,
        mapping=mapping,
        train_config=config,
        data_hash=digest,
        callbacks=[_StopAt(stop_after)] if stop_after else None,
    )
    last = _last_checkpoint(out / "checkpoints")
    start = time.perf_counter()
    with MemoryMeter(backbone.device) as memory:
        result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    wall = time.perf_counter() - start
    if stop_after is not None and trainer.state.global_step < trainer.state.max_steps:
        return {"stopped_at": trainer.state.global_step}
    trainer.save_model(str(out))
    summary = {
        "method": config.method,
        "examples": len(items),
        "steps": trainer.state.global_step,
        "resumed_from": str(last.relative_to(out)) if last else None,  # no machine paths in the record
        "train_seconds": round(wall, 2),
        # sft_text_mas: writing the upstream texts in this run (not counted in train_seconds; 0 when cached)
        "upstream_text_seconds": round(context_seconds, 2),
        "seconds_per_step": round(wall / max(trainer.state.global_step - _step_of(last), 1), 3),
        "peak_memory_bytes": memory.peak_bytes,
        "final_loss": result.training_loss,
        "loss_curve": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
    }
    if not trainer.args.should_save:
        return {}  # other ranks of a multi-process run: the main process reports
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def process_device(device: str) -> str:
    """Where this process loads the model: under torchrun / `accelerate launch`, its own GPU.

    "auto" (or "cuda") alone would put every rank's copy on GPU 0 until the Trainer moves it there
    (8 x Qwen3-8B: about 128 GB on one GPU). LOCAL_RANK is what the launchers set per process.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(local_rank)}"


def _training_args(config: TrainConfig, out: Path, report_to) -> TrainingArguments:
    from importlib.util import find_spec

    if report_to is None:
        report_to = ["tensorboard"] if find_spec("tensorboard") else []
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=config.device == "cpu" or not torch.cuda.is_available(),
        report_to=report_to,
        # upstream adapters get no gradient under stop-gradient; DDP must not wait for them
        ddp_find_unused_parameters=config.apply_to == "per-role" and config.upstream_grad == "none",
        disable_tqdm=False,
    )


def _check_config(out: Path, config: TrainConfig) -> dict | None:
    """A saved training run in `out` must have the same settings (read only); returns what was saved."""
    path = out / TRAIN_CONFIG
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainRunConflictError(f"{path} is not valid JSON ({exc}); restore it or choose another --out") from None
    settings = {k: v for k, v in saved.items() if k != "data_hash"}
    diff = config_diff(settings, config.to_dict(), dataclass_defaults(TrainConfig))
    if diff:
        raise TrainRunConflictError(
            f"{out} holds a training run with other settings ({'; '.join(diff)}); "
            "resume with the same settings or choose another --out"
        )
    return saved


def _check_data(out: Path, saved: dict | None, digest: str) -> None:
    """Same settings can still mean other examples (an edited data file, or a --subset-seed draw
    of another diffmas version): resuming would then train on a mix."""
    before = _saved_data_hash(out, saved)
    if before not in (None, digest):
        raise TrainRunConflictError(
            f"{out} was trained on other examples (data hash {before}, now "
            f"{digest}): the data file or the --subset-seed draw changed; "
            "choose another --out"
        )


def _saved_data_hash(out: Path, saved: dict | None) -> str | None:
    """From train_config.json, or for runs saved before it held one, from the last checkpoint's metadata."""
    if saved and saved.get("data_hash"):
        return saved["data_hash"]
    last = _last_checkpoint(out / "checkpoints")
    meta = last / DIFFMAS_CONFIG if last else None
    return json.loads(meta.read_text()).get("data_hash") if meta and meta.is_file() else None


def _write_config(out: Path, config: TrainConfig, digest: str) -> None:
    path = out / TRAIN_CONFIG
    if not path.is_file() and int(os.environ.get("RANK", "0")) == 0:
        path.write_text(json.dumps({**config.to_dict(), "data_hash": digest}, indent=2) + "\n")


def _check_target_modules(backbone, config: TrainConfig) -> None:
    """peft's own error for a --target-modules name the model lacks comes as a traceback, later."""
    names = [name for name, _ in backbone.model.named_modules()]
    # peft's rule for a list of names: a module matches a target equal to its name or a suffix of it
    missing = [t for t in config.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in backbone.model.named_modules()
                if isinstance(module, torch.nn.Linear)
            }
        )
        raise DiffmasError(
            f"--target-modules {','.join(missing)}: not in model {backbone.name!r}; "
            f"its linear layers are {', '.join(linear)}"
        )


def _last_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [
        p
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(found, key=_step_of) if found else None


def _step_of(path: Path | None) -> int:
    return int(path.name.split("-")[-1]) if path else 0
