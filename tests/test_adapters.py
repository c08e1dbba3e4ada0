"""Adapters across dtypes (the base-model check) and the trained settings an adapter brings along."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from diffmas.backbone import BackboneError
from diffmas.roles import default_topology
from diffmas.train import TrainConfig
from diffmas.train.adapters import (
    AdapterSettingsWarning,
    _legacy_fingerprint,
    add_trainable_adapters,
    attach_adapter,
    reconcile_settings,
    write_metadata,
)

from conftest import make_backbone, make_model, make_tokenizer


def _save_adapter(bb, out, **train_kw):
    """An untrained adapter directory with its metadata, as `train` writes it (no optimisation needed)."""
    cfg = TrainConfig(task="x", **train_kw)
    topo = default_topology(cfg.topology, cfg.n_agents)
    mapping = add_trainable_adapters(bb, cfg, topo)
    bb.model.save_pretrained(out)
    write_metadata(out, bb, cfg, topo, mapping, "hash")
    return topo


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_adapter_trained_in_fp32_attaches_to_the_same_model_in_another_dtype(tmp_path, dtype):
    topo = _save_adapter(make_backbone(False), tmp_path / "ad")
    other = make_backbone(False)
    other.model.to(dtype)
    assert attach_adapter(other, tmp_path / "ad", topo)  # refused before: the fingerprint hashed fp32 values


def test_an_adapter_trained_in_bf16_attaches_in_fp32(tmp_path):
    bb = make_backbone(False)
    bb.model.to(torch.bfloat16)
    topo = _save_adapter(bb, tmp_path / "ad")
    assert attach_adapter(make_backbone(False), tmp_path / "ad", topo)


def test_other_weights_of_the_same_shape_are_still_refused_in_any_dtype(tmp_path):
    topo = _save_adapter(make_backbone(False), tmp_path / "ad")
    other = make_backbone(False, seed=1)
    other.model.to(torch.bfloat16)
    with pytest.raises(BackboneError, match="was trained for base model"):
        attach_adapter(other, tmp_path / "ad", topo)


def test_an_adapter_with_the_old_fingerprint_is_checked_as_before(tmp_path):
    topo = _save_adapter(make_backbone(False), tmp_path / "ad")
    meta_path = tmp_path / "ad" / "diffmas_config.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"] = {"name": "tiny", "fingerprint": _legacy_fingerprint(make_backbone(False))}
    meta_path.write_text(json.dumps(meta))
    assert attach_adapter(make_backbone(False), tmp_path / "ad", topo)
    with pytest.raises(BackboneError, match="was trained for base model"):
        attach_adapter(make_backbone(False, seed=1), tmp_path / "ad", topo)


def test_reconcile_settings_defaults_to_trained_and_warns_on_others():
    trained = {"latent_steps": 5, "topology": "hierarchical", "chat_kwargs": {"enable_thinking": False}}
    defaults = {
        "latent_steps": 10,
        "topology": "sequential",
        "n_agents": None,
        "roles": None,
        "chat_kwargs": {},
        "reads": "all",
    }
    settings, notes = reconcile_settings(trained, {"latent_steps": 7}, defaults)
    assert settings == {
        "latent_steps": 7,
        "topology": "hierarchical",
        "n_agents": None,
        "roles": None,
        "chat_kwargs": {"enable_thinking": False},
        "reads": "all",
    }
    assert len(notes) == 1 and "latent_steps=5" in notes[0] and "latent_steps=7" in notes[0]
    same, quiet = reconcile_settings(trained, {"latent_steps": 5}, defaults)
    assert same["latent_steps"] == 5 and not quiet
    plain, none = reconcile_settings({}, {}, defaults)  # a plain peft adapter records nothing
    assert plain == defaults and not none


@pytest.fixture
def tiny_dir_and_adapter(tmp_path):
    from diffmas.backbone import load_backbone

    model_dir = tmp_path / "tiny"
    make_model(tied=False).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    _save_adapter(load_backbone(str(model_dir), device="cpu"), tmp_path / "ad", latent_steps=3, n_agents=2)
    return model_dir, tmp_path / "ad"


def _run_json(*args):
    from typer.testing import CliRunner

    from diffmas.cli import app

    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_run_uses_the_trained_settings_when_none_are_given(tiny_dir_and_adapter):
    model_dir, adapter = tiny_dir_and_adapter
    base = [
        "Q?",
        "--model",
        str(model_dir),
        "--method",
        "diffmas",
        "--adapter",
        str(adapter),
        "--max-new-tokens",
        "2",
        "--json",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterSettingsWarning)
        record = _run_json(*base)
    assert [(a["role"], a["n_latent_steps"]) for a in record["agents"]] == [("planner", 3), ("solver", 0)]
    with pytest.warns(AdapterSettingsWarning, match="latent_steps=3 but runs with latent_steps=1"):
        record = _run_json(*base, "--latent-steps", "1")
    assert [a["n_latent_steps"] for a in record["agents"]] == [1, 0]


def test_cli_run_reads_as_the_adapter_was_trained_and_warns_on_another(tmp_path):
    from diffmas.backbone import load_backbone

    model_dir = tmp_path / "tiny"
    make_model(tied=False).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    _save_adapter(
        load_backbone(str(model_dir), device="cpu"), tmp_path / "ad", latent_steps=2, n_agents=2, reads="latent"
    )
    base = [
        "Q?",
        "--model",
        str(model_dir),
        "--method",
        "diffmas",
        "--adapter",
        str(tmp_path / "ad"),
        "--max-new-tokens",
        "2",
        "--json",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterSettingsWarning)
        assert _run_json(*base)["config"]["reads"] == "latent"
    with pytest.warns(AdapterSettingsWarning, match="reads='latent' but runs with reads='all'"):
        assert _run_json(*base, "--reads", "all")["config"]["reads"] == "all"


def test_cli_sweep_uses_the_adapters_trained_agents(tiny_dir_and_adapter, tmp_path):
    """The sweep sets m itself; the rest (here: two agents) comes from the adapter, as in eval."""
    from typer.testing import CliRunner

    from diffmas.cli import app

    model_dir, adapter = tiny_dir_and_adapter
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    args = ["sweep", "--task", f"jsonl:{data}?type=math", "--model", str(model_dir), "--method", "diffmas"]
    args += ["--adapter", str(adapter), "--latent-steps", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "s")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterSettingsWarning)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "s" / "m1" / "samples.jsonl").read_text().splitlines()[0])
    assert [(a["role"], a["n_latent_steps"]) for a in record["agents"]] == [("planner", 1), ("solver", 0)]
