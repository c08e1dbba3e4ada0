"""The differentiable multi-agent forward: build the trajectory with autograd on, then
teacher-force the final agent on its target and return the cross-entropy on target tokens only.

diffmas       upstream agents write prompts + m latent steps to the trace (LoRA on, gradients
              flowing back through every latent step unless upstream_grad="none"), the final agent
              reads the whole trace
sft_single    the final agent alone (a fresh trace)
sft_text_mas  the final agent with the frozen model's upstream text (cached) in its prompt

The upstream is built by the very code inference runs (`Method.build_upstream`), so training and
inference see the same trace, the same masks and the same adapters per agent.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from diffmas.methods import Ask, Method, Upstream, asks_of
from diffmas.trace import LatentTrace

IGNORE = -100


class TrajectoryModel(torch.nn.Module):
    """nn.Module whose forward is one batch of trajectories -> loss.

    Wrapping the whole trajectory in one forward lets DDP (accelerate / torchrun) synchronise the
    gradients of every adapter once per step.
    """

    def __init__(self, method: Method, train_method: str, upstream_grad: str = "full", max_target_tokens: int = 512):
        super().__init__()
        self.method = method
        self.peft_model = method.backbone.model  # registered: its LoRA weights are the parameters
        self.train_method = train_method
        self.upstream_grad = upstream_grad
        self.max_target_tokens = max_target_tokens
        self.last_stats: dict[str, float] = {}

    def forward(
        self,
        questions: Sequence[str],
        targets: Sequence[str],
        formats: Sequence[str],
        contexts: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        privates: Sequence[dict] | None = None,
    ) -> dict:
        method = self.method
        asks = asks_of(questions, privates)
        up = self._upstream(asks, contexts)
        final = method.topology.final
        prompts = [method.prompts(final, [a], f, [c])[0] for a, f, c in zip(asks, formats, up.contexts)]
        with method.adapter_for(final):
            loss_sum, n_tokens = teacher_forced_loss(up.trace, final.name, prompts, targets, self.max_target_tokens)
        self.last_stats = {"n_target_tokens": n_tokens, "trace_len": float(sum(up.trace.n_real())) / len(questions)}
        # loss: this batch's mean; loss_sum / n_target_tokens let the Trainer weight micro-batches by tokens
        return {"loss": loss_sum / max(n_tokens, 1), "loss_sum": loss_sum, "n_target_tokens": n_tokens}

    def count_target_tokens(self, targets: Sequence[str]) -> int:
        """The number of tokens the loss of these targets is taken over (before running anything)."""
        tok = self.method.backbone.tokenizer
        return sum(len(target_ids(tok, t, self.max_target_tokens)) for t in targets)

    def _upstream(self, asks: list[Ask], contexts) -> Upstream:
        if self.train_method == "diffmas":
            grad = contextlib.nullcontext() if self.upstream_grad == "full" else torch.no_grad()
            with grad:
                return self.method.build_upstream(asks)
        trace = self.method.new_trace(len(asks))
        return Upstream(agents=[], trace=trace, contexts=list(contexts or [""] * len(asks)), traces=[trace])


def target_ids(tokenizer, target: str, max_target_tokens: int) -> list[int]:
    """The target's token ids, cut at `max_target_tokens`; EOS is appended only to a whole target,
    since one after a cut would teach the model to stop mid-answer."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) > max_target_tokens:
        return ids[:max_target_tokens]
    return ids + [tokenizer.eos_token_id]


def teacher_forced_loss(
    trace: LatentTrace, agent: str, prompts: Sequence[str], targets: Sequence[str], max_target_tokens: int = 512
) -> tuple[torch.Tensor, int]:
    """Append prompt + target for each row in one chunk; summed cross-entropy on the target tokens.

    Each row's chunk is [padding, prompt, target, EOS]: the same positions and mask the final agent
    has when it decodes the target at inference (no EOS after a target cut at max_target_tokens).
    Returns (summed loss, number of target tokens): the caller divides, by this batch's count or by
    the count over all micro-batches of an optimizer step.
    """
    bb = trace.backbone
    tok = bb.tokenizer
    rows = []
    for prompt, target in zip(prompts, targets):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, target_ids(tok, target, max_target_tokens)))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for b, (p_ids, t_ids) in enumerate(rows):
        seq = p_ids + t_ids
        ids[b, width - len(seq) :] = torch.tensor(seq)
        mask[b, width - len(seq) :] = 1
        # column c predicts token c + 1: the last prompt token predicts the first target token
        labels[b, width - len(t_ids) - 1 : width - 1] = torch.tensor(t_ids)
    ids, mask, labels = (x.to(bb.device) for x in (ids, mask, labels))
    hidden = trace.append(bb.embed(ids), mask, agent, "prompt")  # (B, T, d)
    chosen = labels != IGNORE
    logits = bb.logits(hidden[chosen])  # (N, V): only the target positions reach the LM head
    n_tokens = int(chosen.sum())
    return F.cross_entropy(logits, labels[chosen], reduction="sum"), n_tokens
