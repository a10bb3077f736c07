"""FSDP2 loading benchmark: host memory of the ranks of one machine while they load and shard a model.

Each rank builds ``LoRARecoveryModule`` from the pruned model file and shards it with FSDP2 (as under
``configs/scale/fsdp.yaml``), in processes of its own on gloo (``benchmarks.fsdp_load_worker``). Two
arms per file format: ``before`` reads the weights into each rank's memory (``--model.mmap_weights
false``: the loader as it was), ``after`` keeps them in a copy-on-write memory map of the file (the
default), so every rank's process memory ends up holding its shard only and the page cache holds
the file once for all of them.

The measure is the growth of each rank's resident anonymous memory (``RssAnon``: memory the process
owns; mapped file pages are not in it, they are in ``RssFile`` and in the page cache, shared) from
just before the load to its peak while loading and sharding, summed over the ranks, divided by the
model's size in bytes. Goal: at most 1.3 (about one copy per machine whatever the number of ranks);
reading the weights into every rank gives about the number of ranks. Also recorded: the growth at
the end of sharding, the summed ``Pss`` growth (which counts shared file pages once) and the
seconds of each stage. A model of a few hundred MB is built with ``lit_recover.demos.tiny`` at a
larger width and written as an LLM-Pruner pickle and as a pruned folder.

Usage, from the repository root::

    python -m benchmarks.bench_fsdp_load                      # ~370 MB model, 2 ranks, both formats
    python -m benchmarks.bench_fsdp_load --quick              # ~35 MB model
    python -m benchmarks.bench_fsdp_load --model prune_log/x/pruned_model.bin --world 4

Results: ``benchmarks/results/fsdp_load/<tag>.json|md``, the tag naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, WORKER_ENV, command_line, hardware
from benchmarks.report import fresh_tag, write_report

OUT = RESULTS / "fsdp_load"
ARMS = ("before", "after")  # mmap_weights false / true
GOAL = 1.3
# model shapes (build_tiny_pruned keyword arguments)
FULL = {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "num_kv_heads": 8, "intermediate_size": 2816}
QUICK = {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 3, "intermediate_size": 1536}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~35 MB model instead of ~370 MB")
    p.add_argument("--model", help="measure this pruned pickle or pruned folder instead of building one")
    p.add_argument("--formats", default="pickle,folder", help="built model's formats: pickle, folder or both")
    p.add_argument("--world", type=int, default=2, help="ranks (processes) on this machine")
    p.add_argument("--work-dir", default=None, help="where the built model goes (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one launch of the ranks may take")
    p.add_argument("--tag", default=None, help="results name (default fsdp_load_<cpu>[_quick])")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--overwrite", action="store_true", help="replace results of the same --tag")
    return p.parse_args(argv)


# --- the model ---------------------------------------------------------------------------------------
def build_models(work: Path, shapes: dict[str, int] | None, formats: tuple[str, ...] = ("pickle", "folder"),
                 seed: int = 0) -> dict[str, Path]:
    """A randomly initialised, unevenly pruned LLaMA of ``shapes`` (``None``: the 30 KB tiny one),
    written in each of ``formats`` (``pickle``, ``folder``) under ``work``."""
    from lit_recover.demos.tiny import build_tiny_pruned
    from lit_recover.models.folder import save_pruned_folder
    from lit_recover.models.load import save_pruned

    model, tokenizer = build_tiny_pruned(seed=seed, **(shapes or {}))
    work.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if "pickle" in formats:
        paths["pickle"] = save_pruned(model, tokenizer, work / "pruned_model.bin")
    if "folder" in formats:
        paths["folder"] = save_pruned_folder(model, tokenizer, work / "pruned_folder", overwrite=True)
    return paths


def warmup_model(work: Path, model: Path) -> Path:
    """The tiny model in ``model``'s format, which every rank loads and shards before it is measured."""
    fmt = "folder" if model.is_dir() else "pickle"
    return build_models(work / "warmup", None, (fmt,))[fmt]


