"""Trace budgets: bound what each upstream agent leaves in the shared trace.

When an upstream agent has written its prompt and its latent steps, a policy rewrites that agent's
entries to fit the budget, before any later agent reads them:

  prompt-drop  keep the latent steps and the k prompt entries that the agent's own last queries
               (its last prompt token and its latent steps) attend to most: SnapKV / H2O-style
               scoring, averaged over heads and layers so one set of columns serves every layer
  random       keep the latent steps and k prompt entries drawn at random: the control
  window       keep the latent steps, the first `sinks` prompt entries and the k - sinks most
               recent ones: StreamingLLM's attention sinks + recent window, inside the trace
  merge        keep the latent steps; pool the prompt into k slots, each the mean of a contiguous
               group of entries (keys and values alike)
  quantize     keep every entry; keys and values of the agent's columns in int8 or int4, one scale
               and offset per position and head

The budget is k prompt entries per agent, or a share of the agent's bytes (its prompt and latent
entries: the latent steps are kept first, the prompt fills what is left), or bytes per agent.
With scope "trace" it bounds all upstream entries together instead (k prompt entries, or bytes,
per trace row): after each upstream agent writes, the policy chooses among every upstream prompt
entry so far (earlier agents' survivors included), scored by the newest agent's queries for
prompt-drop, and the sinks are the trace's first entries for window.
Kept entries keep their RoPE positions: keys are stored rotated, so moving a column does not move
its position (`LatentTrace.positions` records them). The final agent's own entries are never
touched.

Inside training (autograd on) the same policies apply: kept and pooled entries stay differentiable;
quantisation rounds with a straight-through gradient and is stored unpacked (training keeps
activations anyway), so the numbers equal the packed inference path.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import torch
from transformers.cache_utils import DynamicLayer
from transformers.models.llama.modeling_llama import rotate_half

from diffmas.attention import current_packed_rows
from diffmas.errors import DiffmasError
from diffmas.trace import LatentTrace

POLICIES = ("prompt-drop", "random", "window", "merge", "quantize")
SCOPES = ("agent", "trace")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class BudgetError(DiffmasError):
    """An invalid trace budget."""


@dataclass(frozen=True)
class TraceBudget:
    """A trace budget; set exactly one of `prompt_states`, `fraction`, `agent_bytes` (not for
    quantize, whose budget is its `bits`). `scope`: "agent" bounds each upstream agent's entries,
    "trace" all upstream entries together (the counts are then per trace row)."""

    policy: str
    prompt_states: int | None = None  # k: prompt entries kept per agent (per trace row)
    fraction: float | None = None  # share of each agent's entries (= bytes) kept
    agent_bytes: int | None = None  # bytes per agent (per trace) and row
    bits: int = 8  # quantize: 8 or 4
    sinks: int = 4  # window: first prompt entries always kept
    seed: int = 0  # random: draws depend on this and the row's prompt only
    scope: str = "agent"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise BudgetError(f"trace policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.scope not in SCOPES:
            raise BudgetError(f"trace budget scope {self.scope!r}: choose one of {', '.join(SCOPES)}")
        given = [v is not None for v in (self.prompt_states, self.fraction, self.agent_bytes)]
        if self.policy == "quantize":
            if any(given) or self.bits not in (4, 8):
                raise BudgetError("the quantize policy takes a budget of int8 or int4 (bits), nothing else")
            if self.scope != "agent":
                raise BudgetError("quantize has no per-trace budget: it packs every upstream entry (scope agent)")
            return
        if self.scope == "trace" and self.fraction is not None:
            # re-applied after each agent, a share of what survives would compound on earlier agents
            raise BudgetError("a per-trace budget is prompt states (96) or bytes (1MiB), not a share")
        if sum(given) != 1:
            raise BudgetError(f"policy {self.policy}: give one budget (prompt states, a percentage, or bytes)")
        if self.prompt_states is not None and self.prompt_states < 0:
            raise BudgetError(f"prompt states must be >= 0, got {self.prompt_states}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise BudgetError(f"a budget share must be in (0, 100%], got {self.fraction:.4g}")
        if self.agent_bytes is not None and self.agent_bytes <= 0:
            raise BudgetError(f"a byte budget must be > 0, got {self.agent_bytes}")
        if self.sinks < 0:
            raise BudgetError(f"sinks must be >= 0, got {self.sinks}")

    @property
    def label(self) -> str:
        """Short name for tables and run directories, e.g. prompt-drop-32, window-25pct, quantize-int4."""
        if self.policy == "quantize":
            return f"quantize-int{self.bits}"
        if self.prompt_states is not None:
            size = str(self.prompt_states)
        elif self.fraction is not None:
            size = f"{self.fraction * 100:g}pct"
        else:
            size = f"{self.agent_bytes}B"
        return f"{self.policy}-{size}" + ("-trace" if self.scope == "trace" else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, value: "TraceBudget | dict | None") -> "TraceBudget | None":
        if value is None or isinstance(value, TraceBudget):
            return value
        return cls(**value)

    def prompt_kept(self, n_prompt: int, n_latent: int, entry_bytes: int) -> int:
        """How many of an agent's `n_prompt` prompt entries a row keeps (position policies)."""
        if self.prompt_states is not None:
            total = n_latent + self.prompt_states
        elif self.fraction is not None:
            total = math.floor(self.fraction * (n_prompt + n_latent) + 1e-9)
        else:
            total = self.agent_bytes // entry_bytes
        return max(0, min(n_prompt, total - n_latent))


