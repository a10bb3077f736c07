"""Distillation losses: the unpruned teacher's next-token distributions (and hidden states) for its pruned student.

Pure torch, no Lightning: ``LoRARecoveryModule`` calls these when ``--model.teacher`` is set.

The objective of one micro-batch is ``(1 − kd_ratio)·CE + kd_ratio·T²·D + kd_hidden_weight·H``:

- ``CE``: the mean next-token NLL over the supervised positions (the seed's loss, at temperature 1);
- ``D``: the mean over the distillation positions (:func:`kd_mask`) of a divergence between the
  teacher's and the student's next-token distributions at temperature ``T``
  (:data:`KD_LOSSES`); the ``T²`` keeps its gradient on the scale of the CE's as ``T`` grows;
- ``H`` (:func:`hidden_mse`): the mean squared difference of every decoder layer's output, student
  against teacher, on the same positions, averaged over the layers.

Memory: :func:`distillation_loss` never holds either model's full-vocabulary logits for a whole
micro-batch. The positions are cut into chunks; per chunk both heads run, the CE and the divergence
are summed, and everything vocabulary-sized is dropped. For frozen plain ``Linear`` heads (the LM
head of every LLaMA-family model under LoRA) each chunk's gradient with respect to the student's
hidden states is formed right there (closed forms, times the head's weight) and kept as a
``[positions, hidden]`` tensor, so no head runs twice; any other head (trainable, adapted, sharded
by FSDP2) has each chunk computed again in the backward pass (``torch.utils.checkpoint``), one
chunk at a time. The teacher's logits are always computed under ``no_grad``, from its final
(post-norm) hidden states.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

KDLoss = Literal["forward_kl", "reverse_kl", "jsd"]
KDPositions = Literal["all", "response"]
KD_LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
"""``forward_kl``: KL(teacher ‖ student), mass-covering (Minitron, torchtune). ``reverse_kl``:
KL(student ‖ teacher), mode-seeking. ``jsd``: the Jensen–Shannon divergence (β = ½), bounded by ln 2."""
KD_POSITIONS: tuple[str, ...] = ("all", "response")
"""``all``: every position whose next token is a real token of the same sequence, the prompt
included (the CE masks the prompt out; the teacher knows it too). ``response``: the supervised
positions only, those of the CE."""

IGNORE_INDEX = -100  # lit_recover.data.IGNORE_INDEX; this module imports nothing of the project
CHUNK_ELEMENTS = 1 << 22
"""Positions per chunk × vocabulary size: 16 MiB per fp32 vocabulary-sized tensor of a chunk (a chunk
holds about eight of them at its peak, in the backward pass). 85 positions for SmolLM2's 49,152-token
vocabulary, 131 for LLaMA's 32,000."""


