"""Recovery by distillation against recovery by SFT, at equal wall time, on SmolLM2-135M pruned 20 %.

Every arm starts from the same pruned model (the packaged SmolLM2-135M-Instruct pruned 20 % by
``lit-recover prune``, Taylor), reads the same Alpaca-cleaned records in the same order
(``configs/demo.yaml``: micro-batch 4, 16 records a step, LoRA r 8 on the seven projections, packed
micro-batches) and trains for the same wall-clock budget (``--trainer.max_time``; ``max_steps`` is
set out of reach and ``save_steps`` past the budget, so the clock alone ends a fit and no checkpoint
is written inside it). An arm is the SFT recipe, or the same fit with ``--model.teacher`` (the dense
model) and its distillation keys. Each fit runs in a process of its own (its peak resident memory is
the process's, teacher included); each recovered model is then measured in a fresh process with the
same settings as the base and the pruned model: perplexity by LLM-Pruner's protocol at 128 tokens on
WikiText-2 test, PTB validation and the demo's held-out docstrings (``--limit`` windows each) and,
with ``--zero_shot true``, the seven zero-shot tasks (``--limit`` examples each). Reported per arm:
steps, tokens, seconds per step, peak RSS, every perplexity and R, the share of the log-perplexity
gap won back, ``(ln P_pruned − ln P_arm) / (ln P_pruned − ln P_base)``.

    python -m benchmarks.recover_kd --arms sft,kd --budget_s 600 --zero_shot true --tag recover_kd

The models and runs go to ``--work`` (not committed); the JSON and the markdown table to
``benchmarks/results/<tag>/`` (``results.json``, ``results.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_ALPACA, RESULTS, ROOT, SHARED_DATA, WORKER_ENV, command_line, hardware
from benchmarks.report import write_report

# name → the fit's extra arguments; "{teacher}" is the dense model
ARMS: dict[str, list[str]] = {
    "sft": [],
    "sft_lr1e-3": ["--model.learning_rate", "1e-3"],
    "kd": ["--model.teacher", "{teacher}"],
    "kd_r0.9": ["--model.teacher", "{teacher}", "--model.kd_ratio", "0.9"],
    "kd_r1": ["--model.teacher", "{teacher}", "--model.kd_ratio", "1.0"],
    "kd_response": ["--model.teacher", "{teacher}", "--model.kd_positions", "response"],
    "kd_T2": ["--model.teacher", "{teacher}", "--model.kd_temperature", "2.0"],
    "kd_hidden": ["--model.teacher", "{teacher}", "--model.kd_hidden_weight", "0.01"],
    "kd_lr1e-3": ["--model.teacher", "{teacher}", "--model.learning_rate", "1e-3"],
    "kd_r0.9_lr1e-3": ["--model.teacher", "{teacher}", "--model.kd_ratio", "0.9", "--model.learning_rate", "1e-3"],
    "kd_r1_lr1e-3": ["--model.teacher", "{teacher}", "--model.kd_ratio", "1.0", "--model.learning_rate", "1e-3"],
    "kd_rkl": ["--model.teacher", "{teacher}", "--model.kd_loss", "reverse_kl"],
    "kd_jsd": ["--model.teacher", "{teacher}", "--model.kd_loss", "jsd"],
}
PPL_NAMES = ("wikitext2", "ptb", "demo_held_out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recover_kd", description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="sft,kd", help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--budget_s", type=int, default=600, help="training wall-clock seconds per arm")
    p.add_argument("--limit", type=int, default=128, help="perplexity windows per text (and zero-shot examples)")
    p.add_argument("--zero_shot", choices=("true", "false"), default="false", help="also the 7 zero-shot tasks")
    p.add_argument("--held_out", choices=("true", "false"), default="true",
                   help="also the perplexity of the demo's held-out docstrings")
    p.add_argument("--data", default=str(DEFAULT_ALPACA), help="the Alpaca file both arms read")
    p.add_argument("--work", default="results/recover_kd", help="models and runs (not committed)")
    p.add_argument("--tag", default="recover_kd_sweep", help="benchmarks/results/<tag>/")
    p.add_argument("--reuse", choices=("true", "false"), default="true",
                   help="keep an arm's finished run and measurement from an earlier call with the same settings")
    p.add_argument("--overwrite", choices=("true", "false"), default="false",
                   help="replace benchmarks/results/<tag>/ when it exists")
    return p.parse_args(argv)


def run_logged(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd`` from the repository root, output to ``log``; ``(exit code, wall s, peak RSS MiB)``."""
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                env={**os.environ, **WORKER_ENV})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024  # KiB on Linux