def parse_budget(policy: str | None, spec: str | None, seed: int = 0, scope: str = "agent") -> TraceBudget | None:
    """CLI form: `--trace-policy POLICY --trace-budget SPEC [--trace-scope agent|trace]`.

    SPEC: `32` (prompt states per agent), `25%` (of each agent's bytes), `64KiB` / `2MB` (bytes per
    agent and row), `int8` / `int4` (quantize). With scope trace, the count or bytes bound all
    upstream agents together. Neither given: no budget.
    """
    if policy is None and spec is None:
        if scope != "agent":
            raise BudgetError("--trace-scope needs --trace-policy and --trace-budget")
        return None
    if policy is None:
        raise BudgetError("--trace-budget needs --trace-policy (" + ", ".join(POLICIES) + ")")
    if policy == "quantize":
        bits = {"int8": 8, "int4": 4, "8": 8, "4": 4, None: 8}.get(spec.lower() if spec else None)
        if bits is None:
            raise BudgetError(f"--trace-budget {spec!r}: the quantize policy takes int8 or int4")
        return TraceBudget(policy, bits=bits, scope=scope)
    if spec is None:
        raise BudgetError(f"--trace-policy {policy} needs --trace-budget (e.g. 32, 25%, 64KiB)")
    text = spec.strip().lower()
    if re.fullmatch(r"\d+", text):
        return TraceBudget(policy, prompt_states=int(text), seed=seed, scope=scope)
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text):
        return TraceBudget(policy, fraction=float(m.group(1)) / 100, seed=seed, scope=scope)
    if (m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)", text)) and m.group(2) in _UNITS:
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2)])
        return TraceBudget(policy, agent_bytes=nbytes, seed=seed, scope=scope)
    raise BudgetError(f"--trace-budget {spec!r}: use prompt states (32), a share (25%) or bytes (64KiB)")


# ----------------------------------------------------------------------------- scoring probe