# --------------------------------------------------------------------------- positions
def kd_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, positions: KDPositions = "all") -> torch.Tensor:
    """The distillation positions of a micro-batch, ``[batch, length − 1]`` (the shifted frame: position
    ``t`` predicts token ``t + 1``).

    ``response``: where the shifted label is supervised (``labels[:, 1:] != IGNORE_INDEX``), the CE's
    positions. ``all``: where token ``t + 1`` is a real token of the sequence token ``t`` belongs to:
    not padding (``attention_mask``), and not the start of the next packed sequence
    (``position_ids[:, t + 1] == 0``). A sequence of ``n`` tokens gives ``n − 1`` positions, padded or
    packed alike.
    """
    if positions not in KD_POSITIONS:
        raise ValueError(f"kd_positions {positions!r}: choose from {list(KD_POSITIONS)}")
    if positions == "response":
        return labels[:, 1:] != IGNORE_INDEX
    mask = torch.ones_like(labels[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        real = attention_mask.bool()
        mask &= real[:, 1:] & real[:, :-1]
    if position_ids is not None:
        mask &= position_ids[:, 1:] != 0
    return mask


def kd_position_count(length: int, positions: KDPositions, supervised: int) -> int:
    """The distillation positions :func:`kd_mask` gives one sequence of ``length`` tokens with
    ``supervised`` supervised targets: ``length − 1`` under ``all``, ``supervised`` under ``response``."""
    return supervised if positions == "response" else max(0, int(length) - 1)


# --------------------------------------------------------------------------- divergences
def _log_half_one_plus_exp(d: torch.Tensor) -> torch.Tensor:
    """``log((1 + e^d) / 2)``, exactly 0 at ``d = 0`` and finite for large ``|d|``."""
    return d.clamp(min=0) + torch.log1p(0.5 * torch.expm1(-d.abs()))


def _divergence_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, kind: str,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: the divergence between the student ``q`` and the teacher ``p`` (log-probabilities
    over the last dimension), and its gradient with respect to the student's tempered logits.

    The gradients are the closed forms (softmax Jacobian applied by hand), so a student whose
    distribution equals the teacher's gets exactly zero, not a rounding residue.
    """
    d = log_p - log_q
    if kind == "forward_kl":  # Σ p (log p − log q); ∂/∂z = q − p
        p = log_p.exp()
        value = (p * d).sum(-1)
        grad = (log_q.exp() - p) if need_grad else None
    elif kind == "reverse_kl":  # Σ q (log q − log p); ∂/∂z = q ⊙ (log q − log p − D)
        q = log_q.exp()
        value = -(q * d).sum(-1)
        grad = q * (-d - value.unsqueeze(-1)) if need_grad else None
    elif kind == "jsd":
        # m = (p + q)/2; log m − log q = log((1 + e^d)/2) = f; log p − log m = d − f
        # JSD = ½ Σ p (d − f) − ½ Σ q f;  ∂/∂z = q ⊙ (c − Σ q c) with c = −½ f
        f = _log_half_one_plus_exp(d)
        p, q = log_p.exp(), log_q.exp()
        value = 0.5 * ((p * (d - f)).sum(-1) - (q * f).sum(-1))
        if need_grad:
            c = -0.5 * f
            grad = q * (c - (q * c).sum(-1, keepdim=True))
        else:
            grad = None
    else:
        raise ValueError(f"kd_loss {kind!r}: choose from {list(KD_LOSSES)}")
    return value, grad


class _Divergence(torch.autograd.Function):
    """Per-row divergence of the student's logits from the teacher's at temperature ``T``; the
    gradient reaches the student's logits only."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float):
        if temperature != 1.0:
            student, teacher = student / temperature, teacher / temperature
        log_q = F.log_softmax(student, dim=-1)
        log_p = F.log_softmax(teacher, dim=-1)
        value, _ = _divergence_and_grad(log_q, log_p, kind, need_grad=False)
        ctx.save_for_backward(log_q, log_p)
        ctx.kind, ctx.temperature = kind, temperature
        return value

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):
        log_q, log_p = ctx.saved_tensors
        _, grad = _divergence_and_grad(log_q, log_p, ctx.kind, need_grad=True)
        return grad * (grad_value.unsqueeze(-1) / ctx.temperature), None, None, None


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: KDLoss = "forward_kl",
               temperature: float = 1.0) -> torch.Tensor:
    """The divergence ``kind`` between the teacher's and the student's next-token distributions at
    ``temperature``, per row (the last dimension is the vocabulary), in the logits' dtype (use
    float32 or float64). Differentiable in ``student_logits``; ``teacher_logits`` is a constant."""
    if kind not in KD_LOSSES:
        raise ValueError(f"kd_loss {kind!r}: choose from {list(KD_LOSSES)}")
    if not temperature > 0:
        raise ValueError(f"kd_temperature must be positive, got {temperature}")
    return _Divergence.apply(student_logits, teacher_logits.detach(), kind, float(temperature))


