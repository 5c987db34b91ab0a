"""The training loss: next-token cross-entropy plus AdaMix consistency regularization (AdaMix, Eq. 4).

    L = CE_eps(p1) + lambda * 0.5 * (KL(p1 || sg(p2)) + KL(p2 || sg(p1)))

p1 and p2 are next-token distributions of the same batch under two independently drawn routes;
sg is stop-gradient; both terms are summed over target tokens (labels != -100) only, and the trainer
divides by the global count of target tokens, so lambda weighs a per-token mean symmetric KL against a
per-token mean CE: the reference's weight (100 for NLG, symmetric_KL_loss's 'batchmean' over target
tokens) means the same here. CE_eps is cross-entropy with label smoothing eps (Szegedy et al., 2016),
(1 - eps) * (-log p_y) + eps * mean_v(-log p_v), as torch's cross_entropy(label_smoothing=eps). Logits follow the
model's own head: a constant scale (Cohere's logit_scale, Granite's 1 / logits_scaling), then a soft
cap (Gemma 2/3's final_logit_softcapping). Instead of two
forward passes, the batch is concatenated with itself and run once, the halves routed as passes 0
and 1. The vocabulary projection, softmaxes and KL are computed in chunks of target tokens with their
gradients in closed form, so the fp32 logits of both halves are never all in memory at once, neither
in forward nor in backward, and nothing is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..data.labels import IGNORE_INDEX
from ..distributed.sharded import gathered
from ..methods.adamix.stochastic_routing import StochasticRouter


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


class _HeadLosses(torch.autograd.Function):
    """CE and symmetric-KL sums from hidden states, chunk by chunk, with gradients computed in closed form.

    Each chunk's logits live only while that chunk is processed; the gradients with respect to the
    hidden states (the only ones needed: the output projection is frozen) are formed in the same pass,
    so backward needs neither the logits nor the projection weight. For logits z = softcap(scale * u):
      d CE_eps / d z1 = p1 - (1 - eps) onehot(y) - eps / V
      d KL(p1 || sg p2) / d z1 = p1 * (log p1 - log p2 - KL_row)   (and symmetrically for z2)
    """

    @staticmethod
    def forward(ctx, h1, h2, weight, bias, targets, chunk_tokens, scale, softcap, smoothing):
        need_grad = any(ctx.needs_input_grad[:2])
        with torch.no_grad():
            lm = h1.new_zeros((), dtype=torch.float32)
            kl = h1.new_zeros((), dtype=torch.float32)
            grad_ce_1 = torch.empty_like(h1) if need_grad else None
            grad_kl_1 = torch.empty_like(h1) if need_grad and h2 is not None else None
            grad_kl_2 = torch.empty_like(h2) if need_grad and h2 is not None else None
            chunk_tokens = chunk_tokens or default_chunk_tokens(weight)
            for start in range(0, h1.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                u1, dz1 = _logits(h1[rows], weight, bias, scale, softcap)
                logp1 = F.log_softmax(u1, dim=-1)
                del u1
                y = targets[rows]
                lm += -(1.0 - smoothing) * logp1.gather(1, y[:, None]).sum()
                if smoothing:
                    lm += -smoothing * logp1.mean(dim=-1).sum()
                if not need_grad and h2 is None:
                    continue
                p1 = logp1.exp()
                if need_grad:
                    grad_ce = p1 if h2 is None else p1.clone()  # p1 itself where the KL does not need it
                    if smoothing:
                        grad_ce.sub_(smoothing / p1.shape[-1])
                    grad_ce[torch.arange(y.numel(), device=y.device), y] -= 1.0 - smoothing
                    grad_ce_1[rows] = _to_hidden(grad_ce, dz1, weight, h1.dtype)
                    del grad_ce
                if h2 is None:
                    continue
                u2, dz2 = _logits(h2[rows], weight, bias, scale, softcap)
                logp2 = F.log_softmax(u2, dim=-1)
                del u2
                p2 = logp2.exp()
                diff = logp1.sub_(logp2)  # log p1 - log p2, in log p1's buffer
                del logp2
                kl_12 = _row_dot(p1, diff)  # KL(p1 || p2) per row
                kl_21 = -_row_dot(p2, diff)  # KL(p2 || p1)
                kl += 0.5 * (kl_12.sum() + kl_21.sum())
                if not need_grad:
                    continue
                grad_kl_1[rows] = _to_hidden((diff - kl_12).mul_(p1).mul_(0.5), dz1, weight, h1.dtype)
                grad_kl_2[rows] = _to_hidden(diff.add_(kl_21).mul_(p2).mul_(-0.5), dz2, weight, h2.dtype)
        ctx.save_for_backward(grad_ce_1, grad_kl_1, grad_kl_2)
        return lm, kl

    @staticmethod
    def backward(ctx, grad_lm, grad_kl):
        grad_ce_1, grad_kl_1, grad_kl_2 = ctx.saved_tensors
        grad_h1 = grad_ce_1 * grad_lm.to(grad_ce_1.dtype)
        grad_h2 = None
        if grad_kl_1 is not None:
            grad_h1 = grad_h1 + grad_kl_1 * grad_kl.to(grad_kl_1.dtype)
            grad_h2 = grad_kl_2 * grad_kl.to(grad_kl_2.dtype)
        return grad_h1, grad_h2, None, None, None, None, None, None, None


CPU_CHUNK_BYTES = 16 * 2**20
"""A CPU chunk's fp32 logits at most this large. glibc maps every block above its mmap threshold (at most 32 MB)
anew and unmaps it when freed, so larger chunks fault in every page of their dozen full-vocabulary buffers on each
use: on SmolLM2 (49,152 tokens) 1,024-token chunks made the consistency step 2.0 times slower than 128-token ones."""


def default_chunk_tokens(weight: torch.Tensor) -> int:
    """1,024 target tokens a chunk on an accelerator (its caching allocator reuses the buffers); on a CPU as many as
    keep one chunk's fp32 logits within CPU_CHUNK_BYTES (85 for a 49,152-token vocabulary), at least 16."""
    if weight.device.type != "cpu":
        return 1024
    return max(16, CPU_CHUNK_BYTES // (4 * weight.shape[0]))


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(rows, 1): each row of a dotted with the same row of b, without an (rows, V) product in memory."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1, 1)


def _logits(hidden, weight, bias, scale, softcap):
    """fp32 logits of a chunk and d(logits)/d(head output) (None where it is 1)."""
    u = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        u = u * scale
    if not softcap:
        return u, (None if scale == 1.0 else scale)
    t = torch.tanh(u / softcap)
    return t * softcap, (1.0 - t * t) * scale


def _to_hidden(grad_logits, dz, weight, dtype):
    if dz is not None:
        grad_logits = grad_logits * dz
    return (grad_logits.to(weight.dtype) @ weight).to(dtype)


def token_losses(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    hidden_2: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    softcap: float | None = None,
    scale: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossSums:
    """Losses from last hidden states (B, T, d) and labels (B, T); position t predicts labels[:, t + 1].

    The output projection `head` must be frozen (the mixture methods never train it); under ZeRO-3 its
    weight is gathered once for the whole computation.
    """
    if head.weight.requires_grad:
        raise ValueError("token_losses needs a frozen output projection; the full method uses the model's own loss")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h1 = hidden[:, :-1][keep]
    h2 = hidden_2[:, :-1][keep] if hidden_2 is not None else None
    y = targets[keep]
    with gathered([p for p in (head.weight, head.bias) if p is not None]):
        lm, kl = _HeadLosses.apply(h1, h2, head.weight, head.bias, y, chunk_tokens, scale, softcap, label_smoothing)
    return LossSums(lm=lm, kl=kl if hidden_2 is not None else None, tokens=int(y.numel()))


def causal_lm_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    router: StochasticRouter | None = None,
    consistency: bool = False,
    chunk_tokens: int | None = None,
    label_smoothing: float = 0.0,
) -> LossSums:
    """One forward of a Hugging Face causal LM; with `consistency`, one forward of the doubled batch.

    The decoder (model.base_model) runs once; the output projection is applied per chunk of target tokens.
    """
    decoder, head = model.base_model, model.get_output_embeddings()
    scale, softcap = logit_scale(model.config), getattr(model.config, "final_logit_softcapping", None)
    if not consistency:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return token_losses(head, hidden, labels, chunk_tokens=chunk_tokens, softcap=softcap, scale=scale,
                            label_smoothing=label_smoothing)
    if router is None:
        raise ValueError("the consistency loss needs the mixtures' router (two routes in one forward)")
    doubled_ids = torch.cat([input_ids, input_ids])
    doubled_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    with router.use_passes(0, 1):
        hidden = decoder(input_ids=doubled_ids, attention_mask=doubled_mask, use_cache=False).last_hidden_state
    h1, h2 = hidden.chunk(2)
    return token_losses(head, h1, labels, hidden_2=h2, chunk_tokens=chunk_tokens, softcap=softcap, scale=scale,
                        label_smoothing=label_smoothing)


def logit_scale(config) -> float:
    """The constant the model's own head multiplies its logits by (before any soft cap)."""
    if getattr(config, "logit_scale", None) is not None:
        return float(config.logit_scale)  # Cohere
    if getattr(config, "logits_scaling", None) is not None:
        return 1.0 / float(config.logits_scaling)  # Granite
    return 1.0