class QueryProbe:
    """Records, per attention layer, the rotated query of the last position of every forward
    while an agent writes (its last prompt token, then each latent step): prompt-drop's
    observation window. Queries are computed in the hook, under the adapter that is active then."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.queries: dict[int, list[torch.Tensor]] = {}
        self.modules: dict[int, torch.nn.Module] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator["QueryProbe"]:
        layers = self.backbone.decoder().layers
        handles = [
            layer.self_attn.register_forward_pre_hook(self._hook(i, layer.self_attn), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, index: int, module: torch.nn.Module) -> Callable:
        def hook(mod, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            rows = current_packed_rows()
            if rows is None:  # a batch (left-padded: every row's last token is the last column) or one row
                hidden, cos, sin = hidden[:, -1:], cos[:, -1:], sin[:, -1:]
            else:  # packed rows (one sequence): each row's last token
                last = torch.tensor([end - 1 for _, end in rows.spans], device=hidden.device)
                hidden, cos, sin = hidden[0, last, None], cos[0, last, None], sin[0, last, None]
            with torch.no_grad():
                query = rotated_query(module, hidden.detach(), cos, sin)
            self.queries.setdefault(index, []).append(query)
            self.modules[index] = module

        return hook

    def attention(self, trace: LatentTrace, visible: torch.Tensor) -> torch.Tensor:
        """(B, L) attention of the recorded queries on the trace, averaged over queries, heads and
        layers; columns the queries could not see get 0."""
        total = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
        for index, (keys, _) in enumerate(trace.kv()):
            module = self.modules[index]
            query = torch.cat(_whole_batches(self.queries[index], visible.shape[0]), dim=2).float()  # (B, Hq, Q, D)
            keys = keys.detach().float().repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
            logits = query @ keys.transpose(2, 3) * getattr(module, "scaling", keys.shape[-1] ** -0.5)
            logits = logits.masked_fill(visible[:, None, None, :] == 0, float("-inf"))
            total += logits.softmax(dim=-1).mean(dim=(1, 2))
        return total / len(self.queries)


def _whole_batches(queries: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """The recorded queries as (B, ...) tensors: a chunk run one row at a time (`LatentTrace`'s
    row-by-row forwards) records one (1, ...) query a row, in row order; those are stacked back."""
    out, rows = [], []
    for q in queries:
        if q.shape[0] == batch:
            out.append(q)
            continue
        rows.append(q)
        if sum(r.shape[0] for r in rows) == batch:
            out.append(torch.cat(rows, dim=0))
            rows = []
    if rows:
        raise RuntimeError("prompt-drop's probe recorded part of a batch's rows")
    return out


def rotated_query(module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, T, d) attention inputs -> (B, heads, T, head_dim) queries with RoPE, as Llama-family
    attention computes them (q_proj, then q_norm where the model has one)."""
    if not hasattr(module, "q_proj"):
        raise BudgetError(f"prompt-drop scores need a q_proj in {type(module).__name__}; use window or random")
    head_dim = getattr(module, "head_dim", None) or cos.shape[-1]
    query = module.q_proj(hidden).view(*hidden.shape[:2], -1, head_dim)
    if getattr(module, "q_norm", None) is not None:
        query = module.q_norm(query)
    query = query.transpose(1, 2)
    return query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)


@contextlib.contextmanager
def probe_for(budget: TraceBudget | None, backbone) -> Iterator[QueryProbe | None]:
    """Record the observation window only where a policy scores with it."""
    if budget is None or budget.policy != "prompt-drop":
        yield None
        return
    probe = QueryProbe(backbone)
    with probe.recording():
        yield probe


# ----------------------------------------------------------------------------- applying a budget


def row_seeds(budget: TraceBudget | None, keys: Iterable[tuple]) -> list[int]:
    """Per row, a seed from the budget's seed and the row's own inputs: a random draw is the same
    whether the row runs alone or in a batch."""
    seed = budget.seed if budget is not None else 0
    return [int.from_bytes(hashlib.sha256(repr((seed, key)).encode()).digest()[:8], "little") for key in keys]


def apply_budget(
    trace: LatentTrace,
    agent: str,
    budget: TraceBudget | None,
    probe: QueryProbe | None = None,
    seeds: list[int] | None = None,
    hidden_agents: Iterable[str] = (),
) -> None:
    """Fit `agent`'s entries (just written) to `budget`; later agents read the result."""
    if budget is None:
        return
    if getattr(trace.backbone, "gradient_checkpointing", False) and torch.is_grad_enabled():
        # checkpointed chunks replay the trace as it was when they ran; a budget rewrites it since
        raise BudgetError("a trace budget cannot be combined with gradient checkpointing")
    if budget.policy == "quantize":
        _quantize_agent(trace, agent, budget.bits)
        return
    writers = _writers(trace, agent, budget.scope)
    n_latent = [sum(counts) for counts in zip(*(trace.agent_tokens(w, "latent") for w in writers))]
    scores = None
    if probe is not None:
        visible = trace.visible_mask(agent, hidden_agents).clone()
        for seg in trace.segments:  # the queries are the latent steps: score what came before them
            if seg.agent == agent and seg.kind == "latent":
                visible[:, seg.start : seg.end] = 0
        scores = probe.attention(trace, visible)
    seeds = seeds or [0] * trace.batch_size
    entry_bytes = trace.bytes_per_entry()
    segments = [s for s in trace.segments if s.agent in writers and s.kind == "prompt"]
    plans: list[list[list[list[int]]]] = [[] for _ in segments]  # per segment, per row: its slots
    for row in range(trace.batch_size):
        real = [trace.attention_mask[row, s.start : s.end].nonzero().flatten().add(s.start).tolist() for s in segments]
        k = budget.prompt_kept(sum(map(len, real)), n_latent[row], entry_bytes)
        row_scores = scores[row] if scores is not None else None
        for plan, slots in zip(plans, _plan_row(budget, real, k, row_scores, seeds[row])):
            plan.append(slots)
    for seg, plan in reversed(list(zip(segments, plans))):  # right to left: earlier columns stay put
        _rewrite(trace, seg.start, seg.end, plan)


