"""Loading and saving pruned models.

Public face: ``load_pruned(path) -> (model, tokenizer)`` and ``save_pruned(model, tokenizer, path)``.

Accepted inputs:
- an LLM-Pruner pickle ``torch.save({'model': model, 'tokenizer': tokenizer}, path)``. By default it
  is read without running any code it names (:mod:`lit_recover.models.safe_pickle`) and the model and
  tokenizer are rebuilt as classes of the installed transformers (:mod:`lit_recover.models.rebuild`), so
  pickles from older releases or from toolkits that are not installed load too. ``trust_pickle=True``
  unpickles it as written (``torch.load(weights_only=False)``), for files you trust only;
- a pickle-free pruned folder (``layer_shapes.json`` + safetensors + config + tokenizer), see
  :mod:`lit_recover.models.folder`;
- a Hugging Face model directory (``config.json`` + weights + tokenizer), for unpruned baselines;
- a hub model id (``org/name``), loaded with ``from_pretrained`` when the hub is reachable.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lit_recover.models.checks import PrunedModelError, check_forward, check_structure
from lit_recover.outputs import torch_save

log = logging.getLogger(__name__)


def _checkpoint_parts(path: Path, obj: object) -> tuple[object, object]:
    if not isinstance(obj, dict) or "model" not in obj or "tokenizer" not in obj:
        if isinstance(obj, dict):
            found = f"a dict with keys {sorted(map(str, obj))}"
        else:
            found = f"a pickled {obj.class_path}" if hasattr(obj, "class_path") else f"a {type(obj).__name__}"
        raise PrunedModelError(
            f"{path}: expected an LLM-Pruner checkpoint {{'model': model, 'tokenizer': tokenizer}}, found {found}"
        )
    return obj["model"], obj["tokenizer"]


def _load_pickle_trusted(path: Path, mmap: bool = False) -> tuple[nn.Module, object]:
    log.warning("%s: trust_pickle=True: unpickling runs whatever code the file names", path)
    mmap = mmap and zipfile.is_zipfile(path)  # a legacy (pre-zip) file cannot be mapped
    try:
        # weights_only=False runs code named by the pickle: the file must be trusted.
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise PrunedModelError(
            f"{path}: the pickle refers to code that is not importable here ({exc}); "
            "the default safe loader (trust_pickle=False) does not need it"
        ) from exc
    except Exception as exc:  # corrupt or not a torch file
        raise PrunedModelError(f"{path}: not a readable torch pickle ({type(exc).__name__}: {exc})") from exc
    model, tokenizer = _checkpoint_parts(path, obj)
    if not isinstance(model, nn.Module):
        raise PrunedModelError(f"{path}: 'model' is a {type(model).__name__}, not a torch module")
    return model, tokenizer


def _load_pickle_safe(path: Path, mmap: bool = False) -> tuple[nn.Module, object]:
    from lit_recover.models.rebuild import RebuildError, rebuild_model, rebuild_tokenizer
    from lit_recover.models.safe_pickle import UnsafePickleError, safe_load

    try:
        obj, recorded = safe_load(path, mmap=mmap)
    except UnsafePickleError as exc:
        raise PrunedModelError(f"{path}: {exc}") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise PrunedModelError(f"{path}: not a readable torch pickle ({type(exc).__name__}: {exc})") from exc
    model_record, tokenizer_record = _checkpoint_parts(path, obj)
    try:
        model = rebuild_model(model_record)
    except RebuildError as exc:
        raise PrunedModelError(f"{path}: record 'model': {exc}") from exc
    try:
        tokenizer = rebuild_tokenizer(tokenizer_record)
    except RebuildError as exc:
        raise PrunedModelError(f"{path}: record 'tokenizer': {exc}") from exc
    log.info("%s: rebuilt %s from the pickle without running it", path, type(model).__name__)
    return model, tokenizer


def _load_hf(path: str | Path, dtype: torch.dtype | None) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token (LLaMA has none; LLM-Pruner uses id 0) and left padding.

    Left padding is for batched generation; training batches are padded by our own collator.
    """
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "left"


