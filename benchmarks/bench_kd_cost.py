"""What a distillation step costs against an SFT step: seconds and peak memory, the same micro-batches.

Each arm trains in a process of its own on the same micro-batches of Alpaca-cleaned records (the
recipe's tokens and prompt-masked labels, ``lit_recover.data.tokenize``, packed as the fits pack them):

- ``sft``: the CE on the supervised positions (``LoRARecoveryModule.supervised_loss``);
- ``kd``: the module's default distillation objective with the dense model as the teacher
  (``LoRARecoveryModule.distill_loss``), the teacher in the student's dtype;
- further arms with the distillation keys the recovery benchmark tried (``--arms``).

Per arm: the seconds of a step (forward, backward and the AdamW step of one micro-batch; median over
the steps after ``--skip``, per process, the processes alternating A B A B), and the peak resident
memory of the training loop above the memory at its start (``VmHWM`` reset when the loop starts), and
that start (the model, the teacher, the LoRA weights). The models load in the CPU default dtype
(``lit_recover.cli.default_torch_dtype``: bfloat16 where the CPU has native bf16) with the fused
projections, as a fit's would.

    python -m benchmarks.bench_kd_cost --model results/recover_kd/pruned_taylor20/pruned_model.bin
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_ALPACA, RESULTS, ROOT, WORKER_ENV, command_line, hardware
from benchmarks.report import write_report

ARMS: dict[str, dict[str, Any]] = {
    "sft": {},
    "kd": {"teacher": True},
    "kd_response": {"teacher": True, "kd_positions": "response"},
    "kd_hidden": {"teacher": True, "kd_hidden_weight": 0.01},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kd_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the pruned model (pickle or folder)")
    p.add_argument("--teacher", default=None, help="the dense model (default: the packaged SmolLM2, converted)")
    p.add_argument("--data", default=str(DEFAULT_ALPACA))
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--cutoff_len", type=int, default=192)
    p.add_argument("--steps", type=int, default=6, help="micro-batches per process")
    p.add_argument("--skip", type=int, default=1, help="first steps of each process left out of the median")
    p.add_argument("--pairs", type=int, default=2, help="processes per arm, alternating")
    p.add_argument("--tag", default="kd_cost", help="the results folder benchmarks/results/<tag>/")
    p.add_argument("--out", default=None, help="the results folder instead (results.json, results.md)")
    p.add_argument("--overwrite", choices=("true", "false"), default="false")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_batches(model: str, data: Path, micro_batch_size: int, cutoff_len: int, count: int) -> list[dict]:
    """``count`` packed micro-batches of the first records, tokens and labels as the recipe makes them."""
    from lit_recover.data.collate import PackCollator
    from lit_recover.data.prompts import load_template
    from lit_recover.data.tokenize import tokenize_batch
    from lit_recover.models.load import read_model

    _, tokenizer = read_model(model)
    records = json.loads(data.read_text())[: micro_batch_size * count]
    columns = {key: [r.get(key) or "" for r in records] for key in ("instruction", "input", "output")}
    columns["index"] = list(range(len(records)))
    encoded = tokenize_batch(columns, tokenizer=tokenizer, template=load_template("alpaca"), cutoff_len=cutoff_len,
                             train_on_inputs=False, add_eos_token=False)
    items = [{"input_ids": i, "labels": lab} for i, lab in zip(encoded["input_ids"], encoded["labels"], strict=True)]
    collate = PackCollator()
    return [collate(items[k * micro_batch_size:(k + 1) * micro_batch_size]) for k in range(count)]


def worker(arm: str, model: str, teacher: str, batches_file: str) -> dict[str, Any]:
    """One arm in this process: the module, the steps, their seconds and the loop's peak memory."""
    import gc

    import torch

    from benchmarks.meter import reset_peak_rss, status_kib
    from lit_recover.cli import default_torch_dtype
    from lit_recover.module import LoRARecoveryModule

    spec = dict(ARMS[arm])
    kwargs = {k: v for k, v in spec.items() if k != "teacher"}
    if spec.get("teacher"):
        kwargs["teacher"] = teacher
    module = LoRARecoveryModule(model, torch_dtype=default_torch_dtype("cpu"), **kwargs)  # as a CPU fit's
    module.train()
    module.fuse_projections_now()  # as the fit's first step does
    optim = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=5e-4)
    batches = torch.load(batches_file, weights_only=False)
    gc.collect()
    start = status_kib("VmRSS")
    reset = reset_peak_rss()
    seconds, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss = module.distill_loss(batch).loss if module.teacher is not None else module.supervised_loss(batch)[0]
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = status_kib("VmHWM") if reset else None
    return {"arm": arm, "seconds": seconds, "losses": losses,
            "base_dtype": str(module.base_dtype).removeprefix("torch."),
            "rss_at_loop_start_mib": (start or 0) / 1024,
            "loop_peak_above_start_mib": (peak - start) / 1024 if peak and start else None,
            "tokens": [int(b["input_ids"].numel()) for b in batches]}


