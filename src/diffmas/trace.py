"""LatentTrace: the shared, append-only KV-cache trace that agents write to and read from.

The trace owns a transformers cache (one `_TraceLayer` per decoder layer) together with everything
needed to extend it correctly for a *batch* of independent questions:

- `attention_mask` (B, L): 1 for real positions, 0 for padding. Each appended chunk is left-padded
  on its own, so padding can sit in the middle of the trace; the mask (never rebuilt as all ones)
  keeps it invisible.
- `next_position` (B,): the RoPE position of each row's next real entry. Positions count real
  entries only, so a row's positions are the same whether it runs alone or in a padded batch.
- `segments`: which agent wrote which columns, and whether they are prompt tokens, latent steps or
  generated tokens.
- `positions` (B, L): the RoPE position of every column (-1 for padding). A trace budget
  (`diffmas.budget`) may drop, pool or quantise upstream columns; kept entries keep their
  positions (keys are stored already rotated), so `positions` need not be contiguous.

Only this module touches cache internals. The trace is never overwritten, only appended to.

Gradient checkpointing (training long traces): with `backbone.gradient_checkpointing` on and
autograd enabled, each appended chunk is one checkpointed region — its activations (on the concat
store, the full K/V copy every latent step's attention keeps among them) are recomputed during backward. transformers'
own checkpointing drops the cache, so the trace does it itself: while a chunk is recomputed its
cache layers *replay* (report the length they had then and return the same keys/values, without
appending). Append-only storage makes that exact: the first L entries never change.

Storage: each layer writes new entries in place into a buffer that grows geometrically (1.5x)
and hands attention views of its first L columns, so a decode or latent step costs O(new entries)
instead of `DynamicCache`'s O(L) concatenation of the whole cache. With autograd on the appends
go in place too, through `_AppendInPlace`: a plain in-place write would bump the version counter
of the keys attention saved for backward and fail it (transformers issue 43010), so the writes go
through aliases with counters of their own, which is safe because no column is written twice, and
backward splits the gradient as concatenation's would. A training trajectory then holds one
buffer per layer instead of a copy of the trace per append. `trace_store("concat")` gives the old
store everywhere (benchmarks, equivalence tests).
`n_bytes` counts the live entries; `capacity_bytes` what the buffers hold, free columns included.

Row by row (inference on a CPU): a padded chunk whose rows are all long enough runs each row alone
on its real tokens (`_forward_rows`; see ROW_BY_ROW_MIN_TOKENS), so a compute-bound CPU prefill
spends nothing on padding; padding columns then hold zeros, which no read sees. On the grow store
each left-padded row attends over its own row of the buffers and writes its entries there
(`_RowLayer`), so no row's past is copied for its forward. Where the model's attention is
`diffmas.attention`'s, every chunk of several positions runs packed (`_forward_packed`,
`packed_rows`), at any batch size and padding: the rows' real tokens as one sequence, one forward
for all rows, so each linear product covers every row's tokens, while each row's attention reads
only the columns of its own buffers that it sees, gathered (`_row_reads`). With oneDNN's products
(a row's bits at any row count), the decode kernel (sums over visible positions) and one-row
products run as two rows (`diffmas.linear`), a row then gets the same bits alone and in any batch:
batch size is a runtime-only setting, in bf16 as in fp32 (tests/test_trace.py,
`bench/batch_invariance.py`).

Narrowing (inference, grow store): `narrowed(rows)` hands out a trace of some rows whose layers are
views of this trace's own buffers, the rows moved to the front; decoding uses it to stop computing
rows that have finished (`diffmas.generate`). On exit the rows go back and the other rows get
padding for the new columns, as if they had been decoded on as padding.

Static store (the opt-in fast path, `MethodConfig.compile`, see `diffmas.fast_path`): a trace made
with a `step` keeps each layer's entries in a zero-initialised buffer whose capacity is a bucket
(`bucket_capacity`), and every append attends over the whole buffer with the unused columns masked.
One-position appends (decode and latent steps) then run through the compiled `step`, whose inputs
change shape only when the trace moves into the next bucket.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from diffmas import attention
from diffmas.errors import DiffmasError
from diffmas.switch import Switch

SegmentKind = Literal["prompt", "latent", "generated"]
# Who reads what of the *other* agents' entries (an agent always sees its own):
#   all     everything: the paper's non-overwritten trace
#   latent  only their latent steps: information can pass only through the latent channel
#   none    nothing: each agent alone with its own prompt (the no-communication control)
Reads = Literal["all", "latent", "none"]
READS = ("all", "latent", "none")


class TraceOverflowError(DiffmasError):
    """Appending would run past the model's context length."""


# Which store new traces use: "grow" (in place, geometric capacity; the default) or "concat"
# (transformers' DynamicLayer behaviour: every append concatenates the whole cache). `trace_store`
# switches it, for benchmarks and equivalence tests against the old store.
TraceStore = Literal["grow", "concat"]
TRACE_STORES = ("grow", "concat")
STORE: Switch[TraceStore] = Switch("trace store", "grow", TRACE_STORES)


def trace_store(kind: TraceStore):
    """Build the traces made inside this block with the given store ("grow" or "concat")."""
    return STORE.using(kind)


