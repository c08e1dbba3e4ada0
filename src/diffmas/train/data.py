"""Training items: (question prompt, target text) per example, plus cached upstream text for the
sft_text_mas control."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from diffmas.errors import DiffmasError


class TrainDataError(DiffmasError):
    """Training data problems (missing targets, malformed targets file)."""


def load_items(config) -> list[dict]:
    """One dict per example: id, question (the task's prompt), target, format (answer instruction)."""
    from diffmas.tasks import get_task

    task = get_task(config.task)
    examples = task.load(config.split, data_dir=config.data_dir, limit=config.limit, seed=config.subset_seed)
    overrides = _read_targets(config.targets) if config.targets else {}
    items = []
    for ex in examples:
        target = overrides.get(ex.id) if config.targets else task.target_text(ex)
        if not target:
            raise TrainDataError(
                f"no target for example {ex.id!r}"
                + (f" in {config.targets}" if config.targets else f" in task {task.name}")
            )
        items.append(
            {
                "id": ex.id,
                "question": task.prompt(ex),
                "target": target,
                "format": task.format_instruction,
                "private": dict(ex.private),
            }
        )
    if not items:
        raise TrainDataError(f"task {config.task!r} split {config.split!r} gave no training examples")
    return items


def _read_targets(path: str) -> dict[str, str]:
    file = Path(path)
    if not file.is_file():
        raise TrainDataError(f"targets file {path!r} does not exist")
    targets = {}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            targets[str(row["id"])] = str(row["target"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TrainDataError(f"{path}:{n}: expected a JSON object with 'id' and 'target' ({exc})") from exc
    return targets


def data_hash(items: list[dict]) -> str:
    """Hash of exactly what is trained on (ids, prompts, targets)."""
    h = hashlib.sha256()
    for item in items:
        fields = [item["id"], item["question"], item["target"]]
        if item.get("private"):  # only when present, so hashes of earlier runs stay the same
            fields.append(item["private"])
        h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()[:16]


def attach_text_contexts(items: list[dict], method, cache_path: Path, batch_size: int = 8) -> None:
    """sft_text_mas: the frozen model's upstream messages, produced once and cached (resumable).

    `method` is a text_mas Method on the bare backbone; items gain a "context" field.
    """
    from diffmas.jsonl import read_records
    from diffmas.methods import asks_of

    cached = {}
    for row in read_records(cache_path, repair=True):  # a line cut short by a kill is computed again
        if not isinstance(row.get("id"), str) or not isinstance(row.get("context"), str):
            raise TrainDataError(
                f"{cache_path}: a row without string 'id' and 'context'; delete the file "
                "to write the upstream texts again"
            )
        cached[row["id"]] = row["context"]
    todo = [it for it in items if it["id"] not in cached]
    with open(cache_path, "a") as sink:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            asks = asks_of([it["question"] for it in batch], [it.get("private", {}) for it in batch])
            with torch.no_grad():
                up = method.build_upstream(asks)
            for it, context in zip(batch, up.contexts):
                cached[it["id"]] = context
                sink.write(json.dumps({"id": it["id"], "context": context}) + "\n")
            sink.flush()
    for it in items:
        it["context"] = cached[it["id"]]
