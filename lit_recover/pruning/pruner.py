"""LLM-Pruner-style block-wise structural pruning of LLaMA-family models, to a target parameter ratio.

What is pruned: in the decoder layers of two ranges, attention KV groups (each KV head with the
query heads that read it, so GQA stays consistent and ``head_dim`` is unchanged) and MLP
intermediate channels. Hidden size, embeddings, norms and the LM head are untouched, so layers end
up with uneven widths exactly like LLM-Pruner's ``pruned_model.bin``.

The layer ranges follow LLM-Pruner's ``block_{attention,mlp}_layer_{start,end}`` (end exclusive).
Its 7B recipe prunes layers 4..29 of 32 (``start=4, end=30``), keeping the first four layers and the
last two dense because they are the most sensitive. ``default_layer_range`` scales that to any depth:
``start = round(L/8)``, ``end = L - round(L/16)``, clipped so that at least the first and the last
layer stay dense (30 layers: 4..27; 4 layers: 1..2).

How much: ``pruning_ratio`` is the fraction of *all* parameters of the model to remove (what
LLM-Pruner reports as "#Param before/after"), not LLM-Pruner's per-layer sparsity. Every pruned
layer gets the same fraction ``f = target / (prunable parameters of the pruned blocks)``: attention
removes ``round(f * kv_heads)`` whole KV groups per layer (never the last one), and the MLP channels
absorb the rounding, spread over the pruned MLPs in proportion to their width, so the total hits the
target to within one channel's parameters (``3 * hidden``). Which groups and channels go is decided
per layer by the importance criterion (``lit_recover.pruning.importance``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_recover.errors import ConfigError
from lit_recover.models.anatomy import attention_head_counts, decoder_layers, layer_shapes
from lit_recover.pruning.importance import (
    BUILTIN_CALIBRATION_TEXTS,
    CRITERIA,
    Criterion,
    accumulate_gradients,
    attention_group_scores,
    calibration_batches,
    mlp_channel_scores,
)
from lit_recover.pruning.structure import prune_attention_groups, prune_mlp_channels

log = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> int:
    """All parameters, tied ones (embedding = LM head) counted once, as ``model.parameters()`` yields them."""
    return sum(p.numel() for p in model.parameters())


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """``(start, end)`` of the layers to prune: LLM-Pruner's 4..30-of-32 scaled to ``num_layers``."""
    start = max(1, round(num_layers / 8))
    end = min(num_layers - 1, num_layers - round(num_layers / 16))
    if start >= end:  # one or two layers: nothing can stay dense
        return 0, num_layers
    return start, end


def attention_group_parameters(attn: nn.Module) -> int:
    """Parameters one KV group carries: its q/k/v rows (with biases) and its ``o_proj`` columns."""
    _, kv_heads, _ = attention_head_counts(attn)
    total = sum(p.numel() for lin in (attn.q_proj, attn.k_proj, attn.v_proj) for p in lin.parameters())
    return (total + attn.o_proj.weight.numel()) // kv_heads


def mlp_channel_parameters(mlp: nn.Module) -> int:
    """Parameters one intermediate channel carries: gate/up rows (with biases) and a ``down_proj`` column."""
    total = sum(p.numel() for lin in (mlp.gate_proj, mlp.up_proj) for p in lin.parameters())
    return (total + mlp.down_proj.weight.numel()) // mlp.gate_proj.out_features


def _spread(total: int, widths: Sequence[int]) -> list[int]:
    """Split ``total`` removals over layers in proportion to ``widths``, each below its width."""
    caps = [w - 1 for w in widths]
    counts = [0] * len(widths)
    left = total
    while left > 0:
        open_ = [i for i in range(len(widths)) if counts[i] < caps[i]]
        if not open_:
            break
        room = sum(widths[i] for i in open_)
        exact = {i: left * widths[i] / room for i in open_}
        add = {i: min(caps[i] - counts[i], math.floor(exact[i])) for i in open_}
        rest = left - sum(add.values())
        # Largest remainders first, lower layer index on ties: deterministic.
        for i in sorted(open_, key=lambda i: (-(exact[i] - math.floor(exact[i])), i)):
            if rest == 0:
                break
            if counts[i] + add[i] < caps[i]:
                add[i] += 1
                rest -= 1
        for i, a in add.items():
            counts[i] += a
        if sum(add.values()) == 0:
            break
        left -= sum(add.values())
    return counts


