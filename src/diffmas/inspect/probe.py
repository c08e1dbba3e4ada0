"""Probes over one run: what the agents wrote into the trace and what the final agent read of it.

`inspect_question(method, question)` runs the method on one question exactly as `run_batch` does,
with forward hooks on the decoder, its layers and their attention modules, and returns a JSON-able
record (see `docs/inspection.md` for the fields):

- the trace timeline: per segment (agent x kind) its columns, real entries and KV bytes;
- per latent step of every upstream agent: the logit lens (the residual stream after a layer,
  through the final norm and the output head) at a few layers, the last one being the model's own
  next-token distribution at that position, and the tokens whose input embeddings are nearest (by
  cosine) to the realigned state that the step feeds on;
- while the final agent decodes: the share of its attention that goes to each segment, per
  decoded token and per layer (heads averaged), from the model's real attention weights;
- the answer, token by token.

Attention weights only exist in eager attention, so the inspected pass switches the model to
eager and switches it back afterwards: the normal path keeps its fast kernel. Eager attention
rounds its weights to the model dtype, so in bf16/fp16 the shares sum to 1 only within that
precision (fp32, as on CPU and in the tests: within 1e-6). Nothing is changed
in the trace; the probes only read the decoder's activations and the trace's segments and stored
keys/values (`LatentTrace.kv`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from diffmas.errors import DiffmasError
from diffmas.trace import LatentTrace

FORMAT_VERSION = 1  # of the inspection record; bump when a field changes meaning


class InspectError(DiffmasError):
    """Inspection settings or a model the probes cannot read."""


@dataclass
class InspectConfig:
    top_k: int = 5  # tokens per logit-lens reading and per nearest-embedding list
    # 1-based decoder layers read by the logit lens; None: four spread over the depth, the last included
    lens_layers: list[int] | None = None
    # words whose rank and probability every lens reading records (the relay secret, the gold answer)
    watch: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.top_k < 1:
            raise InspectError(f"top_k must be >= 1, got {self.top_k}")
        if self.lens_layers is not None and (not self.lens_layers or min(self.lens_layers) < 1):
            raise InspectError(f"lens_layers must be 1-based layer numbers, got {self.lens_layers}")

    def layers(self, n_layers: int) -> list[int]:
        if self.lens_layers is None:
            return sorted({max(1, round(n_layers * q)) for q in (0.25, 0.5, 0.75, 1.0)})
        if max(self.lens_layers) > n_layers:
            raise InspectError(f"lens_layers {self.lens_layers}: the model has layers 1..{n_layers}")
        return sorted(set(self.lens_layers))

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- hooks


@dataclass
class _Forward:
    """One decoder forward (one trace append): where it wrote and what its last column saw."""

    cache: object  # the DynamicCache appended to: tells which trace the forward belongs to
    start: int  # first trace column written
    n_cols: int  # columns written
    hidden: list[torch.Tensor] = field(default_factory=list)  # per layer, (d,) output at the last column
    attention: list[torch.Tensor] = field(default_factory=list)  # per layer, (K,) head-mean weights of the last column

    @property
    def last(self) -> int:
        return self.start + self.n_cols - 1


def decoder_layers(backbone) -> list[torch.nn.Module]:
    layers = getattr(backbone.decoder(), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise InspectError(
            f"model {backbone.name!r}: the probes need decoder.layers[i].self_attn (Llama, Qwen, Mistral, ...)"
        )
    return list(layers)


def final_norm(backbone) -> torch.nn.Module:
    norm = getattr(backbone.decoder(), "norm", None)
    if norm is None:
        raise InspectError(f"model {backbone.name!r}: no final norm at decoder.norm for the logit lens")
    return norm


@contextlib.contextmanager
def probing(backbone) -> Iterator[list[_Forward]]:
    """Eager attention and forward hooks for the block; yields the forwards as they are recorded.

    The attention implementation and the hooks are restored/removed on the way out, also on errors.
    """
    model = backbone.base_model()
    previous = model.config._attn_implementation
    forwards: list[_Forward] = []
    handles = []

    def on_decoder(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]  # (B, T, d): the trace always passes embeddings
        if embeds.shape[0] != 1:
            raise InspectError(f"inspection runs one question at a time, got a batch of {embeds.shape[0]}")
        cache = kwargs.get("past_key_values")
        start = cache.get_seq_length() if cache is not None else 0
        forwards.append(_Forward(cache, start, embeds.shape[1]))

    def on_layer(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        forwards[-1].hidden.append(hidden[0, -1].detach().clone())

    def on_attention(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None  # (B, H, T, K)
        if weights is None:
            raise InspectError(f"model {backbone.name!r}: its attention returned no weights under eager attention")
        # (K,) on the CPU: a long decode keeps one per token and layer, which need not hold device memory
        forwards[-1].attention.append(weights[0, :, -1].detach().float().mean(dim=0).cpu())

    try:
        model.set_attn_implementation("eager")
        handles.append(backbone.decoder().register_forward_pre_hook(on_decoder, with_kwargs=True))
        for layer in decoder_layers(backbone):
            handles.append(layer.register_forward_hook(on_layer))
            handles.append(layer.self_attn.register_forward_hook(on_attention))
        yield forwards
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def capturing_traces(method) -> Iterator[list[LatentTrace]]:
    """Collect every trace the method creates (`Method.new_trace`), without changing them."""
    traces: list[LatentTrace] = []
    make = method.new_trace

    def new_trace(batch_size: int) -> LatentTrace:
        trace = make(batch_size)
        traces.append(trace)
        return trace

    before = vars(method).get("new_trace")  # an instance attribute someone else set, kept
    method.new_trace = new_trace  # an instance attribute: shadows the class method for this block only
    try:
        yield traces
    finally:
        if before is None:
            del method.new_trace
        else:
            method.new_trace = before


# ----------------------------------------------------------------------------- the record


def inspect_question(
    method,
    question: str,
    format: str = "",
    seed: int | None = None,
    private: Mapping[str, str] | None = None,
    config: InspectConfig | None = None,
) -> dict:
    """Run `method` on one question under the probes; return the inspection record (JSON-able).

    question, format, seed, private: as one row of `Method.run_batch`.
    """
    config = config or InspectConfig()
    bb = method.backbone
    lens_layers = config.layers(bb.n_layers)
    seeds = [method.config.decode.seed if seed is None else seed]
    with probing(bb) as forwards, capturing_traces(method) as traces:
        result = method.run_batch([question], format, seeds, privates=[dict(private or {})])[0]
    final = method.topology.final.name
    trace = next(t for t in reversed(traces) if any(s.agent == final for s in t.segments))
    own = [f for f in forwards if f.cache is trace.cache]  # the final trace's appends, in order
    roles = {role.name: role for role in method.topology.roles}
    with torch.no_grad():
        watch = _watch_ids(bb.tokenizer, config.watch)
        latent = [
            _agent_steps(method, roles[agent], trace, own, lens_layers, config.top_k, watch)
            for agent in _agents(trace)
            if any(s.agent == agent and s.kind == "latent" for s in trace.segments)
        ]
    return {
        "format_version": FORMAT_VERSION,
        "question": question,
        "private": dict(private or {}),
        "method": method.name,
        "model": bb.name,
        "settings": {
            "latent_steps": method.config.latent_steps,
            "reads": method.config.reads,
            "topology": method.topology.kind,
            "roles": [r.name for r in method.topology.roles],
            "decode": asdict(method.config.decode),
            "seed": seeds[0],
            "adapters": dict(method.adapters),
        },
        "inspect": {**config.to_dict(), "lens_layers": lens_layers},
        "n_layers": bb.n_layers,
        "trace": _timeline(trace),
        "latent": latent,
        "attention": _attention(bb.tokenizer, trace, own, final, result.token_ids),
        "answer": {
            "text": result.text,
            "token_ids": list(result.token_ids),
            "tokens": [bb.tokenizer.decode([i]) for i in result.token_ids],
            "truncated": result.truncated,
        },
    }


def _agents(trace: LatentTrace) -> list[str]:
    return list(dict.fromkeys(s.agent for s in trace.segments))


def _timeline(trace: LatentTrace) -> dict:
    """Segments with their real entries and the KV bytes they hold, read from the stored keys/values."""
    kv = trace.kv()
    segments = []
    for seg in trace.segments:
        n_bytes = sum(
            (k[..., seg.start : seg.end, :].numel() + v[..., seg.start : seg.end, :].numel()) * k.element_size()
            for k, v in kv
        )
        segments.append({**seg.to_dict(), "n_tokens": seg.n_tokens[0], "n_bytes": n_bytes})
    return {
        "length": trace.length,
        "n_real": trace.n_real()[0],
        "n_bytes": trace.n_bytes(),
        "bytes_per_entry": trace.bytes_per_entry(),
        "segments": segments,
    }


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def _watch_ids(tokenizer, words: list[str]) -> list[tuple[str, list[int]]]:
    """Per watched word, the ids that can start it: its first token with and without a leading space
    (a first token that is only whitespace says nothing about the word and is left out)."""
    out = []
    for word in words:
        firsts = [tokenizer(text, add_special_tokens=False)["input_ids"][:1] for text in (word, " " + word)]
        ids = sorted({ids[0] for ids in firsts if ids and _token(tokenizer, ids[0]).strip()})
        if not ids:
            raise InspectError(f"watched word {word!r} tokenizes to whitespace only; watch a word with letters")
        out.append((word, ids))
    return out


def _lens(bb, norm, hidden: torch.Tensor, top_k: int, watch) -> dict:
    """Top-k of softmax(head(norm(hidden))) and the rank/probability of each watched word."""
    probs = bb.logits(norm(hidden[None]))[0].softmax(dim=-1)  # (V,) fp32
    top = probs.topk(min(top_k, probs.shape[0]))
    reading = {
        "top": [
            {"id": int(i), "token": _token(bb.tokenizer, i), "p": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ],
        "entropy": float(-(probs * probs.clamp_min(1e-30).log()).sum()),
    }
    if watch:
        reading["watch"] = []
        for word, ids in watch:
            best = max(ids, key=lambda i: float(probs[i]))
            rank = int((probs > probs[best]).sum()) + 1
            reading["watch"].append(
                {"word": word, "id": best, "token": _token(bb.tokenizer, best), "rank": rank, "p": float(probs[best])}
            )
    return reading


def _nearest(bb, embedding: torch.Tensor, top_k: int) -> list[dict]:
    """Tokens whose input embeddings have the highest cosine similarity with `embedding` (d,)."""
    table = F.normalize(bb.input_embeddings().weight.float(), dim=-1)  # (V, d)
    cos = table @ F.normalize(embedding.float(), dim=-1)  # (V,)
    top = cos.topk(min(top_k, cos.shape[0]))
    return [
        {"id": int(i), "token": _token(bb.tokenizer, i), "cos": float(c)}
        for c, i in zip(top.values.tolist(), top.indices.tolist())
    ]


def _agent_steps(method, role, trace, forwards, lens_layers, top_k, watch) -> dict:
    """The last prompt column of an agent (step 0: the state its first latent step is made from) and
    each of its latent steps: logit lens at `lens_layers`, nearest tokens of the realigned state."""
    bb = method.backbone
    norm = final_norm(bb)
    prompt_ends = {s.end - 1 for s in trace.segments if s.agent == role.name and s.kind == "prompt"}
    latent_cols = {
        c for s in trace.segments if s.agent == role.name and s.kind == "latent" for c in range(s.start, s.end)
    }
    steps = []
    with method.adapter_for(role):  # the head and norm as this agent's forward used them
        for f in forwards:
            if (f.n_cols == 1 and f.last in latent_cols) or f.last in prompt_ends:
                last = norm(f.hidden[-1][None])[0]  # = the decoder's last_hidden_state at that column
                steps.append(
                    {
                        "step": len(steps),
                        "column": f.last,
                        "kind": "latent" if f.last in latent_cols else "prompt_end",
                        "lens": [
                            {"layer": layer, **_lens(bb, norm, f.hidden[layer - 1], top_k, watch)}
                            for layer in lens_layers
                        ],
                        # what the next latent step is fed: this state realigned into embedding space
                        "realigned_nearest": _nearest(bb, bb.realigner(last), top_k),
                    }
                )
    return {"agent": role.name, "steps": steps}


def _attention(tokenizer, trace, forwards, final: str, token_ids: list[int]) -> dict:
    """Share of the final agent's attention per segment (agent x kind), per decoded token and layer.

    Decoded token t is chosen from the forward at the final prompt's last column (t = 0) or at the
    column of generated token t - 1; its weights over the key columns are summed per segment.
    """
    pairs = list(dict.fromkeys((s.agent, s.kind) for s in trace.segments))
    owner = torch.empty(trace.length, dtype=torch.long)  # column -> index into pairs
    for s in trace.segments:
        owner[s.start : s.end] = pairs.index((s.agent, s.kind))
    prompt_ends = {s.end - 1 for s in trace.segments if s.agent == final and s.kind == "prompt"}
    generated = {c for s in trace.segments if s.agent == final and s.kind == "generated" for c in range(s.start, s.end)}
    steps = [f for f in forwards if f.last in prompt_ends or (f.n_cols == 1 and f.last in generated)]
    if len(steps) != len(token_ids):
        raise InspectError(f"found {len(steps)} decoding forwards for {len(token_ids)} decoded tokens")
    tokens = []
    for t, (f, token_id) in enumerate(zip(steps, token_ids)):
        per_layer = torch.stack(
            [torch.zeros(len(pairs)).index_add_(0, owner[: w.shape[0]], w) for w in f.attention]
        )  # (layers, segments)
        tokens.append(
            {
                "index": t,
                "token_id": int(token_id),
                "token": _token(tokenizer, token_id),
                "column": f.last,
                "per_layer": per_layer.tolist(),
                "mean": per_layer.mean(dim=0).tolist(),
            }
        )
    per_layer_mean = torch.tensor([tok["per_layer"] for tok in tokens]).mean(dim=0) if tokens else None
    return {
        "segments": [{"agent": a, "kind": k, "label": f"{a}/{k}"} for a, k in pairs],
        "tokens": tokens,
        "per_layer_mean": per_layer_mean.tolist() if tokens else [],
        "mean": per_layer_mean.mean(dim=0).tolist() if tokens else [],
    }
