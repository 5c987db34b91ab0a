"""The training loss: next-token cross-entropy plus AdaMix consistency regularization (AdaMix, Eq. 4).

    L = CE(p1) + lambda * 0.5 * (KL(p1 || sg(p2)) + KL(p2 || sg(p1)))

p1 and p2 are next-token distributions of the same batch under two independently drawn routes;
sg is stop-gradient; both terms are summed over target tokens (labels != -100) only. Instead of two
forward passes, the batch is concatenated with itself and run once, the halves routed as passes 0
and 1. The vocabulary projection, softmaxes and KL are computed in chunks of target tokens under
activation checkpointing, so the fp32 logits of both halves are never all in memory at once, neither
in forward nor in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .routing import Router

IGNORE_INDEX = -100


@dataclass
class LossSums:
    """Sums over target tokens, so that callers can normalise across micro-batches and ranks."""

    lm: torch.Tensor
    kl: torch.Tensor | None
    tokens: int

    def mean(self, consistency_weight: float = 0.0, tokens: int | None = None) -> torch.Tensor:
        """(CE + weight * KL) / tokens; `tokens` overrides the count for global normalisation."""
        n = max(self.tokens if tokens is None else tokens, 1)
        total = self.lm if self.kl is None else self.lm + consistency_weight * self.kl
        return total / n


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_sums(head, softcap, h1, h2, targets):
    """CE sum of pass 1 and symmetric-KL sum with stop-gradients, for one chunk of target tokens."""
    logp1 = F.log_softmax(_logits(head, h1, softcap), dim=-1)
    ce = F.nll_loss(logp1, targets, reduction="sum")
    if h2 is None:
        return ce, ce.new_zeros(())
    logp2 = F.log_softmax(_logits(head, h2, softcap), dim=-1)
    kl_12 = (logp1.exp() * (logp1 - logp2.detach())).sum()
    kl_21 = (logp2.exp() * (logp2 - logp1.detach())).sum()
    return ce, 0.5 * (kl_12 + kl_21)


def token_losses(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    hidden_2: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    softcap: float | None = None,
) -> LossSums:
    """Losses from last hidden states (B, T, d) and labels (B, T); position t predicts labels[:, t + 1]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h1 = hidden[:, :-1][keep]
    h2 = hidden_2[:, :-1][keep] if hidden_2 is not None else None
    y = targets[keep]
    tokens = int(y.numel())
    lm = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()
    kl = lm.clone() if h2 is not None else None
    for start in range(0, tokens, chunk_tokens):
        end = start + chunk_tokens
        ce_c, kl_c = checkpoint(
            _chunk_sums, head, softcap, h1[start:end], None if h2 is None else h2[start:end], y[start:end],
            use_reentrant=False,
        )
        lm = lm + ce_c
        if kl is not None:
            kl = kl + kl_c
    return LossSums(lm=lm, kl=kl, tokens=tokens)


def causal_lm_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    router: Router | None = None,
    consistency: bool = False,
    chunk_tokens: int = 1024,
) -> LossSums:
    """One forward of a Hugging Face causal LM; with `consistency`, one forward of the doubled batch.

    The decoder (model.base_model) runs once; the output projection is applied per chunk of target tokens.
    """
    decoder, head = model.base_model, model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if not consistency:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return token_losses(head, hidden, labels, chunk_tokens=chunk_tokens, softcap=softcap)
    if router is None:
        raise ValueError("the consistency loss needs the mixtures' router (two routes in one forward)")
    doubled_ids = torch.cat([input_ids, input_ids])
    doubled_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    with router.use_passes(0, 1):
        hidden = decoder(input_ids=doubled_ids, attention_mask=doubled_mask, use_cache=False).last_hidden_state
    h1, h2 = hidden.chunk(2)
    return token_losses(head, h1, labels, hidden_2=h2, chunk_tokens=chunk_tokens, softcap=softcap)
