"""The pruning report (``pruned_model.json`` beside ``pruned_model.bin``), in one place: building, writing, reading.

A report is a plain JSON object::

    {
      "schema": "lit-recover/pruning",  "schema_version": 1,
      "base_model": ..., "output": ..., "calibration_data": ..., "device": ..., "dtype": ...,
      "versions": {"torch": ..., "transformers": ...},
      "criterion": ..., "pruning_ratio": ..., "params_before": ..., "params_after": ...,
      "params_removed": ..., "achieved_ratio": ..., "layers": [...], "layer_shapes": [...], ...
    }

The header is the one every JSON file of the project opens with (``lit_recover.outputs.schema_header``);
the rest is what :func:`lit_recover.pruning.prune_model` measured. Reports written before the header
existed carry no tag and are read as version 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lit_recover.errors import LitRecoverError
from lit_recover.outputs import finite, read_schema, schema_header, write_json

SCHEMA = "lit-recover/pruning"
SCHEMA_VERSION = 1
# What every report holds, old or new: the numbers the pruning is judged by.
REQUIRED = ("params_before", "params_after", "achieved_ratio")


class PruningReportError(LitRecoverError, ValueError):
    """A pruning report that cannot be read, or a JSON file that is not one."""


def report_path(output: str | Path) -> Path:
    """The JSON report that goes beside a pruned pickle: ``pruned_model.bin`` -> ``pruned_model.json``."""
    return Path(output).with_suffix(".json")


def build_report(stats: dict[str, Any], *, base_model: str, output: str | Path, calibration_data: str | None,
                 device: str, dtype: str, versions: dict[str, str | None]) -> dict[str, Any]:
    """The report of one pruning run: the header, what was pruned and how, then ``prune_model``'s numbers.

    Non-finite numbers (a diverged calibration loss) become ``null``, so the returned report is
    exactly what :func:`write_report` puts in the file.
    """
    return finite({
        **schema_header(SCHEMA, SCHEMA_VERSION),
        "base_model": base_model,
        "output": str(output),
        "calibration_data": calibration_data,
        "device": device,
        "dtype": dtype,
        "versions": versions,
        **stats,
    })


def write_report(report: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the report atomically; an existing file (also one that appeared meanwhile) is refused
    unless ``overwrite``."""
    return write_json(path, finite(report), overwrite=overwrite)


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a pruning report, tagged or from before the tag (version 0).

    Raises:
        PruningReportError: naming the file and the problem (missing, not JSON, another schema, a
            newer version, a missing number).
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PruningReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PruningReportError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise PruningReportError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    schema, version = read_schema(obj)
    if schema is None and version is None:
        version = 0  # written before reports were tagged
    elif schema != SCHEMA:
        raise PruningReportError(f"{path}: not a pruning report (schema is {schema!r}, expected {SCHEMA!r})")
    if type(version) is not int or not 0 <= version <= SCHEMA_VERSION:
        raise PruningReportError(f"{path}: schema_version {version!r} is not readable here (up to {SCHEMA_VERSION})")
    for key in REQUIRED:
        value = obj.get(key)
        if type(value) not in (int, float):
            raise PruningReportError(f"{path}: {key!r} is {'missing' if key not in obj else repr(value)}, "
                                     "expected a number")
    return obj
