"""Precision benchmark: the frozen base in float32 against bfloat16 (LoRA, AdamW and loss float32).

Both arms are ``LoRARecoveryModule``s of the same pruned model in one process, trained on the same
Alpaca micro-batches with LoRA dropout 0, so that the only difference is the base dtype. Their
optimizer steps alternate (A B A B …), so load from other processes falls on both alike, and each
step's process CPU time is taken with one torch thread: on a shared machine CPU time counts the work
done, where wall time also counts the waiting. Reported per arm: the median and the fastest step,
tokens per CPU-second, and each step's loss; per step the loss difference. Peak RSS is measured in
one fresh process per arm (``--memory-steps`` steps), where the dtype is the only thing that differs.

The bf16_base lever of ``benchmarks.bench_fit`` measures the same through ``main.py fit`` (wall
time, peak memory); on a quiet machine that is the one to run.

Usage, from the repository root::

    python -m benchmarks.bench_precision --model prune_log/x/pruned_model.bin --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_ALPACA, RESULTS, WORKER_ENV, command_line, hardware

ARMS = ("float32", "bfloat16")


def cpu_tag() -> str:
    """``<vendor model>-<native 16-bit dtypes>``, e.g. ``amd-epyc-bf16``: the results folder's name."""
    from lit_recover.hardware import cpu_detection

    found = cpu_detection()
    name = "-".join(found["cpu"].lower().replace("(r)", "").replace("(tm)", "").split()[:3]) or "cpu"
    short = {"bfloat16": "bf16", "float16": "fp16"}
    native = "-".join(short[str(d).removeprefix("torch.")] for d in found["native"]) or "no-native-16bit"
    return f"{name}-{native}".replace("/", "_")


def batches(model_path: str, data: Path, micro_batch_size: int, cutoff_len: int, count: int) -> list[dict]:
    """``count`` micro-batches of Alpaca prompts + responses (labels on every token), padded right."""
    from lit_recover.data.prompts import load_template
    from lit_recover.models.load import read_model

    _, tokenizer = read_model(model_path)
    records = json.loads(data.read_text())[: micro_batch_size * count]
    template = load_template("alpaca")
    texts = [template.render(r["instruction"], r.get("input") or None, r["output"]) for r in records]
    out = []
    for i in range(count):
        chunk = texts[i * micro_batch_size:(i + 1) * micro_batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=cutoff_len, padding="longest", return_tensors="pt",
                        padding_side="right")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def _module(model_path: str, dtype: str):
    from lit_recover.module import LoRARecoveryModule

    module = LoRARecoveryModule(model_path, torch_dtype=dtype, lora_dropout=0.0)
    module.train()
    return module


