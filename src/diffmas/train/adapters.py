"""LoRA adapters: creating them for training, saving them with their diffmas metadata, and
attaching them to a backbone for inference.

An adapter directory is a standard peft directory (adapter_config.json + adapter_model.safetensors;
per-role adapters in one sub-directory per role) plus `diffmas_config.json`, which records how it
was trained and which base model it belongs to.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diffmas.backbone import Backbone, BackboneError
from diffmas.provenance import git_commit, package_versions
from diffmas.roles import Topology

DIFFMAS_CONFIG = "diffmas_config.json"
SHARED = "default"  # peft's name for a single adapter; saved at the directory root
# Settings of the trained multi-agent system that inference with the adapter should share (names of
# TrainConfig fields). A run that leaves one unset gets the trained value; one that sets another is warned
# (`reconcile_settings`; the CLI decides what was set, see cli.common.with_adapter_settings).
TRAINED_SETTINGS = ("latent_steps", "topology", "n_agents", "roles", "chat_kwargs", "reads")


class AdapterSettingsWarning(UserWarning):
    """An adapter is used with settings other than the ones it was trained with."""


def base_fingerprint(backbone: Backbone) -> str:
    """The base model's architecture numbers: the same in every dtype it is loaded in."""
    cfg = backbone.config
    return f"{cfg.model_type}-L{cfg.num_hidden_layers}-d{cfg.hidden_size}-V{cfg.vocab_size}"


