"""``lit-recover``: the one command line (``python -m lit_recover`` is the same).

    lit-recover fit --config configs/recover.yaml --model.pruned_model prune_log/x/pruned_model.bin
    lit-recover validate --config configs/recover.yaml --model.pruned_model … --ckpt_path last
    lit-recover prune --base_model smollm2 --pruning_ratio 0.2 --output results/x/pruned_model.bin
    lit-recover convert pruned_model.bin pruned_folder/
    lit-recover evaluate --model_path results/x/pruned_model.bin --metrics all --output pruned.json
    lit-recover compare base.json pruned.json recovered.json --labels base,pruned,recovered
    lit-recover demo

``fit`` and ``validate`` are the LightningCLI of ``python main.py`` (:class:`lit_recover.cli.RecoveryCLI`).
Each other subcommand is a plain function whose typed signature, with its docstring, is the schema of
its options, read by jsonargparse; the function lives in its room and its ``python -m`` alias runs the
same parser. Booleans are spelled ``--flag true|false`` everywhere. A usage or user error prints one
line, ``error: <message>``, and exits with status 2 (:func:`lit_recover.errors.exit_on_user_error`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lit_recover import __version__
from lit_recover.errors import USAGE_EXIT_CODE, exit_on_user_error

PROG = "lit-recover"
DESCRIPTION = ("Recover structurally pruned LLMs with LoRA fine-tuning, then measure what came back. "
               "`lit-recover SUBCOMMAND --help` lists the options of each.")


@dataclass(frozen=True)
class Command:
    """A subcommand: the entry that parses its options and runs its function (``module:function``)."""

    entry: str
    help: str


COMMANDS: dict[str, Command] = {
    "fit": Command("lit_recover.cli:run_cli",
                   "LoRA-fine-tune a pruned model, merge it, evaluate it (python main.py fit)."),
    "validate": Command("lit_recover.cli:run_cli", "Validation loss of a pruned model or a checkpoint."),
    "prune": Command("lit_recover.pruning.__main__:main",
                     "Structurally prune a LLaMA-family model into an LLM-Pruner pruned_model.bin."),
    "convert": Command("lit_recover.models.convert:main",
                       "Convert a pruned model between the pickle and the pickle-free folder."),
    "evaluate": Command("lit_recover.evaluation.command:evaluate_main",
                        "Evaluate a (pruned) model: perplexity, zero-shot accuracy, latency, memory."),
    "compare": Command("lit_recover.evaluation.command:compare_main",
                       "Compare results files: a markdown table on stdout, and a bar chart."),
    "demo": Command("lit_recover.demos.demo:main",
                    "Prune a real small model, recover it with LoRA and measure base / pruned / recovered, offline."),
}
"""Subcommand -> entry point. Parsers are built on demand, so ``lit-recover --help`` loads no model code."""

LIGHTNING_COMMANDS = ("fit", "validate")


def _entry(command: Command):
    module, _, name = command.entry.partition(":")
    return getattr(importlib.import_module(module), name)


def root_parser():
    """The ``lit-recover`` parser: one subcommand per entry of :data:`COMMANDS`, for the help and the choice."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, version=__version__, exit_on_error=False)
    subcommands = parser.add_subcommands(required=True, dest="subcommand")
    for name, command in COMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(prog=f"{PROG} {name}", description=command.help),
                                   help=command.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lit-recover`` with ``argv`` (``sys.argv[1:]`` when ``None``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = args[0] if args else None
    if name in LIGHTNING_COMMANDS:
        # LightningCLI parses the subcommand itself (from sys.argv when that is where the arguments are)
        _entry(COMMANDS[name])(None if argv is None else args)
        return 0
    if name in COMMANDS:
        result = _entry(COMMANDS[name])(args[1:], prog=f"{PROG} {name}")
        return result if isinstance(result, int) else 0  # evaluate's status; the others raise on failure
    # no subcommand, an unknown one, --help or --version: the root parser answers (help exits 0)
    exit_on_user_error(root_parser().parse_args, args)
    return USAGE_EXIT_CODE  # not reached: a valid subcommand is dispatched above


if __name__ == "__main__":
    sys.exit(main())
