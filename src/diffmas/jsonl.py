"""Append-only JSONL files that a kill can cut short: eval's samples.jsonl and its shards, and the
training caches (sft_text_mas upstream texts).

Each record is written as one `json.dumps(record) + "\\n"` and flushed, so a kill leaves at most
one damaged line, the last one: a line without its newline, or (after a crash of the machine) a
line of zero bytes that the file system had allocated but not written. `read_records` drops that
line and, with `repair=True`, cuts it off the file so that the next append starts on a clean line
and the record is computed again. Any other line that is not a JSON object is a `JsonlError`
naming the file and line: that is not a kill, and guessing would lose or invent records.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffmas.errors import DiffmasError


class JsonlError(DiffmasError):
    """A line before the last one of an append-only JSONL file is not a JSON object."""


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """The complete records of `path` ([] when it does not exist), in file order.

    repair: cut a damaged last line off the file (call it only on a file this process appends to).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last item follows the last newline: b"", or a line cut short
    records, end = [], 0  # end: byte offset just after the last good line
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines) or (number == len(lines) - 1 and not lines[-1].strip())
        # a line without its newline is never taken: its write was cut short, however it parses
        record = _parse(line) if number < len(lines) else None
        if record is None and line.strip():
            if is_last:
                break  # the damaged last line of a kill
            raise JsonlError(
                f"{path}:{number} is not a JSON object; delete that line (its record is then "
                "computed again) or start afresh in another directory"
            )
        if record is not None:
            records.append(record)
        if number < len(lines):
            end += len(line) + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def _parse(line: bytes) -> dict | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
