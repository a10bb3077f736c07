"""Checks of a loaded model: the decoder's shapes fit together, and one forward runs.

Each failure is a ``PrunedModelError`` naming the source and the first layer at fault.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_recover.errors import LitRecoverError
from lit_recover.models.anatomy import attention_head_counts, decoder_layers, set_attention_attributes


class PrunedModelError(LitRecoverError, ValueError):
    """A model file that cannot be used, with a one-line reason naming the file."""


def check_structure(model: nn.Module, source: str = "model") -> None:
    """Check every decoder layer's projection shapes fit together; name the first layer that doesn't."""
    try:
        layers = decoder_layers(model)
    except ValueError as exc:
        raise PrunedModelError(f"{source}: {exc}") from exc
    hidden = model.get_input_embeddings().weight.shape[1]
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        q_heads, kv_heads, head_dim = attention_head_counts(attn)
        problems = []
        if attn.q_proj.out_features != q_heads * head_dim or q_heads == 0:
            problems.append(f"q_proj out {attn.q_proj.out_features} is not a multiple of head_dim {head_dim}")
        if attn.k_proj.out_features != attn.v_proj.out_features:
            problems.append(f"k_proj out {attn.k_proj.out_features} != v_proj out {attn.v_proj.out_features}")
        if kv_heads == 0 or q_heads % kv_heads:
            problems.append(f"{q_heads} query heads do not split into {kv_heads} KV groups")
        if attn.o_proj.in_features != attn.q_proj.out_features:
            problems.append(f"o_proj in {attn.o_proj.in_features} != q_proj out {attn.q_proj.out_features}")
        for name in ("q_proj", "k_proj", "v_proj"):
            if getattr(attn, name).in_features != hidden:
                problems.append(f"{name} in {getattr(attn, name).in_features} != hidden size {hidden}")
        if attn.o_proj.out_features != hidden:
            problems.append(f"o_proj out {attn.o_proj.out_features} != hidden size {hidden}")
        if not (mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features):
            problems.append(
                f"MLP widths gate {mlp.gate_proj.out_features}, up {mlp.up_proj.out_features}, "
                f"down in {mlp.down_proj.in_features} differ"
            )
        if problems:
            raise PrunedModelError(f"{source}: layer {i} shapes don't fit: " + "; ".join(problems))
        if not problems and kv_heads and not q_heads % kv_heads:
            set_attention_attributes(attn)


@torch.no_grad()
def check_forward(model: nn.Module, tokenizer, source: str = "model") -> None:
    """One short padded forward; an error names the decoder layer that failed."""
    layers = decoder_layers(model)
    entered: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, i=i: entered.append(i)) for i, layer in enumerate(layers)]
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 7]], device=device) % model.get_input_embeddings().weight.shape[0]
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], device=device)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=mask)
    except Exception as exc:
        where = f"layer {entered[-1]}" if entered else "the embedding"
        raise PrunedModelError(f"{source}: forward fails in {where}: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not torch.isfinite(out.logits.float()).all():
        raise PrunedModelError(f"{source}: forward gives non-finite logits")