# --- launching the ranks -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
                 "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def run_ranks(model: Path, world: int, mmap: bool, out_dir: Path, timeout: float = 600,
              logits: Path | None = None, warmup: Path | None = None) -> list[dict[str, Any]]:
    """Start ``world`` worker processes on gloo; their results, by rank. Raises on a failed rank.

    ``warmup``: a tiny model of the same format each rank loads and shards before it is measured.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    base_env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    base_env.update(WORKER_ENV, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    procs, logs = [], []
    try:
        for rank in range(world):
            cmd = [sys.executable, "-m", "benchmarks.fsdp_load_worker", "--model", str(model),
                   "--mmap", "true" if mmap else "false", "--out", str(out_dir / f"rank{rank}.json")]
            if logits is not None:
                cmd += ["--logits", str(logits)]
            if warmup is not None:
                cmd += ["--warmup", str(warmup)]
            env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
            logs.append(out_dir / f"rank{rank}.log")
            with logs[-1].open("w") as fh:
                procs.append(subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break  # a failed rank leaves the other waiting in a collective
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if codes != [0] * world:
        tails = "\n".join(f"--- rank {i} (exit {c}) ---\n" + "\n".join(logs[i].read_text().splitlines()[-30:])
                          for i, c in enumerate(codes))
        raise RuntimeError(f"ranks ended with {codes} (None: killed after {timeout:.0f} s)\n{tails}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


# --- the numbers ---------------------------------------------------------------------------------------
def summarize(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' summed growths (bytes) and their ratios to the model's size."""
    size = ranks[0]["model_bytes"]

    def growth(stage: str, key: str) -> int:
        return sum(r["stages"][stage][key] - r["stages"]["start"][key] for r in ranks)

    peak = sum(r["peak_rss_anon"] - r["stages"]["start"]["RssAnon"] for r in ranks)
    out = {
        "world": len(ranks),
        "model_bytes": size,
        "trainable_bytes": ranks[0]["trainable_bytes"],
        "peak_anon_growth": peak,
        "peak_anon_ratio": peak / size,
        "loaded_anon_growth": growth("loaded", "RssAnon"),
        "sharded_anon_growth": growth("sharded", "RssAnon"),
        "sharded_anon_ratio": growth("sharded", "RssAnon") / size,
        "loaded_file_growth": growth("loaded", "RssFile"),
        "sharded_file_growth": growth("sharded", "RssFile"),
        "loaded_pss_growth": growth("loaded", "smaps_Pss") if "smaps_Pss" in ranks[0]["stages"]["start"] else None,
        "sharded_pss_growth": growth("sharded", "smaps_Pss") if "smaps_Pss" in ranks[0]["stages"]["start"] else None,
        "load_s": max(r["load_s"] for r in ranks),
        "shard_s": max(r["shard_s"] for r in ranks),
        "frozen_mismatched": sum(r["frozen_mismatched"] for r in ranks),
        "frozen_sharded": ranks[0]["frozen_sharded"],
        "frozen_checked": sum(r["frozen_checked"] for r in ranks),
    }
    out["sharded_pss_ratio"] = out["sharded_pss_growth"] / size if out["sharded_pss_growth"] is not None else None
    return out