class _TraceLayer(DynamicLayer):
    """One decoder layer's keys and values on the trace.

    `keys` / `values` (B, kv_heads, L, head_dim) always hold exactly the L live entries; how they
    are stored depends on the mode:

    - in place (`grow`): they are views of the first L columns of a buffer of capacity >= L, and
      an append writes into the free columns; the buffer is reallocated (1.5x) only when it is
      full, so a step costs O(new entries), amortised, instead of O(L). Views taken earlier stay
      valid: their columns are never written again (append-only). With autograd on the append is
      `_AppendInPlace`, which gives the gradients concatenation would.
    - copy on write (the `concat` store): every append concatenates into a fresh tensor, as
      `DynamicLayer` does.

    `replay_length` (gradient checkpointing, see the module docstring): while set, the layer
    pretends to hold only its first `replay_length` entries and returns them with the new ones
    without appending.
    """

    replay_length: int | None = None
    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values), capacity >= L

    def __init__(self, grow: bool):
        super().__init__()
        self.grow = grow

    def update(self, key_states, value_states, *args, **kwargs):
        if self.replay_length is not None:
            past = slice(0, self.replay_length)
            return (
                torch.cat([self.keys[..., past, :], key_states], dim=-2),
                torch.cat([self.values[..., past, :], value_states], dim=-2),
            )
        if not self.is_initialized or self.keys.numel() == 0:
            self.set(key_states, value_states)  # the first chunk: nothing to copy yet
        elif self.grow and not torch.is_grad_enabled():
            self._write(key_states, value_states)
        elif self.grow:
            self.keys, self.values = _AppendInPlace.apply(self.keys, self.values, key_states, value_states, self)
        else:
            self._buffers = None
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold these tensors as the layer's entries (no copy; they are never written to)."""
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self._buffers = None
        self.is_initialized = True

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, t = self.keys.shape[-2], key_states.shape[-2]
        bk, bv = self._room(t)
        bk[..., n : n + t, :].copy_(key_states)
        bv[..., n : n + t, :].copy_(value_states)
        self.extend(t)

    def _room(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers, reallocated if they have fewer than `width` free columns after the entries,
        as `.data` aliases: those have version counters of their own, so the views handed out before
        (autograd may hold them for backward) see no in-place change from writes through them; such
        writes never cover their columns (append-only)."""
        needed = self.keys.shape[-2] + width
        if self._buffers is None or self._buffers[0].shape[-2] < needed:
            self._reserve(needed)
        return self._buffers[0].data, self._buffers[1].data

    def _reserve(self, needed: int) -> None:
        """Move the entries into new buffers of capacity >= needed, 1.5x the entries at least:
        amortised, each entry is copied a bounded number of times, and free capacity stays <= half."""
        n = self.keys.shape[-2]
        capacity = -(-max(needed, n + n // 2) // _CAPACITY_STEP) * _CAPACITY_STEP
        buffers = []
        for live in (self.keys, self.values):
            shape = (*live.shape[:-2], capacity, live.shape[-1])
            buf = torch.empty(shape, dtype=live.dtype, device=live.device)
            buf[..., :n, :].copy_(live)
            buffers.append(buf)
        self._buffers = (buffers[0], buffers[1])

    def open_columns(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: buffers with `width` free columns after the entries, zeroed (what padding
        holds), for a chunk whose rows write their own columns (`_RowLayer`); `extend(width)` then
        takes them in."""
        n, buffers = self.keys.shape[-2], self._room(width)
        for buf in buffers:
            buf[..., n : n + width, :].zero_()
        return buffers

    def extend(self, width: int) -> None:
        """Take the `width` columns after the entries (already written) into the live entries."""
        n = self.keys.shape[-2]
        self.keys, self.values = (buf[..., : n + width, :] for buf in self._room(width))

    def capacity(self) -> int:
        """Columns the layer can hold before it reallocates (L in copy-on-write mode)."""
        if self._buffers is not None:
            return self._buffers[0].shape[-2]
        return self.get_seq_length()

    def get_seq_length(self) -> int:
        return self.replay_length if self.replay_length is not None else super().get_seq_length()


_CAPACITY_STEP = 64  # buffer capacities are multiples of this many columns


class _AppendInPlace(torch.autograd.Function):
    """The grow store's append under autograd: the new entries are written in place (`_write`)
    and the layer's keys and values become views of its buffer, as at inference, where
    concatenating would copy the whole trace, and keep that copy for backward, on every append
    (a training trajectory's latent steps: m x L entries per layer). For autograd it is the
    concatenation: backward hands the past entries' gradient to the views they came from and the
    new entries' gradient to the chunk that wrote them. What attention saved stays valid because
    no column is written twice."""

    @staticmethod
    def forward(ctx, keys, values, new_keys, new_values, layer):
        ctx.n = keys.shape[-2]
        layer._write(new_keys, new_values)
        return layer.keys, layer.values

    @staticmethod
    def backward(ctx, grad_keys, grad_values):
        n = ctx.n
        past = (grad_keys[..., :n, :], grad_values[..., :n, :])
        new = (grad_keys[..., n:, :], grad_values[..., n:, :])
        return (*past, *new, None)


class _RowLayer(DynamicLayer):
    """One row of a grow layer's buffers while a chunk runs row by row (`_forward_rows`): `update`
    writes the row's new entries into the last columns of the chunk (a left-padded row's real
    columns) and returns the row's keys and values up to the chunk's end, its padding columns
    (zeros, masked) included, so no row's past is copied. It reports the length before the row's
    own entries, so transformers' mask puts the row's queries at those columns."""

    def __init__(self, buffers: tuple[torch.Tensor, torch.Tensor], row: int, end: int, n_new: int):
        super().__init__()
        self.buffers, self.row, self.end, self.n_new = buffers, row, end, n_new
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        row = slice(self.row, self.row + 1)
        out = []
        for buf, new in zip(self.buffers, (key_states, value_states)):
            buf[row, :, self.end - self.n_new : self.end].copy_(new)
            out.append(buf[row, :, : self.end])
        return out[0], out[1]

    def get_seq_length(self) -> int:
        return self.end - self.n_new


class _PackedLayer(DynamicLayer):
    """One layer of the grow store's buffers while a chunk runs packed (`_forward_packed`):
    `update` writes each row's new entries (its span of the packed sequence) into that row's real
    columns of the chunk, from column `firsts[b]` on, and hands attention the buffers up to the
    chunk's end, which `attention.packed_rows` reads row by row. It reports no past, so the
    decoder's own mask is the packed sequence's (unused: attention takes each row's)."""

    def __init__(self, buffers, spans, firsts: list[int], end: int):
        super().__init__()
        self.buffers, self.spans, self.firsts, self.end = buffers, spans, firsts, end
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        for buf, new in zip(self.buffers, (key_states, value_states)):
            for b, ((s, e), first) in enumerate(zip(self.spans, self.firsts)):
                buf[b, :, first : first + e - s].copy_(new[0, :, s:e])
        return self.buffers[0][:, :, : self.end], self.buffers[1][:, :, : self.end]

    def get_seq_length(self) -> int:
        return 0


def _left_padded(chunk_mask: torch.Tensor) -> bool:
    """Is every row's padding before its real columns?"""
    width = chunk_mask.shape[1]
    tail = torch.arange(width, device=chunk_mask.device)[None, :] >= width - chunk_mask.sum(dim=1, keepdim=True)
    return bool(torch.equal(chunk_mask.bool(), tail))


def _real_runs(chunk_mask: torch.Tensor) -> list[int] | None:
    """Each row's first real column, where every row's real columns are one run of at least one
    column (left or right padding, or none); None otherwise."""
    real = chunk_mask.bool()
    n = real.sum(dim=1)
    first = real.int().argmax(dim=1)
    columns = torch.arange(real.shape[1], device=real.device)[None, :]
    run = (columns >= first[:, None]) & (columns < (first + n)[:, None])
    if bool((n == 0).any()) or not torch.equal(real, run):
        return None
    return first.tolist()


# Row by row (inference on a CPU): a CPU's prompt prefill is compute-bound, so a padding column
# costs as much as a real token. A chunk whose rows all have at least ROW_BY_ROW_MIN_TOKENS real
# tokens (enough rows for the matrix products to stay compute-bound) and at least
# ROW_BY_ROW_MIN_PADDING padding runs each row alone on its real tokens. `row_by_row(False)`
# turns it off (benchmarks' before/after, equivalence tests).
ROW_BY_ROW_MIN_TOKENS = 32
ROW_BY_ROW_MIN_PADDING = 0.05
ROW_BY_ROW: Switch[bool] = Switch("row_by_row", True, (True, False))


def row_by_row(enabled: bool):
    """Within the block, traces run padded chunks row by row where they qualify (or never)."""
    return ROW_BY_ROW.using(bool(enabled))


# Packed rows: every chunk of several positions, at any batch size, with the rows' real tokens in
# one sequence through the linear layers (`_forward_packed`), where the store and the model allow
# it (`_packed_layout`). `packed_rows(False)` leaves chunks to the row-by-row rules above, one
# forward a row (benchmarks' before/after, equivalence tests); `row_by_row(False)` turns both off.
PACKED_ROWS: Switch[bool] = Switch("packed_rows", True, (True, False))


def packed_rows(enabled: bool):
    """Within the block, chunks run packed where they can (or never)."""
    return PACKED_ROWS.using(bool(enabled))


MIN_BUCKET = 256  # the static store's smallest capacity, in columns


def bucket_capacity(needed: int) -> int:
    """The static store's capacity for `needed` columns: the smallest power of two >= needed, at
    least `MIN_BUCKET`. Powers of two keep the number of shapes a compiled step sees (and so its
    recompiles) at `n_buckets(max_length)`, at the price of up to 2x free columns."""
    return max(MIN_BUCKET, 1 << max(needed - 1, 0).bit_length())


def n_buckets(max_length: int) -> int:
    """How many capacities a trace of up to `max_length` columns can go through: 256, 512, ...,
    the first power of two >= max_length (9 for a 40960-position Qwen3 context)."""
    return bucket_capacity(max_length).bit_length() - MIN_BUCKET.bit_length() + 1


class _BucketLayer(StaticLayer):
    """One decoder layer's keys and values in the static store (inference only).

    transformers' `StaticLayer` does the writing: `update` index_copy_'s the new entries into the
    buffer at column `cumulative_length` (a tensor, so a compiled step does not specialise on the
    trace length), and attention reads the whole buffer, `capacity()` columns, of which the trace's
    mask hides the unused ones (zeros, so a masked column's zero weight never meets a NaN). The
    buffers get static addresses (`mark_static_address`), which CUDA graphs need for in-place
    writes. Growing into the next bucket (new buffers, entries copied) happens in `reserve`, before
    the step, never inside it. The in-place writes would break autograd (see `_TraceLayer`), so an
    append with autograd on is refused.
    """

    def __init__(self):
        super().__init__(max_cache_len=0)
        self.length = 0  # live columns, kept in Python: reading `cumulative_length` would sync a GPU

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.is_grad_enabled():
            raise DiffmasError(
                "the static trace store (--compile) writes in place and is inference only; "
                "train without --compile, or append under torch.no_grad()"
            )
        return super().update(key_states, value_states)

    def reserve(self, needed: int) -> None:
        """Make room for `needed` columns: move into the bucket that holds them, if this one does not."""
        if needed <= self.max_cache_len:
            return
        self.max_cache_len = bucket_capacity(needed)
        if self.is_initialized:
            keys, values = self.full()  # views of the old buffers, which they keep alive for the copy
            self.lazy_initialization(keys, values)
            self.keys[..., : self.length, :].copy_(keys)
            self.values[..., : self.length, :].copy_(values)

    def advance(self, n_new: int) -> None:
        """Count the `n_new` columns the decoder just wrote (`cumulative_length` counted them on its side)."""
        self.length += n_new

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold a copy of these entries, (B, kv_heads, L, head_dim) each, in a fresh bucket."""
        n = keys.shape[-2]
        self.max_cache_len = bucket_capacity(n)
        self.lazy_initialization(keys, values)
        self.keys[..., :n, :].copy_(keys)
        self.values[..., :n, :].copy_(values)
        self.cumulative_length.fill_(n)
        self.length = n

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live entries: views of the first `length` columns."""
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def n_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.full())

    def capacity(self) -> int:
        return self.max_cache_len


