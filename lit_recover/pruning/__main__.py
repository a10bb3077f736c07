"""The pruner's command line.

``lit-recover prune --base_model DIR_OR_PICKLE --pruning_ratio 0.2 --output results/NAME/pruned_model.bin``

Writes the LLM-Pruner pickle ``{'model', 'tokenizer'}`` and, beside it, ``<output stem>.json``
(``pruned_model.json``): the settings, the parameter counts before and after, the achieved ratio and
the kept shapes per layer. ``--base_model smollm2`` converts (once) and prunes the packaged
SmolLM2-135M-Instruct. ``python -m lit_recover.prune`` and ``python -m lit_recover.pruning`` are the
same command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lit_recover.errors import OutputExistsError, exit_on_user_error
from lit_recover.pruning.importance import Criterion, read_calibration_texts
from lit_recover.pruning.pruner import prune_model
from lit_recover.pruning.report import build_report, report_path, write_report

log = logging.getLogger(__name__)


def prune(
    base_model: str,
    output: str,
    pruning_ratio: float = 0.2,
    criterion: Criterion = "taylor",
    block_attention_layer_start: int | None = None,
    block_attention_layer_end: int | None = None,
    block_mlp_layer_start: int | None = None,
    block_mlp_layer_end: int | None = None,
    calibration_data: str | None = None,
    num_examples: int = 10,
    calibration_seq_len: int = 64,
    micro_batch_size: int = 2,
    seed: int = 42,
    device: str = "cpu",
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Structurally prune a LLaMA-family model and save it as an LLM-Pruner ``pruned_model.bin``.

    Args:
        base_model: a Hugging Face model folder, an LLM-Pruner pickle, a hub id, or ``smollm2`` (the
            packaged SmolLM2-135M-Instruct, converted once).
        output: the pickle to write, e.g. ``results/NAME/pruned_model.bin``; the JSON report goes beside it.
        pruning_ratio: fraction of all parameters to remove.
        criterion: importance criterion: l1, l2, taylor or random.
        block_attention_layer_start: first layer whose attention heads are pruned (default scales LLM-Pruner's 4 of 32).
        block_attention_layer_end: one past the last such layer (default scales LLM-Pruner's 30 of 32).
        block_mlp_layer_start: first layer whose MLP channels are pruned.
        block_mlp_layer_end: one past the last such layer.
        calibration_data: text file or Alpaca JSON for taylor; default a few built-in paragraphs.
        num_examples: calibration windows for taylor.
        calibration_seq_len: tokens per calibration window.
        micro_batch_size: calibration windows per forward/backward.
        seed: seed for random scores and the calibration order.
        device: where importance is computed (cpu, cuda); the result is saved from the CPU.
        dtype: load the model in this dtype (float32, bfloat16, float16); default keeps the stored one.
        overwrite: replace an existing output instead of stopping.

    Returns:
        The report written to the JSON file.
    """
    from lit_recover.models.checks import check_forward, check_structure
    from lit_recover.models.load import load_pruned, save_pruned

    out, out_json = Path(output), report_path(output)
    if not overwrite:
        for path in (out, out_json):
            if path.exists():
                raise OutputExistsError(f"{path}: already exists; pass --overwrite true to replace it")
    texts = read_calibration_texts(calibration_data) if calibration_data else None
    source = base_model
    if base_model == "smollm2":
        from lit_recover.models.gguf import convert_smollm2

        source = str(convert_smollm2())
    model, tokenizer = load_pruned(source, dtype=dtype)
    model.to(device)
    report = prune_model(
        model, tokenizer, pruning_ratio, criterion=criterion,
        block_attention_layer_start=block_attention_layer_start,
        block_attention_layer_end=block_attention_layer_end,
        block_mlp_layer_start=block_mlp_layer_start, block_mlp_layer_end=block_mlp_layer_end,
        calibration_texts=texts, num_examples=num_examples, calibration_seq_len=calibration_seq_len,
        micro_batch_size=micro_batch_size, seed=seed,
    )
    model.to("cpu")
    model.eval()
    check_structure(model, str(out))
    check_forward(model, tokenizer, str(out))
    report = build_report(
        report, base_model=base_model, output=out, calibration_data=calibration_data, device=device,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        versions={"torch": torch.__version__, "transformers": _version("transformers")},
    )
    save_pruned(model, tokenizer, out, overwrite=overwrite)
    write_report(report, out_json, overwrite=overwrite)
    print(f"#Param before: {report['params_before']}, #Param after: {report['params_after']}, "
          f"removed {report['params_removed']} = {100 * report['achieved_ratio']:.4f}% "
          f"(target {100 * pruning_ratio:.2f}%)")
    print(f"wrote {out} and {out_json}")
    return report


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None, prog: str = "python -m lit_recover.prune") -> dict[str, Any]:
    """``lit-recover prune --base_model … --pruning_ratio … --output …``: parse ``argv`` and run :func:`prune`."""
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_on_user_error(CLI, prune, args=argv, as_positional=False, prog=prog, exit_on_error=False)


if __name__ == "__main__":
    main()
