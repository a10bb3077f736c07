"""Training benchmark: lit-recover against the reference recipe (``reference_trainer.py``).

Both sides fine-tune the same pruned model on the same Alpaca records with the same settings. The
runs alternate (reference, lit-recover, reference, lit-recover, …), each in its own subprocess
(``benchmarks.fit_workers``), and every run is measured the same way from inside its process
(``benchmarks.meter``):

- a forward pre-hook on the decoder stack counts the non-pad tokens and the padded positions of each
  training micro-batch;
- a step post-hook on the optimizer stamps the wall time of each optimizer step;
- the loss of each micro-batch is weighted by its supervised-token count, giving one loss per step
  (the mean next-token NLL over the step's supervised tokens, the quantity both sides optimise);
- the peak resident memory of the training loop (the kernel's high-water mark, reset when training
  starts), or the peak CUDA memory on a GPU.

The first ``--skip`` steps of each run are left out of the timings (allocator and thread-pool
warm-up). Results go to ``benchmarks/results/<tag>.json`` (numbers with units, settings, hardware)
and ``<tag>.md`` (the ratio table, ``benchmarks.report``), and the table is printed.

Usage, from the repository root::

    python -m benchmarks.bench_fit --quick                       # tiny model, a few minutes
    python -m benchmarks.bench_fit --model prune_log/x/pruned_model.bin --steps 12 --pairs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_ALPACA, RESULTS, command_line, default_tag, hardware, run_module, write_subset
from benchmarks.report import (
    METRICS,
    clear_goals,
    compare,
    fit_markdown,
    fresh_tag,
    render_fit,
    summarize_run,
    write_report,
)


# --- settings --------------------------------------------------------------------------------------
@dataclass
class FitSettings:
    """What both sides of one scenario run with.

    Args:
        model: the pruned pickle ``{'model', 'tokenizer'}``.
        data: the Alpaca JSON subset both sides read.
        batch_size: examples per optimizer step.
        micro_batch_size: examples per forward/backward.
        cutoff_len: truncation length in tokens.
        steps: optimizer steps per run.
        group_by_length: length-grouped sampling on both sides.
        learning_rate: peak learning rate.
        warmup_steps: linear warm-up steps.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        sequential: keep the file's order on both sides (for step-by-step loss comparison).
        seed: seed of both sides.
        threads: torch intra-op threads (``None``: torch's default).
        lit_args: extra ``main.py fit`` arguments for the lit-recover side (levers to toggle).
        full_logits: lit-recover computes the LM head and cross-entropy over every position, as the
            reference does (turns the supervised-positions-only lever off, for measuring it).
        padding_free: lit-recover packs each micro-batch into one row with per-sequence position ids
            (``--data.padding_free true``: no compute on padding, the same loss).
        skip_outputs: lit-recover leaves out the end-of-fit merge and save (``RecoveryOutputs``): for
            models whose merged copy takes minutes to write (the GPU check's 7B shapes).
    """

    model: str
    data: str
    batch_size: int = 16
    micro_batch_size: int = 4
    cutoff_len: int = 256
    steps: int = 12
    group_by_length: bool = False
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    sequential: bool = False
    seed: int = 42
    threads: int | None = None
    lit_args: list[str] = field(default_factory=list)
    full_logits: bool = False
    padding_free: bool = False
    skip_outputs: bool = False


# the reference-vs-lit scenarios: name -> what it compares
SCENARIOS = {
    "defaults": "The seed's defaults (random order), both sides.",
    "group_by_length": "Length-grouped sampling on both sides.",
    "padding_free": "The seed's defaults; lit-recover with padding-free micro-batches (--data.padding_free).",
    "same_batches": "The seed's defaults, both sides in the order of the drawn records (a random order): the "
                    "same micro-batches on both sides, so memory and speed compare like for like.",
    "same_batches_padding_free": "As same_batches, lit-recover with padding-free micro-batches "
                                 "(--data.padding_free).",
    "sequential": "Both sides in the file's order with LoRA dropout 0: the same batches, so the per-step "
                  "losses must agree (the math check).",
}

_PRECISION = ["--trainer.precision", "32-true"]

_FUSED_ADAMW = ('{"class_path": "torch.optim.AdamW", "init_args": {"lr": %s, "weight_decay": 0.0, '
                '"fused": true}}')

# lever -> (what it is, settings with the lever off, settings with it on); lit-recover on both arms
LEVERS: dict[str, tuple[str, Any, Any]] = {
    "supervised_logits": (
        "LM head + cross-entropy only on positions whose label is not -100 (off: over every position, "
        "as LlamaForCausalLM(labels=...) does)",
        lambda s: dataclasses.replace(s, full_logits=True), lambda s: s),
    "sdpa": (
        "SDPA attention kernel (off: eager attention)",
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.attn_implementation", "eager"]),
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.attn_implementation", "sdpa"])),
    "fused_adamw": (
        "torch.optim.AdamW(fused=True) (off: the default foreach AdamW)",
        lambda s: s,
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.optimizer",
                                                   _FUSED_ADAMW % s.learning_rate])),
    "lean_lora": (
        "LoRA branches through lit_recover.lora.LoRABranch: boolean dropout masks drawn with torch.rand "
        "and the shared input kept for backward (off: PEFT's forward, two float copies per adapted layer)",
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.lean_lora", "false"]),
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.lean_lora", "true"])),
    "loader_worker": (
        "one DataLoader worker process (off: batches collated in the training process)",
        lambda s: s, lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--data.num_workers", "1"])),
    "padding_free": (
        "padding-free micro-batches: one packed row per micro-batch, block-causal attention from the "
        "position ids (off: padded to the longest sequence)",
        lambda s: s, lambda s: dataclasses.replace(s, padding_free=True)),
    "gradient_checkpointing": (
        "activation checkpointing of the decoder layers (recomputed in the backward pass)",
        lambda s: s,
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.gradient_checkpointing", "true"])),
    "group_by_length": (
        "length-grouped sampling (off: random order)",
        lambda s: dataclasses.replace(s, group_by_length=False),
        lambda s: dataclasses.replace(s, group_by_length=True)),
    "fuse_projections": (
        "one frozen matmul per layer for q/k/v and one for gate/up, each LoRA branch still its own "
        "(lit_recover.fused; off: five separate frozen matmuls)",
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.fuse_projections", "false"]),
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.fuse_projections", "true"])),
    "chunked_head": (
        "LM head + cross-entropy on the supervised positions in chunks, each chunk's input gradient "
        "computed in the forward pass (lit_recover.head; off: one head call on all supervised positions)",
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.chunked_head", "false"]),
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.chunked_head", "true"])),
    "compile": (
        "torch.compile of every decoder layer (inductor; its compile seconds are in each run's compile_s "
        "and fall in the first, untimed steps only if --skip covers them)",
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.compile", "false"]),
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.compile", "true"])),
    "bf16_base": (
        "the frozen base in bfloat16, LoRA weights, AdamW state and loss in float32, no autocast "
        "(--trainer.precision 32-true --model.torch_dtype bfloat16; off: the base in float32); both arms "
        "skip the end-of-fit merge and save, which is not what is measured",
        lambda s: dataclasses.replace(s, skip_outputs=True,
                                      lit_args=[*s.lit_args, *_PRECISION, "--model.torch_dtype", "float32"]),
        lambda s: dataclasses.replace(s, skip_outputs=True,
                                      lit_args=[*s.lit_args, *_PRECISION, "--model.torch_dtype", "bfloat16"])),
}


# --- the runs: one subprocess each, alternating arms --------------------------------------------
def run_worker(side: str, s: FitSettings, workdir: Path, index: int, timeout: float) -> dict[str, Any]:
    """One run in a fresh subprocess; its output goes to ``<workdir>/<index>-<side>.log``."""
    settings = workdir / f"{index}-{side}.settings.json"
    settings.write_text(json.dumps(dataclasses.asdict(s)))
    out = workdir / f"{index}-{side}.json"
    logfile = workdir / f"{index}-{side}.log"
    code = run_module("fit_workers", [side, str(settings), str(out)], logfile, timeout)
    if code != 0 or not out.exists():
        tail = "\n".join(logfile.read_text().splitlines()[-20:])
        raise RuntimeError(f"{side} run {index} failed (exit {code}); log {logfile}:\n{tail}")
    result = json.loads(out.read_text())
    if not result["steps"]:
        raise RuntimeError(f"{side} run {index} recorded no optimizer step; log {logfile}")
    return result


def run_scenario(name: str, arms: list[tuple[str, str, FitSettings]], pairs: int, workdir: Path, skip: int,
                 timeout: float) -> dict[str, Any]:
    """``pairs`` × the arms ``(label, side, settings)``, alternating: A B A B …"""
    runs = []
    for p in range(pairs):
        for label, side, s in arms:
            t0, load = time.perf_counter(), os.getloadavg()
            r = run_worker(side, s, workdir, len(runs), timeout)
            r.update({"pair": p, "arm": label, "load_avg_start": load})
            runs.append(r)
            sm = summarize_run(r, skip)
            mfu = f", MFU {sm['mfu']:.3f}" if sm.get("mfu") is not None else ""
            if r.get("compile_s"):
                mfu += f", compile {r['compile_s']:.0f} s"
            print(f"  [{name}] pair {p + 1}/{pairs} {label:9s}: {sm['tokens_per_s']:8.1f} tok/s{mfu}, "
                  f"{sm['s_per_step']:6.2f} s/step, peak {sm['peak_memory_mb']:7.0f} MiB, "
                  f"pad {sm['padded_fraction']:.3f}, loss {sm['mean_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    settings = {label: _public_settings(s) for label, _, s in arms}
    first = arms[0][2]
    out = compare(runs, skip, first.group_by_length, (arms[0][0], arms[1][0]))
    if arms[0][1] == arms[1][1]:  # a lever (lit-recover on both arms): the goals are about the reference
        clear_goals(out)
    return {"settings": settings, "runs": runs, **out}


def _public_settings(s: FitSettings) -> dict[str, Any]:
    """Settings for the report, paths shown by file name only (they lie in a temporary folder)."""
    d = dataclasses.asdict(s)
    d["model"], d["data"] = Path(s.model).name, Path(s.data).name
    return d


# --- the command line -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny pruned model built on the fly; a few minutes")
    p.add_argument("--model", help="pruned pickle (default: the tiny model with --quick)")
    p.add_argument("--data", default=str(DEFAULT_ALPACA),
                   help="Alpaca JSON (default ../shared/data/alpaca/alpaca_data_cleaned.json)")
    p.add_argument("--examples", type=int, default=None,
                   help="records drawn from --data (default: 4000, 256 with --quick: enough for HF's 50x megabatches)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8; 4 with --quick)")
    p.add_argument("--pairs", type=int, default=2, help="run pairs per scenario")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per optimizer step (default 16; 8 with --quick)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--scenarios", default="defaults,group_by_length",
                   help=f"comma-separated reference-vs-lit scenarios ({', '.join(SCENARIOS)}), or empty")
    p.add_argument("--levers", default="",
                   help=f"comma-separated lit-recover levers to toggle, off vs on ({', '.join(LEVERS)})")
    p.add_argument("--skip", type=int, default=1, help="untimed first steps of each run")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both sides (default: torch's)")
    p.add_argument("--lit-arg", action="append", default=[],
                   help="extra main.py fit argument for lit-recover (repeatable)")
    p.add_argument("--tag", default=None, help="result file name under benchmarks/results/ (default perf_fit[_quick])")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--overwrite", action="store_true", help="replace results of the same --tag")
    p.add_argument("--render", metavar="JSON",
                   help="recompute the tables of a results JSON from its per-step data and rewrite it")
    return p.parse_args(argv)


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in known:
            raise SystemExit(f"error: unknown {what} {n!r} (choose from {', '.join(known)})")
    return names


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.render:
        return render_fit(Path(args.render))
    steps = args.steps or (4 if args.quick else 8)
    batch = args.batch_size or (8 if args.quick else 16)
    examples = args.examples or (256 if args.quick else 4000)
    command = command_line("bench_fit", argv)
    tag = args.tag or default_tag("fit", args.quick)
    out = Path(args.out)
    if not args.no_write:
        tag = fresh_tag(out, tag, args.overwrite)
    scenarios, levers = _names(args.scenarios, SCENARIOS, "scenario"), _names(args.levers, LEVERS, "lever")
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            if not args.quick:
                raise SystemExit("error: --model is required without --quick")
            from lit_recover.demos.tiny import write_tiny_pruned

            model = str(write_tiny_pruned(workdir / "tiny" / "pruned_model.bin"))
        if not Path(model).is_file():
            raise SystemExit(f"error: {model}: no such pruned model file")
        data = write_subset(Path(args.data), examples, workdir / "subset.json")
        base = FitSettings(model=str(Path(model).resolve()), data=str(data), batch_size=batch,
                           micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len, steps=steps,
                           learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                           lora_dropout=args.lora_dropout, threads=args.threads, lit_args=args.lit_arg)
        variants = {
            "defaults": base,
            "group_by_length": dataclasses.replace(base, group_by_length=True),
            "sequential": dataclasses.replace(base, sequential=True, lora_dropout=0.0),
            "padding_free": base,
            "same_batches": dataclasses.replace(base, sequential=True),
            "same_batches_padding_free": dataclasses.replace(base, sequential=True),
        }
        report: dict[str, Any] = {"tag": tag, "command": command, "hardware": hardware(), "skip": args.skip,
                                  "examples": examples, "load_avg_start": os.getloadavg(), "scenarios": {},
                                  "units": {m: u for m, (u, _, _) in METRICS.items()}}
        plan = [(name, SCENARIOS[name], [("reference", "reference", variants[name]),
                                         ("lit", "lit", dataclasses.replace(variants[name],
                                                                            padding_free=name.endswith("padding_free")))])
                for name in scenarios]
        plan += [(f"lever {name}", LEVERS[name][0], [("off", "lit", LEVERS[name][1](base)),
                                                       ("on", "lit", LEVERS[name][2](base))])
                 for name in levers]
        for name, description, arms in plan:
            print(f"scenario {name}:", flush=True)
            result = run_scenario(name, arms, args.pairs, workdir, args.skip, args.timeout)
            report["scenarios"][name] = {"description": description, **result}
        report["load_avg_end"] = os.getloadavg()
    text = fit_markdown(report)
    print(text)
    if not args.no_write:
        write_report(out, tag, report, text)
    return report


if __name__ == "__main__":
    main()