def train_paired(model_path: str, data: list[dict], lr: float) -> dict[str, Any]:
    """Both arms, steps alternating; per step and arm: process CPU seconds, wall seconds, loss."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    modules = {arm: _module(model_path, arm) for arm in ARMS}
    optims = {arm: torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=lr)
              for arm, m in modules.items()}
    steps: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for i, batch in enumerate(data):
        for arm in (ARMS if i % 2 == 0 else ARMS[::-1]):  # A B, B A, …: neither arm always goes first
            c0, w0 = time.process_time(), time.perf_counter()
            loss, _ = modules[arm].supervised_loss(batch)
            loss.backward()
            optims[arm].step()
            optims[arm].zero_grad(set_to_none=True)
            steps[arm].append({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
                               "loss": float(loss), "tokens": int(batch["attention_mask"].sum())})
        print(f"  step {i + 1}/{len(data)}: " + ", ".join(
            f"{arm} {steps[arm][-1]['cpu_s']:.2f} CPU-s loss {steps[arm][-1]['loss']:.4f}" for arm in ARMS), flush=True)
    return steps


def peak_rss_worker(model_path: str, dtype: str, data_file: str, lr: float) -> None:
    """One arm alone (a child process): train on the pickled batches, print the peak RSS in MiB."""
    import gc

    import torch

    from benchmarks.meter import reset_peak_rss, status_kib

    data = torch.load(data_file, weights_only=False)
    torch.set_num_threads(1)
    module = _module(model_path, dtype)
    optim = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=lr)
    gc.collect()
    start = status_kib("VmRSS")
    reset = reset_peak_rss()  # the training loop's peak, not the loading's (the file is read as stored)
    for batch in data:
        loss, _ = module.supervised_loss(batch)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    peak = status_kib("VmHWM") if reset else None
    print(json.dumps({"peak_rss_mib": (peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
                      "rss_at_train_start_mib": (start or 0) / 1024, "loop_peak": bool(reset)}))


def summarize(steps: dict[str, list[dict[str, float]]], skip: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, rows in steps.items():
        timed = rows[skip:]
        cpu = [r["cpu_s"] for r in timed]
        tokens = sum(r["tokens"] for r in timed)
        out[arm] = {"median_cpu_s_per_step": statistics.median(cpu), "fastest_cpu_s_per_step": min(cpu),
                    "tokens_per_cpu_s": tokens / sum(cpu),
                    "median_wall_s_per_step": statistics.median(r["wall_s"] for r in timed),
                    "losses": [r["loss"] for r in rows]}
    a, b = (out[arm]["losses"] for arm in ARMS)
    diffs = [y - x for x, y in zip(a, b)]
    out["loss_difference"] = {"per_step": diffs, "max_abs": max(abs(d) for d in diffs),
                              "mean": statistics.fmean(diffs),
                              "max_relative": max(abs(d) / abs(x) for d, x in zip(diffs, a))}
    out["ratios"] = {
        "tokens_per_cpu_s": out["bfloat16"]["tokens_per_cpu_s"] / out["float32"]["tokens_per_cpu_s"],
        "median_cpu_s_per_step": out["bfloat16"]["median_cpu_s_per_step"] / out["float32"]["median_cpu_s_per_step"],
        "fastest_cpu_s_per_step": out["bfloat16"]["fastest_cpu_s_per_step"] / out["float32"]["fastest_cpu_s_per_step"],
    }
    return out


def markdown(report: dict[str, Any]) -> str:
    s, rss = report["summary"], report.get("peak_rss_mib", {})
    lines = [f"# Precision: float32 base vs bfloat16 base (`{report['tag']}`)", "",
             f"Command: `{report['command']}`", "",
             "Hardware: " + ", ".join(f"{k} {v}" for k, v in report["hardware"].items()), "",
             f"Native dtypes detected: {report['detection']}", "",
             f"Load average (1/5/15 min) before/after: {report['load_avg_start']} / {report['load_avg_end']}", "",
             f"{report['settings']['steps']} steps, micro-batch {report['settings']['micro_batch_size']}, cutoff "
             f"{report['settings']['cutoff_len']}, lr {report['settings']['learning_rate']}, LoRA dropout 0, one torch "
             f"thread, the first {report['settings']['skip']} step(s) untimed, steps alternating between the arms.", "",
             "| metric | float32 base | bfloat16 base | bf16 / fp32 |", "|---|---|---|---|"]
    for key, label in (("median_cpu_s_per_step", "CPU seconds per step (median)"),
                       ("fastest_cpu_s_per_step", "CPU seconds per step (fastest)"),
                       ("tokens_per_cpu_s", "tokens per CPU-second"),
                       ("median_wall_s_per_step", "wall seconds per step (median)")):
        a, b = s["float32"][key], s["bfloat16"][key]
        lines.append(f"| {label} | {a:.3g} | {b:.3g} | {b / a:.3f} |")
    if rss:
        a, b = rss["float32"], rss["bfloat16"]
        lines.append(f"| peak RSS of the training loop, one arm per process (MiB) | {a:.0f} | {b:.0f} | {b / a:.3f} |")
        a, b = rss["float32_at_train_start"], rss["bfloat16_at_train_start"]
        lines.append(f"| RSS when training starts (MiB) | {a:.0f} | {b:.0f} | {b / a:.3f} |")
    d = s["loss_difference"]
    lines += ["", "Loss, bf16 − fp32 per step: "
              f"max |difference| {d['max_abs']:.4f} (relative {d['max_relative']:.2e}), "
              f"mean {d['mean']:+.4f}.", "", "| step | fp32 loss | bf16 loss | difference |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(s["float32"]["losses"], s["bfloat16"]["losses"])):
        lines.append(f"| {i + 1} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pruned pickle or folder")
    p.add_argument("--data", default=str(DEFAULT_ALPACA))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--skip", type=int, default=1, help="untimed first steps")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of each peak-RSS process (0: none)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/precision_<cpu-tag>)")
    p.add_argument("--tag", default="bf16_base")
    p.add_argument("--peak-rss-worker", nargs=2, metavar=("DTYPE", "BATCHES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_rss_worker:
        peak_rss_worker(args.model, args.peak_rss_worker[0], args.peak_rss_worker[1], args.learning_rate)
        return None
    import tempfile

    import torch

    from lit_recover.hardware import cpu_detection

    out = Path(args.out) if args.out else RESULTS / f"precision_{cpu_tag()}"
    load_start = os.getloadavg()
    data = batches(args.model, Path(args.data), args.micro_batch_size, args.cutoff_len, args.steps)
    rss: dict[str, float] = {}
    if args.memory_steps:
        with tempfile.TemporaryDirectory() as tmp:
            data_file = str(Path(tmp) / "batches.pt")
            torch.save(data[: args.memory_steps], data_file)
            for arm in ARMS:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_precision", "--model", args.model,
                                       "--peak-rss-worker", arm, data_file], capture_output=True, text=True,
                                      env={**os.environ, **WORKER_ENV}, check=True)
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                rss[arm], rss[f"{arm}_at_train_start"] = got["peak_rss_mib"], got["rss_at_train_start_mib"]
                print(f"  peak RSS {arm}: {rss[arm]:.0f} MiB (training loop; {got['rss_at_train_start_mib']:.0f} "
                      "MiB when it started)", flush=True)
    steps = train_paired(args.model, data, args.learning_rate)
    found = cpu_detection()
    report = {
        "tag": args.tag, "command": command_line("bench_precision", argv), "hardware": hardware(),
        "detection": {**found, "native": [str(d).removeprefix("torch.") for d in found["native"]]},
        "settings": {"model": Path(args.model).name, "steps": args.steps, "micro_batch_size": args.micro_batch_size,
                     "cutoff_len": args.cutoff_len, "learning_rate": args.learning_rate, "skip": args.skip,
                     "torch_threads": 1, "lora_dropout": 0.0},
        "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "steps": steps, "peak_rss_mib": rss, "summary": summarize(steps, args.skip),
    }
    text = markdown(report)
    print(text)
    from lit_recover.outputs import write_json, write_text

    write_json(out / f"{args.tag}.json", report, overwrite=False)
    write_text(out / f"{args.tag}.md", text + "\n", overwrite=False)
    print(f"wrote {out / args.tag}.json and .md")
    return report


if __name__ == "__main__":
    main()
