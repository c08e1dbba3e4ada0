"""The opt-in fast path for inference: the one-position steps (decode and latent), compiled.

On a GPU a one-position forward through transformers' eager modules is bound by kernel launches,
not by memory bandwidth (docs/design.md, "Where the time goes"). The fast path runs it as one
compiled function (`torch.compile`; on CUDA by default mode "reduce-overhead", i.e. CUDA graphs)
over a trace in the static store (`diffmas.trace`, `bucket_capacity`): every layer's keys and
values sit in a preallocated buffer whose capacity is a bucket, the new entry is written in place
(`index_copy_` at the current column), and attention reads the whole bucket with the unused columns
masked. The compiled function sees new shapes only when a trace moves into the next bucket, so it
compiles at most `n_buckets(max_length)` times per batch size and adapter (and, with CUDA graphs,
records a graph per trace and bucket, since each trace has its own buffers).

Off by default (`MethodConfig.compile = "off"`, `--compile`). Prompts (chunks longer than one
position) run eagerly on the same store. Training never uses it: the static store's in-place cache
writes break autograd (transformers issue 43010), so traces built with autograd on keep the eager stores.
Failures are errors, never a silent fallback to eager execution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from diffmas.errors import DiffmasError
from diffmas.trace import n_buckets

# off: eager (the default). auto: inductor with CUDA graphs ("reduce-overhead") on CUDA, inductor on
# a CPU. inductor / reduce-overhead / cudagraphs: those torch.compile backends or modes (the last two
# need CUDA). aot_eager / eager: torch.compile's debugging backends (no code generation; the tests).
COMPILE_MODES = ("off", "auto", "inductor", "reduce-overhead", "cudagraphs", "aot_eager", "eager")
_NEEDS_CUDA = ("reduce-overhead", "cudagraphs")
# Recompiles allowed per bucket (batch sizes x adapters seen); past them torch would fall back to
# eager frames quietly, so the step raises instead (fail_on_recompile_limit_hit).
_RECOMPILES_PER_BUCKET = 16


class CompileError(DiffmasError):
    """torch.compile is unavailable, does not fit the device, or failed on the model."""


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise CompileError(f"compile={mode!r}: choose one of {', '.join(COMPILE_MODES)}")


@dataclass
class StaticStep:
    """The decoder forward of a static-store trace, `(embeds, mask, position_ids, cache) -> hidden`.

    embeds (B, T, d); mask (B, C): the trace's visibility mask widened to the bucket capacity C,
    0 on unused columns; position_ids (B, T); cache: the trace's cache of `_BucketLayer`s, written
    in place. Returns the last hidden states (B, T, d), post final norm. Calling it runs the
    compiled function (one-position steps); `eager` runs the same forward uncompiled (prompts).
    """

    decoder: torch.nn.Module
    backend: str | Callable  # a torch.compile backend, or a callable backend (tests count compiles)
    mode: str | None = None  # torch.compile mode ("reduce-overhead": CUDA graphs)
    recompile_limit: int = 8 * _RECOMPILES_PER_BUCKET
    _compiled: Callable = field(init=False, repr=False)

    def __post_init__(self):
        # fullgraph: a graph break would leave part of the step eager without saying so
        self._compiled = torch.compile(self.eager, backend=self.backend, mode=self.mode, fullgraph=True, dynamic=False)

    @property
    def graphs(self) -> bool:
        """Whether outputs live in a CUDA graph's memory, which its next replay overwrites."""
        return self.mode == "reduce-overhead" or self.backend == "cudagraphs"

    def eager(self, embeds, mask, position_ids, cache) -> torch.Tensor:
        out = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        return out.last_hidden_state

    def __call__(self, embeds, mask, position_ids, cache) -> torch.Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: no output is kept
        limits = dict(recompile_limit=self.recompile_limit, fail_on_recompile_limit_hit=True)
        try:
            with torch._dynamo.config.patch(**limits):
                hidden = self._compiled(embeds, mask, position_ids, cache)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
            cause = getattr(exc, "inner_exception", exc)  # a failing backend: what it raised
            text = str(cause).strip()
            backend = getattr(self.backend, "__name__", self.backend)
            raise CompileError(
                f"torch.compile (backend {backend}, mode {self.mode}) failed on the one-position step: "
                f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}; run without --compile"
            ) from exc
        return hidden.clone() if self.graphs else hidden  # the next replay reuses the graph's output memory


def static_step(backbone, mode: str) -> StaticStep | None:
    """The backbone's compiled step for `mode` (None for "off"), built once per backbone and mode.

    Checks here, after the model has loaded: torch.compile exists on this platform and the mode fits
    the device. Compiling itself happens on the first one-position step (and errors there are
    `CompileError`s too)."""
    check_compile_mode(mode)
    if mode == "off":
        return None
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise CompileError(
            f"--compile {mode}: torch.compile is not supported here (torch {torch.__version__}); run without --compile"
        )
    cuda = backbone.device.type == "cuda"
    if mode in _NEEDS_CUDA and not cuda:
        raise CompileError(
            f"--compile {mode} needs CUDA graphs, and the model is on {backbone.device}; use --compile inductor or auto"
        )
    steps = backbone._static_steps
    if mode not in steps:
        backend, torch_mode = {
            "auto": ("inductor", "reduce-overhead" if cuda else None),
            "reduce-overhead": ("inductor", "reduce-overhead"),
        }.get(mode, (mode, None))
        limit = n_buckets(backbone.max_length) * _RECOMPILES_PER_BUCKET
        steps[mode] = StaticStep(backbone.decoder(), backend, torch_mode, recompile_limit=limit)
    return steps[mode]
