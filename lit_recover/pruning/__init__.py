"""Structural pruning of LLaMA-family decoders (attention heads and MLP channels)."""

from lit_recover.models.anatomy import layer_shapes
from lit_recover.pruning.importance import CRITERIA, read_calibration_texts
from lit_recover.pruning.pruner import count_parameters, default_layer_range, prune_model
from lit_recover.pruning.structure import prune_attention_groups, prune_mlp_channels

__all__ = [
    "CRITERIA",
    "count_parameters",
    "default_layer_range",
    "layer_shapes",
    "prune_attention_groups",
    "prune_mlp_channels",
    "prune_model",
    "read_calibration_texts",
]
