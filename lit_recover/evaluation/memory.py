"""Model size and peak memory.

- parameters: unique parameters (tied weights once), and the ratio to a base model's count;
- size: bytes of unique parameters and buffers, in MiB, in the dtype the model was evaluated in
  (recorded beside it, with the parameter count per dtype);
- peak memory while the suite ran: ``torch.cuda.max_memory_allocated`` on a GPU (the peak is reset
  when tracking starts); on CPU, the peak resident set size sampled every ``interval`` seconds
  during evaluation, plus the process's lifetime peak (``ru_maxrss``, which includes loading).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from pathlib import Path

import torch
from torch import nn

from lit_recover.evaluation.report import OK, measurement, skipped

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def parameter_count(model: nn.Module) -> int:
    """Number of unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_dtypes(model: nn.Module) -> dict[str, int]:
    """Unique parameters by dtype (``{"bfloat16": n}``; a LoRA-wrapped model shows its float32 adapter)."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + p.numel()
    return counts


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by unique parameters and buffers."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _safetensors_count(path: Path) -> int:
    """Parameters in a .safetensors file, read from its header only (no tensor is loaded)."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in meta["shape"]:
            count *= d
        total += count
    return total


def count_parameters_at(path: str | Path) -> int:
    """Parameter count of a model on disk: an HF folder's safetensors headers, or by loading it.

    Args:
        path: an HF model folder, an LLM-Pruner pickle, or a hub id.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if files:
            return sum(_safetensors_count(f) for f in files)
    from lit_recover.models.load import load_pruned

    model, _ = load_pruned(path, check=False)
    try:
        return parameter_count(model)
    finally:
        del model


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _process_peak_rss_bytes() -> int | None:
    # Linux: the peak of this program's own memory (VmHWM). ru_maxrss would also hold the peak of
    # the process that started this one (the kernel keeps it across fork and exec), so a model
    # measured in a process started by a bigger one would be charged the parent's memory.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Track peak memory between ``start()`` and ``stop()`` (or as a context manager).

    Args:
        device: the device the model runs on; CUDA peaks are read on a GPU, RSS is sampled always.
        interval: seconds between RSS samples.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cuda_peak: int | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, _rss_bytes())

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak_rss = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> PeakMemory:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak_rss = max(self.peak_rss, _rss_bytes())
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)
        return self

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def report(self) -> dict:
        """Peak measurements; the CUDA peak is skipped with the reason on CPU."""
        out: dict = {}
        if self.device.type == "cuda" and self.cuda_peak is not None:
            out["peak_cuda_allocated"] = measurement(self.cuda_peak / MIB, "MiB", higher_is_better=False,
                                                     device=str(self.device))
        else:
            # Not asked for on a CPU run: neither the failure box nor strict counts it.
            out["peak_cuda_allocated"] = skipped(f"the model runs on {self.device.type}, not CUDA; "
                                                 "see peak_rss", not_applicable=True)
        out["peak_rss"] = measurement(self.peak_rss / MIB, "MiB", higher_is_better=False,
                                      note=f"sampled every {self.interval:g} s while evaluating")
        life = _process_peak_rss_bytes()
        if life is not None:
            # ru_maxrss and sampled RSS are read differently; the window lies inside the process's life.
            life = max(life, self.peak_rss)
            out["process_peak_rss"] = measurement(life / MIB, "MiB", higher_is_better=False,
                                                  note="whole process, loading included")
        return out


def evaluate_memory(model: nn.Module, tracker: PeakMemory | None = None, base_model: str | None = None) -> dict:
    """The ``memory`` section: parameters (and ratio to ``base_model``), size, and the tracker's peaks.

    Args:
        model: the evaluated model.
        tracker: a stopped :class:`PeakMemory` that ran during evaluation; ``None`` records no peaks.
        base_model: path of the unpruned model to compare the parameter count with.
    """
    t0 = time.perf_counter()
    weight = model.get_input_embeddings().weight
    params = parameter_count(model)
    dtype = str(weight.dtype).removeprefix("torch.")
    out: dict = {"status": OK, "settings": {"base_model": base_model, "device": str(weight.device),
                                            "dtype": dtype, "parameter_dtypes": parameter_dtypes(model)},
                 "parameters": measurement(params, "count")}
    if base_model is not None:
        try:
            base = count_parameters_at(base_model)
            out["base_parameters"] = measurement(base, "count", source=str(base_model))
            out["parameter_ratio"] = measurement(params / base, "ratio")
        except Exception as exc:  # an unreachable hub id, an unreadable file
            out["parameter_ratio"] = skipped(f"could not count {base_model}'s parameters "
                                             f"({type(exc).__name__}: {exc})")
    # the size as evaluated: in the dtype the model ran in (a float16 file evaluated in bfloat16 or
    # float32 is reported at that size, with the dtype beside it)
    out["size"] = measurement(model_size_bytes(model) / MIB, "MiB", higher_is_better=False, dtype=dtype)
    if tracker is not None:
        out.update(tracker.report())
    out["elapsed"] = measurement(time.perf_counter() - t0, "s")
    return out
