"""The one owner of a run folder's names and layout, of resolving ``--ckpt_path``, and of writing files.

A run folder (``output_dir``)::

    config.yaml                          the resolved config
    checkpoint-<step>/lightning.ckpt     adapter + optimizer + loop state, and the PEFT adapter files
    checkpoint-last/                     the newest checkpoint (``--ckpt_path last``)
    lora_adapter/                        the adapter that was written at the end of fit
    pruned_model.bin                     the merged model + tokenizer (LLM-Pruner's pickle)
    pruned_model/                        the same without pickle
    evaluation/evaluation_results.json   before / after / deltas
    evaluation/before_training.json      the before-training numbers, kept across resumes

Every file the project writes goes through the atomic writer below: a temporary name beside the
target, flushed and fsync'ed, then renamed over it, with the modes a plain ``open()`` or ``mkdir``
would give. A kill at any point leaves either the old file or the new one, never half of one.
``overwrite=False`` refuses an existing target, also one that appeared while the file was written.

The project's JSON files (evaluation results, the pruning report) open with one header,
``{"schema": <name>, "schema_version": <int>, ...}`` (:func:`schema_header`, :func:`read_schema`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lit_recover.errors import OutputExistsError

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_LAST = "checkpoint-last"
TRAINER_STATE = "lightning.ckpt"
ADAPTER_DIR = "lora_adapter"
MERGED_PICKLE = "pruned_model.bin"
MERGED_FOLDER = "pruned_model"
EVAL_DIR = "evaluation"
EVAL_FILE = "evaluation_results.json"
BEFORE_FILE = "before_training.json"
CONFIG_FILE = "config.yaml"
LOG_DIR = "logs"
# What marks an output_dir as holding results of an earlier run.
RESULT_NAMES = (ADAPTER_DIR, MERGED_PICKLE, MERGED_FOLDER, EVAL_DIR, CHECKPOINT_LAST)
# A folder being written (``checkpoint-<n>.tmp``) and the previous copy during a swap (``.old``).
STAGING_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
# The header of every JSON file the project writes.
SCHEMA_KEY = "schema"
SCHEMA_VERSION_KEY = "schema_version"


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder; nothing is created until something is written."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def checkpoint(self, step: int | str) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step}"

    @property
    def last_checkpoint(self) -> Path:
        return self.root / CHECKPOINT_LAST

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def merged_pickle(self) -> Path:
        return self.root / MERGED_PICKLE

    @property
    def merged_folder(self) -> Path:
        return self.root / MERGED_FOLDER

    @property
    def evaluation(self) -> Path:
        return self.root / EVAL_DIR / EVAL_FILE

    @property
    def before_training(self) -> Path:
        return self.root / EVAL_DIR / BEFORE_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOG_DIR

    def existing_results(self) -> list[str]:
        """The names in :data:`RESULT_NAMES` that already exist here (an earlier run's results)."""
        return [n for n in RESULT_NAMES if (self.root / n).exists()]


# --- resolving --ckpt_path ----------------------------------------------------------------------
def _complete(state: Path) -> bool:
    """A trainer state file, or the folder of a sharded (FSDP2) one with its metadata written."""
    return state.is_file() or (state / "meta.pt").is_file()


def resolve_checkpoint(ckpt_path: str | Path, output_dir: str | Path | None = None) -> str:
    """Turn ``last``, a ``checkpoint-<step>`` folder or a ``.ckpt`` file into the file Lightning loads.

    ``last`` is ``<output_dir>/checkpoint-last``, or, when a kill interrupted its swap, the newest
    complete checkpoint folder in ``output_dir`` (``checkpoint-<step>/`` or ``checkpoint-last.old/``).
    """
    if str(ckpt_path) == "last":
        if output_dir is None:
            raise FileNotFoundError("--ckpt_path last needs an output_dir to look in")
        out = Path(output_dir)
        last = out / CHECKPOINT_LAST / TRAINER_STATE
        if _complete(last):
            return str(last)
        # a kill between the renames of a save: the newest complete folder wins
        found = [p / TRAINER_STATE for p in out.glob(f"{CHECKPOINT_PREFIX}*")
                 if not p.name.endswith(STAGING_SUFFIX) and _complete(p / TRAINER_STATE)]
        if not found:
            raise FileNotFoundError(
                f"{out}: no checkpoint to resume from (looked for {CHECKPOINT_LAST}/ and checkpoint-<step>/)"
            )
        return str(max(found, key=lambda f: f.stat().st_mtime_ns))
    p = Path(ckpt_path)
    if p.is_dir():
        if _complete(p / TRAINER_STATE):
            return str(p / TRAINER_STATE)
        raise FileNotFoundError(f"{p}: not a checkpoint folder (no {TRAINER_STATE} inside)")
    if p.is_file():
        return str(p)
    raise FileNotFoundError(f"{p}: no such checkpoint")


# --- the atomic writer ----------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path}: already exists; pass overwrite=True (--overwrite true) to replace it")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish_file(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link creates the name only if it is still free, so a file that appeared while we wrote
    # is not replaced either.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise _exists_error(path) from None
        os.replace(tmp, path)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], *, overwrite: bool = True) -> Path:
    """Write ``path`` through ``write(binary file)``: temp file beside it, fsync, rename.

    Args:
        path: the file to write; parent folders are created.
        write: called with the open temporary file (binary mode).
        overwrite: replace an existing file; ``False`` raises ``FileExistsError`` instead.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise _exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600)
        _publish_file(tmp, path, overwrite)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), overwrite=overwrite)


def write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str | Path, data: Any, *, overwrite: bool = True, indent: int = 2) -> Path:
    """JSON with a trailing newline; NaN and infinity are refused (they are not JSON)."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n", overwrite=overwrite)