def _writers(trace: LatentTrace, agent: str, scope: str) -> list[str]:
    """The agents whose entries the budget bounds now: the one that just wrote, or (scope trace)
    every agent on the trace so far (the final agent has not written yet when a budget applies)."""
    if scope == "agent":
        return [agent]
    return list(dict.fromkeys(seg.agent for seg in trace.segments))


def _plan_row(budget: TraceBudget, real: list[list[int]], k: int, scores, seed: int) -> list[list[list[int]]]:
    """One row's new slots in each segment, each slot a group of trace columns (a group of one
    keeps an entry). real: per segment, the row's real prompt columns; k: entries kept in all."""
    if budget.policy == "merge":  # pool within segments, k shared by their sizes
        return [_merge(cols, n) for cols, n in zip(real, _shares(k, [len(c) for c in real]))]
    columns = [c for cols in real for c in cols]
    kept = set(_choose(budget, columns, k, scores, seed))
    return [[[c] for c in cols if c in kept] for cols in real]


def _choose(budget: TraceBudget, columns: list[int], k: int, scores, seed: int) -> list[int]:
    """The k of these trace columns a dropping policy keeps."""
    if budget.policy == "window":
        sinks = min(budget.sinks, k)
        return columns[:sinks] + columns[len(columns) - (k - sinks) :] if k > sinks else columns[:sinks]
    if budget.policy == "random":
        g = torch.Generator().manual_seed(seed % (2**63))
        return [columns[i] for i in torch.randperm(len(columns), generator=g)[:k].tolist()]
    order = scores[columns].argsort(descending=True, stable=True)  # prompt-drop
    return [columns[i] for i in order[:k].tolist()]