def prepared_models(work: Path) -> tuple[Path, Path, Path]:
    """``(dense folder, pruned pickle, demo held-out text)``, made once and reused."""
    from lit_recover.demos.demo_data import write_demo_dataset
    from lit_recover.models.gguf import convert_smollm2
    from lit_recover.pruning.__main__ import prune
    from lit_recover.pruning.report import report_path

    base = convert_smollm2()
    pruned = work / "pruned_taylor20" / "pruned_model.bin"
    if not (pruned.is_file() and report_path(pruned).is_file()):
        print(f"pruning {base} by 20 % (taylor) → {pruned}", flush=True)
        prune(str(base), str(pruned), pruning_ratio=0.2, criterion="taylor", overwrite=True)
    held_out = work / "data" / "demo_eval.txt"
    if not held_out.is_file():
        write_demo_dataset(work / "data" / "demo_alpaca.json", val_texts_path=held_out, overwrite=True)
    return base, pruned, held_out


def evaluate(model: Path, label: str, out: Path, held_out: Path | None, limit: int, zero_shot: bool,
             reuse: bool) -> dict:
    """Measure one model in a fresh process (``lit_recover.evaluate``), fp32; its results."""
    from lit_recover.evaluation import read_results

    settings = {"limit": limit, "zero_shot": zero_shot, "held_out": held_out is not None}
    marker = out.with_suffix(".settings.json")
    if reuse and out.is_file() and marker.is_file() and json.loads(marker.read_text()) == settings:
        return read_results(out)[0][1]
    metrics = "[ppl,zero_shot]" if zero_shot else "[ppl]"
    cmd = [sys.executable, "-m", "lit_recover.evaluate", "--model_path", str(model), "--label", label,
           "--metrics", metrics, "--ppl_datasets", "[wikitext2,ptb]", "--ppl_data_dir", str(SHARED_DATA / "ppl"),
           "--limit", str(limit), "--dtype", "float32", "--output", str(out), "--overwrite", "true",
           "--quiet", "true"]
    if held_out is not None:
        cmd += ["--ppl_texts", json.dumps({"demo_held_out": str(held_out)})]
    if zero_shot:
        cmd += ["--zero_shot_data_dir", str(SHARED_DATA / "zeroshot")]
    print(f"  measuring {label} ({metrics}, limit {limit}) …", flush=True)
    code, seconds, _ = run_logged(cmd, out.with_suffix(".log"))
    if code not in (0, 1) or not out.is_file():
        raise SystemExit(f"{out.with_suffix('.log')}: measuring {label} failed (exit status {code})")
    marker.write_text(json.dumps(settings))
    print(f"  measured {label} in {seconds:.0f} s", flush=True)
    return read_results(out)[0][1]


