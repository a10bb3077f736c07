"""Fused frozen projections: one matmul for q/k/v and one for gate/up per decoder layer, LoRA unchanged.

A LLaMA layer reads one input into three frozen projections (``q_proj``, ``k_proj``, ``v_proj``) and
another into two (``gate_proj``, ``up_proj``). :func:`fuse_projections` concatenates each group's
frozen base weights into one ``[Σ out, in]`` tensor per layer and points every member's weight at its
rows of it (a view: the weights are not copied twice, and what the module's parameters show is what
the fused matmul reads). The first member called with an input computes ``x @ Wᵀ`` for the whole
group and splits it; the others, called with the same input (the same tensor object), take their part.
The backward pass then also runs one input-gradient matmul per group instead of three (two).

Only the base layer's matmul is shared. Each LoRA branch stays its own adapter with its own ``A``
and ``B`` (PEFT's or the lean forward, :mod:`lit_recover.lora`), added to its member's part of the
fused output: the adapter files, merging and checkpoints see the same modules and names as without
fusion. Grouped-query attention (narrower ``k``/``v``) and uneven per-layer widths are just other row
counts.

Memory: the fused weights replace the separate ones (the same bytes; one group's worth is copied
transiently while fusing). Weights read from a memory-mapped file (``mmap_weights``) move from the
shared page cache into the process's own memory by fusing; a cast base (``bfloat16``) is the process's
own copy already.

Falls back to the member's own matmul, with the same result, whenever a group is not what it was
fused as: weights replaced (merged, cast, moved: fused again lazily where they are plain frozen
tensors of one dtype and device, else left alone), sharded (FSDP2: :func:`unfuse_projections` before
sharding), weights that require grad, and inside ``torch.compile`` tracing. Call
:func:`unfuse_projections` before pickling or saving the model: it gives every weight its own storage
again and removes the patched forwards.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_GROUP = ("q_proj", "k_proj", "v_proj")
MLP_GROUP = ("gate_proj", "up_proj")


class ProjectionGroup:
    """The frozen ``nn.Linear`` layers of one group that read one input, fused into one weight."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.linears = linears
        self.sizes = [int(lin.out_features) for lin in linears]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None
        self.fused_calls = 0  # group matmuls run (for tests and logs)

    # --- fusing -----------------------------------------------------------------------------
    def eligible(self) -> bool:
        """Plain frozen tensors of one dtype and device, biases all present or all absent."""
        from torch.distributed.tensor import DTensor

        weights = [lin.weight for lin in self.linears]
        biases = [lin.bias for lin in self.linears]
        if any(isinstance(w, DTensor) or w.requires_grad for w in weights):
            return False
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return False
        if any(b is not None for b in biases):
            if any(b is None or isinstance(b, DTensor) or b.requires_grad for b in biases):
                return False
        return True

    def fuse(self) -> bool:
        """Concatenate the weights (and biases) and make each member's a view of its rows; ``False``
        when the group is not :meth:`eligible`."""
        self._pending = None
        if not self.eligible():
            self.weight = self.bias = None
            return False
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([lin.weight.detach() for lin in self.linears], dim=0)
            bias = None
            if self.linears[0].bias is not None:
                bias = torch.cat([lin.bias.detach() for lin in self.linears], dim=0)
            start = 0
            for lin, size in zip(self.linears, self.sizes, strict=True):
                lin.weight.data = weight[start:start + size]
                if bias is not None:
                    lin.bias.data = bias[start:start + size]
                start += size
        self.weight, self.bias = weight, bias
        return True

    def is_fused(self) -> bool:
        """Every member's weight (and bias) is still its rows of the fused tensor."""
        if self.weight is None:
            return False
        from torch.distributed.tensor import DTensor

        step = self.weight.stride(0) * self.weight.element_size()
        base = self.weight.data_ptr()
        start = 0
        for lin, size in zip(self.linears, self.sizes, strict=True):
            w = lin.weight
            if isinstance(w, DTensor) or w.requires_grad or w.dtype != self.weight.dtype \
                    or w.device != self.weight.device or w.data_ptr() != base + start * step \
                    or tuple(w.shape) != (size, self.weight.shape[1]):
                return False
            if (lin.bias is None) != (self.bias is None):
                return False
            if self.bias is not None and lin.bias.data_ptr() != self.bias.data_ptr() + start * self.bias.element_size():
                return False
            start += size
        return True

    def unfuse(self) -> None:
        """Give every member's weight (and bias) its own storage again; the fused tensor is dropped."""
        self._pending = None
        if self.weight is None:
            return
        shared = {t.untyped_storage().data_ptr() for t in (self.weight, self.bias) if t is not None}
        with torch.inference_mode(False), torch.no_grad():
            for lin in self.linears:
                for p in (lin.weight, lin.bias):
                    # a member still reading the fused tensor (not replaced by a merge or a cast)
                    if p is not None and p.untyped_storage().data_ptr() in shared:
                        p.data = p.data.clone()
        self.weight = self.bias = None

    # --- the forward --------------------------------------------------------------------------
    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for ``x``: its part of the group's matmul."""
        lin = self.linears[index]
        if torch.compiler.is_compiling():
            return F.linear(x, lin.weight, lin.bias)
        pending = self._pending
        grad = torch.is_grad_enabled()
        if pending is not None and pending["x"]() is x and pending["version"] == x._version \
                and pending["grad"] == grad and index not in pending["taken"]:
            pending["taken"].add(index)
            if len(pending["taken"]) == len(self.linears):
                self._pending = None
            return pending["outputs"][index]
        if not self.is_fused() and not (self.weight is not None and self.eligible() and self.fuse()):
            return F.linear(x, lin.weight, lin.bias)
        outputs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.fused_calls += 1
        self._pending = {"x": weakref.ref(x), "version": x._version, "grad": grad, "outputs": outputs,
                         "taken": {index}}
        return outputs[index]


