"""Reading and checking instruction records (hub id or local .json/.jsonl), one by one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lit_recover.errors import LitRecoverError

log = logging.getLogger(__name__)

_LOCAL_SUFFIXES = (".json", ".jsonl")
_TEXT_FIELDS = ("instruction", "input", "output")


class DataError(LitRecoverError, ValueError):
    """Unusable training data, with a one-line reason naming the file (and the record, when one is at fault)."""


def is_local_path(data_path: str) -> bool:
    """Whether ``data_path`` names a local file rather than a hub dataset id."""
    path = Path(data_path).expanduser()
    return path.exists() or path.suffix in _LOCAL_SUFFIXES or data_path.startswith((".", "/", "~", "\\"))


def check_record(record: object) -> dict[str, str]:
    """The record as ``{instruction, input, output}`` strings, or ``ValueError`` saying what is wrong.

    ``input`` may be absent or null (no context); ``instruction`` and ``output`` must be present.
    Strings that cannot be encoded as UTF-8 (lone surrogates from a ``\\ud800`` escape) are refused
    here because the tokenizer would fail on them later with a far less useful message.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with 'instruction' and 'output', found {type(record).__name__}")
    clean = {}
    for key in _TEXT_FIELDS:
        value = record.get(key)
        if value is None:
            if key != "input":
                raise ValueError(f"missing '{key}'")
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"'{key}' is a {type(value).__name__}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"'{key}' is not valid Unicode (lone surrogate at character {exc.start})") from None
        clean[key] = value
    return clean


def _read_local(path: Path, source: str, max_records: int | None, skip_bad: bool) -> tuple[list[object], list[str]]:
    """Raw records of a .json list or a .jsonl file; unparsable .jsonl lines count as bad records."""
    if path.is_dir():
        raise DataError(f"{source}: is a directory; give a .json/.jsonl file or a hub dataset id")
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    if path.suffix not in _LOCAL_SUFFIXES:
        raise DataError(f"{source}: unsupported file type '{path.suffix}' (expected .json or .jsonl)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{source}: empty file, no records")
    problems: list[str] = []
    if path.suffix == ".jsonl":
        raw: list[object] = []
        index = 0
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if max_records is not None and index >= max_records:
                break
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                problem = f"{source}: record {index} (line {line_no}): invalid JSON: {exc.msg} at column {exc.colno}"
                if not skip_bad:
                    raise DataError(problem) from None
                problems.append(problem)
                raw.append(_UNPARSABLE)
            index += 1
        return raw, problems
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of records, found a {type(data).__name__}")
    return (data if max_records is None else data[:max_records]), problems


_UNPARSABLE = object()  # placeholder keeping record indices equal to line order in a .jsonl file


def read_hub(name: str, cache_dir: str | None, max_records: int | None) -> list[object]:
    try:
        import datasets

        table = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
    except Exception as exc:  # offline, unknown id, no train split: all end the run the same way
        message = " ".join(str(exc).split())
        raise DataError(
            f"{name}: cannot load the hub dataset's train split ({type(exc).__name__}: {message})"
        ) from None
    if max_records is not None:
        table = table.select(range(min(max_records, len(table))))
    return table.to_list()


def load_records(
    data_path: str,
    *,
    skip_bad_records: bool = False,
    max_records: int | None = None,
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Read and check Alpaca records.

    Args:
        data_path: a hub dataset id or a local ``.json`` (a list) / ``.jsonl`` (one object a line) file.
        skip_bad_records: drop records that fail the checks (and log how many) instead of raising.
        max_records: keep only the first ``max_records`` records of the source (before any check).
        cache_dir: where the hub download goes; ``None`` uses the Hugging Face datasets cache.

    Returns:
        ``[{"index", "instruction", "input", "output"}, ...]``, ``index`` being the position in the source.

    Raises:
        DataError: naming the source, the record index and the problem.
    """
    if max_records is not None and max_records < 1:
        raise DataError(f"{data_path}: max_records must be at least 1, got {max_records}")
    problems: list[str] = []
    if is_local_path(data_path):
        raw, problems = _read_local(Path(data_path).expanduser(), data_path, max_records, skip_bad_records)
    else:
        raw = read_hub(data_path, cache_dir, max_records)
    if not raw:
        raise DataError(f"{data_path}: no records")
    records = []
    for index, record in enumerate(raw):
        if record is _UNPARSABLE:
            continue  # already counted in problems
        try:
            clean = check_record(record)
        except ValueError as exc:
            problem = f"{data_path}: record {index}: {exc}"
            if not skip_bad_records:
                raise DataError(problem) from None
            problems.append(problem)
            continue
        records.append({"index": index, **clean})
    if problems:
        log.warning("%s: skipped %d bad record(s) of %d; first: %s", data_path, len(problems), len(raw), problems[0])
    if not records:
        raise DataError(f"{data_path}: no usable records ({len(problems)} bad)")
    return records