def _mb(v: float | None) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [
        f"# {report['tag']}", "",
        f"`{report['command']}`", "",
        f"{report['world']} ranks (gloo, one process each, 1 thread) on {hw.get('cpu')}, {hw.get('cores')} cores, "
        f"{hw.get('memory_gib')} GiB; torch {hw.get('torch')}; load average {report['load_avg_start'][0]:.1f} at "
        "the start.", "",
        "Growth of resident anonymous memory (`RssAnon`, /proc/<pid>/status: what each process owns, mapped "
        "file pages excluded) from just before `LoRARecoveryModule(...)` to its peak (sampled every ms) while "
        "loading and sharding with FSDP2 (`configure_model`), summed over the ranks, over the model's size. "
        f"Goal for `after`: at most {GOAL}. `before`: `--model.mmap_weights false`, each rank reads the weights "
        "into its memory (the loader as it was); `after`: the default, a copy-on-write map of the file. Each rank "
        "first loads and shards the 30 KB tiny model of the same format, unmeasured, so that what is imported "
        "or cached on first use is not counted. "
        "A pruned folder's safetensors were memory-mapped before too (safetensors maps them): its two arms "
        "are the same loader. `Pss` (/proc/<pid>/smaps_rollup, read after a barrier) counts a page the ranks "
        "share once: after the load the mapped file's pages appear there once per machine (the page cache, "
        "which also holds the file when it is read instead), after sharding only the shards remain.", "",
        "| format | arm | model MiB | peak anon growth, summed MiB | ÷ model | goal met | anon growth after "
        "sharding, summed MiB | ÷ model | Pss growth after the load, summed MiB | Pss growth after sharding, summed "
        "MiB | mapped file pages in RSS after the load, summed MiB | load s | shard s | frozen tensors equal to "
        "the file (all ranks) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for fmt, arms in report["formats"].items():
        for arm in ARMS:
            s = arms[arm]["summary"]
            met = ("yes" if s["peak_anon_ratio"] <= GOAL else "no") if arm == "after" else ""
            lines.append(
                f"| {fmt} | {arm} | {_mb(s['model_bytes'])} | {_mb(s['peak_anon_growth'])} "
                f"| {s['peak_anon_ratio']:.2f} "
                f"| {met} | {_mb(s['sharded_anon_growth'])} | {s['sharded_anon_ratio']:.2f} "
                f"| {_mb(s['loaded_pss_growth'])} | {_mb(s['sharded_pss_growth'])} | {_mb(s['loaded_file_growth'])} "
                f"| {s['load_s']:.1f} | {s['shard_s']:.1f} "
                f"| {s['frozen_checked'] - s['frozen_mismatched']}/{s['frozen_checked']} |")
    lines += ["", "Per rank (MiB, growth over the start): peak RssAnon / RssAnon loaded / RssAnon sharded / "
              "RssFile loaded (the map's pages the load checks touched) / RssFile sharded (the map is released "
              "with the full tensors)", ""]
    for fmt, arms in report["formats"].items():
        for arm in ARMS:
            cells = []
            for r in arms[arm]["ranks"]:
                st, start = r["stages"], r["stages"]["start"]
                cells.append(f"rank {r['rank']}: {_mb(r['peak_rss_anon'] - start['RssAnon'])} / "
                             f"{_mb(st['loaded']['RssAnon'] - start['RssAnon'])} / "
                             f"{_mb(st['sharded']['RssAnon'] - start['RssAnon'])} / "
                             f"{_mb(st['loaded']['RssFile'] - start['RssFile'])} / "
                             f"{_mb(st['sharded']['RssFile'] - start['RssFile'])}")
            lines.append(f"- {fmt}, {arm}: " + "; ".join(cells))
    return "\n".join(lines)


def cpu_slug(cpu: str) -> str:
    """``AMD EPYC 7B13 64-Core Processor`` → ``amd_epyc_7b13_64_core``."""
    slug = re.sub(r"\(r\)|\(tm\)|\bprocessor\b|\bcpu\b|@.*$", "", cpu.lower())
    return re.sub(r"[^a-z0-9]+", "_", slug).strip("_") or "cpu"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    hw = hardware()
    tag = args.tag or f"fsdp_load_{cpu_slug(str(hw.get('cpu', 'cpu')))}" + ("_quick" if args.quick else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = fresh_tag(out, tag, args.overwrite)
    load_avg = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="fsdp_load_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shapes = QUICK if args.quick else FULL
        if args.model:
            models = {"folder" if Path(args.model).is_dir() else "pickle": Path(args.model)}
            shapes = None
        else:
            models = build_models(work, shapes, tuple(f.strip() for f in args.formats.split(",") if f.strip()))
        formats: dict[str, Any] = {}
        for fmt, path in models.items():
            formats[fmt] = {}
            warmup = warmup_model(work, path)
            for arm in ARMS:
                ranks = run_ranks(path, args.world, mmap=arm == "after", out_dir=work / "runs" / f"{fmt}-{arm}",
                                  timeout=args.timeout, warmup=warmup)
                for r in ranks:  # a built model lies in a temporary folder: its name only
                    r["model"] = args.model if args.model else path.name
                formats[fmt][arm] = {"ranks": ranks, "summary": summarize(ranks)}
                s = formats[fmt][arm]["summary"]
                print(f"{fmt} {arm}: peak anonymous growth summed over {args.world} ranks "
                      f"{s['peak_anon_growth'] / 2**20:.1f} MiB = {s['peak_anon_ratio']:.2f} x the model "
                      f"({s['model_bytes'] / 2**20:.1f} MiB)", flush=True)
    report = {
        "schema": "lit-recover-bench-fsdp-load", "tag": tag, "command": command_line("bench_fsdp_load", argv),
        "hardware": hw, "load_avg_start": load_avg, "world": args.world, "shapes": shapes, "goal": GOAL,
        "measure": "sum over ranks of (peak RssAnon while loading and sharding - RssAnon before) / model bytes",
        "formats": formats,
        "goals_met": {fmt: arms["after"]["summary"]["peak_anon_ratio"] <= GOAL for fmt, arms in formats.items()},
    }
    text = markdown(report)
    write_report(out, tag, report, text)
    print(text)
    return report


def render(path: Path) -> str:
    """Rewrite ``<tag>.md`` from ``<tag>.json`` (after a change of the table; the numbers stay)."""
    from benchmarks.report import write_result

    report = json.loads(path.read_text())
    text = markdown(report)
    write_result(path.with_suffix(".md"), text + "\n")
    return text


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render(Path(sys.argv[2])))
    else:
        main()
