"""Where a result came from: package versions, git commit, machine. Stamped on every saved run."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
import typing
from pathlib import Path

PACKAGES = (
    "diffmas",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "datasets",
    "math-verify",
    "gguf",
    "typer",
    "rich",
    "numpy",
)


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: str | Path | None = None) -> str | None:
    """Commit of the checkout that holds the diffmas sources, with '+dirty' if modified."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        # benchmark results are outputs, not code: a run that rewrote one leaves the next record clean
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)bench/results"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"cuda ({torch.cuda.device_count()}x {name}, CUDA {torch.version.cuda})"
    # The vector ISA torch's kernels run (AVX512, AVX2, ...): two machines of one model name can differ.
    parts = [cpu_model(), platform.machine(), torch.backends.cpu.get_cpu_capability()]
    return f"cpu ({', '.join(p for p in parts if p)}, {torch.get_num_threads()} threads)"


def cpu_vendor() -> str:
    """The CPU's vendor as the kernel reports it ("GenuineIntel", "AuthenticAMD", ...; Linux's
    /proc/cpuinfo), or "" where it cannot be read. MKL and oneDNN are fastest on different ones
    (diffmas.linear)."""
    return _cpuinfo_field("vendor_id")


def cpu_flags() -> list[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo: avx512f, avx512_bf16, ...), or [] where
    they cannot be read."""
    return _cpuinfo_field("flags").split()


def cpu_bf16_support() -> dict[str, bool]:
    """Which bf16 instructions this CPU has: avx512_bf16 (bf16 dot products) and amx_bf16 (AMX
    tiles, what oneDNN uses for bf16 matmuls on Sapphire Rapids and later). Read from the kernel's
    CPU flags (Linux); both False where they cannot be read."""
    flags = cpu_flags()
    return {name: name in flags for name in ("avx512_bf16", "amx_bf16")}


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or "" where it cannot be read. CPU timings
    depend on it beyond the core count: MKL runs different code on Intel and AMD parts."""
    model = _cpuinfo_field("model name")
    if model:
        return model
    return platform.processor() if platform.processor() != platform.machine() else ""


@dataclasses.dataclass(frozen=True)
class Optional_:
    """The default of an optional nested config (`X | None = None`): the value itself, and the
    defaults of X's fields, for a saved X that predates one of them."""

    value: object
    fields: dict


def dataclass_defaults(cls) -> dict:
    """Default values of a config dataclass's fields, nested configs as dicts (optional nested
    configs as `Optional_`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            nested = [t for t in typing.get_args(hints.get(f.name)) if dataclasses.is_dataclass(t)]
            out[f.name] = Optional_(f.default, dataclass_defaults(nested[0])) if nested else f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = dataclass_defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def config_diff(saved: dict, wanted: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Settings (dotted names, with both values) in which a saved run's config differs from the
    wanted one. A setting absent from the saved config (added in a later version) counts as its
    default: the older run ran with it, so it stays resumable."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        entry = defaults.get(key) if isinstance(defaults, dict) else None
        default = entry.value if isinstance(entry, Optional_) else entry
        fields = entry.fields if isinstance(entry, Optional_) else entry if isinstance(entry, dict) else {}
        old, new = saved.get(key, default), wanted.get(key, default)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_diff(old, new, fields, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out
