"""Model FLOPs of LoRA training on a pruned decoder, counted from its per-layer shapes, and the
device's own matmul rate to set them against (model FLOP utilization, MFU).

``LoRATrainingFlops`` counts the matrix multiplications one training step needs, layer by layer with
each layer's own widths (``anatomy.layer_shapes``):

- ``frozen_forward``: every projection of every decoder layer, ``2·in·out`` per token;
- ``frozen_input_grad``: their input gradient in the backward pass, another ``2·in·out``, wherever the
  input needs a gradient (no weight gradient: the base weights are frozen). The first layer's
  ``q/k/v`` read the embedding output, which needs none unless gradient checkpointing makes the
  embeddings' output require grad (``embedding_grad``);
- ``lora_forward``: ``x·Aᵀ`` then ``·Bᵀ``, ``2·r·(in + out)``; ``lora_weight_grad``: the gradients of
  ``A`` and ``B``, ``2·r·(in + out)``; ``lora_input_grad``: ``grad·B`` (``2·r·out``, needed for ``A``'s
  gradient) and, where the input needs a gradient, ``·A`` (``2·r·in``);
- ``attention_forward``: scores ``Q·Kᵀ`` and values ``P·V``, ``2·heads·head_dim`` per attended pair
  each; ``attention_backward``: the four matmuls of their gradients (``grad·Vᵀ``, ``Pᵀ·grad``,
  ``dS·K``, ``dSᵀ·Q``), each only where its operand needs a gradient. Attended pairs per sequence are
  ``n²`` (the score matrix, the convention of published MFU figures) or ``n(n+1)/2`` with
  ``causal=True`` (the pairs a causal mask keeps); a micro-batch's are computed from the sum of its
  squared sequence lengths, so padding and packing neighbours count nothing;
- ``lm_head_forward`` / ``lm_head_input_grad``: ``2·hidden·vocab`` each, on supervised positions only
  (the only positions whose logits the loss needs);
- ``recompute``: with activation checkpointing, the decoder layers' forward matmuls run again in
  the backward pass.

Not counted: element-wise work (norms, activations, softmax, dropout, the residual adds, the loss,
the rotary embedding's outer product of positions and frequencies), the optimizer update, and the
embedding lookup: none is a matmul. Padding positions are not model
FLOPs (the kernels may still spend time on them): tokens are real tokens.

``matmul_peak_flops`` times ``x·Wᵀ`` at the model's own projection shapes and token counts: the rate
the device reaches on the work the model consists of, in the dtype the matmuls run in.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_recover.models.anatomy import layer_shapes

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

BREAKDOWN_KEYS = (
    "frozen_forward", "frozen_input_grad", "lora_forward", "lora_input_grad", "lora_weight_grad",
    "attention_forward", "attention_backward", "lm_head_forward", "lm_head_input_grad", "recompute",
)


def projection_shapes(shape: dict[str, int], hidden_size: int) -> dict[str, tuple[int, int]]:
    """``{projection: (in_features, out_features)}`` of one decoder layer from its ``layer_shapes`` entry."""
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    f = shape["intermediate_size"]
    d = hidden_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


@dataclass(frozen=True)
class LoRATrainingFlops:
    """The model FLOPs of LoRA training steps on a (pruned) LLaMA-family decoder.

    Args:
        layers: per-layer shapes, ``lit_recover.models.anatomy.layer_shapes(model)``.
        hidden_size: the model width.
        vocab_size: rows of the LM head.
        lora_rank: LoRA rank ``r``.
        lora_targets: projection names that carry a LoRA adapter.
        gradient_checkpointing: the decoder layers' forward is recomputed in the backward pass.
        embedding_grad: the embedding output requires grad (what ``enable_input_require_grads`` does
            for gradient checkpointing); ``None``: the same as ``gradient_checkpointing``.
        causal: count ``n(n+1)/2`` attended pairs per sequence instead of ``n²``.
    """

    layers: tuple[dict[str, int], ...]
    hidden_size: int
    vocab_size: int
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = PROJECTIONS
    gradient_checkpointing: bool = False
    embedding_grad: bool | None = None
    causal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(dict(s) for s in self.layers))
        unknown = sorted(set(self.lora_targets) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not decoder projections ({', '.join(PROJECTIONS)})")
        object.__setattr__(self, "lora_targets", tuple(p for p in PROJECTIONS if p in self.lora_targets))

    @classmethod
    def from_model(cls, model: nn.Module, lora_rank: int | None = None,
                   lora_targets: Iterable[str] | None = None, **kwargs: Any) -> LoRATrainingFlops:
        """Read the shapes off ``model`` (plain, PEFT-wrapped or FSDP2-sharded).

        Rank and targets default to those of the PEFT adapters the model carries (the first decoder
        layer's), else rank 8 on all seven projections; ``gradient_checkpointing`` to whether the model
        has it on (transformers' ``is_gradient_checkpointing``).
        """
        found_rank, found_targets = _lora_of(model)
        config = _config_of(model)
        kwargs.setdefault("gradient_checkpointing", _checkpointing_of(model))
        return cls(
            layers=tuple(layer_shapes(model)),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            lora_rank=int(lora_rank if lora_rank is not None else (found_rank or 8)),
            lora_targets=tuple(lora_targets if lora_targets is not None else (found_targets or PROJECTIONS)),
            **kwargs,
        )

    # --- counting ----------------------------------------------------------------------------------
    def step(self, tokens: int | float, supervised: int | float, sum_squared_lengths: int | float) -> dict[str, Any]:
        """The breakdown of one step (or micro-batch): every ``BREAKDOWN_KEYS`` entry and ``total``.

        Args:
            tokens: real (non-pad) tokens the decoder processed.
            supervised: positions with a label (where the LM head and loss run).
            sum_squared_lengths: the sum over the step's sequences of their length squared
                (``sum_squared_lengths(lengths)``; a packed row counts each of its sequences).
        """
        if self.causal:
            pairs = (sum_squared_lengths + tokens) / 2
            if isinstance(tokens, int) and isinstance(sum_squared_lengths, int):
                pairs = (sum_squared_lengths + tokens) // 2  # n(n+1) is even
        else:
            pairs = sum_squared_lengths
        out = dict.fromkeys(BREAKDOWN_KEYS, 0)
        r = self.lora_rank
        targets = set(self.lora_targets)
        grad = self.gradient_checkpointing if self.embedding_grad is None else self.embedding_grad
        layer_forward = 0
        for shape in self.layers:
            proj = projection_shapes(shape, self.hidden_size)
            # which projection inputs need a gradient, following the layer's data flow
            x_grad = grad
            out_grad = {p: x_grad or p in targets for p in ("q_proj", "k_proj", "v_proj")}
            attn_grad = any(out_grad.values())
            mlp_in_grad = x_grad or attn_grad or "o_proj" in targets
            down_in_grad = mlp_in_grad or "gate_proj" in targets or "up_proj" in targets
            input_grad = {"q_proj": x_grad, "k_proj": x_grad, "v_proj": x_grad, "o_proj": attn_grad,
                          "gate_proj": mlp_in_grad, "up_proj": mlp_in_grad, "down_proj": down_in_grad}
            grad = down_in_grad or "down_proj" in targets
            for name, (i, o) in proj.items():
                out["frozen_forward"] += 2 * i * o * tokens
                layer_forward += 2 * i * o * tokens
                if input_grad[name]:
                    out["frozen_input_grad"] += 2 * i * o * tokens
                if name in targets:
                    out["lora_forward"] += 2 * r * (i + o) * tokens
                    layer_forward += 2 * r * (i + o) * tokens
                    out["lora_weight_grad"] += 2 * r * (i + o) * tokens
                    out["lora_input_grad"] += 2 * r * (o + (i if input_grad[name] else 0)) * tokens
            width = shape["num_attention_heads"] * shape["head_dim"]  # K and V repeated to every query head
            per_matmul = 2 * width * pairs
            out["attention_forward"] += 2 * per_matmul
            layer_forward += 2 * per_matmul
            q, k, v = out_grad["q_proj"], out_grad["k_proj"], out_grad["v_proj"]
            out["attention_backward"] += per_matmul * ((q or k) + v + q + k)
        out["lm_head_forward"] = 2 * self.hidden_size * self.vocab_size * supervised
        if grad:
            out["lm_head_input_grad"] = 2 * self.hidden_size * self.vocab_size * supervised
        if self.gradient_checkpointing:
            out["recompute"] = layer_forward
        out["total"] = sum(out[k] for k in BREAKDOWN_KEYS)
        return out

    def per_token(self, seq_len: float, supervised_fraction: float = 1.0) -> dict[str, float]:
        """The breakdown for one token of a sequence of ``seq_len`` tokens (``supervised_fraction`` of
        positions supervised): ``step`` per token."""
        return self.step(1.0, float(supervised_fraction), float(seq_len))

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The breakdown of a training micro-batch ``{"input_ids", "labels", "attention_mask" | "position_ids"}``."""
        tokens, squares = length_stats(batch)
        labels = batch["labels"]
        supervised = int((labels[:, 1:] != -100).sum())
        return self.step(tokens, supervised, squares)


def sum_squared_lengths(lengths: Iterable[int]) -> int:
    """``Σ n²`` over sequence lengths."""
    return sum(int(n) * int(n) for n in lengths)


def length_stats(batch: dict[str, Any]) -> tuple[int, int]:
    """``(real tokens, Σ n²)`` of a micro-batch, without listing its sequences.

    A sequence of ``n`` tokens is ``Σ_{p<n} (2p + 1) = n²``, so ``Σ n²`` is the sum of ``2p + 1`` over
    the position ``p`` of every real token within its sequence: from ``position_ids`` when the batch
    has them (packed rows restart at 0 per sequence), else from the running count of the attention
    mask (right or left padding alike), else every position of every row.
    """
    positions = batch.get("position_ids")
    mask = batch.get("attention_mask")
    if positions is not None:
        real = mask.bool() if mask is not None else torch.ones_like(positions, dtype=torch.bool)
        p = positions.long()
    else:
        ids = batch["input_ids"]
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        p = real.long().cumsum(-1) - 1
    stats = torch.stack([real.sum(), ((2 * p + 1) * real).sum()]).tolist()  # one device sync
    return int(stats[0]), int(stats[1])


def _config_of(model: nn.Module) -> Any:
    for inner in _wrappers(model):
        if hasattr(inner, "config") and hasattr(inner.config, "hidden_size"):
            return inner.config
    raise ValueError(f"{type(model).__name__} has no config with hidden_size to read")


def _checkpointing_of(model: nn.Module) -> bool:
    return any(bool(getattr(m, "is_gradient_checkpointing", False)) for m in _wrappers(model))


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """``model`` and the models it wraps (PEFT: PeftModel -> LoraModel -> *ForCausalLM -> decoder)."""
    chain = [model]
    while len(chain) < 6:
        inner = None
        for attr in ("base_model", "model"):
            candidate = getattr(chain[-1], attr, None)
            if isinstance(candidate, nn.Module) and not any(candidate is c for c in chain):
                inner = candidate
                break
        if inner is None:
            break
        chain.append(inner)
    return chain


def _lora_of(model: nn.Module) -> tuple[int | None, list[str]]:
    """Rank and target projections of the PEFT LoRA adapters in the first decoder layer."""
    from lit_recover.models.anatomy import decoder_layers

    try:
        layer = decoder_layers(model)[0]
    except (ValueError, IndexError):
        return None, []
    rank, targets = None, []
    for name, module in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        ranks = getattr(module, "r", None)
        if short in PROJECTIONS and isinstance(ranks, dict) and ranks:
            targets.append(short)
            rank = int(next(iter(ranks.values())))
    return rank, targets


# --- the device's matmul rate -----------------------------------------------------------------------
def matmul_shapes(layers: Sequence[dict[str, int]], hidden_size: int,
                  max_layers: int | None = None) -> list[tuple[int, int]]:
    """The distinct ``(in, out)`` projection shapes of a model, in order of first appearance.

    ``max_layers``: only those of that many layers spread evenly from the first to the last (a pruned
    model has a shape set per layer; the first and last are usually dense, the middle ones pruned).
    """
    if max_layers is not None and len(layers) > max_layers:
        picks = sorted({round(i * (len(layers) - 1) / max(1, max_layers - 1)) for i in range(max_layers)})
        layers = [layers[i] for i in picks]
    seen: list[tuple[int, int]] = []
    for shape in layers:
        for io in projection_shapes(shape, hidden_size).values():
            if io not in seen:
                seen.append(io)
    return seen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(
    shapes: Sequence[tuple[int, int]],
    tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    min_seconds: float = 0.05,
    warmup: int = 1,
) -> dict[str, Any]:
    """The device's matmul rate at the model's shapes: FLOP/s of ``x·Wᵀ`` with ``x`` of
    ``tokens × in`` and ``W`` of ``out × in``, each shape weighted as the model runs it once per layer.

    One repeat runs every shape back to back (each at least once, all together for at least
    ``min_seconds``); the result is the median over ``repeats`` of total FLOPs / time.

    Returns:
        ``{"flops_per_s", "gflops_per_s", "repeats": [FLOP/s of each], "dtype", "device", "tokens",
        "shapes"}``.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they are used: no host copies
    operands = []
    for i, o in shapes:
        x = torch.randn(tokens, i, generator=gen, device=device, dtype=dtype)
        w = torch.randn(o, i, generator=gen, device=device, dtype=dtype)
        operands.append((x, w))
    flops_per_pass = sum(2 * tokens * i * o for i, o in shapes)

    def one_pass() -> None:
        for x, w in operands:
            torch.nn.functional.linear(x, w)

    with torch.no_grad():
        for _ in range(max(0, warmup)):
            one_pass()
        _sync(device)
        t0 = time.perf_counter()
        one_pass()
        _sync(device)
        first = max(time.perf_counter() - t0, 1e-9)
        passes = max(1, int(min_seconds / first))
        rates = []
        for _ in range(max(1, repeats)):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(passes):
                one_pass()
            _sync(device)
            rates.append(flops_per_pass * passes / max(time.perf_counter() - t0, 1e-12))
    rate = statistics.median(rates)
    return {"flops_per_s": rate, "gflops_per_s": rate / 1e9, "repeats": rates, "passes_per_repeat": passes,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "tokens": tokens,
            "shapes": [list(s) for s in shapes]}


_PEAK_CACHE: dict[tuple, float] = {}


def cached_peak_flops(shapes: Sequence[tuple[int, int]], tokens: int, dtype: torch.dtype,
                      device: str | torch.device) -> float:
    """``matmul_peak_flops(...)["flops_per_s"]``, measured once per process for each shape set, dtype
    and device (a quick measurement: 3 repeats of at least 20 ms)."""
    key = (tuple(map(tuple, shapes)), int(tokens), dtype, str(device))
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = matmul_peak_flops(shapes, tokens, dtype, device, repeats=3, min_seconds=0.02)["flops_per_s"]
    return _PEAK_CACHE[key]
