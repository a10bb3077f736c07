"""Turn the inert records of a pruned pickle into a model and tokenizer of the installed transformers.

The records (see :mod:`lit_recover.models.safe_pickle`) hold each module's ``_parameters``, ``_buffers`` and
``_modules`` and the config object's attributes, whatever release or toolkit made them. From those we
build the installed ``*ForCausalLM`` of the same family:

1. the architecture comes from the class name at the end of the recorded class path
   (``transformers...LlamaForCausalLM`` and ``LLMPruner...LlamaForCausalLM`` both mean Llama);
2. the config from the recorded config attributes that the installed config class knows (plus the
   legacy rope keys, which it converts itself), with vocabulary, width, depth and ``head_dim`` read off
   the weights;
3. the model is instantiated with its parameters on the meta device (no memory, no random init),
   then every decoder layer's projections are replaced by Linears of that layer's own shapes, and
   the weights are assigned in.

The same :func:`build_causal_lm` serves the pickle-free folder, whose shape map gives the layer shapes.
The tokenizer is rebuilt from its recorded state: a fast tokenizer from the JSON of its
``tokenizers.Tokenizer``, a slow sentencepiece one from its ``sp_model_proto`` bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_recover.errors import LitRecoverError
from lit_recover.models.anatomy import decoder_layers, set_attention_attributes
from lit_recover.models.safe_pickle import PickledObject, is_record

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("LlamaForCausalLM", "LlamaConfig"),
    "MistralForCausalLM": ("MistralForCausalLM", "MistralConfig"),
    "Qwen2ForCausalLM": ("Qwen2ForCausalLM", "Qwen2Config"),
}
"""Recorded class name → (installed model class, config class). All share the LLaMA layer layout."""

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")

# Buffers that older releases saved but every release recomputes from the config.
_RECOMPUTED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached|original_inv_freq)$|\.masked_bias$")
# Config attributes that were never architecture: generation defaults, bookkeeping.
_LEGACY_CONFIG_KEYS = {"rope_theta", "rope_scaling", "sliding_window", "use_sliding_window", "max_window_layers"}


class RebuildError(LitRecoverError, ValueError):
    """The records do not describe a model or tokenizer we know how to rebuild."""


# --- records → plain data --------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Config values as JSON-like data; ``...`` for anything that is not (records, tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return ... if ... in items else items
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return ... if ... in items.values() or not all(isinstance(k, (str, int)) for k in items) else items
    return ...


def config_attributes(record: PickledObject) -> dict[str, Any]:
    """The recorded config's public attributes that are plain data."""
    out = {}
    for key, value in record.attrs.items():
        if key.startswith("_"):
            continue
        plain = _plain(value)
        if plain is not ...:
            out[key] = plain
    return out


