"""The one decode loop: batched, on top of a LatentTrace, greedy or sampled.

Every method decodes through `decode` (single agent, text_mas agents, latent_mas final agent), so
batching, stopping, sampling and per-token statistics behave the same everywhere.

Sampling uses one torch.Generator per row, seeded by the caller: a question's sample depends on its
own seed only, not on which other questions share its batch.

Finished rows: a batch decodes until its slowest row stops, but once enough rows have finished the
loop goes on over the unfinished ones alone (`LatentTrace.narrowed`: the trace's storage is shared,
not copied), so a batch's last steps cost what their live rows cost. Tokens, statistics and the
trace come out as if every row had been computed to the end (tests/test_drop_finished.py).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from diffmas.errors import DiffmasError
from diffmas.switch import Switch, scoped
from diffmas.trace import LatentTrace

# Streaming: called after every decode step as listener(agent, ids), ids[b] the token row b just
# produced or None where row b had already finished. A context variable, so a server's worker
# thread can listen to its own decoding without the methods passing a callback through.
TokenListener = Callable[[str, list], None]
_token_listener: ContextVar[TokenListener | None] = ContextVar("diffmas_token_listener", default=None)


def listening(listener: TokenListener):
    """Within the block, every `decode` reports its tokens step by step to `listener`."""
    return scoped(_token_listener, listener)


# Finished rows (inference): once DROP_MIN_SHARE of the rows being computed have finished and at
# least DROP_MIN_STEPS_LEFT steps may remain, decoding goes on over the unfinished rows alone
# (`LatentTrace.narrowed`); the trace ends up as if the finished rows had been padded.
# `drop_finished(False)` keeps computing them (benchmarks' before/after, equivalence tests).
DROP_MIN_SHARE = 0.25
DROP_MIN_STEPS_LEFT = 8
DROP_FINISHED: Switch[bool] = Switch("drop finished rows", True, (True, False))


def drop_finished(enabled: bool):
    """Within the block, decoding stops computing rows that have finished (or never does)."""
    return DROP_FINISHED.using(bool(enabled))


@dataclass
class DecodeConfig:
    max_new_tokens: int = 256  # per agent that decodes
    min_new_tokens: int = 0  # end-of-sequence is suppressed before this many tokens
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass (sampling only)
    seed: int = 0  # base seed; row seeds are derived from it by the caller
    entropy_top_k: int = 25  # decoding-stability statistic: entropy over the top-k tokens
    # Benchmarking: suppress end-of-sequence so every row decodes exactly max_new_tokens (vLLM's
    # ignore_eos). Makes costs comparable across models, e.g. randomly initialised ones.
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise DiffmasError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise DiffmasError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise DiffmasError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise DiffmasError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Decoded:
    token_ids: list[list[int]]  # per row, generated ids (a final EOS included)
    texts: list[str]  # per row, decoded without special tokens
    logprobs: list[list[float]]  # per row, log p(token) under the untempered model distribution
    entropies: list[list[float]]  # per row, entropy of the renormalised top-k distribution
    truncated: list[bool]  # per row, stopped by max_new_tokens or the context limit, not EOS


def decode(
    trace: LatentTrace,
    agent: str,
    last_hidden: torch.Tensor,
    config: DecodeConfig,
    seeds: Sequence[int],
) -> Decoded:
    """Decode from the trace; generated tokens are appended to it as `agent`'s segment.

    last_hidden: (B, d) hidden state at each row's last trace position (the end of the prompt).
    seeds: one per row (sampling only).
    """
    bb = trace.backbone
    batch = last_hidden.shape[0]
    eos = torch.tensor(bb.eos_token_ids, device=last_hidden.device)
    pad_id = bb.tokenizer.pad_token_id
    pick = _sampler(config, seeds, last_hidden.device)
    listener = _token_listener.get()

    out_ids: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    entropies: list[list[float]] = [[] for _ in range(batch)]
    rows = list(range(batch))  # the rows still computed, in the order `computed` holds them
    unfinished = torch.ones(batch, dtype=torch.bool, device=last_hidden.device)
    logits = bb.logits(last_hidden)  # (b, V), b = len(rows)
    with contextlib.ExitStack() as narrowing:
        computed = trace
        for step in range(config.max_new_tokens):
            if config.ignore_eos or step < config.min_new_tokens:
                logits = logits.index_fill(1, eos, float("-inf"))
            next_ids = pick(logits, rows)  # (b,)
            _record(logits, next_ids, unfinished, rows, out_ids, logprobs, entropies, config.entropy_top_k)
            if listener is not None:
                listener(agent, _tokens_by_row(batch, rows, next_ids, unfinished))
            unfinished = unfinished & ~torch.isin(next_ids, eos)
            if not unfinished.any() or step == config.max_new_tokens - 1:
                break
            if int(computed.next_position[unfinished].max()) + 1 > bb.max_length:
                break  # context full: stop here, rows are marked truncated below
            if _worth_dropping(computed, unfinished, config.max_new_tokens - step - 1):
                keep = unfinished.nonzero().flatten()
                computed = narrowing.enter_context(computed.narrowed(keep.tolist(), config.max_new_tokens - step))
                rows = [rows[i] for i in keep.tolist()]
                next_ids, unfinished = next_ids[keep], unfinished[keep]
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_id))
            hidden = computed.append(bb.embed(next_ids[:, None]), unfinished[:, None].long(), agent, "generated")
            logits = bb.logits(hidden[:, -1])

    eos_set = set(bb.eos_token_ids)
    texts = bb.tokenizer.batch_decode(out_ids, skip_special_tokens=True)
    truncated = [not ids or ids[-1] not in eos_set for ids in out_ids]
    return Decoded(out_ids, texts, logprobs, entropies, truncated)


def _sampler(config: DecodeConfig, seeds: Sequence[int], device: torch.device):
    if config.greedy:
        return lambda logits, rows: logits.argmax(dim=-1)
    warpers = [TemperatureLogitsWarper(config.temperature)]
    if config.top_p < 1:
        warpers.append(TopPLogitsWarper(config.top_p))
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def pick(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits (b, V) of the given rows of the batch, each drawn with its own row's generator."""
        scores = logits
        for warp in warpers:
            scores = warp(None, scores)
        probs = scores.softmax(dim=-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=generators[row]) for i, row in enumerate(rows)])

    return pick


