"""The anatomy of a LLaMA-family decoder: its layers, head counts and per-layer widths.

The pruned layers keep the module classes of the installed transformers release, so that a
pruned model is an ordinary model object whose layers simply have different widths. What each
transformers release reads at forward time differs: 5.x infers the head count from the projection
width and only needs ``head_dim`` and ``num_key_value_groups``; 4.3x/4.4x read ``num_heads``,
``num_key_value_heads`` and ``hidden_size`` off the attention module. ``set_attention_attributes``
sets every attribute that exists so the same pruned model runs on both.
"""

from __future__ import annotations

from torch import nn


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
