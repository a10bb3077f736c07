"""The evaluation results schema, in one place: building, checking, writing, comparing, charting.

A results file is a plain JSON object::

    {
      "schema": "lit-recover/evaluation",  "schema_version": 1,
      "label": "recovered" | null,          "timestamp": "2025-01-01T12:00:00+00:00",
      "model": {"class": ..., "source": ..., "num_layers": ..., "layer_shapes": [...]},
      "environment": {"device": ..., "dtype": ..., "torch_threads": ..., "platform": ..., "versions": {...}},
      "settings": {...every EvalConfig field...},
      "metrics": {"ppl": SECTION, "zero_shot": SECTION, "latency": SECTION, "memory": SECTION},
      "training": TRAINING                  # results of a fit only (training_record)
    }

Every section has a ``status`` (``ok``, ``skipped`` or ``failed``; a ``reason`` when not ok), its
own ``settings`` and its ``elapsed`` time. Every number is a *measurement*:
``{"value": <number | null>, "unit": <str>, ...}``, optionally with ``higher_is_better``. An item
that could not run carries ``status`` and ``reason`` and no value: never a silent zero.
docs/evaluation.md describes each section's fields.

This module deliberately imports neither torch nor lm-eval: comparing result files stays fast.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lit_recover.errors import LitRecoverError
from lit_recover.outputs import atomic_write, finite, read_schema, schema_header, write_json

log = logging.getLogger(__name__)

SCHEMA = "lit-recover/evaluation"
SCHEMA_VERSION = 1
DELTAS_SCHEMA = "lit-recover/evaluation-deltas"

OK, SKIPPED, FAILED = "ok", "skipped", "failed"
STATUSES = (OK, SKIPPED, FAILED)
SECTIONS = ("ppl", "zero_shot", "latency", "memory")

# Subtrees that describe how a number was made rather than being results; the compare table and
# the deltas leave them out ("details" holds every lm-eval metric behind a task's headline number).
_NOT_RESULTS = frozenset({"settings", "elapsed"})
_DETAIL_KEYS = frozenset({"details"})
# Container keys dropped from the short row names of the compare table.
_CONTAINERS = frozenset({"datasets", "tasks"})


class ResultsFileError(LitRecoverError, ValueError):
    """A results file that cannot be read or is not an evaluation results file."""


# --------------------------------------------------------------------------- building blocks
def measurement(value: float | int | None, unit: str, *, higher_is_better: bool | None = None,
                **extra: Any) -> dict[str, Any]:
    """A number with its unit. Non-finite floats become ``null`` with ``non_finite`` saying which."""
    out: dict[str, Any] = {"value": value, "unit": unit}
    if isinstance(value, float) and not math.isfinite(value):
        out["value"] = None
        out["non_finite"] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if higher_is_better is not None:
        out["higher_is_better"] = higher_is_better
    out.update(extra)
    return out


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    """An item or section that could not run here (no data offline, no CUDA, ...)."""
    return {"status": SKIPPED, "reason": reason, **extra}


def failed(reason: str, **extra: Any) -> dict[str, Any]:
    """An item or section that raised or was given bad input; ``reason`` is one line."""
    return {"status": FAILED, "reason": " ".join(str(reason).split()), **extra}


def is_measurement(node: Any) -> bool:
    return isinstance(node, dict) and "value" in node and "unit" in node


def timestamp() -> str:
    """Now, in UTC, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_results(*, label: str | None, settings: dict[str, Any], model: dict[str, Any],
                environment: dict[str, Any]) -> dict[str, Any]:
    """The top level of a results object, with an empty ``metrics`` to fill."""
    return {
        **schema_header(SCHEMA, SCHEMA_VERSION),
        "label": label,
        "timestamp": timestamp(),
        "model": model,
        "environment": environment,
        "settings": settings,
        "metrics": {},
    }