def torch_save(obj: Any, path: str | Path, *, overwrite: bool = True) -> Path:
    """``torch.save`` through the atomic writer."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh), overwrite=overwrite)


def _ordinary_modes(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give it and its files the modes mkdir/open would."""
    mask = _umask()
    for sub in [folder, *folder.rglob("*")]:
        sub.chmod((0o777 if sub.is_dir() else 0o666) & ~mask)


def sync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder`` and the folders themselves, before the folder is renamed."""
    folder = Path(folder)
    for sub in folder.rglob("*"):
        if sub.is_file() and not sub.is_symlink():
            with open(sub, "rb") as fh:
                os.fsync(fh.fileno())
    for sub in [folder, *(d for d in folder.rglob("*") if d.is_dir())]:
        _fsync_dir(sub)


def staging_dir(final: str | Path) -> Path:
    """``<final>.tmp``: where a folder is written before :func:`replace_dir` renames it.

    A fixed name, so that every rank of a distributed run writes its part into the same folder;
    :func:`resolve_checkpoint` never picks it.
    """
    final = Path(final)
    return final.with_name(final.name + STAGING_SUFFIX)


def fresh_dir(folder: str | Path) -> Path:
    """An empty ``folder`` (a leftover of an interrupted write is removed first)."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _swap_dir(tmp: Path, final: Path, aside: Path) -> None:
    """``final`` -> ``aside``, ``tmp`` -> ``final``, then ``aside`` goes: always one whole copy on disk."""
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside.is_dir():
        shutil.rmtree(aside)
    elif aside.exists():
        aside.unlink()


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; a kill at any point leaves a usable copy.

    The files in ``tmp`` are fsync'ed first. An existing ``final`` is renamed to ``final.old`` (still
    found by ``resolve_checkpoint``), then ``tmp`` takes its name, then the old copy goes.
    """
    final, tmp = Path(final), Path(tmp)
    sync_tree(tmp)
    old = final.with_name(final.name + OLD_SUFFIX)
    if old.exists():
        shutil.rmtree(old)
    _swap_dir(tmp, final, old)


@contextlib.contextmanager
def atomic_dir(directory: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place when the block ends.

    ``with atomic_dir(out / "lora_adapter") as tmp: save_files_into(tmp)``. An exception inside the
    block removes the temporary folder and leaves an existing ``directory`` as it was.
    ``overwrite=False`` refuses (``FileExistsError``) an existing file or non-empty folder, also one
    that appeared while the block ran; an empty folder is replaced. During the swap the previous
    copy waits under a hidden unique name beside it (``.<name>.XXXX.old/previous``), so no other
    folder is ever removed.
    """
    directory = Path(directory)

    def refuse() -> None:
        if not overwrite and directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise _exists_error(directory)

    refuse()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=STAGING_SUFFIX, dir=directory.parent))
    try:
        yield tmp
        sync_tree(tmp)
        _ordinary_modes(tmp)
        refuse()  # again: something may have appeared while writing
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=OLD_SUFFIX, dir=directory.parent))
        try:
            _swap_dir(tmp, directory, aside / "previous")
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- the JSON header ------------------------------------------------------------------------------
def schema_header(schema: str, version: int) -> dict[str, Any]:
    """``{"schema": schema, "schema_version": version}``: the first keys of a JSON file we write."""
    return {SCHEMA_KEY: schema, SCHEMA_VERSION_KEY: version}


def read_schema(obj: Any) -> tuple[Any, Any]:
    """``(schema, version)`` of a JSON object; ``(None, None)`` for an untagged one.

    Reads the header of :func:`schema_header` and also the ``{"format", "version"}`` spelling.
    """
    if not isinstance(obj, dict):
        return None, None
    if SCHEMA_KEY in obj or SCHEMA_VERSION_KEY in obj:
        return obj.get(SCHEMA_KEY), obj.get(SCHEMA_VERSION_KEY)
    return obj.get("format"), obj.get("version")


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (not valid JSON), logged.

    For results that must not be lost at writing because one number overflowed.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        log.warning("a non-finite number (%s) was written as null", obj)
        return None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