@torch.no_grad()
def _record(logits, next_ids, active, rows, out_ids, logprobs, entropies, top_k) -> None:
    """Append each active row's token and its stability statistics (row i of the tensors is
    batch row rows[i])."""
    logp = logits.float().log_softmax(dim=-1)  # (b, V)
    chosen = logp.gather(1, next_ids[:, None]).squeeze(1)  # (b,)
    top = logp.topk(min(top_k, logp.shape[-1]), dim=-1).values  # (b, k)
    top_p = top.softmax(dim=-1)
    entropy = -(top_p * top_p.clamp_min(1e-30).log()).sum(dim=-1)  # (b,)
    for i in active.nonzero().flatten().tolist():
        b = rows[i]
        out_ids[b].append(int(next_ids[i]))
        logprobs[b].append(float(chosen[i]))
        entropies[b].append(float(entropy[i]))


def _tokens_by_row(batch: int, rows: list[int], next_ids: torch.Tensor, active: torch.Tensor) -> list:
    """The listener's view of a step: per batch row its token, or None where it has finished."""
    ids: list = [None] * batch
    for row, token, live in zip(rows, next_ids.tolist(), active.tolist()):
        ids[row] = int(token) if live else None
    return ids


def _worth_dropping(trace: LatentTrace, unfinished: torch.Tensor, steps_left: int) -> bool:
    """Stop computing the finished rows now? Dropping rows costs about two passes over the
    trace's entries (`LatentTrace.narrowed`); a step reads them all once and spends a batch
    row's compute on every finished row, so it pays once a share of the rows has finished and
    enough steps may remain."""
    if not DROP_FINISHED.value or steps_left < DROP_MIN_STEPS_LEFT:
        return False
    finished = int((~unfinished).sum())
    return finished >= max(1, DROP_MIN_SHARE * len(unfinished)) and trace.can_narrow()


def continuation_logprobs(
    trace: LatentTrace, agent: str, contexts: Sequence[str], options: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Sum log p(option | trace, context) for every option of every row.

    Multiple choice by likelihood, as lm-evaluation-harness scores it, but read through the trace:
    each row's context is prefilled on a *copy* of the trace (the trace itself is left as it
    was), then every option is teacher-forced on its own copy of that row.
    contexts: per row, plain text; options: per row, continuation texts (mind the leading space).
    Returns per row, per option, the summed log-probability of the option's tokens.
    """
    from diffmas.channel import prefill, tokenize

    bb = trace.backbone
    n_opt = max(len(o) for o in options)
    scratch = trace.expand(1)
    last = prefill(scratch, agent, contexts)  # (B, d)
    texts = [row[j] if j < len(row) else " " for row in options for j in range(n_opt)]  # (B*n,)
    # Right padding on a throwaway copy: token t is predicted at column t-1 in every row.
    ids, mask = tokenize(bb.tokenizer, texts, bb.device, padding_side="right")  # (B*n, T)
    if (mask.sum(dim=1) == 0).any():
        raise DiffmasError("an option tokenizes to nothing; option texts must be non-empty")
    big = scratch.expand(n_opt)
    hidden = big.append(bb.embed(ids), mask, agent, "generated")  # (B*n, T, d)
    first = bb.logits(last).repeat_interleave(n_opt, dim=0)[:, None]  # (B*n, 1, V)
    rest = bb.logits(hidden[:, :-1])  # (B*n, T-1, V): position t predicts token t+1
    logp = torch.cat([first, rest], dim=1).log_softmax(dim=-1)
    token_logp = logp.gather(2, ids[..., None]).squeeze(-1) * mask  # (B*n, T)
    # a running sum, left to right: a row's padding (zeros at its end) and the batch's width
    # change no bit of it, where `sum`'s vector lanes would regroup the terms
    sums = token_logp.double().cumsum(dim=1)[:, -1].view(len(options), n_opt).tolist()
    return [row[: len(opts)] for row, opts in zip(sums, options)]