def validate_results(results: Any, source: str = "results") -> None:
    """Raise :class:`ResultsFileError` naming the first thing that breaks the schema."""
    if not isinstance(results, dict):
        raise ResultsFileError(f"{source}: expected a JSON object, found {type(results).__name__}")
    schema, version = read_schema(results)
    if schema != SCHEMA:
        raise ResultsFileError(f"{source}: not an evaluation results file (schema is {schema!r}, "
                               f"expected {SCHEMA!r})")
    if version != SCHEMA_VERSION:
        raise ResultsFileError(f"{source}: schema_version {version!r} is not {SCHEMA_VERSION}")
    for key in ("timestamp", "model", "environment", "settings", "metrics"):
        if key not in results:
            raise ResultsFileError(f"{source}: missing top-level key {key!r}")
    for name, section in results["metrics"].items():
        if name not in SECTIONS:
            raise ResultsFileError(f"{source}: unknown metric section {name!r}")
        if not isinstance(section, dict) or section.get("status") not in STATUSES:
            raise ResultsFileError(f"{source}: metrics.{name} has no valid status")
        if section["status"] != OK and not section.get("reason"):
            raise ResultsFileError(f"{source}: metrics.{name} is {section['status']} without a reason")


# --------------------------------------------------------------------------- writing
def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats (not valid JSON) by null so that a long evaluation is never lost at writing."""
    return finite(obj)


def write_results(results: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write results as JSON atomically; refuse to replace an existing file unless ``overwrite``.

    Args:
        results: a results object (or the output of :func:`with_deltas`).
        path: the JSON file to write; parent folders are created.
        overwrite: replace an existing file instead of raising ``FileExistsError``.

    Returns:
        The path written.
    """
    # the one atomic writer: a file that appeared while we evaluated is not replaced either
    return write_json(path, _finite(results), overwrite=overwrite)


def read_results(path: str | Path) -> list[tuple[str | None, dict]]:
    """Read a results file; a :func:`with_deltas` file gives two entries (before, after).

    Returns:
        ``[(label, results), ...]``.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"{path}: not valid JSON ({exc})") from exc
    if read_schema(obj)[0] == DELTAS_SCHEMA:
        out = []
        for key in ("before", "after"):
            validate_results(obj.get(key), f"{path} ({key})")
            out.append((obj[key].get("label") or key, obj[key]))
        return out
    validate_results(obj, str(path))
    return [(obj.get("label"), obj)]


# --------------------------------------------------------------------------- flattening
def iter_rows(results: dict, *, details: bool = False) -> Iterator[tuple[str, dict]]:
    """Yield ``(path, leaf)`` for every measurement and every skipped/failed item under ``metrics``.

    ``path`` joins the keys with "/", e.g. ``ppl/datasets/wikitext2``. Settings and timings are left
    out; ``details=True`` also yields each zero-shot task's full lm-eval metrics.
    """
    def walk(node: Any, path: list[str]) -> Iterator[tuple[str, dict]]:
        if not isinstance(node, dict):
            return
        if is_measurement(node):
            yield "/".join(path), node
            if not details:
                return
        elif node.get("status") in (SKIPPED, FAILED):
            yield "/".join(path), node
            return
        for key, child in node.items():
            if key in _NOT_RESULTS or (key in _DETAIL_KEYS and not details):
                continue
            if isinstance(child, dict):
                yield from walk(child, [*path, key])

    for name, section in results.get("metrics", {}).items():
        yield from walk(section, [name])
    training = results.get("training")
    if isinstance(training, dict):  # what the fit cost, for comparing runs at equal wall time
        yield from walk(training, ["training"])


def short_name(path: str) -> str:
    """``ppl/datasets/wikitext2`` -> ``ppl wikitext2``: the row name in tables and charts."""
    return " ".join(p for p in path.split("/") if p not in _CONTAINERS)


def _number(leaf: dict) -> float | None:
    v = leaf.get("value") if is_measurement(leaf) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def with_deltas(before: dict, after: dict) -> dict:
    """Both results side by side with ``after - before`` for every measurement present in both.

    Returns:
        ``{"schema": "lit-recover/evaluation-deltas", "before": ..., "after": ..., "deltas": {path: {
        "before", "after", "delta", "relative", "unit", "higher_is_better"?, "improved"?}}}``; ``relative``
        is ``delta / |before|`` (null when before is 0). Items skipped on either side get no delta.
    """
    validate_results(before, "before")
    validate_results(after, "after")
    b_rows = dict(iter_rows(before, details=True))
    deltas: dict[str, dict] = {}
    for path, a_leaf in iter_rows(after, details=True):
        b_leaf = b_rows.get(path)
        if b_leaf is None:
            continue
        b, a = _number(b_leaf), _number(a_leaf)
        if b is None or a is None or b_leaf.get("unit") != a_leaf.get("unit"):
            continue
        entry: dict[str, Any] = {
            "before": b, "after": a, "delta": a - b,
            "relative": (a - b) / abs(b) if b else None, "unit": a_leaf["unit"],
        }
        hib = a_leaf.get("higher_is_better")
        if hib is not None:
            entry["higher_is_better"] = hib
            entry["improved"] = (a > b) if hib else (a < b)
        deltas[path] = entry
    return {**schema_header(DELTAS_SCHEMA, SCHEMA_VERSION), "timestamp": timestamp(),
            "before": before, "after": after, "deltas": deltas}


# --------------------------------------------------------------------------- training
def training_record(*, seconds: float, steps: int, tokens: int, supervised_tokens: int,
                    max_time_s: float | None = None, max_steps: int | None = None, world_size: int = 1,
                    stopped_by: str | None = None, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``training`` entry of a fit's results: what the recovery cost, so that runs (SFT against
    distillation) can be compared at equal wall time.

    Args:
        seconds: wall time of the training loop (validation inside it included; loading and the
            end-of-fit evaluation not), summed over resumed parts.
        steps: optimizer steps taken.
        tokens: non-pad tokens trained on, all ranks.
        supervised_tokens: the supervised (loss) tokens among them.
        max_time_s: the ``--trainer.max_time`` budget in seconds, if any.
        max_steps: the ``--trainer.max_steps`` limit, if any.
        world_size: processes that trained.
        stopped_by: ``max_time``, ``max_steps``, ``max_epochs`` or ``other``.
        recipe: the objective and its settings (``sft`` or ``distillation`` with the teacher's keys).
    """
    return {
        "wall_time": measurement(float(seconds), "s", higher_is_better=False),
        "optimizer_steps": measurement(int(steps), "count"),
        "tokens_seen": measurement(int(tokens), "tokens"),
        "supervised_tokens": measurement(int(supervised_tokens), "tokens"),
        "settings": {"max_time_s": max_time_s, "max_steps": max_steps, "world_size": int(world_size),
                     "stopped_by": stopped_by, "recipe": dict(recipe or {})},
    }