@dataclass
class Segment:
    agent: str  # role name of the writer
    kind: SegmentKind
    start: int  # first trace column (inclusive)
    end: int  # last trace column (exclusive)
    n_tokens: list[int]  # real (unpadded) entries per row

    def to_dict(self) -> dict:
        return {
            "agent": self.agent,
            "kind": self.kind,
            "start": self.start,
            "end": self.end,
            "n_tokens": list(self.n_tokens),
        }


class LatentTrace:
    """Append-only KV trace for a batch of B sequences.

    backbone: the `Backbone` whose decoder writes the entries (see `append`).
    reads: which entries of other agents an appended chunk attends to (see `Reads`); the trace
        applies it to every append, so prefill, latent steps, decoding, option scoring and the
        training loss all see the same visibility.
    record_inputs: also keep every append's (inputs_embeds, chunk_mask), detached, so another
        engine can rebuild the trace from its input embeddings (see `real_inputs`).
    step: the compiled one-position step of `diffmas.fast_path` (inference only): the trace then
        uses the static store (see the module docstring) and runs its one-position appends through it.
    """

    released = False  # see `release`
    step = None  # see `step`
    inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see `record_inputs`

    def __init__(self, backbone, batch_size: int, reads: Reads = "all", record_inputs: bool = False, step=None):
        if reads not in READS:
            raise DiffmasError(f"reads={reads!r}: choose one of {', '.join(READS)}")
        self.backbone = backbone
        self.batch_size = batch_size
        self.reads = reads
        self.step = step
        self.store: TraceStore | Literal["static"] = "static" if step is not None else STORE.value
        device = backbone.device
        self.set_kv([])
        self.attention_mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.segments: list[Segment] = []
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if record_inputs else None

    # ------------------------------------------------------------------ size
    @property
    def length(self) -> int:
        """Columns in the trace (padding included)."""
        return self.attention_mask.shape[1]

    def n_real(self) -> list[int]:
        """Real entries per row."""
        return self.attention_mask.sum(dim=1).tolist()

    def n_bytes(self) -> int:
        """Exact bytes of the live keys and values: L columns, all rows, padding included
        (`bytes_per_entry() * length * batch`, less where a quantised budget packs entries); free
        buffer capacity is not counted."""
        return sum(self._layer_bytes(layer) for layer in self._live_layers())

    def capacity_bytes(self) -> int:
        """Bytes the key/value storage holds, free columns of the in-place buffers included
        (at most about 1.5x `n_bytes`; equal to it in copy-on-write mode)."""
        return sum(
            layer.capacity() * (layer.keys.numel() // max(layer.keys.shape[-2], 1)) * layer.keys.element_size() * 2
            if hasattr(layer, "capacity")
            else self._layer_bytes(layer)
            for layer in self._live_layers()
        )

    def _live_layers(self) -> list:
        return [] if self.released or self.length == 0 else list(self.cache.layers)

    @staticmethod
    def _layer_bytes(layer) -> int:
        if hasattr(layer, "n_bytes"):  # packed (a quantised budget) or bucketed (--compile) storage counts its own
            return layer.n_bytes()
        return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()

    def real_bytes(self) -> list[int]:
        """Per row, the bytes of its real entries (padding excluded): n_real x `bytes_per_entry`, but
        packed layers (a quantised trace budget) count their own. A released trace reports what it held."""
        layers = self._live_layers()
        if not any(hasattr(layer, "row_bytes") for layer in layers):
            return [n * self.bytes_per_entry() for n in self.n_real()]
        per_layer = self.bytes_per_entry() // self.backbone.n_layers
        totals = torch.zeros(self.batch_size, dtype=torch.long)
        for layer in layers:
            if hasattr(layer, "row_bytes"):
                totals += layer.row_bytes(self.attention_mask).cpu()
            else:
                totals += self.attention_mask.sum(dim=1).cpu() * per_layer
        return totals.tolist()

    def bytes_per_entry(self) -> int:
        """layers x 2 (K and V) x kv_heads x head_dim x dtype size: the cost of one trace position."""
        return self.backbone.kv_bytes_per_entry

    def release(self) -> None:
        """Free the keys and values and keep the accounting (mask, positions, segments).

        For a trace no agent reads again (text_mas: an upstream agent's own trace once it has
        decoded): its length is still reported, its memory is not held. Nothing can be appended after.
        """
        self.set_kv([])
        self.released = True

    # ------------------------------------------------------------------ writing
    def append(
        self,
        inputs_embeds: torch.Tensor,
        chunk_mask: torch.Tensor,
        agent: str,
        kind: SegmentKind,
        hidden_agents: Iterable[str] = (),
    ) -> torch.Tensor:
        """Run the decoder on a new chunk on top of the trace and keep its KV entries.

        inputs_embeds: (B, T, d) token or latent embeddings, each row left-padded.
        chunk_mask: (B, T) 1 for real entries, 0 for padding.
        hidden_agents: agents whose segments this chunk must not attend to (independent
            specialists in a hierarchical topology); later chunks still see them.
        Returns the last hidden states (B, T, d), post final norm.
        """
        if self.released:
            raise DiffmasError("this trace was released (its keys and values freed); append to a live trace")
        chunk_mask = chunk_mask.to(self.attention_mask)
        n_new = chunk_mask.sum(dim=1)
        furthest = int((self.next_position + n_new).max()) if n_new.numel() else 0
        if furthest > self.backbone.max_length:
            raise TraceOverflowError(
                f"the trace would reach {furthest} positions, beyond the model's context of "
                f"{self.backbone.max_length}; shorten the prompts, use fewer agents or latent steps"
            )
        # Positions count real entries only; padded slots get a dummy position (they are masked).
        offsets = (chunk_mask.cumsum(dim=1) - 1).clamp_min(0)
        position_ids = self.next_position[:, None] + offsets  # (B, T)
        visible = self.visible_mask(agent, hidden_agents)
        full_mask = torch.cat([visible, chunk_mask], dim=1)  # (B, L + T)

        def run(embeds: torch.Tensor) -> torch.Tensor:
            if self.store == "static":
                return self._static_forward(embeds, full_mask, position_ids)
            firsts = self._packed_layout(chunk_mask)
            if firsts is not None:
                return self._forward_packed(embeds, chunk_mask, full_mask, position_ids, firsts)
            if self._row_by_row(chunk_mask):
                return self._forward_rows(embeds, chunk_mask, full_mask, position_ids)
            return self.backbone.decoder()(
                inputs_embeds=embeds,
                attention_mask=full_mask,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state

        start = self.length
        if getattr(self.backbone, "gradient_checkpointing", False) and torch.is_grad_enabled():
            scope = self.backbone.active_adapter_scope  # the recomputation runs under the same adapter
            hidden = checkpoint(
                run,
                inputs_embeds,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), self._replaying(start, scope)),
            )
        else:
            hidden = run(inputs_embeds)
        if self.inputs is not None:
            self.inputs.append((inputs_embeds.detach(), chunk_mask))
        self.attention_mask = torch.cat([self.attention_mask, chunk_mask], dim=1)
        self.positions = torch.cat([self.positions, position_ids.masked_fill(chunk_mask == 0, -1)], dim=1)
        self.next_position = self.next_position + n_new
        self._record(agent, kind, start, self.length, n_new.tolist())
        return hidden

    def _row_by_row(self, chunk_mask: torch.Tensor) -> bool:
        """Run this chunk row by row on its real tokens (see ROW_BY_ROW_*)?"""
        batch, width = chunk_mask.shape
        if not ROW_BY_ROW.value or batch < 2 or width < ROW_BY_ROW_MIN_TOKENS or not self._rows_may_split():
            return False
        real = chunk_mask.sum(dim=1)
        padding = 1 - float(real.sum()) / (batch * width)
        return int(real.min()) >= ROW_BY_ROW_MIN_TOKENS and padding >= ROW_BY_ROW_MIN_PADDING

    def _forward_rows(
        self, embeds: torch.Tensor, chunk_mask: torch.Tensor, full_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The decoder on each row's real tokens alone, over that row of the trace; the rows' new
        keys and values are laid into the chunk's columns (zeros in padding, which the mask hides)
        and appended through the cache as one batched forward would append them. Hidden states of
        padding columns are zeros."""
        if self._rows_write_in_place(chunk_mask):
            return self._forward_rows_in_place(embeds, chunk_mask, full_mask, position_ids)
        length, config = self.length, self.backbone.base_model().config
        past = self.kv()
        hidden = torch.zeros_like(embeds)
        new: list[tuple[torch.Tensor, torch.Tensor]] = []
        for b in range(embeds.shape[0]):
            cols = chunk_mask[b].nonzero().squeeze(1)  # the row's real columns, in order
            scratch = DynamicCache(config=config)
            scratch.layers = [_TraceLayer(grow=False) for _ in scratch.layers]
            for layer, (keys, values) in zip(scratch.layers, past):
                layer.set(keys[b : b + 1], values[b : b + 1])  # views; the forward concatenates
            mask = torch.cat([full_mask[b : b + 1, :length], chunk_mask.new_ones(1, len(cols))], dim=1)
            hidden[b, cols] = self.backbone.decoder()(
                inputs_embeds=embeds[b : b + 1, cols],
                attention_mask=mask,
                position_ids=position_ids[b : b + 1, cols],
                past_key_values=scratch,
                use_cache=True,
            ).last_hidden_state[0]
            for i, layer in enumerate(scratch.layers):
                k, v = layer.keys[0, :, length:], layer.values[0, :, length:]  # (H, t, D)
                if len(new) <= i:
                    shape = (embeds.shape[0], k.shape[0], embeds.shape[1], k.shape[2])
                    new.append((k.new_zeros(shape), v.new_zeros(shape)))
                new[i][0][b, :, cols] = k
                new[i][1][b, :, cols] = v
        for i, (keys, values) in enumerate(new):
            self.cache.update(keys, values, i)
        return hidden

    def _rows_write_in_place(self, chunk_mask: torch.Tensor) -> bool:
        """Can each row write straight into the grow store's buffers (`_RowLayer`)? Every layer an
        in-place one holding entries, and every row left-padded (its real columns last)."""
        return self.length > 0 and self._grow_layers() and _left_padded(chunk_mask)

    def _grow_layers(self) -> bool:
        return all(type(layer) is _TraceLayer and layer.grow for layer in self.cache.layers)

    def _rows_may_split(self) -> bool:
        """May a chunk run other than as one padded batch? Inference on a CPU (a GPU gains from
        the batched shapes), and not a recorded trace (it replays chunks as written)."""
        return not torch.is_grad_enabled() and self.backbone.device.type == "cpu" and self.inputs is None

    def _packed_layout(self, chunk_mask: torch.Tensor) -> list[int] | None:
        """Each row's first real column if this chunk runs packed (`_forward_packed`), else None.
        Every chunk of several positions does, at any batch size and padding, where the rows may
        split (`_rows_may_split`, `row_by_row` and `packed_rows` on), every row's real columns are
        one run (`_real_runs`), the store grows in place, and the model's attention is
        `diffmas.attention`'s, which splits the rows (every layer attends over the whole trace:
        the backbone refuses sliding windows). A row's attention then reads its visible columns
        only, which is what gives it the same bits alone and in any batch."""
        if not (ROW_BY_ROW.value and PACKED_ROWS.value) or chunk_mask.shape[1] < 2 or not self._rows_may_split():
            return None
        if not self._grow_layers() or self.backbone.base_model().config._attn_implementation != attention.NAME:
            return None
        return _real_runs(chunk_mask)

    def _forward_packed(
        self,
        embeds: torch.Tensor,
        chunk_mask: torch.Tensor,
        full_mask: torch.Tensor,
        position_ids: torch.Tensor,
        firsts: list[int],
    ) -> torch.Tensor:
        """The rows' real tokens, one after another, run as one sequence, so each linear layer
        makes one product over all of them (a product's rows keep their bits at any row count,
        `diffmas.linear`); attention splits them back into rows (`attention.packed_rows`), each
        over its own visible columns of the buffers (`_row_reads`), and each row's entries go to
        its real columns of the chunk (`_PackedLayer`), from column `firsts[b]` of the chunk on
        (`_packed_layout`). Padding columns are zeroed and masked."""
        width, n_real = embeds.shape[1], chunk_mask.sum(dim=1).tolist()
        firsts = [self.length + first for first in firsts]
        rows = self._row_reads(full_mask, n_real, firsts)
        layers = self.cache.layers
        if self.length == 0:
            bb = self.backbone
            empty = embeds.new_empty(embeds.shape[0], bb.n_kv_heads, 0, bb.head_dim, dtype=bb.dtype)
            for layer in layers:
                layer.set(empty, empty)
        buffers = [layer.open_columns(width) for layer in layers]
        end = self.length + width
        scratch = DynamicCache(config=self.backbone.base_model().config)
        scratch.layers = [_PackedLayer(bufs, rows.spans, firsts, end) for bufs in buffers]
        real = chunk_mask.bool()
        with attention.packed_rows(rows):
            packed = self.backbone.decoder()(
                inputs_embeds=embeds[real][None],
                position_ids=position_ids[real][None],
                past_key_values=scratch,
                use_cache=True,
            ).last_hidden_state[0]
        hidden = torch.zeros_like(embeds)
        hidden[real] = packed
        for layer in layers:
            layer.extend(width)
        return hidden

    def _row_reads(self, full_mask: torch.Tensor, n_real: list[int], firsts: list[int]) -> attention.PackedRows:
        """Where each row's tokens sit in the packed sequence and what they attend to: only the
        columns the row sees (its visible trace columns and its own tokens, in order), causally over
        its own. A row's attention then gets the same keys, values and mask whatever padding or
        other agents' columns the batch puts around them: the same bits alone and in any batch.
        A row that sees no earlier column attends causally and unmasked, as transformers runs a
        row alone in an empty trace (so the same SDPA call, and the same bits)."""
        starts = [0, *itertools.accumulate(n_real)]
        spans = tuple(zip(starts[:-1], starts[1:]))
        visible = full_mask.bool()
        columns, masks = [], []
        for b, (n, first) in enumerate(zip(n_real, firsts)):
            seen = visible[b].nonzero().squeeze(1)  # earlier visible columns, then the row's own
            columns.append(seen)
            if len(seen) == n:
                masks.append(None)
                continue
            own = torch.arange(first, first + n, device=seen.device)
            masks.append((seen[None, :] <= own[:, None])[None, None])
        return attention.PackedRows(spans, tuple(columns), tuple(masks))

    def _forward_rows_in_place(
        self, embeds: torch.Tensor, chunk_mask: torch.Tensor, full_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """`_forward_rows` without copies: each row attends over its own row of the buffers (the
        chunk's padding columns zeroed and masked) and writes its entries there."""
        width, config = embeds.shape[1], self.backbone.base_model().config
        layers = self.cache.layers
        buffers = [layer.open_columns(width) for layer in layers]
        end = self.length + width
        hidden = torch.zeros_like(embeds)
        for b, n in enumerate(chunk_mask.sum(dim=1).tolist()):
            scratch = DynamicCache(config=config)
            scratch.layers = [_RowLayer(bufs, b, end, n) for bufs in buffers]
            cols = slice(width - n, width)
            hidden[b, cols] = self.backbone.decoder()(
                inputs_embeds=embeds[b : b + 1, cols],
                attention_mask=full_mask[b : b + 1],  # the chunk's padding columns stay hidden
                position_ids=position_ids[b : b + 1, cols],
                past_key_values=scratch,
                use_cache=True,
            ).last_hidden_state[0]
        for layer in layers:
            layer.extend(width)
        return hidden

    def _static_forward(self, embeds: torch.Tensor, full_mask: torch.Tensor, position_ids: torch.Tensor):
        """The decoder on the static store: the mask widened to the bucket (its new columns hidden);
        one-position chunks through the compiled step, longer ones (prompts) eagerly."""
        n_new = embeds.shape[1]
        layers = self.cache.layers
        for layer in layers:
            layer.reserve(self.length + n_new)  # outside the step: growing reallocates
        mask = full_mask.new_zeros(full_mask.shape[0], layers[0].capacity())  # (B, C)
        mask[:, : full_mask.shape[1]] = full_mask
        forward = self.step if n_new == 1 else self.step.eager
        hidden = forward(embeds, mask, position_ids, self.cache)
        for layer in layers:
            layer.advance(n_new)
        return hidden

    @contextlib.contextmanager
    def _replaying(self, length: int, adapter_scope: tuple[bool, str | None]):
        """During a chunk's recomputation, make every cache layer look `length` long and return
        past + recomputed entries without appending (see the module docstring), under the adapter
        that wrote the chunk."""
        layers = self.cache.layers
        for layer in layers:
            layer.replay_length = length
        inside, adapter = adapter_scope
        try:
            with self.backbone.use_adapter(adapter) if inside else contextlib.nullcontext():
                yield
        finally:
            for layer in layers:
                layer.replay_length = None

    def visible_mask(self, agent: str, hidden_agents: Iterable[str] = ()) -> torch.Tensor:
        """(B, L) mask of the trace columns a chunk written by `agent` attends to.

        Padding is never visible; `hidden_agents` are never visible; other agents' segments are
        visible as `reads` allows; the agent's own segments always are.
        """
        hidden = set(hidden_agents)
        blocked = [
            seg
            for seg in self.segments
            if seg.agent != agent
            and (seg.agent in hidden or self.reads == "none" or (self.reads == "latent" and seg.kind != "latent"))
        ]
        if not blocked:
            return self.attention_mask
        mask = self.attention_mask.clone()
        for seg in blocked:
            mask[:, seg.start : seg.end] = 0
        return mask

    def _record(self, agent: str, kind: SegmentKind, start: int, end: int, n_tokens: list[int]) -> None:
        last = self.segments[-1] if self.segments else None
        if last is not None and last.agent == agent and last.kind == kind and last.end == start:
            # Consecutive latent steps / decode steps of one agent form one segment.
            last.end = end
            last.n_tokens = [a + b for a, b in zip(last.n_tokens, n_tokens)]
        else:
            self.segments.append(Segment(agent, kind, start, end, n_tokens))

    # ------------------------------------------------------------------ reading
    def agent_tokens(self, agent: str, kind: SegmentKind) -> list[int]:
        """Real entries per row that `agent` wrote with `kind`."""
        counts = [0] * self.batch_size
        for seg in self.segments:
            if seg.agent == agent and seg.kind == kind:
                counts = [c + n for c, n in zip(counts, seg.n_tokens)]
        return counts

    def real_inputs(self, row: int) -> torch.Tensor:
        """(n_real, d) the input embeddings of row `row`'s real entries, in trace order (padding
        dropped). Needs `record_inputs`. Positions count real entries only, so with reads=all
        and no hidden agents a causal LM prefilled on these embeddings holds this row's KV."""
        if self.inputs is None:
            raise DiffmasError("this trace does not record its inputs; create it with record_inputs=True")
        return torch.cat([embeds[row][mask[row].bool()] for embeds, mask in self.inputs], dim=0)

    def expand(self, repeats: int) -> "LatentTrace":
        """A new trace with every row repeated `repeats` times (row b -> rows b*r .. b*r+r-1).

        The original is left untouched: used to score several continuations of one trace.
        """
        rows = torch.arange(self.batch_size, device=self.attention_mask.device).repeat_interleave(repeats)
        return self.select(rows)

    def select(self, rows: torch.Tensor | list[int]) -> "LatentTrace":
        """A new trace made of the given rows of this one, in that order (rows may repeat).

        The original is left untouched; appends to either never reach the other, because cache
        updates concatenate into new tensors.
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        other = self._rows_without_kv(rows)
        other.released = self.released
        other.inputs = (
            None
            if self.inputs is None
            else [(e.index_select(0, rows), m.index_select(0, rows)) for e, m in self.inputs]
        )
        if self.length == 0 or self.released:
            other.set_kv([])
        elif all(hasattr(layer, "select_rows") for layer in self.cache.layers):
            other.set_layers([layer.select_rows(rows) for layer in self.cache.layers])  # packed: no unpacking
        else:
            other.set_kv([(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in self.kv()])
        return other

    def _rows_without_kv(self, rows: torch.Tensor) -> "LatentTrace":
        """A new trace with these rows' mask, positions and segments, the same settings, and no
        keys or values yet (the caller gives it its storage)."""
        other = LatentTrace.__new__(LatentTrace)
        other.backbone, other.reads, other.store, other.step = self.backbone, self.reads, self.store, self.step
        other.batch_size = len(rows)
        other.cache = None
        other.attention_mask = self.attention_mask.index_select(0, rows)
        other.next_position = self.next_position.index_select(0, rows)
        other.positions = self.positions.index_select(0, rows)
        picked = rows.tolist()
        other.segments = [
            Segment(s.agent, s.kind, s.start, s.end, [s.n_tokens[r] for r in picked]) for s in self.segments
        ]
        return other

    def can_narrow(self) -> bool:
        """Whether `narrowed` applies: inference on the in-place store, every layer a plain
        `_TraceLayer` (not a budget's packed storage), no recorded inputs."""
        return (
            self.store == "grow"
            and not torch.is_grad_enabled()
            and not self.released
            and self.inputs is None
            and self.length > 0
            and all(type(layer) is _TraceLayer and layer.replay_length is None for layer in self.cache.layers)
        )

    @contextlib.contextmanager
    def narrowed(self, rows: list[int], room: int) -> Iterator["LatentTrace"]:
        """Within the block, a trace of only `rows` (in that order) whose appends go into this
        trace's own storage: decoding stops computing its finished rows (`diffmas.generate`)
        without a second copy of the trace.

        The rows are moved to the front of each layer's buffers (one pass over the entries) and
        the narrow trace's layers are views of those first rows, with `room` free columns reserved
        so no append inside the block reallocates. On exit the rows go back in place and this
        trace holds every column the block appended: the rows' entries, and padding (masked, zero
        keys and values, as in `_forward_rows`) in the other rows. Mask, positions and segments
        are then what appending padding in the other rows would have given. Needs `can_narrow()`.
        """
        if not self.can_narrow():
            raise DiffmasError("narrowed() needs an inference trace on the in-place store (see can_narrow)")
        length, batch = self.length, self.batch_size
        kept = set(rows)
        order = rows + [r for r in range(batch) if r not in kept]
        perm = torch.tensor(order, device=self.attention_mask.device)
        moved = order != list(range(batch))  # rows already in front need no move
        for layer in self.cache.layers:
            if layer._buffers is None or layer.capacity() < length + room:
                layer._reserve(length + room)
            if moved:
                for buf in layer._buffers:
                    buf[:, :, :length] = buf[:, :, :length].index_select(0, perm)  # one layer's copy at a time
        picked = perm[: len(rows)]
        narrow = self._rows_without_kv(picked)
        layers = []
        for layer in self.cache.layers:
            view = _TraceLayer(grow=True)
            bk, bv = (buf[: len(rows)] for buf in layer._buffers)
            view.set(bk[:, :, :length], bv[:, :, :length])
            view._buffers = (bk, bv)
            layers.append(view)
        narrow.set_layers(layers)
        try:
            yield narrow
        finally:
            self._take_back(narrow, perm, moved)

    def _take_back(self, narrow: "LatentTrace", perm: torch.Tensor, moved: bool) -> None:
        """`narrowed`'s exit: the narrow trace's new columns into this trace, rows back in place."""
        length, end, a = self.length, narrow.length, narrow.batch_size
        picked, inverse = perm[:a], torch.argsort(perm)
        for layer, view in zip(self.cache.layers, narrow.cache.layers):
            if view._buffers is None or view._buffers[0].data_ptr() != layer._buffers[0].data_ptr():
                raise DiffmasError("a narrowed trace outgrew the room it reserved")  # an internal bug
            for buf in layer._buffers:
                buf[a:, :, length:end] = 0
                if moved:
                    buf[:, :, :end] = buf[:, :, :end].index_select(0, inverse)
            bk, bv = layer._buffers
            layer.keys, layer.values = bk[:, :, :end], bv[:, :, :end]
        width = end - length
        mask = self.attention_mask.new_zeros(self.batch_size, width)
        mask[picked] = narrow.attention_mask[:, length:]
        positions = self.positions.new_full((self.batch_size, width), -1)
        positions[picked] = narrow.positions[:, length:]
        self.attention_mask = torch.cat([self.attention_mask, mask], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=1)
        self.next_position = self.next_position.clone()
        self.next_position[picked] = narrow.next_position
        for seg in narrow.segments:
            start = max(seg.start, length)
            if seg.end > start:
                counts = [0] * self.batch_size
                for row, n in zip(picked.tolist(), narrow.attention_mask[:, start : seg.end].sum(dim=1).tolist()):
                    counts[row] = n
                self._record(seg.agent, seg.kind, start, seg.end, counts)

    # ------------------------------------------------------------------ storage seam
    # Everything that reads or rebuilds stored keys/values outside the decoder (row selection,
    # budget policies, inspection) goes through these two, so the storage behind them can change.
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the stored (keys, values), each (B, kv_heads, L, head_dim); do not write to them."""
        return [layer.full() if hasattr(layer, "full") else (layer.keys, layer.values) for layer in self._live_layers()]

    def set_kv(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace the stored keys/values (one (keys, values) per layer, or [] for none); the caller
        keeps mask, positions and segments consistent with the new columns."""
        config = self.backbone.base_model().config
        cache = DynamicCache(config=config)
        if kv and len(kv) != len(cache.layers):
            raise DiffmasError(
                f"set_kv got {len(kv)} layers of keys/values for a model with {len(cache.layers)}; "
                "pass one (keys, values) per decoder layer"
            )
        cache.layers = [
            _BucketLayer() if self.store == "static" else _TraceLayer(grow=self.store == "grow") for _ in cache.layers
        ]
        for layer, (keys, values) in zip(cache.layers, kv):
            layer.set(keys, values)
        self.cache = cache

    def set_layers(self, layers: list) -> None:
        """Hold these cache layers (one per decoder layer), e.g. a budget's packed storage."""
        self.set_kv([])
        self.cache.layers = layers

    def replace_columns(
        self, start: int, end: int, weights: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Replace columns [start, end), which must lie inside one segment, with W new slots.

        weights (B, W, end - start): each slot's keys and values are these weighted sums of the old
            columns (one-hot rows keep an entry, averaging rows pool several); differentiable.
        mask (B, W): which slots are real; positions (B, W): their RoPE positions (-1 padding).
        The old columns' storage is released: the trace really shrinks.
        """
        seg = next((s for s in self.segments if (s.start, s.end) == (start, end)), None)
        if seg is None:
            raise DiffmasError("replace_columns rewrites one whole segment")
        width = weights.shape[1]
        kv = []
        for keys, values in self.kv():
            w = weights.to(keys.dtype)
            new_k = torch.einsum("bwl,bhld->bhwd", w, keys[:, :, start:end])
            new_v = torch.einsum("bwl,bhld->bhwd", w, values[:, :, start:end])
            kv.append(
                (
                    torch.cat([keys[:, :, :start], new_k, keys[:, :, end:]], dim=2),
                    torch.cat([values[:, :, :start], new_v, values[:, :, end:]], dim=2),
                )
            )
        self.set_kv(kv)
        mask = mask.to(self.attention_mask)
        self.attention_mask = torch.cat([self.attention_mask[:, :start], mask, self.attention_mask[:, end:]], dim=1)
        self.positions = torch.cat(
            [self.positions[:, :start], positions.to(self.positions), self.positions[:, end:]], 1
        )
        shift = width - (end - start)
        seg.end, seg.n_tokens = start + width, mask.sum(dim=1).tolist()
        for later in self.segments[self.segments.index(seg) + 1 :]:
            later.start, later.end = later.start + shift, later.end + shift

    def summary(self) -> list[dict]:
        return [seg.to_dict() for seg in self.segments]
