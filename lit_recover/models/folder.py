"""The pickle-free pruned model: a folder of safetensors weights, config, shape map and tokenizer.

Layout of ``<dir>/``::

    model.safetensors      every weight, by its usual name (a tied lm_head is stored once)
    config.json            the model config (architectures names the class)
    layer_shapes.json      {"format": "lit-recover-pruned", "version": 1, "architecture": ...,
                            "layers": [{"num_attention_heads", "num_key_value_heads", "head_dim",
                                        "intermediate_size"}, ...]}
    tokenizer files        whatever ``tokenizer.save_pretrained`` writes

Nothing in it is executable. ``from_pretrained`` alone would build every layer at the config's
uniform width, so loading builds the layers from the shape map first and then assigns the weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_recover.models.anatomy import layer_shapes
from lit_recover.models.checks import PrunedModelError
from lit_recover.models.rebuild import ARCHITECTURES, RebuildError, build_causal_lm
from lit_recover.outputs import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "lit-recover-pruned"
FORMAT_VERSION = 1
SHAPES_FILE = "layer_shapes.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


def is_pruned_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pruned_folder` (it has a shape map)."""
    return (Path(path) / SHAPES_FILE).is_file()


def _weights(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors to write: on the CPU, floating-point ones in ``dtype`` (``None``: as they are)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        del state["lm_head.weight"]  # safetensors stores no aliases; loading ties it again
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        converted = tensor.detach().to("cpu", target)
        # Any other shared storage is written as its own copy rather than refused.
        shared = converted.untyped_storage().data_ptr() == ptr and ptr in seen
        out[key] = converted.clone() if shared else converted.contiguous()
        seen.setdefault(ptr, key)
    return out


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise PrunedModelError(f"{directory}: exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise PrunedModelError(
            f"{directory}: folder exists and is not empty; pass overwrite=True (--overwrite true) to replace it"
        )


def save_pruned_folder(model: nn.Module, tokenizer: Any, directory: str | Path, *, overwrite: bool = False,
                       dtype: torch.dtype | str | None = None) -> Path:
    """Write a pruned model and its tokenizer as a pickle-free folder, atomically.

    Everything is written to a temporary folder beside ``directory`` and renamed into place, so a
    crash leaves either the old folder or the new one, never a half-written one.

    Args:
        model: a LLaMA/Mistral/Qwen2 ``*ForCausalLM`` with pruned (uneven) layers.
        tokenizer: its tokenizer.
        directory: the folder to create.
        overwrite: replace an existing non-empty folder; without it that is an error.
        dtype: write the floating-point weights in this dtype (``None``: as the model holds them);
            they are written from CPU copies whatever device the model is on.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    if dtype is not None:
        from lit_recover.models.load import as_dtype

        dtype = as_dtype(dtype)
    architecture = type(model).__name__
    if architecture not in ARCHITECTURES:
        raise PrunedModelError(
            f"{directory}: cannot save a {architecture}; supported are {', '.join(sorted(ARCHITECTURES))}"
        )
    _check_target(directory, overwrite)
    from safetensors.torch import save_file

    try:
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            weights = _weights(model, dtype)
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            config = json.loads(model.config.to_json_string(use_diff=False))
            config["architectures"] = [architecture]
            written = str(weights["model.embed_tokens.weight"].dtype).removeprefix("torch.")
            for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
                config[key] = written  # the dtype of the weights in this folder
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            shapes = {"format": FORMAT, "version": FORMAT_VERSION, "architecture": architecture,
                      "layers": layer_shapes(model)}
            (tmp / SHAPES_FILE).write_text(json.dumps(shapes, indent=1) + "\n")
            tokenizer.save_pretrained(str(tmp))
    except FileExistsError:
        _check_target(directory, overwrite)  # something appeared while writing: the usual error
        raise
    log.info("wrote pruned folder %s (%d layers)", directory, len(shapes["layers"]))
    return directory


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PrunedModelError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise PrunedModelError(f"{path}: not readable JSON ({exc})") from exc


def read_shape_map(directory: str | Path) -> tuple[str | None, list[dict[str, int]]]:
    """``(architecture, layers)`` from ``layer_shapes.json``, each layer checked for sense."""
    path = Path(directory) / SHAPES_FILE
    data = _read_json(path)
    if isinstance(data, list):  # a bare list of layers is accepted too
        data = {"layers": data}
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or not data["layers"]:
        raise PrunedModelError(f"{path}: expected {{'layers': [...]}} with one entry per decoder layer")
    if data.get("format", FORMAT) != FORMAT or data.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise PrunedModelError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r} is not readable here"
        )
    layers = []
    for i, entry in enumerate(data["layers"]):
        if not isinstance(entry, dict):
            raise PrunedModelError(f"{path}: layer {i} is not an object")
        missing = [k for k in _SHAPE_KEYS if k not in entry]
        bad = [k for k in _SHAPE_KEYS if k in entry and (type(entry[k]) is not int or entry[k] <= 0)]
        if missing or bad:
            what = f"lacks {', '.join(missing)}" if missing else f"has non-positive or non-integer {', '.join(bad)}"
            raise PrunedModelError(f"{path}: layer {i} {what}")
        if entry["num_attention_heads"] % entry["num_key_value_heads"]:
            raise PrunedModelError(
                f"{path}: layer {i}: {entry['num_attention_heads']} query heads do not split into "
                f"{entry['num_key_value_heads']} KV groups"
            )
        layers.append({k: entry[k] for k in _SHAPE_KEYS})
    return data.get("architecture"), layers


def load_pruned_folder(directory: str | Path) -> tuple[nn.Module, Any]:
    """Load a folder written by :func:`save_pruned_folder`: layers built from the shape map, then weights.

    Returns:
        ``(model, tokenizer)`` as saved (eval mode, the saved dtype).
    """
    directory = Path(directory)
    architecture, layers = read_shape_map(directory)
    config = _read_json(directory / CONFIG_FILE)
    if not isinstance(config, dict):
        raise PrunedModelError(f"{directory / CONFIG_FILE}: not a JSON object")
    if architecture is None:
        architecture = (config.get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        raise PrunedModelError(
            f"{directory / SHAPES_FILE}: architecture {architecture!r} is not one of {', '.join(sorted(ARCHITECTURES))}"
        )
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise PrunedModelError(f"{weights_path}: missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise PrunedModelError(f"{weights_path}: not readable safetensors ({exc})") from exc
    try:
        model = build_causal_lm(architecture, config, state_dict, shape_map=layers)
    except RebuildError as exc:
        raise PrunedModelError(f"{weights_path}: {exc}") from exc
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise PrunedModelError(f"{directory}: tokenizer files do not load ({type(exc).__name__}: {exc})") from exc
    return model, tokenizer
