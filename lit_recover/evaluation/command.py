"""The evaluation commands: ``lit-recover evaluate`` (measure a saved model) and ``lit-recover compare``.

Measure (the same suite the end-of-fit callback runs)::

    lit-recover evaluate --model_path pruned_model.bin --metrics all \\
        --ppl_data_dir ../shared/data/ppl --zero_shot_data_dir ../shared/data/zeroshot --output pruned.json

Compare::

    lit-recover compare base.json pruned.json recovered.json --labels base,pruned,recovered --chart compare.png

``python -m lit_recover.evaluate`` (and ``python -m lit_recover.evaluation``) is the same pair:
``--model_path …`` measures, ``--compare A.json B.json …`` compares.

The options are the signatures of :func:`evaluate` and :func:`compare`, read by jsonargparse; every
``EvalConfig`` field is an option of its own (``--ppl_seq_len 2048``, ``--zero_shot_tasks boolq,piqa``,
``--ppl_texts demo=notes.txt``, ``--progress false``). List and mapping options take a YAML value or
the short forms ``a,b`` and ``name=path,name=path``. Booleans are ``--flag true|false``.
Exit status: 0 when every requested metric ran or was skipped with a reason, 1 when one failed
(the JSON is still written), 2 for bad arguments or input, and under ``--strict true`` when a metric
that was asked for could not run (the JSON is still written).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lit_recover.errors import ConfigError, OutputExistsError, exit_on_user_error
from lit_recover.evaluation.suite import EvalConfig

log = logging.getLogger(__name__)

EVALUATE_PROG = "lit-recover evaluate"
COMPARE_PROG = "lit-recover compare"
SHORT_FORMS = (" Lists take [a,b] or a,b; mappings {name: path} or name=path,name=path;"
               " booleans true or false.")


# --------------------------------------------------------------------------- the commands
def evaluate(
    model_path: str,
    settings: EvalConfig | None = None,
    output: str | None = None,
    overwrite: bool = False,
    label: str | None = None,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    trust_pickle: bool = False,
    quiet: bool = False,
) -> int:
    """Evaluate a (pruned) model: perplexity, zero-shot accuracy, latency, memory.

    Args:
        model_path: pruned_model.bin (LLM-Pruner pickle), a pruned folder, or a Hugging Face model folder.
        settings: what to measure and how (on the command line, one option per field).
        output: write the results here (an existing file is refused unless --overwrite true).
        overwrite: replace an existing --output file.
        label: name of these results in comparisons (default: the model file's stem).
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
        dtype: auto (keep; float16 becomes float32 on CPU), float32, bfloat16 or float16.
        trust_pickle: unpickle with plain torch.load (runs code named by the file: trusted files only).
        quiet: log warnings only.

    Returns:
        The exit status: 0 when every metric ran or was skipped with a reason, 1 when one failed.
    """
    from lit_recover.evaluation.report import compare_table, failure_box, raise_if_missing, write_results
    from lit_recover.evaluation.suite import evaluate_model, failed_sections

    _configure_logging(quiet)
    config = settings if settings is not None else EvalConfig()
    # Fail before the long part: an existing output, or a data folder that isn't there.
    if output and Path(output).exists() and not overwrite:
        raise OutputExistsError(f"{output}: already exists; pass --overwrite true to replace it")
    for name in ("ppl_data_dir", "zero_shot_data_dir"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_dir():
            raise ConfigError(f"--{name} {value}: no such folder")
    model, tokenizer = _load_model(model_path, device, dtype, trust_pickle)
    label = label or Path(model_path).stem
    results = evaluate_model(model, tokenizer, config, label=label, source=model_path)
    written = write_results(results, output, overwrite=overwrite) if output else None
    if written:
        print(f"results: {written}")
    print(compare_table([results], [label]))
    box = failure_box(results, written)
    if box is not None:  # last, so that a metric lost to an unreachable dataset is seen
        print(box, file=sys.stderr)
    if config.strict:
        raise_if_missing(results, written)
    bad = failed_sections(results)
    if bad:
        print(f"failed: {', '.join(bad)} (see the reasons in the JSON)", file=sys.stderr)
        return 1
    return 0


def compare(
    results: list[str],
    labels: list[str] | None = None,
    chart: str | None = None,
    overwrite: bool = False,
    recovery: bool | None = None,
) -> int:
    """Compare results files: a markdown table on stdout, and a bar chart.

    Args:
        results: results files to put side by side (a with_deltas file counts as two columns, before and after).
        labels: column names, one per column (default: the labels stored in the files).
        chart: save a PNG bar chart here (an existing file is refused unless --overwrite true).
        overwrite: replace an existing --chart file.
        recovery: read the columns as base, pruned, recovered…, and add for each recovered one the
            share of the gap won back: R = (ln P_pruned − ln P_recovered) / (ln P_pruned − ln P_base)
            per perplexity, and the share of the accuracy gap for the zero-shot average (default:
            with three columns or more).

    Returns:
        The exit status, 0.
    """
    from lit_recover.evaluation.report import compare_chart, compare_table, read_results

    # A with_deltas file holds two results (before, after): each is a column.
    entries = [(label or Path(path).stem, res) for path in results for label, res in read_results(path)]
    names = list(labels) if labels else [label for label, _ in entries]
    if len(names) != len(entries):
        raise ConfigError(f"--labels gives {len(names)} names for {len(entries)} results")
    columns = [res for _, res in entries]
    if chart and Path(chart).exists() and not overwrite:
        raise OutputExistsError(f"{chart}: already exists; pass --overwrite true to replace it")
    print(compare_table(columns, names, recovery=recovery))
    if chart:
        try:
            written = compare_chart(columns, names, chart, overwrite=overwrite)
        except ValueError as exc:  # nothing numeric to draw
            raise ConfigError(f"{chart}: {exc}") from None
        print(f"chart: {written}")
    return 0


# --------------------------------------------------------------------------- their parsers
def evaluate_parser(prog: str = EVALUATE_PROG):
    """The jsonargparse parser of :func:`evaluate`: its parameters, and one option per ``EvalConfig`` field."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=_summary(evaluate) + SHORT_FORMS, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Read the options from a YAML/JSON file.")
    parser.add_function_arguments(evaluate, skip={"settings"}, as_group=False)
    parser.add_class_arguments(EvalConfig, as_group=True)  # flat: --metrics, --ppl_seq_len, ...
    return parser