def fit(arm: str, args: list[str], pruned: Path, data: str, budget_s: int, run_dir: Path, reuse: bool) -> dict:
    """One recovery fit in its own process; its ``training`` record plus the process's wall time and peak RSS."""
    from lit_recover.demos.demo import max_time_spec
    from lit_recover.evaluation import read_results

    record = run_dir / "fit_record.json"
    settings = {"args": args, "budget_s": budget_s, "data": data, "pruned": str(pruned)}
    if reuse and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings") == settings:
            return saved
    cmd = [sys.executable, "-m", "lit_recover", "fit", "--config", "configs/demo.yaml",
           "--model.pruned_model", str(pruned), "--data.data_path", data, "--data.padding_free", "true",
           "--trainer.max_time", max_time_spec(budget_s), "--trainer.max_steps", "100000",
           "--save_steps", "100000", "--before_metrics", "[]", "--evaluation.metrics", "[]", *args,
           "--output_dir", str(run_dir), "--overwrite", "true"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{arm}] fit for {budget_s} s: {' '.join(args) or '(SFT)'}", flush=True)
    code, seconds, rss = run_logged(cmd, run_dir.parent / f"{run_dir.name}.fit.log")
    results_file = run_dir / "evaluation" / "evaluation_results.json"
    if code != 0 or not results_file.is_file():
        raise SystemExit(f"{run_dir.parent / f'{run_dir.name}.fit.log'}: the {arm} fit failed (exit status {code})")
    (_, results), *_ = read_results(results_file)
    training = results["training"]
    steps = training["optimizer_steps"]["value"]
    out = {"settings": settings, "command": " ".join(cmd[1:]), "process_wall_s": round(seconds, 1),
           "peak_rss_mib": round(rss, 1), "train_wall_s": training["wall_time"]["value"],
           "optimizer_steps": steps, "tokens_seen": training["tokens_seen"]["value"],
           "s_per_step": training["wall_time"]["value"] / steps if steps else None,
           "train_loss_last": _last_logged(run_dir, "train/loss"),
           "ce_loss_last": _last_logged(run_dir, "train/ce_loss")}
    record.write_text(json.dumps(out, indent=1))
    print(f"[{arm}] {steps} steps, {out['tokens_seen']:,} tokens in {out['train_wall_s']:.0f} s, "
          f"peak RSS {rss:.0f} MiB", flush=True)
    return out


def _last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of ``key`` in the fit's CSV log (``logs/**/metrics.csv``), or ``None``."""
    import csv

    value = None
    for path in sorted(run_dir.glob("logs/**/metrics.csv")):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                if row.get(key):
                    value = float(row[key])
    return value


