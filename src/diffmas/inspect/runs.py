"""Inspecting task examples: one question of a task (`diffmas inspect --task`), or the first N
questions of an eval run (`diffmas eval --inspect N`), each into its own folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from diffmas.inspect.page import JSON_FILE, write_inspection
from diffmas.inspect.probe import InspectConfig, inspect_question

INSPECTION_DIR = "inspection"  # inside a run directory: one folder per inspected question


def with_gold(config: InspectConfig, gold: str | None) -> InspectConfig:
    """The config, also watching the gold answer when it is a short word or number (the relay secret)."""
    if not gold or len(gold) > 32 or not gold.strip() or gold in config.watch:
        return config
    return InspectConfig(config.top_k, config.lens_layers, [*config.watch, gold.strip()])


def inspect_example(method, task, example, seed: int, config: InspectConfig | None = None) -> dict:
    """Inspect one task example as the eval loop asks it; the record also holds id, gold and score."""
    config = with_gold(config or InspectConfig(), example.answer)
    record = inspect_question(method, task.prompt(example), task.format_instruction, seed, example.private, config)
    score = task.score(example, record["answer"]["text"]) if record["answer"]["text"].strip() else None
    return {
        **record,
        "task": getattr(task, "spec", task.name),
        "id": example.id,
        "gold": example.answer,
        "extracted": score.extracted if score else None,
        "correct": bool(score.correct) if score else False,
    }


def example_dir(run_dir: str | Path, example_id: str) -> Path:
    """run_dir/inspection/<id>, the id made safe for a file name."""
    return Path(run_dir) / INSPECTION_DIR / re.sub(r"[^A-Za-z0-9._-]", "_", example_id)


def is_inspected(run_dir: str | Path, example_id: str) -> bool:
    return (example_dir(run_dir, example_id) / JSON_FILE).is_file()


def inspect_run_examples(
    method, task, examples: Sequence, run_dir: str | Path, seeds: Sequence[int], records: Sequence[dict] = ()
) -> list[Path]:
    """Inspect each example (sample 0's seed) into run_dir/inspection/<id>/; folders already there
    are kept (a resumed run). `records`: the run's records, to note whether the inspected answer is
    the one the run recorded. Returns the folders written."""
    texts = {r["id"]: r.get("text") for r in records if r.get("sample") == 0}
    written = []
    for example, seed in zip(examples, seeds):
        folder = example_dir(run_dir, example.id)
        if is_inspected(run_dir, example.id):
            continue
        record = inspect_example(method, task, example, seed)
        if example.id in texts:
            record["matches_run"] = texts[example.id] == record["answer"]["text"]
        write_inspection(record, folder, indent=None)  # compact: a run keeps many
        written.append(folder)
    return written