def _member_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self._fused_group.output(self._fused_index, x)


def _base_linear(module: nn.Module) -> nn.Linear | None:
    """The frozen ``nn.Linear`` a projection computes with: itself, or a LoRA layer's base layer."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base if type(base) is nn.Linear else None


def projection_groups(model: nn.Module) -> list[ProjectionGroup]:
    """The fused groups installed in ``model`` (empty when it is not fused)."""
    groups: list[ProjectionGroup] = []
    for module in model.modules():
        group = module.__dict__.get("_fused_group")
        if group is not None and module.__dict__.get("_fused_index") == 0:
            groups.append(group)
    return groups


def fuse_projections(model: nn.Module) -> int:
    """Fuse every decoder layer's q/k/v and gate/up base projections of ``model`` (a causal LM, PEFT
    wrapper or not); returns the number of groups fused. Groups whose members cannot be fused
    (a base layer that is not a plain ``nn.Linear``, trainable or mixed-dtype weights) are left as they are."""
    from lit_recover.models.anatomy import decoder_layers

    count = 0
    for layer in decoder_layers(model):
        for parent, names in ((getattr(layer, "self_attn", None), ATTENTION_GROUP),
                              (getattr(layer, "mlp", None), MLP_GROUP)):
            if parent is None or not all(hasattr(parent, n) for n in names):
                continue
            linears = [_base_linear(getattr(parent, n)) for n in names]
            if any(lin is None or "_fused_group" in lin.__dict__ for lin in linears):
                continue
            group = ProjectionGroup(linears)
            if not group.fuse():
                continue
            for index, lin in enumerate(linears):
                lin._fused_group = group
                lin._fused_index = index
                lin.forward = types.MethodType(_member_forward, lin)
            count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: separate weights again, the ``nn.Linear`` forward restored
    (a model that can be pickled and saved); returns the number of groups undone."""
    count = 0
    for module in list(model.modules()):
        group = module.__dict__.get("_fused_group")
        if group is None:
            continue
        if module.__dict__.get("_fused_index") == 0:
            group.unfuse()
            count += 1
        for attr in ("_fused_group", "_fused_index", "forward"):
            module.__dict__.pop(attr, None)
    return count
