"""A memory-lean forward for PEFT's LoRA ``Linear`` layers: the same math, fewer saved activations.

PEFT computes a LoRA branch as ``lora_B(lora_A(dropout(x))) * scaling``. For the backward pass autograd
then keeps, per adapted layer, the dropout's noise and the dropped-out input: two full-size copies of
``x`` (on CPU the noise is a float tensor), although ``q_proj``, ``k_proj`` and ``v_proj`` (and
``gate_proj``, ``up_proj``) read one and the same ``x``. With LoRA on all seven projections of a LLaMA
layer that is about half of the layer's activation memory.

``LoRABranch`` keeps the input ``x`` itself (one reference, shared by the layers that read it) and the
dropout mask as booleans (1 byte per element), and recomputes the dropped-out input in the backward
pass. The mask is ``torch.rand(x.shape) < 1 - p`` from the global generator: the distribution of
``nn.Dropout`` (each element kept with probability ``1 - p``, then scaled by ``1 / (1 - p)``), drawn
about 3x faster than ``bernoulli_`` on CPU, where drawing the masks of seven projections is ~10 % of a
step. Given the same masks, outputs and gradients equal PEFT's (tested); the draws themselves differ
from ``nn.Dropout``'s, as two seeds do.

``use_lean_lora(model)`` switches the adapted ``Linear`` layers of a PEFT model to it. Layers it cannot
serve take PEFT's own forward: merged or disabled adapters, several active adapters, LoRA variants
(DoRA, ...), per-request ``adapter_names``, and autocast (mixed precision), where PEFT's path runs.
A bfloat16 or float16 base with float32 adapters (the default on CPUs with native bf16) runs here:
the branch computes in float32 from the shared half-precision input, as PEFT's does.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LoRABranch(torch.autograd.Function):
    """``dropout(x) @ A.T @ B.T * scaling`` saving ``x`` (shared), a boolean mask and the rank-r middle.

    Computed in the dtype of the LoRA weights: a bfloat16 or float16 ``x`` (a half-precision base)
    is cast to it as PEFT casts it, but ``x`` is kept for the backward pass as it came (shared by the
    layers that read it) and cast again there. The output is in the weights' dtype; its gradient
    to ``x`` comes back in ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, mask, keep_scale: float, scaling: float):
        compute = weight_a.dtype
        xc = x.to(compute)
        dropped = xc if mask is None else xc * _noise(mask, keep_scale, compute)
        middle = F.linear(dropped, weight_a)
        out = F.linear(middle, weight_b).mul_(scaling)
        ctx.save_for_backward(x, weight_a, weight_b, mask, middle)
        ctx.keep_scale, ctx.scaling = keep_scale, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_a, weight_b, mask, middle = ctx.saved_tensors
        compute = weight_a.dtype
        grad_out = grad_out.to(compute) * ctx.scaling
        grad_middle = grad_out @ weight_b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).t() @ middle.reshape(-1, middle.shape[-1])
        noise = None if mask is None else _noise(mask, ctx.keep_scale, compute)
        if ctx.needs_input_grad[1]:
            xc = x.to(compute)
            dropped = xc if noise is None else xc * noise
            grad_a = grad_middle.reshape(-1, grad_middle.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_middle @ weight_a
            if noise is not None:
                grad_x = grad_x.mul_(noise)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, grad_b, None, None, None


_HALF = (torch.float16, torch.bfloat16)


def _noise(mask: torch.Tensor, keep_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier (0 or ``1 / (1 - p)``) from the boolean mask.

    Through a ``uint8`` view: converting that to float is ~5x faster on CPU than converting the
    booleans, and ``float * float`` ~10x faster than ``float * bool``.
    """
    return mask.view(torch.uint8).to(dtype).mul_(keep_scale)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's keep mask for ``x``: each element ``True`` with probability ``1 - p``, independently."""
    return torch.rand(x.shape, device=x.device) < (1.0 - p)


def _dropout_p(dropout: nn.Module) -> float | None:
    """The drop probability of an active dropout, 0 for none, ``None`` for a module this path cannot mimic."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout and not dropout.inplace:
        return float(dropout.p) if dropout.training else 0.0
    return None


def _lean_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``peft.tuners.lora.layer.Linear.forward`` for one plain adapter, through ``LoRABranch``."""
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    plain = (
        not args and not kwargs and not self.disable_adapters and not self.merged and len(adapters) == 1
        and adapters[0] not in self.lora_variant and not torch.is_autocast_enabled(x.device.type)
    )
    p = _dropout_p(self.lora_dropout[adapters[0]]) if plain else None
    lora_a = self.lora_A[adapters[0]].weight if plain else None
    lora_b = self.lora_B[adapters[0]].weight if plain else None
    # a half-precision base (x) with float32 adapters runs here too: the branch computes in float32
    if p is None or lora_b.dtype != lora_a.dtype or not (lora_a.dtype == x.dtype or x.dtype in _HALF):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    mask = keep_mask(x, p) if p > 0.0 else None
    branch = LoRABranch.apply(x, lora_a, lora_b, mask, 1.0 / (1.0 - p), self.scaling[adapters[0]])
    # as PEFT: the sum in the promoted dtype, then back to the base layer's output dtype
    return (result + branch).to(result.dtype)


def use_lean_lora(model: nn.Module) -> int:
    """Route the LoRA ``Linear`` layers of a PEFT model through ``LoRABranch``; returns how many.

    The switch lives on the layer instances: ``merge_and_unload`` replaces them by their base layers,
    so merged models carry nothing of it.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
