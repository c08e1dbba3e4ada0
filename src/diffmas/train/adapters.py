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

import torch

from diffmas.backbone import Backbone, BackboneError
from diffmas.provenance import git_commit, package_versions
from diffmas.roles import Topology

DIFFMAS_CONFIG = "diffmas_config.json"
SHARED = "default"  # peft's name for a single adapter; saved at the directory root


def base_fingerprint(backbone: Backbone) -> str:
    """Identifies base weights: architecture numbers plus a hash of the input embeddings.

    The embeddings are frozen and differ between any two trained models, so an adapter trained on
    another base model (even one of the same shape) is caught.
    """
    cfg = backbone.config
    emb = backbone.input_embeddings().weight.detach()
    sample = emb[:: max(1, emb.shape[0] // 64)].float().cpu().contiguous()  # 64 rows spread over the vocab
    digest = hashlib.sha256(sample.numpy().round(4).tobytes()).hexdigest()[:16]
    return f"{cfg.model_type}-L{cfg.num_hidden_layers}-d{cfg.hidden_size}-V{cfg.vocab_size}-{digest}"


def lora_config(config):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")


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


def write_metadata(out_dir: str | Path, backbone: Backbone, config, topology: Topology,
                   mapping: dict[str, str], data_hash: str) -> None:
    payload = {
        "method": config.method,
        "apply_to": config.apply_to,
        "adapters": mapping,
        "topology": topology.to_dict(),
        "latent_steps": config.latent_steps,
        "base_model": {"name": config.model, "fingerprint": base_fingerprint(backbone)},
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


def attach_adapter(backbone: Backbone, path: str | Path, topology: Topology) -> dict[str, str]:
    """Load a trained adapter onto the backbone; return {role name: adapter name} for a method.

    Refuses an adapter trained on another base model. Per-role adapters need the same role names.
    """
    from peft import PeftModel

    path = Path(path)
    meta = read_metadata(path)
    trained_on = meta.get("base_model", {})
    if trained_on.get("fingerprint") and trained_on["fingerprint"] != base_fingerprint(backbone):
        raise BackboneError(
            f"adapter {str(path)!r} was trained for base model {trained_on.get('name')!r} "
            f"({trained_on['fingerprint']}), not for {backbone.name!r} ({base_fingerprint(backbone)}); "
            "load it with the model it was trained on")
    if meta["apply_to"] == "per-role":
        trained = list(meta["adapters"])
        roles = [r.name for r in topology.roles]
        if sorted(trained) != sorted(roles):
            raise BackboneError(f"per-role adapter {str(path)!r} has roles {trained}, the topology has {roles}; "
                                "use the roles it was trained with (--roles / --topology / --agents)")
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
            raise BackboneError(f"{path / DIFFMAS_CONFIG} lacks 'apply_to' (all, final or per-role) or "
                                "'adapters'; it was not written by `diffmas train`, retrain or restore it")
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
        raise BackboneError(f"adapter file {str(file)!r} is not valid JSON ({exc}); retrain the adapter "
                            "or restore the file") from None
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
        raise BackboneError(f"adapter file {str(file)!r} is not a readable safetensors file ({exc}); "
                            "retrain the adapter or restore the file") from None


def attach_checked(backbone: Backbone, path: str | Path, topology: Topology) -> dict[str, str]:
    """`attach_adapter` for user-given directories: peft's errors for an adapter that does not fit
    this model (other layer names or shapes) as one BackboneError. Check the files first with
    `check_adapter_dir`, before the model is loaded."""
    from safetensors import SafetensorError

    try:
        return attach_adapter(backbone, path, topology)
    except (ValueError, RuntimeError, TypeError, KeyError, OSError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(f"adapter {str(path)!r} does not fit model {backbone.name!r}: {first[:300]}; "
                            "use the model it was trained on") from None
