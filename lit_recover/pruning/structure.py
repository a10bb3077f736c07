"""Shape surgery on LLaMA-style decoder layers.

The pruned layers keep the module classes of the installed transformers release, so that a
pruned model is an ordinary model object whose layers simply have different widths. What each
transformers release reads at forward time differs: 5.x infers the head count from the projection
width and only needs ``head_dim`` and ``num_key_value_groups``; 4.3x/4.4x read ``num_heads``,
``num_key_value_heads`` and ``hidden_size`` off the attention module. We set every attribute that
exists so the same pruned model runs on both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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


def attention_head_counts(attn: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` read off the projection shapes."""
    head_dim = int(attn.head_dim)
    q_heads = attn.q_proj.out_features // head_dim
    kv_heads = attn.k_proj.out_features // head_dim
    return q_heads, kv_heads, head_dim


def set_attention_attributes(attn: nn.Module) -> None:
    """Set the head-count attributes every supported transformers release reads."""
    q_heads, kv_heads, head_dim = attention_head_counts(attn)
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"attention with {q_heads} query heads and {kv_heads} KV heads is not a valid GQA layout")
    attn.num_key_value_groups = q_heads // kv_heads
    for name, value in (("num_heads", q_heads), ("num_key_value_heads", kv_heads), ("hidden_size", q_heads * head_dim)):
        if hasattr(attn, name):
            setattr(attn, name, value)


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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA-family causal LM (also through a PEFT wrapper)."""
    inner = model
    for attr in ("base_model", "model"):
        # PeftModel -> LoraModel -> LlamaForCausalLM -> LlamaModel
        while hasattr(inner, attr) and not hasattr(inner, "layers"):
            inner = getattr(inner, attr)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layers (model.model.layers) to read")
    return inner.layers


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per-layer widths: query heads, KV heads, head_dim and MLP intermediate size."""
    shapes = []
    for layer in decoder_layers(model):
        q_heads, kv_heads, head_dim = attention_head_counts(layer.self_attn)
        shapes.append({
            "num_attention_heads": q_heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "intermediate_size": int(layer.mlp.gate_proj.out_features),
        })
    return shapes