# --------------------------------------------------------------------------- share of the gap won back
def recovery_shares(results: Sequence[dict]) -> list[tuple[str, str, list[float | None]]]:
    """What each recovered model won back of what pruning lost, from ``[base, pruned, recovered, …]``.

    Per perplexity (every ``perplexity`` row): ``R = (ln P_pruned − ln P_recovered) / (ln P_pruned −
    ln P_base)``, the share of the log-perplexity gap won back (1: back at the base, 0: no better
    than pruned, < 0: worse). For the zero-shot average: ``(A_recovered − A_pruned) / (A_base −
    A_pruned)``, the share of the accuracy gap. Rows ``(name, unit, [None, None, share, …])``, one
    value per results (``None`` for the base and the pruned columns, and where a number is missing
    or the gap is zero).
    """
    if len(results) < 3:
        raise ValueError(f"recovery shares need base, pruned and at least one recovered result, got {len(results)}")
    out: list[tuple[str, str, list[float | None]]] = []
    for path, unit, leaves in comparison_rows(results):
        values = [None if leaf is None else _number(leaf) for leaf in leaves]
        base, pruned = values[0], values[1]
        if unit == "perplexity" and path.startswith("ppl/"):
            if base is None or pruned is None or base <= 0 or pruned <= 0 or math.log(pruned) == math.log(base):
                continue
            gap = math.log(pruned) - math.log(base)
            shares = [None if v is None or v <= 0 else (math.log(pruned) - math.log(v)) / gap for v in values[2:]]
            out.append((f"R {short_name(path)}", "share of log-PPL gap", [None, None, *shares]))
        elif path == "zero_shot/average":
            if base is None or pruned is None or base == pruned:
                continue
            shares = [None if v is None else (v - pruned) / (base - pruned) for v in values[2:]]
            out.append(("R zero_shot average", "share of accuracy gap", [None, None, *shares]))
    return out


# --------------------------------------------------------------------------- what did not run
class MissingMetricsError(LitRecoverError, RuntimeError):
    """Under ``strict``: a metric that was asked for could not run (the results are written first)."""


