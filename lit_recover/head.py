"""The LM head and cross-entropy over supervised positions, in chunks, without all their logits at once.

``LoRARecoveryModule.supervised_loss`` runs the head only on the positions whose label is supervised.
Even so, one micro-batch's fp32 logits, their log-softmax and their gradient are each ``positions ×
vocabulary`` (a few hundred positions × 49,152 for SmolLM2: ~80 MB per copy). :func:`head_cross_entropy`
cuts the positions into chunks of ``lit_recover.distill.CHUNK_ELEMENTS`` logits (the chunk size of
the distillation loss, which does the same for its two heads: 85 positions of SmolLM2's vocabulary)
and, per chunk, computes the logits, the summed NLL and, when a gradient is wanted,
already its gradient with respect to the chunk's hidden states (``(softmax − onehot) / n @ W``):
the head is frozen, so that input gradient is all the backward pass needs. Then the chunk's
vocabulary-sized tensors are dropped. The backward pass only scales the kept ``[positions, hidden]``
gradient by the incoming one: no second head matmul (a recompute would add one head forward, ~7 % of
a step on SmolLM2), and at most one chunk's logits alive at any time.

The math is that of ``F.cross_entropy(head(h).float(), labels)``: logits in the head's dtype, the
loss in float32 at least (float64 stays float64), the gradient rounded to the head's dtype before
its matmul, as autograd does. The head must be a plain frozen ``nn.Linear`` (the LM head of every
LLaMA-family model; tied or not); anything else (a trainable or adapted head, a sharded one) takes
the unchunked path (:func:`supervised_cross_entropy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    from lit_recover.distill import CHUNK_ELEMENTS

    return max(1, int(chunk_size) if chunk_size else CHUNK_ELEMENTS // max(1, vocab))


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean NLL of ``hidden @ weightᵀ (+ bias)`` against ``labels``, chunked; gradient to ``hidden`` only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int):
        n = int(hidden.shape[0])
        work = torch.promote_types(hidden.dtype if weight is None else weight.dtype, torch.float32)
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=work, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            logits = F.linear(hidden[lo:hi], weight, bias).to(work)
            log_probs = F.log_softmax(logits, dim=-1)
            del logits
            target = labels[lo:hi].unsqueeze(1)
            total -= log_probs.gather(1, target).sum()
            if need_grad:
                probs = log_probs.exp_()  # in place: log_probs is not needed any more
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                probs.div_(n)
                grad[lo:hi] = probs.to(weight.dtype) @ weight
            del log_probs
        ctx.save_for_backward(grad)
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def chunkable(head: nn.Module) -> bool:
    """Whether :func:`head_cross_entropy` can run ``head``: a plain ``nn.Linear`` whose weights are frozen
    plain tensors (not sharded); the distillation loss's test for its own chunked heads."""
    from lit_recover.distill import _frozen_linear

    return _frozen_linear(head)


def head_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                       chunk_size: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(head(hidden).float(), labels)`` (mean) over ``hidden`` ``[positions, hidden size]``,
    in chunks of ``chunk_size`` positions (``None``: ``CHUNK_ELEMENTS`` / vocabulary); ``head`` as
    :func:`chunkable` says. Every label must be a class index (select the supervised positions first)."""
    rows = _chunk_rows(int(head.weight.shape[0]), chunk_size)
    return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, labels, rows)


def supervised_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                             chunked: bool = True, chunk_size: int | None = None) -> torch.Tensor:
    """The mean NLL of ``head(hidden)`` against ``labels``: :func:`head_cross_entropy` when ``chunked``
    and the head allows it, else the plain full-logits computation (loss in float32 at least)."""
    if chunked and chunkable(head):
        return head_cross_entropy(hidden, head, labels, chunk_size)
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="mean")
