"""Structural pruning of LLaMA-family decoders (attention heads and MLP channels)."""

from lit_recover.pruning.structure import (
    layer_shapes,
    prune_attention_groups,
    prune_mlp_channels,
)

__all__ = ["layer_shapes", "prune_attention_groups", "prune_mlp_channels"]
