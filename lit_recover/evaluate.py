"""The standalone evaluation command: measure a saved model, or compare results files.

Measure (the same suite the end-of-fit callback runs)::

    python -m lit_recover.evaluate --model_path pruned_model.bin --metrics all \\
        --ppl_data_dir ../shared/data/ppl --zero_shot_data_dir ../shared/data/zeroshot --output pruned.json

Compare::

    python -m lit_recover.evaluate --compare base.json pruned.json recovered.json \\
        --labels base,pruned,recovered --chart compare.png

Every ``EvalConfig`` field is an option (``--ppl_seq_len 2048``, ``--zero_shot_tasks boolq,piqa``...).
Exit status: 0 when every requested metric ran or was skipped with a reason, 1 when one failed
(the JSON is still written), 2 for bad arguments or input.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path

log = logging.getLogger(__name__)


def _number(text: str) -> int | float | None:
    if text.lower() in {"none", "null"}:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _name_paths(text: str) -> dict[str, str]:
    out = {}
    for item in _comma_list(text):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"expected name=path[,name=path...], got {item!r}")
        out[name.strip()] = path.strip()
    return out


def _metrics(text: str) -> list[str]:
    from lit_recover.evaluation.suite import parse_metrics

    try:
        return parse_metrics(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _field_help() -> dict[str, str]:
    from lit_recover.evaluation.suite import EvalConfig

    try:
        import docstring_parser
    except ImportError:  # help text is a nicety
        return {}
    return {p.arg_name: p.description or "" for p in docstring_parser.parse(EvalConfig.__doc__ or "").params}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ``EvalConfig`` field, typed from its annotation: the dataclass stays the one schema."""
    from lit_recover.evaluation.suite import EvalConfig

    helps = _field_help()
    hints = typing.get_type_hints(EvalConfig)
    group = parser.add_argument_group("evaluation settings (EvalConfig)")
    for f in dataclasses.fields(EvalConfig):
        hint = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict = {"default": argparse.SUPPRESS, "help": f"{helps.get(f.name, '')} (default: {default})"}
        origin, args = typing.get_origin(hint), set(typing.get_args(hint))
        if f.name == "metrics":
            kwargs.update(type=_metrics, metavar="all|ppl,zero_shot,latency,memory")
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(type=_comma_list, metavar="A,B,...")
        elif origin is dict:
            kwargs.update(type=_name_paths, metavar="NAME=PATH,...")
        elif {int, float} <= args or hint is float:
            kwargs.update(type=_number, metavar="N")
        elif hint is int:
            kwargs.update(type=int, metavar="N")
        else:
            kwargs.update(type=str, metavar="PATH" if "dir" in f.name or "model" in f.name else "STR")
        group.add_argument(f"--{f.name}", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_recover.evaluate",
        description="Evaluate a (pruned) model: perplexity, zero-shot accuracy, latency, memory; or compare "
                    "results files.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model_path", metavar="PATH", help="pruned_model.bin (LLM-Pruner pickle) or an HF model folder")
    mode.add_argument("--compare", nargs="+", metavar="JSON", help="results files to put side by side")
    parser.add_argument("--output", metavar="JSON", help="write the results here (refuses to overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --output / --chart files")
    parser.add_argument("--label", help="name of these results in comparisons (default: the model file's stem)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto",
                        help="auto (keep; float16 becomes float32 on CPU), float32, bfloat16 or float16")
    parser.add_argument("--labels", type=_comma_list, metavar="A,B,...", help="column names for --compare")
    parser.add_argument("--chart", metavar="PNG", help="with --compare: save a bar chart here")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="unpickle with plain torch.load (runs code named by the file: trusted files only)")
    _add_config_arguments(parser)
    return parser


def _config_from(args: argparse.Namespace):
    from lit_recover.evaluation.suite import EvalConfig

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    return EvalConfig(**{k: v for k, v in vars(args).items() if k in names})


def _load_model(path: str, device: str, dtype: str, trust_pickle: bool = False):
    import torch

    from lit_recover.models.load import load_pruned

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    model, tokenizer = load_pruned(path, dtype=None if dtype == "auto" else dtype, trust_pickle=trust_pickle)
    if dtype == "auto" and torch.device(device).type == "cpu" and next(model.parameters()).dtype == torch.float16:
        log.info("float16 weights on CPU: evaluating in float32 (pass --dtype float16 to keep them)")
        model.to(torch.float32)
    model.to(device)
    model.eval()
    return model, tokenizer


def _compare(args: argparse.Namespace) -> int:
    from lit_recover.evaluation.report import compare_chart, compare_table, read_results

    # A with_deltas file holds two results (before, after): each is a column.
    entries = [(label or Path(path).stem, res) for path in args.compare for label, res in read_results(path)]
    labels = args.labels or [label for label, _ in entries]
    if len(labels) != len(entries):
        raise ValueError(f"--labels gives {len(labels)} names for {len(entries)} results")
    results = [res for _, res in entries]
    if args.chart and Path(args.chart).exists() and not args.overwrite:
        raise FileExistsError(f"{args.chart}: already exists; pass --overwrite to replace it")
    print(compare_table(results, labels))
    if args.chart:
        print(f"chart: {compare_chart(results, labels, args.chart, overwrite=args.overwrite)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lit_recover.evaluation.report import compare_table, write_results
    from lit_recover.evaluation.suite import evaluate_model, failed_sections
    from lit_recover.models.checks import PrunedModelError

    config = _config_from(args)
    # Fail before the long part: an existing output, or a data folder that isn't there.
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"{args.output}: already exists; pass --overwrite to replace it")
    for name in ("ppl_data_dir", "zero_shot_data_dir"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_dir():
            raise FileNotFoundError(f"--{name} {value}: no such folder")
    try:
        model, tokenizer = _load_model(args.model_path, args.device, args.dtype, args.trust_pickle)
    except (PrunedModelError, ValueError):
        raise
    except Exception as exc:  # transformers' loaders raise all kinds; one line is enough here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PrunedModelError(f"{args.model_path}: could not load the model ({type(exc).__name__}: {first})") from exc
    label = args.label or Path(args.model_path).stem
    results = evaluate_model(model, tokenizer, config, label=label, source=args.model_path)
    if args.output:
        print(f"results: {write_results(results, args.output, overwrite=args.overwrite)}")
    print(compare_table([results], [label]))
    bad = failed_sections(results)
    if bad:
        print(f"failed: {', '.join(bad)} (see the reasons in the JSON)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (``sys.argv[1:]`` when ``None``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.compare is None and (args.labels or args.chart):
        parser.error("--labels and --chart go with --compare")
    from lit_recover.evaluation.report import ResultsFileError
    from lit_recover.models.checks import PrunedModelError

    try:
        return _compare(args) if args.compare else _evaluate(args)
    except (FileExistsError, FileNotFoundError, ResultsFileError, PrunedModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
