"""Shape surgery on LLaMA-style decoder layers: slicing attention KV groups and MLP channels.

What a layer is made of (head counts, widths, the attributes each transformers release reads) is
``lit_recover.models.anatomy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lit_recover.models.anatomy import attention_head_counts, set_attention_attributes


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim=0: outputs) or columns (dim=1: inputs) ``keep``."""
    weight = linear.weight.data.index_select(dim, keep.to(linear.weight.device)).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.data if dim == 1 else linear.bias.data.index_select(0, keep.to(linear.bias.device))
        new.bias.data.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def prune_attention_groups(attn: nn.Module, keep_groups: Sequence[int]) -> None:
    """Keep the KV heads ``keep_groups`` and, with each, the query heads that read it.

    With multi-head attention every group is one head, so this is plain head pruning; with GQA
    the query heads of a group go together with their KV head, which keeps the layer consistent.
    """
    q_heads, kv_heads, head_dim = attention_head_counts(attn)
    groups = q_heads // kv_heads
    keep_groups = sorted(set(int(g) for g in keep_groups))
    if not keep_groups or keep_groups[0] < 0 or keep_groups[-1] >= kv_heads:
        raise ValueError(f"keep_groups {keep_groups} out of range for {kv_heads} KV heads")
    kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in keep_groups])
    q_rows = torch.cat([
        torch.arange(h * head_dim, (h + 1) * head_dim)
        for g in keep_groups for h in range(g * groups, (g + 1) * groups)
    ])
    attn.q_proj = _slice_linear(attn.q_proj, q_rows, 0)
    attn.k_proj = _slice_linear(attn.k_proj, kv_rows, 0)
    attn.v_proj = _slice_linear(attn.v_proj, kv_rows, 0)
    attn.o_proj = _slice_linear(attn.o_proj, q_rows, 1)
    set_attention_attributes(attn)


def prune_mlp_channels(mlp: nn.Module, keep: Sequence[int]) -> None:
    """Keep the intermediate channels ``keep`` of a gated (SwiGLU) MLP."""
    idx = torch.as_tensor(sorted(set(int(i) for i in keep)), dtype=torch.long)
    if idx.numel() == 0 or idx[-1] >= mlp.gate_proj.out_features:
        raise ValueError(f"cannot keep {idx.numel()} channels of {mlp.gate_proj.out_features}")
    mlp.gate_proj = _slice_linear(mlp.gate_proj, idx, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, idx, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, idx, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(idx.numel())