DtypeChoice = torch.dtype | str | Callable[[torch.dtype], torch.dtype] | None


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` from ``"bfloat16"`` (or a dtype as it is); an unknown name is an error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise PrunedModelError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16, float64)")
    return value


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's floating-point parameters (the one holding most elements)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    s, t = torch.finfo(source), torch.finfo(target)
    return t.eps <= s.eps and t.max >= s.max


def cast_parameters(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """Cast the floating-point parameters and persistent buffers of ``model`` to ``dtype``, in place.

    Unlike ``model.to(dtype)``, tables computed at construction (non-persistent buffers: the rotary
    ``inv_freq``) are never narrowed: a bfloat16 ``inv_freq`` puts the rotary angle of position
    2,000 off by several radians. They are widened where ``dtype`` holds more.
    """
    dtype = as_dtype(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is None or not buf.is_floating_point() or buf.dtype == dtype:
                    continue
                if name not in module._non_persistent_buffers_set or _widens(buf.dtype, dtype):
                    module._buffers[name] = buf.to(dtype)
    return model


def read_model(
    path: str | Path,
    *,
    dtype: DtypeChoice = None,
    trust_pickle: bool = False,
    mmap: bool = False,
) -> tuple[nn.Module, object]:
    """Read a model and tokenizer as stored, without the training preparation of :func:`load_pruned`.

    Args:
        path: a pruned pickle, a pruned folder, a Hugging Face model directory, or a hub id.
        dtype: cast the model's parameters to this dtype (``"float32"``, ``"bfloat16"``, …; see
            :func:`cast_parameters`), or to what ``dtype(stored dtype)`` returns; ``None`` keeps it.
        trust_pickle: unpickle a pickle as written (runs code it names) instead of rebuilding it safely.
        mmap: the weights of a pickle stay in a copy-on-write memory map of the file (read when first
            touched, their pages shared by every process of the machine that maps the file) instead of
            being read into process memory; a pruned folder's safetensors are mapped either way.
            Weights cast to another ``dtype`` are copies in process memory all the same.
    """
    choose = dtype if callable(dtype) and not isinstance(dtype, torch.dtype) else None
    if choose is None and dtype is not None:
        dtype = as_dtype(dtype)
    elif choose is not None:
        dtype = None
    p = Path(path)
    source = str(path)
    if p.is_file():
        model, tokenizer = _load_pickle_trusted(p, mmap) if trust_pickle else _load_pickle_safe(p, mmap)
    elif p.is_dir():
        from lit_recover.models.folder import is_pruned_folder, load_pruned_folder

        if is_pruned_folder(p):
            model, tokenizer = load_pruned_folder(p)
        elif (p / "config.json").is_file():
            model, tokenizer = _load_hf(p, dtype)
        else:
            raise PrunedModelError(f"{source}: a directory without config.json is not a model folder")
    elif p.suffix in {".bin", ".pt", ".pth", ".ckpt"} or p.is_absolute() or str(path).startswith("."):
        raise PrunedModelError(f"{source}: no such file")
    else:
        model, tokenizer = _load_hf(str(path), dtype)  # a hub id
    if choose is not None:
        dtype = as_dtype(choose(stored_dtype(model)))
    if dtype is not None:
        cast_parameters(model, dtype)
    return model, tokenizer


def load_pruned(
    path: str | Path,
    *,
    dtype: DtypeChoice = None,
    check: bool = True,
    trust_pickle: bool = False,
    mmap: bool = False,
) -> tuple[nn.Module, object]:
    """Load a pruned model and its tokenizer, ready for training.

    Args:
        path: an LLM-Pruner ``pruned_model.bin`` pickle, a pruned folder (``save_pruned_folder``),
            a Hugging Face model directory, or a hub id.
        dtype: cast the model's parameters to this dtype (``"float32"``, ``"bfloat16"``, …), or to
            what ``dtype(stored dtype)`` returns (the checks then run in the chosen dtype); ``None``
            keeps the stored one.
        check: run the structural and forward consistency checks.
        trust_pickle: unpickle a pickle with ``torch.load(weights_only=False)``, running the code it
            names and needing every class it names importable. The default reads it without running
            anything and rebuilds the model with the installed transformers.
        mmap: keep a pickle's weights in a copy-on-write memory map of the file (see :func:`read_model`):
            the ranks of one machine then share one copy of them in the page cache.

    Returns:
        ``(model, tokenizer)``: the model in train mode, the tokenizer with a pad token.
    """
    source = str(path)
    model, tokenizer = read_model(path, dtype=dtype, trust_pickle=trust_pickle, mmap=mmap)
    prepare_tokenizer(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if check:
        check_structure(model, source)
        check_forward(model, tokenizer, source)
    model.train()
    return model, tokenizer


def as_stored(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """``model`` as a file should hold it: every tensor on the CPU, parameters in ``dtype``.

    Returns ``model`` itself when it is that already; otherwise a copy that shares the tensors that
    need no change (so a model on a GPU costs host memory for its weights once, and the GPU copy
    stays as it is). ``torch.load(path, weights_only=False)`` of what is saved then works on a
    machine without CUDA. Non-persistent buffers keep their dtype (see :func:`cast_parameters`).
    """
    dtype = as_dtype(dtype) if dtype is not None else None
    cpu = torch.device("cpu")

    def stored(t: torch.Tensor, keep_dtype: bool) -> torch.Tensor:
        target = dtype if dtype is not None and t.is_floating_point() and not keep_dtype else t.dtype
        return t if t.device == cpu and t.dtype == target else t.detach().to(cpu, target)

    changes: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        new = stored(p, False)
        if new is not p:
            changes[id(p)] = nn.Parameter(new, requires_grad=p.requires_grad)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            persistent = name not in module._non_persistent_buffers_set
            new = stored(buf, not persistent)
            if new is not buf:
                changes[id(buf)] = new
    strays = [t for m in model.modules() for t in vars(m).values()
              if isinstance(t, torch.Tensor) and t.device != cpu and id(t) not in changes]
    if not changes and not strays:
        return model
    import copy

    memo: dict[int, object] = dict(changes)
    for p in model.parameters():
        memo.setdefault(id(p), p)  # unchanged tensors are shared, not copied
    for b in model.buffers():
        memo.setdefault(id(b), b)
    for t in strays:
        memo[id(t)] = t.detach().to(cpu)
    copied = copy.deepcopy(model, memo)
    if dtype is not None and hasattr(copied, "config"):
        setattr(copied.config, "dtype" if hasattr(copied.config, "dtype") else "torch_dtype", dtype)
    return copied


def save_pruned(model: nn.Module, tokenizer, path: str | Path, *, overwrite: bool = True,
                dtype: torch.dtype | str | None = None) -> Path:
    """Save ``{'model', 'tokenizer'}`` exactly as LLM-Pruner does, atomically (``outputs.torch_save``).

    The pickle holds CPU tensors whatever device the model is on, its parameters in ``dtype``
    (``None``: as they are), so ``torch.load(path, weights_only=False)["model"]`` works without CUDA.
    ``overwrite=False`` refuses an existing file, also one that appeared while saving.
    """
    return torch_save({"model": as_stored(model, dtype), "tokenizer": tokenizer}, path, overwrite=overwrite)