def _merge(columns: list[int], k: int) -> list[list[int]]:
    """k slots, each the mean of a contiguous group of these columns."""
    if not columns or k == 0:
        return []
    bounds = [round(i * len(columns) / k) for i in range(k + 1)]
    return [columns[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _shares(k: int, sizes: list[int]) -> list[int]:
    """k split over segments in proportion to their sizes (largest remainder), none above its size."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [k * n / total for n in sizes]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: shares[i] - exact[i])[: k - sum(shares)]:
        shares[i] += 1
    return [min(s, n) for s, n in zip(shares, sizes)]


def _rewrite(trace: LatentTrace, start: int, end: int, groups: list[list[list[int]]]) -> None:
    """Replace one segment by each row's slots (groups of trace columns; rows left-padded to the widest)."""
    batch, width, n = trace.batch_size, max((len(g) for g in groups), default=0), end - start
    device = trace.attention_mask.device
    weights = torch.zeros(batch, width, n, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    positions = torch.full((batch, width), -1, dtype=torch.long, device=device)
    old_positions = trace.positions[:, start:end].float()
    for row, slots in enumerate(groups):
        pad = width - len(slots)
        for j, group in enumerate(slots):
            local = [c - start for c in group]
            weights[row, pad + j, local] = 1.0 / len(local)
            mask[row, pad + j] = 1
            positions[row, pad + j] = int(old_positions[row, local].mean().round())
    trace.replace_columns(start, end, weights, mask, positions)


# ----------------------------------------------------------------------------- quantisation


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-(row, head, position) quantisation over head_dim.

    x: (B, H, L, D) -> codes (B, H, L, D * bits / 8) uint8 (int4: two codes a byte), scale and
    offset (B, H, L, 1) in x's dtype."""
    levels = 2**bits - 1
    x32 = x.float()
    low = x32.amin(dim=-1, keepdim=True).to(x.dtype)  # stored in x's dtype, used as stored
    scale = ((x32.amax(dim=-1, keepdim=True) - low.float()) / levels).to(x.dtype)
    scale = scale.clamp_min(torch.finfo(x.dtype).tiny)
    codes = ((x32 - low.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)
    return (codes.float() * scale.float() + low.float()).to(scale.dtype)


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The dequantised values with a straight-through gradient (training under a budget)."""
    codes, scale, low = quantize(x.detach(), bits)
    return x + (dequantize(codes, scale, low, bits) - x).detach()


class QuantizedLayer(DynamicLayer):
    """A cache layer whose first `packed_length` columns are stored packed (codes + scale +
    offset) and the rest as usual. Reads unpack the prefix, so the memory held between steps is
    the packed size; appends go to the unpacked tail."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.packed = [quantize(keys, bits), quantize(values, bits)]
        self.packed_length = keys.shape[2]
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys[:, :, :0], values[:, :, :0]  # the unpacked tail, (B, H, 0, D)

    def pack_tail(self) -> None:
        """Move the unpacked tail into the packed prefix."""
        tail = [quantize(self.keys, self.bits), quantize(self.values, self.bits)]
        self.packed = [tuple(torch.cat([a, b], dim=2) for a, b in zip(p, t)) for p, t in zip(self.packed, tail)]
        self.packed_length += self.keys.shape[2]
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = (dequantize(*p, self.bits) for p in self.packed)
        return torch.cat([k, self.keys], dim=2), torch.cat([v, self.values], dim=2)

    def update(self, key_states, value_states, *args, **kwargs):
        super().update(key_states, value_states, *args, **kwargs)
        return self.full()

    def get_seq_length(self) -> int:
        return self.packed_length + self.keys.shape[2]

    def n_bytes(self) -> int:
        stored = [t for p in self.packed for t in p] + [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in stored)

    def row_bytes(self, mask: torch.Tensor) -> torch.Tensor:
        """(B,) bytes of each row's real entries in this layer, packed prefix and tail."""
        _, heads, _, dim = self.keys.shape
        side = self.packed[0][1].element_size()  # scale and offset, per position and head
        packed_entry = 2 * heads * (dim * self.bits // 8 + 2 * side)
        tail_entry = 2 * heads * dim * self.keys.element_size()
        split = self.packed_length
        return mask[:, :split].sum(dim=1) * packed_entry + mask[:, split:].sum(dim=1) * tail_entry

    def select_rows(self, rows: torch.Tensor) -> "QuantizedLayer":
        other = QuantizedLayer.__new__(QuantizedLayer)
        DynamicLayer.__init__(other)
        other.bits, other.packed_length = self.bits, self.packed_length
        other.packed = [tuple(t.index_select(0, rows) for t in p) for p in self.packed]
        other.lazy_initialization(self.keys, self.values)
        other.keys, other.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        return other


def _quantize_agent(trace: LatentTrace, agent: str, bits: int) -> None:
    """Quantise `agent`'s columns (the last ones written; earlier agents' are quantised already)."""
    own = [s for s in trace.segments if s.agent == agent]
    start, end = min(s.start for s in own), max(s.end for s in own)
    if end != trace.length:
        raise BudgetError("quantize applies to an agent's entries right after it writes them")
    if torch.is_grad_enabled():
        trace.set_kv(
            [
                (
                    torch.cat([k[:, :, :start], fake_quantize(k[:, :, start:], bits)], dim=2),
                    torch.cat([v[:, :, :start], fake_quantize(v[:, :, start:], bits)], dim=2),
                )
                for k, v in trace.kv()
            ]
        )
        return
    layers = trace.cache.layers
    if all(isinstance(layer, QuantizedLayer) for layer in layers):
        for layer in layers:
            layer.pack_tail()
        return
    trace.set_layers([QuantizedLayer(k, v, bits) for k, v in trace.kv()])