def missing_metrics(results: dict) -> list[tuple[str, dict]]:
    """Every metric that was asked for and did not run, as ``(name, item)``, in the results' order.

    A skipped or failed section, dataset, task or other item counts; an item marked
    ``not_applicable`` (the CUDA peak of a CPU run) does not. A :func:`with_deltas` object lists
    its before and after results, each name prefixed with its label (``pruned: ppl ptb``).
    """
    from lit_recover.outputs import read_schema

    if read_schema(results)[0] == DELTAS_SCHEMA:
        out = []
        for key in ("before", "after"):
            part = results.get(key) or {}
            out.extend((f"{part.get('label') or key}: {name}", leaf) for name, leaf in missing_metrics(part))
        return out
    out: list[tuple[str, dict]] = []
    for path, leaf in iter_rows(results):
        if leaf.get("status") not in (SKIPPED, FAILED) or leaf.get("not_applicable"):
            continue
        if "/" not in path:  # a whole section: name its datasets or tasks, each with its own reason
            items = [(f"{path}/{box}/{key}", item) for box in sorted(_CONTAINERS)
                     for key, item in (leaf.get(box) or {}).items()
                     if isinstance(item, dict) and item.get("status") in (SKIPPED, FAILED)]
            if items:
                out.extend(items)
                continue
        out.append((path, leaf))
    return [(short_name(path), leaf) for path, leaf in out]


def failure_box(results: dict, path: str | Path | None = None, width: int = 100) -> str | None:
    """A framed list of the metrics that were asked for and could not run, with their reasons.

    ``None`` when everything ran. Printed at the end of fit and of ``evaluate``, so that a metric
    lost to an unreachable dataset is seen, not found later as a missing row.

    Args:
        results: a results object or a :func:`with_deltas` object.
        path: the file the results were written to, named in the box.
        width: the box's width in characters.
    """
    import textwrap

    missing = missing_metrics(results)
    if not missing:
        return None
    inner = width - 4
    lines = [f"{len(missing)} metric{'s' if len(missing) > 1 else ''} asked for could not run:"]
    for name, leaf in missing:
        lines.extend(textwrap.wrap(f"{name}: {leaf['status']}: {leaf.get('reason') or 'no reason given'}",
                                   inner, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False))
    if path is not None:
        lines.extend(textwrap.wrap(f"(the reasons are also in {path})", inner, break_on_hyphens=False))
    rule = "+" + "-" * (width - 2) + "+"
    return "\n".join([rule, *(f"| {line:<{inner}} |" for line in lines), rule])


def raise_if_missing(results: dict, path: str | Path | None = None) -> None:
    """Raise :class:`MissingMetricsError` naming every metric that was asked for and did not run."""
    missing = missing_metrics(results)
    if missing:
        where = f" (results written to {path})" if path is not None else ""
        names = ", ".join(f"{name} {leaf['status']}" for name, leaf in missing)
        raise MissingMetricsError(f"strict evaluation: {len(missing)} metric{'s' if len(missing) > 1 else ''} "
                                  f"asked for could not run: {names}{where}")


# --------------------------------------------------------------------------- compare table
def _fmt(leaf: dict | None) -> str:
    if leaf is None:
        return "–"
    if not is_measurement(leaf):
        return leaf.get("status", "?")
    v = leaf.get("value")
    if v is None:
        return leaf.get("non_finite", "null")
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    unit = leaf.get("unit")
    if unit == "fraction":
        text = f"{v:.4f}"
    elif abs(v) >= 100:
        text = f"{v:,.1f}"
    else:
        text = f"{v:.3f}"
    if leaf.get("stderr") is not None:
        text += f" ± {leaf['stderr']:.4f}"
    return text


def comparison_rows(results: Sequence[dict]) -> list[tuple[str, str, list[dict | None]]]:
    """Rows ``(name, unit, [leaf per results])`` over the union of all results, in first-seen order."""
    order: list[str] = []
    per: list[dict[str, dict]] = []
    for res in results:
        rows = dict(iter_rows(res))
        per.append(rows)
        order.extend(p for p in rows if p not in order)
    out = []
    for path in order:
        leaves = [rows.get(path) for rows in per]
        unit = next((leaf["unit"] for leaf in leaves if leaf is not None and is_measurement(leaf)), "")
        out.append((path, unit, leaves))
    return out