def markdown(report: dict[str, Any]) -> str:
    rows = report["arms"]
    sft = rows.get("sft")
    lines = ["| arm | s per micro-batch (median) | × sft | memory at loop start MiB | loop peak above start MiB "
             "| × sft |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        t_ratio = row["s_per_step"] / sft["s_per_step"] if sft else None
        m_ratio = (row["loop_peak_above_start_mib"] / sft["loop_peak_above_start_mib"]
                   if sft and row["loop_peak_above_start_mib"] and sft["loop_peak_above_start_mib"] else None)
        lines.append(f"| {name} | {row['s_per_step']:.2f} | {t_ratio:.2f} | {row['rss_at_loop_start_mib']:,.0f} | "
                     f"{row['loop_peak_above_start_mib']:,.0f} | {m_ratio:.2f} |" if sft else f"| {name} |")
    s = report["settings"]
    hw = report["hardware"]
    lines += ["", f"command: `{report['command']}`",
              f"hardware: {hw.get('cpu')}, {hw.get('cores')} cores, torch {hw.get('torch')}; base and teacher in "
              f"{s['base_dtype']}, LoRA and AdamW fp32",
              f"settings: {s['steps']} packed micro-batches of {s['micro_batch_size']} Alpaca-cleaned records "
              f"(cutoff {s['cutoff_len']}, prompt masked) per process, {s['pairs']} processes per arm alternating, "
              f"the first {s['skip']} steps of each left out"]
    return "\n".join(lines) + "\n"


def run_arms(names: list[str], args: argparse.Namespace, teacher: str, batches_file: Path) -> dict[str, list[dict]]:
    """Every arm ``args.pairs`` times, each run a process of its own, the order alternating."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(args.pairs):
        for arm in names if i % 2 == 0 else names[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.bench_kd_cost", "--worker", arm, "--model", args.model,
                   "--teacher", teacher, "--batches", str(batches_file)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                                  env={**os.environ, **WORKER_ENV})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"the {arm} worker failed (exit status {proc.returncode}): {proc.stderr[-2000:]}")
            run = json.loads(line.removeprefix("RESULT "))
            runs[arm].append(run)
            peak = run["loop_peak_above_start_mib"]
            print(f"  {arm} #{i + 1}: median {statistics.median(run['seconds'][args.skip:]):.2f} s/step, loop peak "
                  + (f"+{peak:.0f} MiB" if peak is not None else "not measured"), flush=True)
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    import torch

    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model, args.teacher, args.batches)), flush=True)
        return None
    names = [a for a in args.arms.split(",") if a]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    out_dir = Path(args.out) if args.out else RESULTS / args.tag
    if (out_dir / "results.json").exists() and args.overwrite != "true":
        raise SystemExit(f"{out_dir / 'results.json'} exists: pass --overwrite true or another --tag")
    teacher = args.teacher
    if teacher is None:
        from lit_recover.models.gguf import convert_smollm2

        teacher = str(convert_smollm2())
    with tempfile.TemporaryDirectory(prefix="kd-cost-") as tmp:
        batches_file = Path(tmp) / "batches.pt"
        torch.save(make_batches(args.model, Path(args.data), args.micro_batch_size, args.cutoff_len, args.steps),
                   batches_file)
        runs = run_arms(names, args, teacher, batches_file)
    arms = {}
    for arm, got in runs.items():
        timed = [s for run in got for s in run["seconds"][args.skip:]]
        peaks = [r["loop_peak_above_start_mib"] for r in got if r["loop_peak_above_start_mib"] is not None]
        arms[arm] = {"s_per_step": statistics.median(timed), "seconds": [r["seconds"] for r in got],
                     "losses": got[0]["losses"], "rss_at_loop_start_mib": max(r["rss_at_loop_start_mib"] for r in got),
                     "loop_peak_above_start_mib": max(peaks) if peaks else None, "spec": ARMS[arm]}
    report = {"schema": "lit-recover/benchmark-kd-cost", "schema_version": 1,
              "command": command_line("bench_kd_cost", argv), "hardware": hardware(),
              "settings": {"model": args.model, "micro_batch_size": args.micro_batch_size,
                           "cutoff_len": args.cutoff_len,
                           "steps": args.steps, "skip": args.skip, "pairs": args.pairs,
                           "base_dtype": next(iter(runs.values()))[0]["base_dtype"],
                           "units": {"s_per_step": "s", "memory": "MiB"}},
              "arms": arms}
    text = markdown(report)
    print(text)
    write_report(out_dir, "results", report, text)  # results.json and results.md
    return report


if __name__ == "__main__":
    main()
