"""`diffmas env`: versions, device, dtype and cache locations, to paste into a bug report."""

from __future__ import annotations

from diffmas.cli import app


@app.command()
def env() -> None:
    """Print versions, device, dtype and cache locations for bug reports."""
    import torch

    from diffmas.attention import kernel_status
    from diffmas.backbone import EMBEDDED_MODELS, diffmas_home, resolve_device
    from diffmas.linear import KERNEL
    from diffmas.provenance import cpu_bf16_support, device_description, git_commit, package_versions
    from diffmas.scoring.sandbox import isolation

    device = resolve_device("auto")
    lines = ["- diffmas environment"]
    lines += [f"- {name}: {version or 'not installed'}" for name, version in package_versions().items()]
    lines += [
        f"- git commit: {git_commit() or 'not a git checkout'}",
        f"- device: {device_description()}",
        f"- default dtype (--dtype auto): {_default_dtype(device)}",
        f"- torch threads: {torch.get_num_threads()}",
        "- CPU bf16: "
        + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in cpu_bf16_support().items())
        + f" (torch CPU kernels: {torch.backends.cpu.get_cpu_capability()})",
        "- CPU linear layers: " + _linear_kernel(KERNEL.value),
        "- CPU one-position attention: " + kernel_status(),
        f"- DIFFMAS_HOME: {diffmas_home()}",
        f"- code sandbox: {isolation().describe()}",
    ]
    for name in EMBEDDED_MODELS:
        cached = (diffmas_home() / "models" / name / "config.json").is_file()
        lines.append(f"- embedded model {name}: {'cached' if cached else 'not yet converted'}")
    print("\n".join(lines))


def _linear_kernel(kind: str) -> str:
    import torch

    from diffmas.linear import MAX_PACKED_SHARE_OF_AVAILABLE, packed_gemm
    from diffmas.provenance import cpu_vendor

    bf16 = packed_gemm(kind, torch.bfloat16)
    bf16_text = "; bf16 models: " + (bf16.description if bf16 else "PyTorch's")
    gemm = packed_gemm(kind)
    if gemm is None:
        why = "--cpu-linear default" if kind == "default" else f"no {kind} GEMM for this CPU and torch build"
        return f"PyTorch's ({why}){bf16_text}"
    return (
        f"{gemm.description} for {gemm.rows_text()} (--cpu-linear {kind}, "
        f"CPU vendor {cpu_vendor() or 'unknown'}; where the copies fit in "
        f"{MAX_PACKED_SHARE_OF_AVAILABLE:.0%} of the free memory){bf16_text}"
    )


def _default_dtype(device) -> str:
    """What `--dtype auto` loads here: on a CPU it depends on the model and on training."""
    from diffmas.backbone import cpu_bf16_default, resolve_dtype

    name = str(resolve_dtype("auto", device)).removeprefix("torch.")
    if device.type != "cpu" or not cpu_bf16_default():
        return name
    return (
        "bfloat16 for inference of models whose shapes take the packed bf16 product and the decode "
        "kernel (e.g. the embedded smollm2-135m), else float32; float32 for training"
    )
