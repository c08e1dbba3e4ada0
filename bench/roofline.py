"""The floor of a method's cost on the machine it ran on: the least time its work could take if
every product ran at the fastest rate measured there and every byte were read once at the
streaming bandwidth measured there (a roofline, per phase of each agent).

What the floor counts, per question, from a run's mean token counts (a method record of
`inference_cost.py`):

- prompt prefill: each token's linear products (2 FLOPs per weight) and its attention over the
  real entries it sees (QK and PV, 4 FLOPs per query head, head dimension and entry), at the peak
  product rate; or the weights read once per batch, whichever takes longer;
- one-position steps (latent steps, decoding): the decoder's weights (plus the LM head, which
  decoding applies once per token, or the realignment matrix of a latent step) read once per
  batch and shared by its rows, plus the row's real keys and values, at the read bandwidth;
  or their products at the peak rate, whichever takes longer.

Padding, Python, small ops, and any re-read of data that does not stay in the caches are not in
it: the floor is what no implementation on that machine and kernel set can beat. The peaks are
measured with the backbone's own linear layers (the kernel it runs) and a sum over a buffer far
larger than the caches, best of several runs, before and after the methods (`measure_peaks`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

import _common as c

# Row counts of the peak product measurement: a prompt of one row and a batch's chunk.
PEAK_ROWS = (128, 512, 1024)
READ_MIB = 512  # far above any L3: the sum streams from memory


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def decoder_bytes(bb) -> int:
    """The decoder's layers and final norm: what every forward reads (not the input embedding,
    of which it reads B rows)."""
    embed = bb.input_embeddings().weight
    return sum(_bytes(p) for p in bb.decoder().parameters() if p is not embed)


def weight_bytes(bb, kind: str) -> int:
    """Bytes of weights one step reads: the decoder's, plus the LM head (decode) or the
    realignment matrix (latent)."""
    extra = bb.output_embeddings().weight if kind == "decode" else bb.realigner.matrix
    return decoder_bytes(bb) + _bytes(extra)


@dataclass(frozen=True)
class Shape:
    """What the floor needs of a backbone (recorded with a run, so the docs need no model)."""

    product_params: int  # weights of the decoder layers' linear products (2 FLOPs each per token)
    head_params: int  # the LM head's weights (one product per decoded token)
    realign_params: int  # the realignment matrix of a latent step (0 for tied embeddings)
    attention_flops_per_entry: int  # per query token and visible entry: QK and PV over all layers
    decoder_bytes: int  # the decoder's weights, which every forward reads
    head_bytes: int  # the LM head's
    realign_bytes: int  # the realignment matrix's
    kv_bytes_per_entry: int  # one trace position, all layers

    @classmethod
    def of(cls, bb) -> "Shape":
        products = sum(m.weight.numel() for m in bb.decoder().layers.modules() if isinstance(m, torch.nn.Linear))
        head, matrix = bb.output_embeddings().weight, bb.realigner.matrix
        return cls(
            product_params=products,
            head_params=head.numel(),
            realign_params=0 if matrix is None else matrix.numel(),
            attention_flops_per_entry=4 * bb.config.num_attention_heads * bb.head_dim * bb.n_layers,
            decoder_bytes=decoder_bytes(bb),
            head_bytes=_bytes(head),
            realign_bytes=_bytes(matrix),
            kv_bytes_per_entry=bb.kv_bytes_per_entry,
        )


@dataclass(frozen=True)
class Peaks:
    product_flops_per_s: float  # the fastest product of the backbone's own linear layers
    read_bytes_per_s: float  # a streaming sum over READ_MIB

    @staticmethod
    def best(*measured: dict) -> "Peaks":
        """The highest of several measurements of each (the floor takes the machine at its best)."""
        return Peaks(
            max(m["product_flops_per_s"] for m in measured),
            max(m["read_bytes_per_s"] for m in measured),
        )


def _best_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: packing, allocation
    return min(c.run_times(fn, repeats, device))


@torch.no_grad()
def measure_peaks(bb, repeats: int = 5) -> dict:
    """The product rate of the first decoder layer's linear layers (every shape, PEAK_ROWS rows;
    the fastest) and the read bandwidth of a sum over READ_MIB, each the best of `repeats` runs."""
    device, dtype = bb.device, bb.dtype
    layers = {
        tuple(m.weight.shape): m for m in bb.decoder().layers[0].modules() if isinstance(m, torch.nn.Linear)
    }  # one module per distinct shape (out, in)
    rates = {}
    for (out, inp), module in layers.items():
        for rows in PEAK_ROWS:
            x = torch.randn(rows, inp, device=device, dtype=dtype)
            seconds = _best_seconds(functools.partial(module, x), repeats, device)
            rates[f"{out}x{inp}@{rows}"] = 2 * rows * out * inp / seconds
    read = read_bandwidth(device, repeats)
    return {"product_flops_per_s": max(rates.values()), "read_bytes_per_s": read, "products": rates}


@torch.no_grad()
def read_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Bytes per second of a sum over READ_MIB (streamed from memory), the best of `repeats` runs."""
    buf = torch.ones(READ_MIB * 2**20 // 4, device=device, dtype=torch.float32)
    return buf.numel() * buf.element_size() / _best_seconds(buf.sum, repeats, device)


def _phase_s(flops: float, read_bytes: float, peaks: Peaks) -> float:
    return max(flops / peaks.product_flops_per_s, read_bytes / peaks.read_bytes_per_s)


def prompt_floor_s(shape: Shape, n_tokens: float, context: float, rows: float, peaks: Peaks) -> float:
    """A prompt of n_tokens on top of `context` real entries, per question (rows share weight reads)."""
    attention = n_tokens * context + n_tokens * (n_tokens + 1) / 2  # entries each token attends to
    flops = n_tokens * 2 * shape.product_params + attention * shape.attention_flops_per_entry
    read = shape.decoder_bytes / rows + context * shape.kv_bytes_per_entry
    return _phase_s(flops, read, peaks)


def steps_floor_s(shape: Shape, kind: str, n_steps: int, context: float, rows: float, peaks: Peaks) -> float:
    """n_steps one-position forwards (kind "latent" or "decode") from `context` real entries, per
    question; entries seen sum over the steps (an arithmetic series)."""
    if n_steps <= 0:
        return 0.0
    seen = n_steps * context + n_steps * (n_steps + 1) / 2
    extra, extra_bytes = (
        (shape.head_params, shape.head_bytes) if kind == "decode" else (shape.realign_params, shape.realign_bytes)
    )
    flops = n_steps * 2 * (shape.product_params + extra) + seen * shape.attention_flops_per_entry
    read = n_steps * (shape.decoder_bytes + extra_bytes) / rows + seen * shape.kv_bytes_per_entry
    return _phase_s(flops, read, peaks)


def agent_floors(
    shape: Shape, agents: dict, rows: float, peaks: Peaks, shared_trace: bool
) -> dict[str, dict[str, float]]:
    """Per agent (a method record's `tokens_per_agent`, in order), the floor of its prompt and of its
    one-position steps, seconds per question. shared_trace: each agent continues the one trace
    (latent_mas); else each starts on its own (text_mas, whose later prompts carry the messages).
    Decoding n tokens takes n LM-head products and n - 1 forwards (the last token is not fed back)."""
    out, context = {}, 0.0
    for role, a in agents.items():
        start = context if shared_trace else 0.0
        prompt, latent, generated = a["n_prompt_tokens"], round(a["n_latent_steps"]), round(a["n_generated_tokens"])
        prompt_s = prompt_floor_s(shape, prompt, start, rows, peaks)
        at = start + prompt
        steps_s = steps_floor_s(shape, "latent", latent, at, rows, peaks)
        at += latent
        if generated:
            steps_s += steps_floor_s(shape, "decode", generated - 1, at, rows, peaks)
            steps_s += _phase_s(2 * shape.head_params, shape.head_bytes / rows, peaks)  # the first token's head
            at += generated - 1
        out[role] = {"prompt_s": prompt_s, "steps_s": steps_s, "total_s": prompt_s + steps_s}
        context = at
    return out


def rows_per_batch(n_questions: int, batch_size: int) -> float:
    """The mean rows of a run's batches (its last batch may be short), which share weight reads."""
    return n_questions / math.ceil(n_questions / batch_size)
