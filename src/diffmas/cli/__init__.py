"""Command line: a thin layer over the Python API. `main()` only dispatches; each subcommand
lives in its own module. User-facing errors (DiffmasError) print one line and exit with code 2."""

from __future__ import annotations

import sys

import typer

from diffmas.attention import CPU_ATTENTION
from diffmas.linear import KERNEL, MAX_PACKED_SHARE_OF_AVAILABLE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Multi-agent LLMs that communicate through a (learned) latent channel.",
)


@app.callback()
def _process_options(
    cpu_linear: str = typer.Option(
        None,
        "--cpu-linear",
        help="CPU linear kernel of decode and latent steps: packed (the default: a packed GEMM, MKL's on "
        "Intel CPUs and oneDNN's on other x86 ones, where the copies fit in "
        f"{MAX_PACKED_SHARE_OF_AVAILABLE:.0%} of the free memory; costs about the weights' size again), "
        "mkl or onednn (that library's), or default (PyTorch's kernel, no copies).",
    ),
    cpu_attention: str = typer.Option(
        None,
        "--cpu-attention",
        help="CPU attention of decode and latent steps: kernel (the default: diffmas's compiled one-position "
        "kernel, built for this CPU at first use, where it has AVX-512 and a kernel for the model's heads) or "
        "sdpa (PyTorch's).",
    ),
) -> None:
    """Options for every command (before the command's name)."""
    if cpu_linear is not None:
        KERNEL.set(cpu_linear)
    if cpu_attention is not None:
        CPU_ATTENTION.set(cpu_attention)


from diffmas.cli import compare, demo, env, eval, inspect, report, run, serve, sweep, train  # noqa: E402,F401  (registers the subcommands)


def main() -> None:
    from diffmas.errors import DiffmasError

    try:
        app()
    except DiffmasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
