"""Where a task's rows come from: a local file, the small shipped demo, or the Hugging Face hub.

Resolution, for one task split (first hit wins):

1. ``data_dir`` passed to ``Task.load``: the file must be there; a miss is an error (you said where).
2. ``$DIFFMAS_DATA_DIR``: used when it holds the file; otherwise the search goes on.
3. The files shipped in ``diffmas/data/`` (only ``gsm8k_demo.jsonl``, the first 20 GSM8K test rows),
   used only when they can serve the whole request: ``limit`` <= 20 and no ``seed``, so a run never
   reads a 20-row copy when it asked for the full split or a random sample of it.
4. ``datasets.load_dataset(<hub id>, <config>, split=...)`` unless ``HF_HUB_OFFLINE`` is set.

When all fail, one `TaskError` names the file, the directories looked in, and the hub id.

Rows are plain dicts paired with where they came from (``file:line`` or ``hub id row N``) so that a
malformed row is reported by place. Error messages name fields, never field values: GPQA asks that
its questions not be published in plain text, and logs are a kind of publishing.

GPQA-Diamond is distributed as a password-protected zip. It is decrypted at run time into the user
cache (``diffmas_home()/data``, readable by the user only), never into the repository.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmas.errors import DiffmasError

logger = logging.getLogger(__name__)

PACKAGE_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DATA_DIR_ENV = "DIFFMAS_DATA_DIR"
_TRUTHY = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub itself accepts for HF_HUB_OFFLINE


class TaskError(DiffmasError):
    """A task name, split, data file or row is not usable; the message says what to do."""


class RowError(ValueError):
    """A row lacks what its task needs. `Task.load` turns it into a TaskError naming file and line."""


Row = tuple[str, dict[str, Any]]  # (where: "file:line" or "hub-id row N", the row itself)


@dataclass(frozen=True)
class HubSource:
    """A split on the Hugging Face hub, for users with hub access."""

    path: str  # dataset id, e.g. "openai/gsm8k"
    name: str | None  # config name, e.g. "main"; None for the default config
    split: str  # the hub's split name (GPQA's only split is "train")

    def __str__(self) -> str:
        config = f", config {self.name!r}" if self.name else ""
        return f"{self.path}{config}, split {self.split!r}"


@dataclass(frozen=True)
class Source:
    """Where one split of a task lives."""

    files: tuple[str, ...]  # accepted file names in a data dir, in order of preference
    hub: HubSource | None = None  # hub fallback; None where the hub copy has another layout
    demo: str | None = None  # a small file shipped in diffmas/data/ holding the split's first rows
    n_demo_rows: int = 0  # how many rows the demo file holds
    zip_member: str | None = None  # for a .zip in `files`: the member to read
    zip_password: bytes | None = None  # and its (published) password
    how_to_get: str = ""  # extra hint for the missing-data error (e.g. where the official file is)

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("Source.files: give at least one file name")
        if any(name.endswith(".zip") for name in self.files) and not self.zip_member:
            raise ValueError("Source.zip_member: a .zip in `files` needs the member to read")

    def demo_serves(self, limit: int | None, seed: int | None) -> bool:
        """The demo holds the split's first rows, so it can serve "the first `limit` rows" only."""
        return self.demo is not None and seed is None and limit is not None and limit <= self.n_demo_rows


def load_rows(task: str, split: str, source: Source, data_dir: str | Path | None, *, demo_ok: bool) -> list[Row]:
    """Read the rows of one task split, following the resolution order in the module docstring."""
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        path = _find(directory, source.files)
        if path is None:
            raise TaskError(
                f"{task} split {split!r}: {_names(source.files)} not found in {directory} (the data_dir "
                f"argument). Put the file there, or leave data_dir unset to use ${DATA_DIR_ENV} or the hub."
                + _hint(source)
            )
        return _read(path, source)

    looked = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        path = _find(Path(env_dir).expanduser(), source.files)
        if path is not None:
            return _read(path, source)
        looked.append(f"{env_dir} (${DATA_DIR_ENV})")
    else:
        looked.append(f"${DATA_DIR_ENV} (unset)")

    if demo_ok:
        logger.info("%s/%s: reading the shipped demo file %s", task, split, source.demo)
        return read_jsonl(PACKAGE_DATA_DIR / source.demo)

    if source.hub is None:
        hub_note = "This task has no hub fallback."
    elif os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUTHY:
        hub_note = f"Hub fallback {source.hub} skipped: HF_HUB_OFFLINE is set."
    else:
        try:
            return hub_rows(source.hub)
        except Exception as error:  # noqa: BLE001 - the hub fails in many ways; all are reported below
            hub_note = f"Hub fallback {source.hub} failed: {type(error).__name__}: {error}"
    raise TaskError(
        f"{task} split {split!r}: no data. Put {_names(source.files)} in a directory and pass "
        f"data_dir=... or set {DATA_DIR_ENV} (looked in: {'; '.join(looked)}). {hub_note}" + _hint(source)
    )


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _names(files: tuple[str, ...]) -> str:
    return " or ".join(files)