# --------------------------------------------------------------------------- the chunked loss
@dataclass
class DistillLoss:
    """One micro-batch's distillation objective and its parts.

    Attributes:
        loss: ``(1 − kd_ratio)·ce + kd_ratio·T²·kd`` (differentiable).
        ce: the mean NLL over the supervised positions (0 when there are none).
        kd: the mean divergence over the distillation positions, at ``T``, without ``T²``.
        ce_count: supervised positions.
        kd_count: distillation positions.
        hidden: the hidden-state loss ``H`` when it is part of ``loss`` (:meth:`with_hidden`), else ``None``.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    ce_count: int
    kd_count: int
    hidden: torch.Tensor | None = None

    def with_hidden(self, hidden: torch.Tensor, weight: float) -> DistillLoss:
        """The same terms with ``weight · hidden`` added to ``loss``."""
        return DistillLoss(loss=self.loss + weight * hidden, ce=self.ce, kd=self.kd, ce_count=self.ce_count,
                           kd_count=self.kd_count, hidden=hidden)


def _frozen_linear(head: nn.Module) -> bool:
    """A plain ``nn.Linear`` with frozen, unsharded weights: its input gradient can be formed in the
    forward pass (:class:`_FrozenHeadsTerms`)."""
    from torch.distributed.tensor import DTensor

    if type(head) is not nn.Linear:
        return False
    return not any(p.requires_grad or isinstance(p, DTensor) for p in (head.weight, head.bias) if p is not None)


class _FrozenHeadsTerms(torch.autograd.Function):
    """The CE and divergence sums of all chunks for frozen plain-``Linear`` heads, with the gradient
    with respect to the student's hidden states formed chunk by chunk in the forward pass.

    Per chunk: both heads' logits, the two sums and, when a gradient is wanted, ``∂/∂logits`` of each
    sum (softmax − one-hot for the CE, the closed forms of :func:`_divergence_and_grad` for the
    divergence) times the head's weight: two ``[positions, hidden]`` tensors are kept, nothing
    vocabulary-sized. The backward pass only combines them with the incoming gradients: no head runs
    again (a checkpointed recompute would run both heads once more per chunk).
    """

    @staticmethod
    def forward(ctx, s_rows, t_rows, weight, bias, t_weight, t_bias, labels, kd_weight, kind: str,
                temperature: float, size: int, chunks: int, ignore_index: int, need_grad: bool):
        n = int(s_rows.shape[0])
        work = torch.promote_types(weight.dtype, torch.float32)
        ce_sum = torch.zeros((), dtype=work, device=s_rows.device)
        kd_sum = torch.zeros((), dtype=work, device=s_rows.device)
        grad_ce = torch.zeros_like(s_rows) if need_grad else None
        grad_kd = torch.zeros_like(s_rows) if need_grad else None
        for i in range(chunks):
            lo, hi = min(i * size, n), min((i + 1) * size, n)
            if hi <= lo:
                continue
            logits = F.linear(s_rows[lo:hi], weight, bias).to(work)
            target, w = labels[lo:hi], kd_weight[lo:hi].to(work)
            supervised = target != ignore_index
            log_probs = F.log_softmax(logits, dim=-1)
            picked = log_probs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            ce_sum -= torch.where(supervised, picked, torch.zeros_like(picked)).sum()
            teacher = F.linear(t_rows[lo:hi], t_weight, t_bias).to(work)
            if temperature != 1.0:
                log_q = F.log_softmax(logits / temperature, dim=-1)
                teacher = teacher / temperature
            else:
                log_q = log_probs
            del logits
            log_p = F.log_softmax(teacher, dim=-1)
            del teacher
            value, grad = _divergence_and_grad(log_q, log_p, kind, need_grad)
            del log_p, log_q
            kd_sum += (value * w).sum()
            if need_grad:
                grad_kd[lo:hi] = (grad * (w / temperature).unsqueeze(1)).to(weight.dtype) @ weight
                del grad
                probs = log_probs.exp_()  # ∂CE/∂logits = softmax − one-hot, on supervised rows
                probs.scatter_add_(1, target.clamp(min=0).unsqueeze(1),
                                   torch.full((hi - lo, 1), -1.0, dtype=work, device=probs.device))
                probs.mul_(supervised.to(work).unsqueeze(1))
                grad_ce[lo:hi] = probs.to(weight.dtype) @ weight
            del log_probs
        ctx.save_for_backward(grad_ce, grad_kd)
        return ce_sum, kd_sum

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        grad_ce, grad_kd = ctx.saved_tensors
        grad = grad_ce * g_ce.to(grad_ce.dtype) + grad_kd * g_kd.to(grad_kd.dtype)
        return grad, *([None] * 13)


def _head_size(head: nn.Module) -> int:
    size = getattr(head, "out_features", None)
    if size is None:
        size = head.weight.shape[0]
    return int(size)


def _chunk_terms(student_head: nn.Module, teacher_head: nn.Module, kind: str, temperature: float,
                 ignore_index: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def terms(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
              kd_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = student_head(student_hidden)
        work = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least; float64 stays float64
        logits = logits.to(work)
        ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        with torch.no_grad():
            teacher = teacher_head(teacher_hidden).to(work)
        kd = (divergence(logits, teacher, kind, temperature) * kd_weight.to(work)).sum()
        return ce, kd

    return terms


def distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    kd_ratio: float = 0.5,
    kind: KDLoss = "forward_kl",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    min_chunks: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> DistillLoss:
    """``(1 − kd_ratio)·CE + kd_ratio·T²·D`` of one micro-batch, computed in position chunks.

    Args:
        student_hidden: the student's final (post-norm) hidden states, ``[batch, length, hidden]``.
        teacher_hidden: the teacher's, same batch and length (any hidden size; no gradient).
        student_head: the student's LM head (hidden → vocabulary logits).
        teacher_head: the teacher's LM head; called under ``no_grad``. Same vocabulary size.
        labels: ``[batch, length]``, ``ignore_index`` where nothing is supervised (unshifted: the
            label at ``t + 1`` is the target of position ``t``).
        mask: the distillation positions on the shifted frame, ``[batch, length − 1]`` (:func:`kd_mask`).
        kd_ratio: the weight of the divergence; ``1 − kd_ratio`` that of the CE.
        kind: the divergence (:data:`KD_LOSSES`).
        temperature: ``T``; both distributions are softened by it, and the divergence is scaled by ``T²``.
        chunk_size: positions per chunk; ``None``: :data:`CHUNK_ELEMENTS` / vocabulary size.
        min_chunks: at least this many chunks (empty ones if need be). Under FSDP2 every head call
            is a collective: every rank must make the same number of them.
        ignore_index: the label of unsupervised positions.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must lie in [0, 1], got {kd_ratio}")
    vocab = _head_size(student_head)
    if _head_size(teacher_head) != vocab:
        raise ValueError(f"the teacher's head gives {_head_size(teacher_head)} logits, the student's {vocab}")
    targets = labels[:, 1:]
    supervised = targets != ignore_index
    rows = supervised | mask  # the CE's positions and the divergence's, each chunk serving both
    s_rows = student_hidden[:, :-1][rows]
    t_rows = teacher_hidden[:, :-1][rows].detach()
    y_rows = targets[rows]
    w_rows = mask[rows]
    ce_count, kd_count = int(supervised.sum()), int(mask.sum())
    n = int(s_rows.shape[0])
    size = max(1, int(chunk_size) if chunk_size else CHUNK_ELEMENTS // max(1, vocab))
    chunks = max(-(-n // size), int(min_chunks))
    if kind not in KD_LOSSES:
        raise ValueError(f"kd_loss {kind!r}: choose from {list(KD_LOSSES)}")
    if _frozen_linear(student_head) and _frozen_linear(teacher_head):
        ce_sum, kd_sum = _FrozenHeadsTerms.apply(
            s_rows, t_rows, student_head.weight, student_head.bias, teacher_head.weight, teacher_head.bias,
            y_rows, w_rows, kind, float(temperature), size, chunks, ignore_index,
            torch.is_grad_enabled() and s_rows.requires_grad)
        return _combined(ce_sum, kd_sum, ce_count, kd_count, kd_ratio, temperature)
    terms = _chunk_terms(student_head, teacher_head, kind, temperature, ignore_index)
    recompute = torch.is_grad_enabled() and s_rows.requires_grad
    ce_sum = kd_sum = None
    for i in range(chunks):
        lo, hi = min(i * size, n), min((i + 1) * size, n)
        args = (s_rows[lo:hi], t_rows[lo:hi], y_rows[lo:hi], w_rows[lo:hi])
        if recompute:  # nothing of the chunk is kept for backward: it runs again there
            from torch.utils.checkpoint import checkpoint

            ce, kd = checkpoint(terms, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            ce, kd = terms(*args)
        ce_sum = ce if ce_sum is None else ce_sum + ce
        kd_sum = kd if kd_sum is None else kd_sum + kd
    if ce_sum is None:  # nothing to score: zeros that keep the graph
        ce_sum = kd_sum = student_hidden.sum() * 0.0
    return _combined(ce_sum, kd_sum, ce_count, kd_count, kd_ratio, temperature)


def _combined(ce_sum: torch.Tensor, kd_sum: torch.Tensor, ce_count: int, kd_count: int, kd_ratio: float,
              temperature: float) -> DistillLoss:
    ce = ce_sum / max(ce_count, 1)
    kd = kd_sum / max(kd_count, 1)
    loss = (1.0 - kd_ratio) * ce + (kd_ratio * temperature**2) * kd
    return DistillLoss(loss=loss, ce=ce, kd=kd, ce_count=ce_count, kd_count=kd_count)


# --------------------------------------------------------------------------- hidden states
@contextlib.contextmanager
def layer_outputs(layers: Sequence[nn.Module],
                  select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Collect the output hidden states of ``layers`` (decoder layers) during the forward passes
    run inside the block, in call order; ``select`` maps each before it is kept (e.g. to the
    distillation positions only). The hooks are removed on exit, before any backward pass that
    would run a checkpointed layer again."""
    kept: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        kept.append(select(hidden) if select is not None else hidden)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over layers of the mean squared difference between matching hidden states (each
    ``[positions, hidden]``), in float32 at least; the teacher's are constants. 0 for no positions."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student layers against {len(teacher)} teacher layers")
    if not student:
        raise ValueError("no hidden states to compare")
    total = None
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"hidden states of shape {tuple(s.shape)} against {tuple(t.shape)}")
        work = torch.promote_types(s.dtype, torch.float32)
        diff = s.to(work) - t.detach().to(work)
        term = diff.square().mean() if diff.numel() else diff.sum() * 0.0
        total = term if total is None else total + term
    return total / len(student)


def chunk_count(positions: int, vocab: int, chunk_size: int | None = None) -> int:
    """The chunks :func:`distillation_loss` cuts ``positions`` rows into (for agreeing on a count)."""
    size = max(1, int(chunk_size) if chunk_size else CHUNK_ELEMENTS // max(1, vocab))
    return math.ceil(positions / size)
