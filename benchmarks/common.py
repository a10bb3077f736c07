"""What the benchmark scripts share: paths, the hardware record, the records subset, result names.

The scripts run from the repository root as modules (``python -m benchmarks.bench_fit …``), and so
do the processes they start (:func:`run_module`): the package is imported, never put on a path.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
DEFAULT_ALPACA = SHARED_DATA / "alpaca" / "alpaca_data_cleaned.json"
DEFAULT_TEXT = SHARED_DATA / "ppl" / "wikitext2_test.txt"
# set in every process a benchmark starts: no hub, no wandb, no tokenizer threads beside torch's
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def default_tag(name: str, quick: bool) -> str:
    """The results name of a script's run: ``perf_<name>``, ``perf_<name>_quick`` with ``--quick``."""
    return f"perf_{name}_quick" if quick else f"perf_{name}"


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a report records: ``python -m benchmarks.<module> <arguments>``."""
    return f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


def run_module(module: str, args: list[str], log: Path, timeout: float) -> int:
    """``python -m benchmarks.<module> <args>`` from the repository root, its output in ``log``; the exit code."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args]
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT),
                              env={**os.environ, **WORKER_ENV}, timeout=timeout)
    return proc.returncode


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and the versions of python, torch, transformers, peft, lightning."""
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for pkg in ("transformers", "peft", "lightning"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_subset(data: Path, n: int, out: Path, seed: int = 0) -> Path:
    """``n`` records drawn (seeded) from an Alpaca JSON file, written to ``out``."""
    try:
        records = json.loads(Path(data).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: {data}: cannot read the Alpaca JSON ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise SystemExit(f"error: {data}: expected a non-empty JSON list of records")
    if n < len(records):
        records = random.Random(seed).sample(records, n)
    out.write_text(json.dumps(records))
    return out