def _hint(source: Source) -> str:
    return f" {source.how_to_get}" if source.how_to_get else ""


def _read(path: Path, source: Source) -> list[Row]:
    logger.info("reading %s", path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".csv":
        return read_csv(path)
    if path.suffix == ".zip":
        return read_csv(unpack_zip_member(path, source.zip_member, source.zip_password))
    raise TaskError(f"{path}: cannot read {path.suffix!r} files; expected .jsonl, .csv or .zip")


# ----------------------------------------------------------------------------- readers


def read_text(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 is a TaskError naming the line (utf-8-sig: a
    byte-order mark, as some editors on Windows write, is dropped)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TaskError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
            "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_jsonl(path: Path) -> list[Row]:
    """One JSON object a line; blank lines are skipped, anything else malformed is an error."""
    rows = []
    # split on "\n" only, as reading the file line by line did: str.splitlines would also split
    # inside strings at U+2028 and other characters JSON allows unescaped
    for line_no, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
            raise TaskError(f"{path}:{line_no}: {problem}") from None
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{line_no}", row))
    return rows


def read_csv(path: Path) -> list[Row]:
    """A CSV with a header row; fields may span lines, so `where` names each record's first line."""
    rows = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    start = 2  # line 1 is the header
    for row in reader:
        rows.append((f"{path}:{start}", dict(row)))
        start = reader.line_num + 1
    return rows


def hub_rows(hub: HubSource) -> list[Row]:
    """Download a split with `datasets` (imported here: only hub users pay for it)."""
    import datasets

    logger.info("downloading %s", hub)
    dataset = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    return [(f"{hub.path} row {i}", dict(row)) for i, row in enumerate(dataset)]


def unpack_zip_member(path: Path, member: str, password: bytes | None) -> Path:
    """Decrypt one member of a (ZipCrypto) password zip into the user cache; return its path.

    The cached copy is keyed by the archive's sha256, so a different archive is unpacked afresh,
    and is readable by the user only.
    """
    from diffmas.backbone import diffmas_home  # lazy: backbone imports torch

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    name = Path(member)
    out = diffmas_home() / "data" / f"{name.stem}-{digest}{name.suffix}"
    if out.is_file():
        return out
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise TaskError(f"{path}: no member {member!r} (members: {archive.namelist()})") from None
        if info.compress_type == 99:  # WinZip AES, which zipfile cannot decrypt
            raise TaskError(
                f"{path}: {member} is AES-encrypted, which Python's zipfile cannot read. Extract it "
                f"yourself (e.g. `7z x {path.name}`) and put {name.name} next to the zip."
            )
        try:
            data = archive.read(info, pwd=password)
        except RuntimeError as error:  # zipfile's "Bad password for file"
            raise TaskError(f"{path}: cannot decrypt {member}: {error}") from None
        except NotImplementedError as error:
            raise TaskError(f"{path}: cannot read {member}: {error}. Extract it yourself.") from None
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, out)  # atomic: a concurrent run never reads half a file
    logger.info("unpacked %s from %s into %s", member, path, out.parent)
    return out


# ----------------------------------------------------------------------------- row fields


def get_field(row: dict[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    """row[name], checked for presence and type; raises RowError (names the field, not the value)."""
    if name not in row:
        raise RowError(f"missing field {name!r} (fields present: {', '.join(sorted(row)) or 'none'})")
    value = row[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RowError(f"field {name!r} should be {expected}, got {type(value).__name__}")
    return value


def smoke_questions(n: int | None = None) -> list[str]:
    """Short arithmetic questions shipped in ``diffmas/data/smoke_questions.txt`` (written for this
    project): the fixed inputs of the serving tests and benchmarks, one place for all of them."""
    lines = (Path(__file__).resolve().parents[1] / "data" / "smoke_questions.txt").read_text().splitlines()
    return [line for line in lines if line.strip()][:n]