def module_tensors(record: PickledObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict from a recorded module tree: its parameters and persistent buffers, by dotted name."""
    out: dict[str, torch.Tensor] = {}
    stack = [(prefix, record)]
    while stack:
        name, rec = stack.pop()
        if not is_record(rec):
            raise RebuildError(f"{name or 'model'} is a {type(rec).__name__}, not a pickled module")
        attrs = rec.attrs
        skip = attrs.get("_non_persistent_buffers_set") or set()
        for kind in ("_parameters", "_buffers"):
            for key, tensor in (attrs.get(kind) or {}).items():
                if tensor is None or (kind == "_buffers" and key in skip):
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise RebuildError(f"{name}{key} is a {type(tensor).__name__}, not a tensor")
                out[f"{name}{key}"] = tensor.detach()
        for key, child in (attrs.get("_modules") or {}).items():
            if child is not None:
                stack.append((f"{name}{key}.", child))
    return out


def _submodule(record: PickledObject, path: str) -> PickledObject | None:
    for part in path.split("."):
        record = (record.get("_modules") or {}).get(part) if is_record(record) else None
    return record if is_record(record) else None


def architecture_of(class_path: str) -> str:
    """The supported architecture a recorded class path names, or a :class:`RebuildError`."""
    name = class_path.rsplit(".", 1)[-1]
    if name not in ARCHITECTURES:
        raise RebuildError(
            f"model class {class_path} has no rebuild recipe: its name {name!r} is not one of "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return name


# --- building the model ----------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers such as rotary tables stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _layer_count(state_dict: Mapping[str, torch.Tensor]) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if not found or found != set(range(max(found) + 1)):
        raise RebuildError(f"decoder layers found: {sorted(found)}; expected model.layers.0..N-1")
    return max(found) + 1


def linear_shapes_from_weights(
    state_dict: Mapping[str, torch.Tensor], num_layers: int
) -> list[dict[str, tuple[int, int]]]:
    """Per layer, each projection's ``(in, out)`` as its weight has it."""
    shapes = []
    for i in range(num_layers):
        layer = {}
        for group, names in (("self_attn", ATTN_PROJ), ("mlp", MLP_PROJ)):
            for name in names:
                key = f"model.layers.{i}.{group}.{name}.weight"
                if key not in state_dict:
                    raise RebuildError(f"layer {i}: no {group}.{name} weight")
                out_f, in_f = state_dict[key].shape
                layer[f"{group}.{name}"] = (int(in_f), int(out_f))
        shapes.append(layer)
    return shapes


def linear_shapes_from_map(shape_map: list[dict[str, int]], hidden: int) -> list[dict[str, tuple[int, int]]]:
    """Per layer, each projection's ``(in, out)`` from a per-layer shape map (heads, KV heads, head_dim, MLP)."""
    shapes = []
    for s in shape_map:
        q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
        mlp = s["intermediate_size"]
        shapes.append({
            "self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, mlp), "mlp.up_proj": (hidden, mlp),
            "mlp.down_proj": (mlp, hidden),
        })
    return shapes


def make_config(architecture: str, attributes: Mapping[str, Any]):
    """The installed config class for ``architecture``, from recorded attributes it knows."""
    import transformers

    config_cls = getattr(transformers, ARCHITECTURES[architecture][1])
    known = set(config_cls().to_dict()) | _LEGACY_CONFIG_KEYS
    kwargs = {k: v for k, v in attributes.items() if k in known and k not in {"architectures", "transformers_version",
                                                                              "model_type", "dtype", "torch_dtype"}}
    dropped = sorted(set(attributes) - set(kwargs))
    log.debug("config keys not carried over: %s", dropped)
    return config_cls(**kwargs)


def build_causal_lm(
    architecture: str,
    config_attributes: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    head_dim: int | None = None,
    shape_map: list[dict[str, int]] | None = None,
) -> nn.Module:
    """Instantiate the installed ``architecture`` with each decoder layer's own widths, then load weights.

    Args:
        architecture: a key of :data:`ARCHITECTURES`, e.g. ``"LlamaForCausalLM"``.
        config_attributes: config values (recorded attributes or a ``config.json``).
        state_dict: every weight, by the usual ``model.layers.N....`` names.
        head_dim: the attention head size; defaults to the shape map's, then the config's.
        shape_map: per-layer ``num_attention_heads``/``num_key_value_heads``/``head_dim``/
            ``intermediate_size``; the layers are built from it and the weights must fit. Without it
            each projection takes its weight's shape.

    Returns:
        The model, in eval mode, in the weights' dtype.
    """
    import transformers

    model_cls = getattr(transformers, ARCHITECTURES[architecture][0])
    if "model.embed_tokens.weight" not in state_dict:
        raise RebuildError("no model.embed_tokens.weight among the weights")
    vocab, hidden = state_dict["model.embed_tokens.weight"].shape
    num_layers = _layer_count(state_dict)
    attrs = dict(config_attributes)
    if shape_map is not None:
        if len(shape_map) != num_layers:
            raise RebuildError(f"the shape map lists {len(shape_map)} layers, the weights have {num_layers}")
        head_dims = {int(s["head_dim"]) for s in shape_map}
        if len(head_dims) != 1:
            raise RebuildError(f"layers use different head_dim {sorted(head_dims)}; one rotary table cannot serve them")
        head_dim = head_dims.pop()
        linear_shapes = linear_shapes_from_map(shape_map, int(hidden))
    else:
        linear_shapes = linear_shapes_from_weights(state_dict, num_layers)
    if head_dim is None:
        head_dim = attrs.get("head_dim") or int(hidden) // int(attrs.get("num_attention_heads") or 1)
    attrs.update(vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=num_layers, head_dim=int(head_dim))
    config = make_config(architecture, attrs)
    config.head_dim = int(head_dim)  # releases whose config lacks head_dim still read it off the module below
    config._attn_implementation = "sdpa"
    dtype = state_dict["model.embed_tokens.weight"].dtype

    with _parameters_on_meta():
        model = model_cls(config)
    for i, layer in enumerate(decoder_layers(model)):
        for path, (in_f, out_f) in linear_shapes[i].items():
            owner_name, name = path.split(".")
            owner = getattr(layer, owner_name)
            old = getattr(owner, name)
            prefix = f"model.layers.{i}.{path}"
            bias = f"{prefix}.bias" in state_dict if shape_map is None else old.bias is not None
            setattr(owner, name, nn.Linear(in_f, out_f, bias=bias, device="meta", dtype=dtype))
        layer.self_attn.head_dim = int(head_dim)
        with contextlib.suppress(ValueError):  # an inconsistent layer is reported by check_structure, by name
            set_attention_attributes(layer.self_attn)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = linear_shapes[i]["mlp.gate_proj"][1]

    _assign_weights(model, state_dict, from_map=shape_map is not None)
    setattr(model.config, "dtype" if hasattr(model.config, "dtype") else "torch_dtype", dtype)
    model.eval()
    return model


def _assign_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], from_map: bool) -> None:
    expected = model.state_dict(keep_vars=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = {k: v for k, v in state_dict.items() if not _RECOMPUTED.search(k)}
    if tied:
        weights.pop("lm_head.weight", None)  # the same tensor as the embedding, or a stale copy of it
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise RebuildError(f"weights the rebuilt model has no place for: {', '.join(unexpected[:5])}")
    for key, param in expected.items():
        if key not in weights:
            if key == "lm_head.weight" and tied:
                continue
            if param.device.type == "meta":
                raise RebuildError(f"no weight for {key}")
            continue  # a buffer computed at construction
        if tuple(weights[key].shape) != tuple(param.shape):
            source = "the shape map" if from_map else "the config"
            raise RebuildError(
                f"{key} is {list(weights[key].shape)} in the weights, {source} makes it {list(param.shape)}"
            )
    model.load_state_dict(weights, strict=False, assign=True)
    if tied:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RebuildError(f"left without weights: {', '.join(left[:5])}")


def rebuild_model(record: Any) -> nn.Module:
    """A model of the installed transformers from a recorded ``*ForCausalLM`` module tree.

    Raises:
        RebuildError: naming the class path and what could not be mapped.
    """
    if not is_record(record):
        raise RebuildError(f"'model' is a {type(record).__name__}, not a pickled model")
    path = record.class_path
    architecture = architecture_of(path)
    config = record.get("config")
    if not is_record(config):
        raise RebuildError(f"{path} has no recorded config object")
    try:
        state_dict = module_tensors(record)
        num_layers = _layer_count(state_dict)
        head_dims = set()
        for i in range(num_layers):
            attn = _submodule(record, f"model.layers.{i}.self_attn")
            value = attn.get("head_dim") if attn is not None else None
            if value is not None:
                head_dims.add(int(value))
        if len(head_dims) > 1:
            raise RebuildError(f"layers use different head_dim {sorted(head_dims)}")
        model = build_causal_lm(architecture, config_attributes(config), state_dict,
                                head_dim=head_dims.pop() if head_dims else None)
    except RebuildError as exc:
        raise RebuildError(f"{path}: {exc}") from exc
    _compare_rotary(record, model)
    return model


def _compare_rotary(record: PickledObject, model: nn.Module) -> None:
    """Warn when the rotary frequencies rebuilt from the config differ from the pickled ones.

    They would when a rope setting did not carry over (a custom scaling the installed config does not
    know); dynamic scaling may also have rewritten the pickled table at run time.
    """
    recorded = None
    stack = [record]
    while stack and recorded is None:
        rec = stack.pop()
        recorded = (rec.get("_buffers") or {}).get("inv_freq")
        stack.extend(m for m in (rec.get("_modules") or {}).values() if is_record(m))
    rebuilt = next((b for n, b in model.named_buffers() if n.endswith(".inv_freq")), None)
    if not isinstance(recorded, torch.Tensor) or rebuilt is None:
        return
    # float16 pickles round the table; a wrong rope_theta or scaling is off by far more than 1%.
    if recorded.shape != rebuilt.shape or not torch.allclose(recorded.float(), rebuilt.float(), rtol=1e-2, atol=0):
        log.warning(
            "%s: the rotary frequencies rebuilt from its config differ from the pickled ones; "
            "check the config's rope settings (rope_theta, rope_scaling)", record.class_path,
        )


# --- the tokenizer ---------------------------------------------------------------------------------

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token's text from a str or a recorded ``AddedToken``."""
    if value is None or isinstance(value, str):
        return value
    if is_record(value, "AddedToken"):
        content = value.get("content") if value.attrs else None
        if content is None and value.args and isinstance(value.args[0], str):
            content = value.args[0]
        if isinstance(content, str):
            return content
    raise RebuildError(f"special token recorded as {value!r:.60}")


def special_tokens(attrs: Mapping[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad (sep/cls/mask when set), recorded by 4.x (``_bos_token``) or 5.x (``_special_tokens_map``)."""
    mapping = attrs.get("_special_tokens_map")
    out = {}
    for name in _SPECIAL:
        value = mapping.get(name) if isinstance(mapping, dict) else attrs.get(f"_{name}")
        text = _token_text(value)
        if text is not None:
            out[name] = text
    return out


def _added_tokens(attrs: Mapping[str, Any]) -> dict[int, str]:
    """Tokens added on top of a slow tokenizer's vocabulary, by id."""
    out: dict[int, str] = {}
    for key, value in (attrs.get("added_tokens_encoder") or {}).items():  # up to 4.33: text → id
        if isinstance(key, str) and isinstance(value, int):
            out[value] = key
    for key, value in (attrs.get("_added_tokens_decoder") or {}).items():  # 4.34+: id → AddedToken
        if isinstance(key, int):
            out[key] = _token_text(value)
    return out


def _common_kwargs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {}
    names = ("model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces", "chat_template")
    for name in names:
        value = attrs.get(name)
        if value is not None and _plain(value) is not ...:
            kwargs[name] = value
    return kwargs


def rebuild_tokenizer(record: Any):
    """A tokenizer of the installed transformers from a recorded tokenizer.

    Fast tokenizers come back as ``PreTrainedTokenizerFast`` over the recorded ``tokenizers`` JSON
    (normalizer, pre-tokenizer and BOS template included, so ids are unchanged); slow sentencepiece
    tokenizers through ``AutoTokenizer`` from their model proto, as an old ``tokenizer.model`` would
    (then kept as the converted fast tokenizer where the installed release converts it).

    Raises:
        RebuildError: the record holds neither.
    """
    if not is_record(record):
        raise RebuildError(f"'tokenizer' is a {type(record).__name__}, not a pickled tokenizer")
    attrs = record.attrs
    special = special_tokens(attrs)
    common = _common_kwargs(attrs)
    backend = attrs.get("_tokenizer")
    if is_record(backend, "tokenizers.Tokenizer"):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        state = backend.state
        if not isinstance(state, (bytes, str)):
            raise RebuildError(
                f"{record.class_path}: its tokenizers.Tokenizer state is a {type(state).__name__}, not JSON"
            )
        try:
            backend_tok = Tokenizer.from_str(state.decode() if isinstance(state, bytes) else state)
        except Exception as exc:
            raise RebuildError(f"{record.class_path}: its tokenizers JSON does not load ({exc})") from exc
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend_tok, **special, **common)
    elif isinstance(attrs.get("sp_model_proto"), bytes):
        tokenizer = _sentencepiece_tokenizer(record, attrs["sp_model_proto"], special, common)
    else:
        raise RebuildError(
            f"tokenizer class {record.class_path} holds neither a tokenizers JSON (_tokenizer) "
            "nor a sentencepiece model (sp_model_proto)"
        )
    tokenizer.name_or_path = attrs.get("name_or_path") if isinstance(attrs.get("name_or_path"), str) else ""
    return tokenizer


def _sentencepiece_tokenizer(record: PickledObject, proto: bytes, special: dict[str, str], common: dict[str, Any]):
    import transformers
    from transformers import AutoTokenizer

    name = record.class_path.rsplit(".", 1)[-1]
    if not hasattr(transformers, name):
        raise RebuildError(f"tokenizer class {record.class_path}: no {name} in the installed transformers")
    attrs = record.attrs
    init = attrs.get("init_kwargs") if isinstance(attrs.get("init_kwargs"), dict) else {}
    settings: dict[str, Any] = {"tokenizer_class": name, **special, **common}
    for key in ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space"):
        value = attrs.get(key, init.get(key))
        if isinstance(value, bool):
            settings[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "tokenizer.model").write_bytes(proto)
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(settings))
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:
            raise RebuildError(f"{record.class_path}: its sentencepiece model does not load ({exc})") from exc
    if getattr(tokenizer, "is_fast", False):
        # Converted to a tokenizers backend (BOS template included): keep that alone, so that nothing
        # refers back to the temporary tokenizer.model and save_pretrained/from_pretrained round-trip.
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **special, **common)
    added = {i: t for i, t in _added_tokens(attrs).items() if t is not None and i >= len(tokenizer)}
    for token_id in sorted(added):
        tokenizer.add_tokens([added[token_id]], special_tokens=added[token_id] in special.values())
        if tokenizer.convert_tokens_to_ids(added[token_id]) != token_id:
            raise RebuildError(f"{record.class_path}: added token {added[token_id]!r} does not get back id {token_id}")
    return tokenizer


def rebuild_checkpoint(obj: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a safely read ``{'model': ..., 'tokenizer': ...}`` pickle."""
    return rebuild_model(obj["model"]), rebuild_tokenizer(obj["tokenizer"])
