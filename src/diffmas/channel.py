"""The two channels between agents, and the only code that writes agent prompts into a trace.

latent: an agent prefills its prompt on top of the shared trace, then takes m latent steps: the
    last hidden state is realigned into input-embedding space and fed back as the next input
    embedding; each step appends one KV entry per row.
text:   an agent decodes text; the next agent receives it inside its prompt (`text_context`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from diffmas.trace import LatentTrace


def tokenize(
    tokenizer, texts: Sequence[str], device: torch.device, padding_side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids and mask, (B, T) each; chat templates already carry their special tokens.

    Left padding (the default) keeps every row's last column real."""
    enc = tokenizer(list(texts), padding=True, padding_side=padding_side, add_special_tokens=False, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def prefill(
    trace: LatentTrace,
    agent: str,
    prompts: Sequence[str],
    hidden_agents: Iterable[str] = (),
) -> torch.Tensor:
    """Append each row's rendered prompt to the trace; return the last hidden state, (B, d)."""
    bb = trace.backbone
    input_ids, mask = tokenize(bb.tokenizer, prompts, bb.device)
    hidden = trace.append(bb.embed(input_ids), mask, agent, "prompt", hidden_agents)
    return hidden[:, -1]  # left padding: the last column is real in every row


def latent_steps(
    trace: LatentTrace,
    agent: str,
    last_hidden: torch.Tensor,
    n_steps: int,
    hidden_agents: Iterable[str] = (),
) -> torch.Tensor:
    """Take `n_steps` latent steps from `last_hidden` (B, d); return the final hidden state (B, d).

    Each step is one forward of one position per row: the trace is never re-encoded.
    """
    hidden_agents = tuple(hidden_agents)
    realign = trace.backbone.realigner
    ones = torch.ones(last_hidden.shape[0], 1, dtype=torch.long, device=last_hidden.device)
    for _ in range(n_steps):
        step_embeds = realign(last_hidden)[:, None, :]  # (B, 1, d)
        last_hidden = trace.append(step_embeds, ones, agent, "latent", hidden_agents)[:, -1]
    return last_hidden


def text_context(messages: Sequence[tuple[str, str]]) -> str:
    """Earlier agents' text messages, as the next agent reads them in its prompt.

    messages: (role name, text) in the order they were written.
    """
    if not messages:
        return ""
    blocks = "\n\n".join(f"[{name}]\n{text.strip()}" for name, text in messages)
    return f"\nMessages from earlier agents:\n{blocks}\n"