def plan_removal(
    model: nn.Module,
    pruning_ratio: float,
    attention_layers: Sequence[int],
    mlp_layers: Sequence[int],
) -> tuple[dict[int, int], dict[int, int], int]:
    """How many KV groups and MLP channels each layer loses to remove ``pruning_ratio`` of all parameters.

    Returns:
        ``(groups removed per layer, channels removed per layer, target parameter count removed)``.
    """
    layers = decoder_layers(model)
    target = round(pruning_ratio * count_parameters(model))
    kv = {i: attention_head_counts(layers[i].self_attn)[1] for i in attention_layers}
    a = {i: attention_group_parameters(layers[i].self_attn) for i in attention_layers}
    width = {i: layers[i].mlp.gate_proj.out_features for i in mlp_layers}
    m = {i: mlp_channel_parameters(layers[i].mlp) for i in mlp_layers}
    prunable = sum(kv[i] * a[i] for i in kv) + sum(width[i] * m[i] for i in width)
    most = sum((kv[i] - 1) * a[i] for i in kv) + sum((width[i] - 1) * m[i] for i in width)
    if target > most:
        total = count_parameters(model)
        raise ConfigError(
            f"pruning_ratio {pruning_ratio} asks to remove {target} parameters, but layers "
            f"{_span(attention_layers)} (attention) and {_span(mlp_layers)} (MLP) can give at most {most} "
            f"({most / total:.4f} of {total}) while keeping one KV group and one channel each; "
            "lower the ratio or widen the layer ranges"
        )
    if target == 0:
        return {i: 0 for i in kv}, {i: 0 for i in width}, 0
    f = target / prunable
    mean_m = sum(m.values()) / len(m) if m else 0.0
    best = None
    # Whole KV groups are coarse (a third of a layer's attention for SmolLM2): try rounding the
    # per-layer group count to nearest, down and up, let the MLP fill the rest, keep the closest.
    for rounding in (round, math.floor, math.ceil):
        groups = {i: min(kv[i] - 1, max(0, int(rounding(f * kv[i])))) for i in kv}
        removed_attn = sum(groups[i] * a[i] for i in kv)
        channels_total = 0
        if m:
            channels_total = min(max(0, round((target - removed_attn) / mean_m)), sum(width.values()) - len(width))
        counts = _spread(channels_total, [width[i] for i in width])
        channels = dict(zip(width, counts))
        error = abs(target - removed_attn - sum(channels[i] * m[i] for i in width))
        if best is None or error < best[0]:
            best = (error, groups, channels)
    _, groups, channels = best
    return groups, channels, target


def _span(indices: Sequence[int]) -> str:
    return f"{indices[0]}..{indices[-1]}" if len(indices) else "none"


def _resolve_range(start: int | None, end: int | None, num_layers: int, name: str) -> tuple[int, int]:
    d_start, d_end = default_layer_range(num_layers)
    start = d_start if start is None else start
    end = d_end if end is None else end
    if not 0 <= start <= end <= num_layers:
        raise ConfigError(f"block_{name}_layer_start/end {start}/{end} must satisfy 0 <= start <= end <= {num_layers}")
    return start, end


