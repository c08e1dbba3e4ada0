"""C++ kernels of the package, compiled for the machine they run on at first use.

`torch.utils.cpp_extension.load` builds a source file against the installed torch (with ninja and
the system's C++ compiler) into torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions). The build is tuned for this CPU (`-march=native`), so the module's
name carries a hash of the source, the torch version, the Python ABI and the CPU's flags: a cache
shared between machines or interpreters, or kept across a torch upgrade, never hands one a build
made for another. Where no
build can be made (no compiler or ninja) `load` returns None with the reason, and callers keep
PyTorch's own ops.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch

from diffmas.provenance import cpu_flags

SOURCES = Path(__file__).parent


@functools.cache
def load(name: str) -> tuple[ModuleType | None, str]:
    """The compiled module of `SOURCES/<name>.cpp` and "", or None and why it could not be built."""
    from torch.utils.cpp_extension import get_default_build_root
    from torch.utils.cpp_extension import load as build

    compiler = os.environ.get("CXX", "c++")  # what torch's build calls
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} not found; set CXX)"
    source = SOURCES / f"{name}.cpp"
    # what the build depends on: the source, torch, the Python ABI and the CPU it is tuned for
    parts = (torch.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "", " ".join(cpu_flags()))
    stamp = source.read_bytes() + "\n".join(parts).encode()
    module_name = f"diffmas_{name}_{hashlib.sha256(stamp).hexdigest()[:12]}"
    where = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / module_name
    if not (where / f"{module_name}.so").is_file():
        print(f"diffmas: compiling {source.name} for this CPU (once, about half a minute)", file=sys.stderr)
    # ninja from pip lives beside the interpreter, which need not be on PATH (a venv not activated)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), path])
    try:
        where.mkdir(parents=True, exist_ok=True)
        module = build(
            module_name,
            [str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],  # torch's own libgomp (same soname, already loaded): one thread pool
            build_directory=str(where),
        )
    except Exception as exc:  # no compiler, no ninja, a compiler that rejects the source: keep torch's ops
        lines = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    finally:
        os.environ["PATH"] = path
    return module, ""