def ppl_of(results: dict, name: str) -> float | None:
    item = (results.get("metrics", {}).get("ppl", {}).get("datasets") or {}).get(name) or {}
    value = item.get("value") if isinstance(item, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def zero_shot_average(results: dict) -> float | None:
    item = results.get("metrics", {}).get("zero_shot", {}).get("average") or {}
    value = item.get("value") if isinstance(item, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def shares(base: dict, pruned: dict, recovered: dict) -> tuple[dict[str, float | None], float | None]:
    """R per perplexity and for the zero-shot average (``lit_recover.evaluation.report.recovery_shares``)."""
    from lit_recover.evaluation.report import recovery_shares

    rows = {name: values[2] for name, _, values in recovery_shares([base, pruned, recovered])}
    return {n: rows.get(f"R ppl {n}") for n in PPL_NAMES}, rows.get("R zero_shot average")


def markdown(report: dict[str, Any]) -> str:
    base, pruned = report["base"], report["pruned"]
    zs = report["settings"]["zero_shot"]
    head = ["arm", "steps", "s/step", "tokens", "peak RSS MiB"]
    head += [f"PPL {n}" for n in PPL_NAMES] + [f"R {n}" for n in PPL_NAMES]
    head += ["zero-shot avg", "R zero-shot"] if zs else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ppl_cells(ppl: dict) -> list[str]:
        return [f"{ppl[n]:.2f}" if ppl.get(n) else "–" for n in PPL_NAMES]

    for label, col in (("base", base), ("pruned", pruned)):
        cells = [label, "", "", "", ""] + ppl_cells(col["ppl"]) + [""] * len(PPL_NAMES)
        avg = col.get("zero_shot_average")
        cells += [f"{avg:.4f}" if avg is not None else "–", ""] if zs else []
        lines.append("| " + " | ".join(cells) + " |")
    for arm in report["arms"]:
        f = arm["fit"]
        cells = [arm["name"], str(f["optimizer_steps"]), f"{f['s_per_step']:.1f}", f"{f['tokens_seen']:,}",
                 f"{f['peak_rss_mib']:,.0f}"]
        cells += ppl_cells(arm["ppl"]) + [f"{arm['R'][n]:.3f}" if arm["R"].get(n) is not None else "–"
                                          for n in PPL_NAMES]
        if zs:
            avg, r = arm.get("zero_shot_average"), arm.get("R_zero_shot")
            cells += [f"{avg:.4f}" if avg is not None else "–", f"{r:.3f}" if r is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    hw = report["hardware"]
    lines += ["", f"command: `{report['command']}`",
              f"hardware: {hw.get('cpu')}, {hw.get('cores')} cores, torch {hw.get('torch')}, "
              f"transformers {hw.get('transformers')}; training in the CPU default precision "
              f"(bf16 frozen base where the CPU has native bf16, LoRA and optimizer fp32), measurement in fp32",
              f"budget: {report['settings']['budget_s']} s of training per arm (`--trainer.max_time`), "
              f"configs/demo.yaml (16 records a step, micro-batch 4, cutoff 192, lr 5e-4 unless the arm says, "
              f"LoRA r 8), packed micro-batches; perplexity: {report['settings']['limit']} windows of 128 tokens "
              f"per text" + (f"; zero-shot: the first {report['settings']['limit']} examples of each of the 7 tasks"
                             if zs else "")]
    return "\n".join(lines) + "\n"


def portable(report: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The report with this machine's paths replaced by ``names`` (the dense model's cache folder by
    ``{teacher}``, the data file by its path from the repository root)."""
    text = json.dumps(report)
    for path, name in names.items():
        text = text.replace(json.dumps(path)[1:-1], json.dumps(name)[1:-1])
    return json.loads(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = [a for a in args.arms.split(",") if a]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    work, reuse, zero_shot = Path(args.work), args.reuse == "true", args.zero_shot == "true"
    out_dir = RESULTS / args.tag
    if (out_dir / "results.json").exists() and args.overwrite != "true":
        raise SystemExit(f"{out_dir / 'results.json'} exists: pass --overwrite true or another --tag")
    base_dir, pruned, held_out = prepared_models(work)
    held_out = held_out if args.held_out == "true" else None
    evals = work / "evaluations"
    evals.mkdir(parents=True, exist_ok=True)

    suffix = f"_limit{args.limit}" + ("_zero_shot" if zero_shot else "") + ("_held_out" if held_out else "")

    def column(results: dict) -> dict[str, Any]:
        return {"ppl": {n: ppl_of(results, n) for n in PPL_NAMES}, "zero_shot_average": zero_shot_average(results)}

    def measured(model: Path, label: str) -> dict[str, Any]:
        return evaluate(model, label, evals / f"{label}{suffix}.json", held_out, args.limit, zero_shot, reuse)

    base_results, pruned_results = measured(base_dir, "base"), measured(pruned, "pruned")
    base, pruned_col = column(base_results), column(pruned_results)
    arms = []
    for name in names:
        extra = [a.replace("{teacher}", str(base_dir)) for a in ARMS[name]]
        run_dir = work / "runs" / f"{name}_{args.budget_s}s"
        record = fit(name, extra, pruned, args.data, args.budget_s, run_dir, reuse)
        results = measured(run_dir / "pruned_model.bin", f"{name}_{args.budget_s}s")
        col = column(results)
        col["R"], col["R_zero_shot"] = shares(base_results, pruned_results, results)
        arms.append({"name": name, "args": ARMS[name], "fit": record, **col})
        print(f"[{name}] " + ", ".join(f"{n} {col['ppl'][n]:.2f} (R {col['R'][n]})" for n in PPL_NAMES
                                       if col["ppl"][n] is not None), flush=True)
    report = {"schema": "lit-recover/benchmark-recover-kd", "schema_version": 1,
              "command": command_line("recover_kd", argv), "hardware": hardware(),
              "settings": {"budget_s": args.budget_s, "limit": args.limit, "zero_shot": zero_shot,
                           "held_out": held_out is not None,
                           "data": os.path.relpath(args.data, ROOT), "config": "configs/demo.yaml",
                           "padding_free": True, "ppl_seq_len": 128, "units": {"ppl": "perplexity",
                                                                              "R": "share of log-PPL gap",
                                                                              "peak_rss_mib": "MiB",
                                                                              "s_per_step": "s"}},
              "base": base, "pruned": pruned_col, "arms": arms}
    here = {str(base_dir): "{teacher}", str(Path(args.data).resolve()): os.path.relpath(args.data, ROOT)}
    report = portable(report, here)
    text = markdown(report)
    print(text)
    write_report(out_dir, "results", report, text)  # results.json and results.md
    return report


if __name__ == "__main__":
    main()