def embedding_probe(backbone: Backbone) -> list[float]:
    """A strided sample of the frozen input embeddings (64 rows x 4 columns spread over the matrix).

    They differ between any two trained models, even of the same shape, so an adapter trained on
    another base model is caught; they are compared with a tolerance (`_same_probe`), because one
    model loaded in bf16, fp16 or fp32 holds them rounded differently.
    """
    emb = backbone.input_embeddings().weight.detach()  # (V, d)
    rows = emb[:: max(1, emb.shape[0] // 64)][:64]
    sample = rows[:, :: max(1, emb.shape[1] // 4)][:, :4].float().cpu().flatten()
    return [float(f"{x:.6g}") for x in sample.tolist()]


# bf16 keeps 8 significant bits (relative error <= 2^-9); fp16 loses absolute precision below 6e-5
_PROBE_RTOL, _PROBE_ATOL = 2.0**-7, 1e-6


def _same_probe(saved: list[float], current: list[float]) -> bool:
    return len(saved) == len(current) and all(
        abs(a - b) <= _PROBE_RTOL * max(abs(a), abs(b)) + _PROBE_ATOL for a, b in zip(saved, current)
    )


def _legacy_fingerprint(backbone: Backbone) -> str:
    """The fingerprint adapters written before the probe carry (it depended on the dtype)."""
    emb = backbone.input_embeddings().weight.detach()
    sample = emb[:: max(1, emb.shape[0] // 64)].float().cpu().contiguous()
    digest = hashlib.sha256(sample.numpy().round(4).tobytes()).hexdigest()[:16]
    return f"{base_fingerprint(backbone)}-{digest}"


def trained_for(trained_on: dict, backbone: Backbone) -> bool:
    """Whether the base model an adapter records (`base_model` of its metadata) is this backbone."""
    if not trained_on.get("fingerprint"):
        return True  # a plain peft adapter: nothing recorded to check
    if "embedding_probe" not in trained_on:
        return trained_on["fingerprint"] == _legacy_fingerprint(backbone)
    return trained_on["fingerprint"] == base_fingerprint(backbone) and _same_probe(
        trained_on["embedding_probe"], embedding_probe(backbone)
    )


def lora_config(config):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_trainable_adapters(backbone: Backbone, config, topology: Topology) -> dict[str, str]:
    """Wrap the backbone's model in peft LoRA; return {role name: adapter name} for training.

    shared: one adapter ("default") for every agent; per-role: one adapter per role, named after it.
    Roles left out of the mapping run on the frozen backbone.
    """
    from peft import get_peft_model

    lora = lora_config(config)
    if config.apply_to == "per-role":
        names = [r.name for r in topology.roles]
        model = get_peft_model(backbone.model, lora, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, lora)
        for p_name, p in model.named_parameters():  # add_adapter leaves only the active one trainable
            p.requires_grad_("lora_" in p_name)
        mapping = {n: n for n in names}
    else:
        model = get_peft_model(backbone.model, lora, adapter_name=SHARED)
        roles = topology.roles if config.apply_to == "all" else (topology.final,)
        mapping = {r.name: SHARED for r in roles}
    backbone.model = model
    return mapping


def write_metadata(
    out_dir: str | Path, backbone: Backbone, config, topology: Topology, mapping: dict[str, str], data_hash: str
) -> None:
    payload = {
        "method": config.method,
        "apply_to": config.apply_to,
        "adapters": mapping,
        "topology": topology.to_dict(),
        "latent_steps": config.latent_steps,
        "base_model": {
            "name": config.model,
            "fingerprint": base_fingerprint(backbone),
            "embedding_probe": embedding_probe(backbone),
        },
        "data_hash": data_hash,
        "train_config": config.to_dict(),
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    Path(out_dir, DIFFMAS_CONFIG).write_text(json.dumps(payload, indent=2) + "\n")


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise BackboneError(f"adapter directory {str(path)!r} does not exist")
    meta = path / DIFFMAS_CONFIG
    if meta.is_file():
        return json.loads(meta.read_text())
    if (path / "adapter_config.json").is_file():  # a plain peft adapter: one adapter for all agents
        return {"apply_to": "all", "adapters": {}, "base_model": {}}
    raise BackboneError(f"{path} is not an adapter directory (no {DIFFMAS_CONFIG} or adapter_config.json)")


def trained_settings(meta: dict, keys: Sequence[str] = TRAINED_SETTINGS) -> dict:
    """The adapter's trained values of `keys` (from its metadata; none for a plain peft adapter)."""
    config = meta.get("train_config") or {}
    return {k: config[k] for k in keys if k in config}


def reconcile_settings(
    trained: Mapping, given: Mapping, defaults: Mapping, keys: Sequence[str] = TRAINED_SETTINGS
) -> tuple[dict, list[str]]:
    """Inference settings for an adapter: per key, the given value; where none was given (None),
    the trained value, else the default. Returns (settings, one warning per key given a value
    other than the trained one)."""
    settings, notes = {}, []
    for key in keys:
        value = given.get(key)
        if value is None:
            settings[key] = trained.get(key, defaults.get(key))
            continue
        settings[key] = value
        if key in trained and trained[key] != value:
            notes.append(
                f"the adapter was trained with {key}={trained[key]!r} but runs with {key}={value!r}; "
                f"its results may not carry over (leave {key} unset to use the trained value)"
            )
    return settings, notes


def attach_adapter(backbone: Backbone, path: str | Path, topology: Topology) -> dict[str, str]:
    """Load a trained adapter onto the backbone; return {role name: adapter name} for a method.

    Refuses an adapter trained on another base model. Per-role adapters need the same role names.
    """
    from peft import PeftModel

    path = Path(path)
    meta = read_metadata(path)
    trained_on = meta.get("base_model", {})
    if not trained_for(trained_on, backbone):
        raise BackboneError(
            f"adapter {str(path)!r} was trained for base model {trained_on.get('name')!r} "
            f"({trained_on['fingerprint']}), not for {backbone.name!r} ({base_fingerprint(backbone)}, "
            "or these are other weights of that shape); load it with the model it was trained on"
        )
    if meta["apply_to"] == "per-role":
        trained = list(meta["adapters"])
        roles = [r.name for r in topology.roles]
        if sorted(trained) != sorted(roles):
            raise BackboneError(
                f"per-role adapter {str(path)!r} has roles {trained}, the topology has {roles}; "
                "use the roles it was trained with (--roles / --topology / --agents)"
            )
        model = PeftModel.from_pretrained(backbone.model, path / roles[0], adapter_name=roles[0])
        for name in roles[1:]:
            model.load_adapter(path / name, adapter_name=name)
        mapping = {n: n for n in roles}
    else:
        model = PeftModel.from_pretrained(backbone.model, path, adapter_name=SHARED)
        roles = topology.roles if meta["apply_to"] == "all" else (topology.final,)
        mapping = {r.name: SHARED for r in roles}
    model.eval()
    backbone.model = model
    return mapping


def load_adapter_weights(model, checkpoint: str | Path, mapping: dict[str, str]) -> None:
    """Put the adapter weights saved in a Trainer checkpoint back into a peft model (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in sorted(set(mapping.values())):
        folder = Path(checkpoint) if name == SHARED else Path(checkpoint) / name
        state = load_file(folder / "adapter_model.safetensors", device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        missing = [k for k in getattr(result, "unexpected_keys", [])]
        if missing:
            raise BackboneError(f"checkpoint {checkpoint} has unexpected adapter keys: {missing[:3]} ...")


@torch.no_grad()
def lora_parameters(model, adapter: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors of one adapter (tests and checks)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n}


# ----------------------------------------------------------------------------- checks before use


def check_adapter_dir(path: str | Path) -> dict:
    """Read an adapter directory's metadata and check that its files can be read, without a model.

    Returns the metadata (as `read_metadata`). A BackboneError names the first file that is
    missing, is not valid JSON or is not a readable safetensors file, so that eval and run fail
    on a damaged adapter before loading a model or writing anything.
    """
    path = Path(path)
    if (path / DIFFMAS_CONFIG).is_file():
        meta = _json_object(path / DIFFMAS_CONFIG)
        if meta.get("apply_to") not in ("all", "final", "per-role") or not isinstance(meta.get("adapters"), dict):
            raise BackboneError(
                f"{path / DIFFMAS_CONFIG} lacks 'apply_to' (all, final or per-role) or "
                "'adapters'; it was not written by `diffmas train`, retrain or restore it"
            )
    else:
        meta = read_metadata(path)  # a plain peft adapter, or the error for a non-adapter directory
    folders = [path / role for role in meta["adapters"]] if meta["apply_to"] == "per-role" else [path]
    for folder in folders:
        _json_object(folder / "adapter_config.json")
        _check_safetensors(folder / "adapter_model.safetensors")
    return meta


def _json_object(file: Path) -> dict:
    if not file.is_file():
        raise BackboneError(f"adapter file {str(file)!r} is missing; retrain the adapter or restore the file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackboneError(
            f"adapter file {str(file)!r} is not valid JSON ({exc}); retrain the adapter or restore the file"
        ) from None
    if not isinstance(data, dict):
        raise BackboneError(f"adapter file {str(file)!r} should hold a JSON object, got {type(data).__name__}")
    return data


def _check_safetensors(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise BackboneError(f"adapter file {str(file)!r} is missing; retrain the adapter or restore the file")
    try:
        with safe_open(str(file), framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as exc:
        raise BackboneError(
            f"adapter file {str(file)!r} is not a readable safetensors file ({exc}); "
            "retrain the adapter or restore the file"
        ) from None


def attach_checked(backbone: Backbone, path: str | Path, topology: Topology) -> dict[str, str]:
    """`attach_adapter` for user-given directories: peft's errors for an adapter that does not fit
    this model (other layer names or shapes) as one BackboneError. Check the files first with
    `check_adapter_dir`, before the model is loaded."""
    from safetensors import SafetensorError

    try:
        return attach_adapter(backbone, path, topology)
    except (ValueError, RuntimeError, TypeError, KeyError, OSError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(
            f"adapter {str(path)!r} does not fit model {backbone.name!r}: {first[:300]}; "
            "use the model it was trained on"
        ) from None