def compare_table(results: Sequence[dict], labels: Sequence[str] | None = None,
                  recovery: bool | None = None) -> str:
    """A markdown table: one row per metric, one column per results, and last minus first.

    ``recovery`` (default: with three results or more) reads the columns as base, pruned, then
    recovered models, and adds the share of the gap each recovered one won back
    (:func:`recovery_shares`: ``R`` per perplexity, and for the zero-shot average).
    """
    if not results:
        raise ValueError("nothing to compare")
    labels = list(labels) if labels else [r.get("label") or f"#{i + 1}" for i, r in enumerate(results)]
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    with_delta = len(results) > 1
    head = ["metric", "unit", *labels] + ([f"Δ {labels[-1]} − {labels[0]}"] if with_delta else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for path, unit, leaves in comparison_rows(results):
        cells = [short_name(path), unit, *(_fmt(leaf) for leaf in leaves)]
        if with_delta:
            first, last = (None if leaf is None else _number(leaf) for leaf in (leaves[0], leaves[-1]))
            cells.append("" if first is None or last is None else f"{last - first:+.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    if recovery is None:
        recovery = len(results) >= 3
    if recovery:
        for name, unit, shares in recovery_shares(results):
            cells = [name, unit, *("–" if v is None else f"{v:.3f}" for v in shares)] + ([""] if with_delta else [])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Rows worth a bar in the chart: the headline numbers, grouped by unit into panels.
_CHART_UNITS = ("perplexity", "fraction", "ms", "tokens/s", "MiB")


def chart_panels(results: Sequence[dict]) -> dict[str, list[tuple[str, list[float | None]]]]:
    """What the chart draws: ``{unit: [(row name, [value per results]), ...]}``, one panel per unit.

    Every row a results has a number for is kept, with ``None`` for the results that lack it (the
    base and pruned columns of a demo measured on perplexity only, say); a row no results has a
    number for is left out.
    """
    panels: dict[str, list[tuple[str, list[float | None]]]] = {}
    for row_path, unit, leaves in comparison_rows(results):
        if unit not in _CHART_UNITS or row_path.startswith("memory/parameters"):
            continue
        values = [None if leaf is None else _number(leaf) for leaf in leaves]
        if any(v is not None for v in values):
            panels.setdefault(unit, []).append((short_name(row_path), values))
    return panels


def _bar_text(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def chart_figure(results: Sequence[dict], labels: Sequence[str]):
    """The comparison chart as a matplotlib figure: one panel per unit (perplexity, accuracy,
    latency, throughput, memory), in every panel one bar per row for every model that has the
    number, in the same colour for a model throughout, its value written on it; a model without
    the number gets an ``n/a`` mark and no bar. The caller closes the figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    labels = list(labels)
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    panels = chart_panels(results)
    if not panels:
        raise ValueError("no numeric results to chart")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.6 * len(results) * max(len(r) for r in panels.values())
                                                          + 3), 3.2 * len(panels)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    width = 0.8 / len(results)
    for ax, (unit, rows) in zip(axes[:, 0], panels.items(), strict=True):
        for j, label in enumerate(labels):
            xs = [i + (j - (len(results) - 1) / 2) * width for i in range(len(rows))]
            present = [(x, vals[j]) for x, (_, vals) in zip(xs, rows, strict=True) if vals[j] is not None]
            colour = colours[j % len(colours)]
            if present:  # a missing value is not a zero: no bar, an n/a mark
                bars = ax.bar([x for x, _ in present], [v for _, v in present], width, label=label, color=colour)
                ax.bar_label(bars, labels=[_bar_text(v) for _, v in present], fontsize=6, padding=1)
            else:  # still in the legend, so that the colours read the same in every panel
                ax.bar([], [], width, label=label, color=colour)
            for x, (_, vals) in zip(xs, rows, strict=True):
                if vals[j] is None:
                    ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([name for name, _ in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("accuracy" if unit == "fraction" else unit)
        ax.margins(y=0.12)  # room for the values on the bars
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    return fig


def compare_chart(results: Sequence[dict], labels: Sequence[str], path: str | Path,
                  overwrite: bool = False) -> Path:
    """Save a PNG of grouped bars (:func:`chart_figure`: one panel per unit, every model in every panel)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass --overwrite to replace it")
    fig = chart_figure(results, labels)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix[1:] or "png", dpi=110), overwrite=overwrite)
    finally:
        plt.close(fig)
    return path