def compare_parser(prog: str = COMPARE_PROG):
    """The jsonargparse parser of :func:`compare` (its results files are positional)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=_summary(compare) + SHORT_FORMS, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Read the options from a YAML/JSON file.")
    parser.add_function_arguments(compare, skip={"results"}, as_group=False)
    parser.add_argument("results", nargs="+", type=str, metavar="JSON", help=_arg_help(compare, "results"))
    return parser


def evaluate_main(argv: Sequence[str] | None = None, prog: str = EVALUATE_PROG) -> int:
    """``lit-recover evaluate …``: parse ``argv`` (``sys.argv[1:]`` when ``None``), run, return the exit status."""

    def run() -> int:
        parser = evaluate_parser(prog)
        cfg = parser.parse_args(short_forms(parser, _argv(argv))).as_dict()
        cfg.pop("config", None)
        fields = {f.name for f in dataclasses.fields(EvalConfig)}
        settings = settings_from({k: cfg.pop(k) for k in list(cfg) if k in fields})
        return evaluate(settings=settings, **cfg)

    return exit_on_user_error(run)


def compare_main(argv: Sequence[str] | None = None, prog: str = COMPARE_PROG) -> int:
    """``lit-recover compare A.json B.json …``: parse ``argv``, print the table, return the exit status."""

    def run() -> int:
        parser = compare_parser(prog)
        cfg = parser.parse_args(short_forms(parser, _argv(argv))).as_dict()
        cfg.pop("config", None)
        return compare(**cfg)

    return exit_on_user_error(run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lit_recover.evaluate``: ``--model_path …`` runs :func:`evaluate`, ``--compare A B …`` compares."""
    args = _argv(argv)
    split = _split_compare(args)
    if split is None:
        return evaluate_main(args, prog="python -m lit_recover.evaluate")
    return compare_main(split, prog="python -m lit_recover.evaluate --compare")


