"""Reading a run directory written by `diffmas eval`: `config.json` (the resolved settings),
`samples.jsonl` (one record per question and sample) and `summary.json` (metrics; absent when the
run was killed before it finished). A multi-process run that has not finished keeps its records in
`shards/rank*.jsonl`; those are read too.

A killed run can also leave a half-written last line; it is dropped with a `TruncatedRunWarning`.
Any other unreadable content is a `RunDirError` naming the file and line.

`config.json` may hold the settings flat ({"task": ..., "latent_steps": ...}) or nested as
`diffmas eval` writes them ({"eval": {"task": ..., "method_config": {"latent_steps": ...,
"decode": {"temperature": ...}}}}); `Run.setting(name)` finds a setting in either layout.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from diffmas.errors import DiffmasError

CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


class RunDirError(DiffmasError):
    """A run directory that is missing or cannot be read."""


class TruncatedRunWarning(UserWarning):
    """The last line of samples.jsonl was cut off (a killed run) and was ignored."""


@dataclass
class Run:
    name: str  # the directory name, used as the run's label in tables and plots
    path: Path
    config: dict  # config.json as written by the run
    records: list[dict]  # samples.jsonl, in file order
    summary: dict = field(default_factory=dict)  # summary.json; {} when the run did not finish

    def setting(self, name: str):
        """A setting from config.json, looked up breadth first through nested sections (outer
        sections win), skipping `versions`; None when absent."""
        level = [self.config]
        while level:
            for section in level:
                if name in section and not isinstance(section[name], dict):
                    return section[name]
            level = [v for section in level for k, v in section.items() if isinstance(v, dict) and k != "versions"]
        return None

    @property
    def task(self) -> str | None:
        return self.setting("task")

    @property
    def method(self) -> str | None:
        return self.setting("method") or (self.records[0].get("method") if self.records else None)

    @property
    def latent_steps(self) -> int | None:
        return self.setting("latent_steps")


def load_run(path: str | Path) -> Run:
    """Read one run directory; raise RunDirError naming the path and what is missing or wrong."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise RunDirError(f"run directory '{path}' {what}; pass a folder written by `diffmas eval`")
    sample_files = [path / SAMPLES_FILE] if (path / SAMPLES_FILE).is_file() else []
    sample_files += sorted((path / "shards").glob("rank*.jsonl"))  # an unfinished multi-process run
    for required, present in ((CONFIG_FILE, (path / CONFIG_FILE).is_file()), (SAMPLES_FILE, bool(sample_files))):
        if not present:
            raise RunDirError(
                f"run directory '{path}' has no {required} "
                f"(expected {CONFIG_FILE} and {SAMPLES_FILE} written by `diffmas eval`)"
            )
    config = _read_json(path / CONFIG_FILE)
    records = [record for file in sample_files for record in _read_jsonl(file)]
    if not records:
        raise RunDirError(f"'{path / SAMPLES_FILE}' holds no records; the run stopped before its first batch")
    summary = _read_json(path / SUMMARY_FILE) if (path / SUMMARY_FILE).is_file() else {}
    return Run(name=path.resolve().name, path=path, config=config, records=records, summary=summary)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    return [load_run(p) for p in paths]


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"'{file}' is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"'{file}' should hold a JSON object, got {type(data).__name__}")
    return data


def _read_jsonl(file: Path) -> list[dict]:
    lines = file.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                warnings.warn(
                    f"ignored the cut-off last line {number} of '{file}' (a killed run?)",
                    TruncatedRunWarning,
                    stacklevel=2,
                )
                break
            raise RunDirError(f"'{file}' line {number} is not valid JSON ({exc})") from None
        if not isinstance(record, dict) or "id" not in record:
            raise RunDirError(f"'{file}' line {number} is not a sample record (a JSON object with an 'id')")
        records.append(record)
    return records