def prune_model(
    model: nn.Module,
    tokenizer,
    pruning_ratio: float,
    criterion: Criterion = "taylor",
    block_attention_layer_start: int | None = None,
    block_attention_layer_end: int | None = None,
    block_mlp_layer_start: int | None = None,
    block_mlp_layer_end: int | None = None,
    calibration_texts: Sequence[str] | None = None,
    num_examples: int = 10,
    calibration_seq_len: int = 64,
    micro_batch_size: int = 2,
    seed: int = 42,
) -> dict[str, Any]:
    """Prune ``model`` in place, block-wise, to remove ``pruning_ratio`` of its parameters.

    Args:
        model: a LLaMA-family causal LM (``model.model.layers[i].self_attn/.mlp``), possibly already pruned.
        tokenizer: its tokenizer (for the calibration texts of ``taylor``).
        pruning_ratio: fraction of all parameters to remove, in ``[0, 1)``.
        criterion: ``l1``, ``l2`` (magnitude), ``taylor`` (first-order, needs a backward pass) or ``random``.
        block_attention_layer_start: first layer whose attention is pruned (default: ``default_layer_range``).
        block_attention_layer_end: one past the last such layer.
        block_mlp_layer_start: first layer whose MLP is pruned.
        block_mlp_layer_end: one past the last such layer.
        calibration_texts: texts for ``taylor``; default a few built-in English paragraphs.
        num_examples: calibration windows for ``taylor``.
        calibration_seq_len: tokens per calibration window.
        micro_batch_size: windows per forward/backward when accumulating gradients.
        seed: seed of the ``random`` criterion and of the calibration text order.

    Returns:
        The report: settings, ``params_before``/``params_after``/``params_removed``, ``achieved_ratio``,
        the kept KV groups and channel counts per layer and ``layer_shapes``.
    """
    if not 0.0 <= pruning_ratio < 1.0:
        raise ConfigError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    started = time.perf_counter()
    layers = decoder_layers(model)
    attn_range = _resolve_range(block_attention_layer_start, block_attention_layer_end, len(layers), "attention")
    mlp_range = _resolve_range(block_mlp_layer_start, block_mlp_layer_end, len(layers), "mlp")
    attn_layers, mlp_layers = list(range(*attn_range)), list(range(*mlp_range))
    params_before = count_parameters(model)
    groups_out, channels_out, target = plan_removal(model, pruning_ratio, attn_layers, mlp_layers)
    log.info("pruning %.1f%% of %d parameters (%d): attention layers %s, MLP layers %s, criterion %s",
             100 * pruning_ratio, params_before, target, _span(attn_layers), _span(mlp_layers), criterion)

    calibration_loss = None
    touched = sorted({i for i, n in groups_out.items() if n} | {i for i, n in channels_out.items() if n})
    if criterion == "taylor" and touched:
        batches = calibration_batches(tokenizer, calibration_texts, num_examples, calibration_seq_len, seed)
        calibration_loss = accumulate_gradients(model, [layers[i] for i in touched], batches, micro_batch_size)
        log.info("calibration loss %.4f on %d x %d tokens", calibration_loss, *batches.shape)
    generator = torch.Generator().manual_seed(seed)

    kept: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        _, kv_heads, _ = attention_head_counts(attn)
        entry: dict[str, Any] = {"layer": i, "kv_groups_before": kv_heads,
                                 "mlp_channels_before": mlp.gate_proj.out_features}
        if groups_out.get(i):
            scores = attention_group_scores(attn, criterion, generator)
            keep = sorted(torch.argsort(scores, descending=True, stable=True)[: kv_heads - groups_out[i]].tolist())
            prune_attention_groups(attn, keep)
            entry["kept_kv_groups"] = keep
        if channels_out.get(i):
            scores = mlp_channel_scores(mlp, criterion, generator)
            width = mlp.gate_proj.out_features
            keep = torch.argsort(scores, descending=True, stable=True)[: width - channels_out[i]].sort().values
            prune_mlp_channels(mlp, keep.tolist())
        entry["kv_groups_after"] = attention_head_counts(layer.self_attn)[1]
        entry["mlp_channels_after"] = layer.mlp.gate_proj.out_features
        kept.append(entry)
    for p in model.parameters():
        p.grad = None

    params_after = count_parameters(model)
    report = {
        "criterion": criterion,
        "pruning_ratio": pruning_ratio,
        "block_attention_layer_start": attn_range[0],
        "block_attention_layer_end": attn_range[1],
        "block_mlp_layer_start": mlp_range[0],
        "block_mlp_layer_end": mlp_range[1],
        "num_examples": num_examples if criterion == "taylor" else None,
        "calibration_seq_len": calibration_seq_len if criterion == "taylor" else None,
        "calibration": ("built-in" if calibration_texts is None or calibration_texts is BUILTIN_CALIBRATION_TEXTS
                        else f"{len(calibration_texts)} texts") if criterion == "taylor" else None,
        "calibration_loss": calibration_loss,
        "seed": seed,
        "params_before": params_before,
        "params_after": params_after,
        "params_removed": params_before - params_after,
        "params_target_removed": target,
        "achieved_ratio": (params_before - params_after) / params_before,
        "seconds": round(time.perf_counter() - started, 2),
        "layers": kept,
        "layer_shapes": layer_shapes(model),
    }
    log.info("#Param before: %d, #Param after: %d, removed %.4f%%", params_before, params_after,
             100 * report["achieved_ratio"])
    return report