# --------------------------------------------------------------------------- helpers
def settings_from(values: dict[str, Any]) -> EvalConfig:
    """An ``EvalConfig`` from parsed options; ``metrics`` may be ``[all]``. A bad value is a one-line error."""
    from lit_recover.evaluation.suite import parse_metrics

    try:
        if "metrics" in values:
            values = {**values, "metrics": parse_metrics(values["metrics"])}
        return EvalConfig(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def short_forms(parser, argv: list[str]) -> list[str]:
    """``argv`` with the short spellings of list and mapping options made YAML for jsonargparse.

    For an option typed as a list, ``a,b`` becomes ``["a", "b"]``; for a mapping, ``name=path,name=path``
    becomes ``{"name": "path", ...}``. A value already in brackets or braces, ``null`` and anything
    else is passed on as written (jsonargparse then reports what does not fit).
    """
    kinds: dict[str, str] = {}
    for action in parser._actions:
        kind = _container_kind(getattr(action, "_typehint", None))
        if kind:
            for option in action.option_strings:
                kinds[option] = kind
    out: list[str] = []
    pending: str | None = None
    for token in argv:
        if pending is not None:
            out.append(_short_value(pending, token))
            pending = None
            continue
        option, eq, value = token.partition("=")
        if token in kinds:
            pending = kinds[token]
            out.append(token)
        elif eq and option in kinds:
            out.append(f"{option}={_short_value(kinds[option], value)}")
        else:
            out.append(token)
    return out


def _container_kind(hint: Any) -> str | None:
    """``list`` or ``dict`` when ``hint`` (or a member of its union) is one, else ``None``."""
    if hint is None:
        return None
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _union_type()) else (hint,)
    for candidate in candidates:
        origin = typing.get_origin(candidate) or candidate
        if origin in (list, tuple):
            return "list"
        if origin is dict:
            return "dict"
    return None


def _union_type() -> Any:
    import types

    return getattr(types, "UnionType", typing.Union)


def _short_value(kind: str, value: str) -> str:
    text = value.strip()
    if not text or text[0] in "[{" or text.lower() in ("null", "none"):
        return value
    items = [item.strip() for item in text.split(",") if item.strip()]
    if kind == "list":
        return json.dumps(items)
    pairs = [item.partition("=") for item in items]
    if not all(sep and name.strip() and path.strip() for name, sep, path in pairs):
        return value  # not name=path: jsonargparse says what is expected
    return json.dumps({name.strip(): path.strip() for name, _, path in pairs})


def _split_compare(args: list[str]) -> list[str] | None:
    """``--compare A B --labels x,y`` as ``A B --labels x,y`` (the files first), or ``None`` without ``--compare``."""
    for i, token in enumerate(args):
        if token == "--compare" or token.startswith("--compare="):
            files = [token.partition("=")[2]] if "=" in token else []
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                files.append(args[j])
                j += 1
            return [*files, *args[:i], *args[j:]]
    return None


def _argv(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _summary(fn: Any) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0]


def _arg_help(fn: Any, name: str) -> str:
    try:
        import docstring_parser
    except ImportError:  # help text is a nicety
        return ""
    return next((p.description or "" for p in docstring_parser.parse(fn.__doc__ or "").params
                 if p.arg_name == name), "")


def _load_model(path: str, device: str, dtype: str, trust_pickle: bool = False):
    import torch

    from lit_recover.errors import LitRecoverError
    from lit_recover.models.checks import PrunedModelError
    from lit_recover.models.load import load_pruned

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device (auto, cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here")
    try:
        model, tokenizer = load_pruned(path, dtype=None if dtype == "auto" else dtype, trust_pickle=trust_pickle)
    except LitRecoverError:
        raise
    except Exception as exc:  # transformers' loaders raise all kinds; one line is enough here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PrunedModelError(f"{path}: could not load the model ({type(exc).__name__}: {first})") from exc
    if dtype == "auto" and kind == "cpu" and next(model.parameters()).dtype == torch.float16:
        log.info("float16 weights on CPU: evaluating in float32 (pass --dtype float16 to keep them)")
        model.to(torch.float32)
    model.to(device)
    model.eval()
    return model, tokenizer
