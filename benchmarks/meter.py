"""What a measured run records about itself: per-optimizer-step counters and its resident memory.

Both sides of the training benchmark attach the same :class:`StepMeter` the same way: a forward
pre-hook on the decoder stack, a step post-hook on the optimizer, and one call per micro-batch with
its loss and supervised-token count. Given the model (``attach_flops``), it also counts each step's
model FLOPs (``lit_recover.models.flops``: real tokens, supervised positions, the sum of squared
sequence lengths), the same count for both sides.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


def status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); ``None`` where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def supervised_count(labels) -> int:
    """Positions whose next-token label is supervised (not ``IGNORE_INDEX``)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class StepMeter:
    """Per-optimizer-step counters, fed by hooks that both sides attach the same way."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.rss_start_mb: float | None = None
        self.peak_rss_mb: float | None = None
        self.peak_rss_reset = False
        self.cuda_peak_mb: float | None = None
        self.flop_model: Any = None
        self.matmul_dtype: str | None = None
        self._last: float | None = None
        self._last_cpu: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._tokens = self._positions = self._supervised = self._squares = 0
        self._nll_sum = 0.0

    def attach_flops(self, model, matmul_dtype: str, **kwargs: Any) -> None:
        """Count model FLOPs per step for ``model`` (PEFT-wrapped), whose matmuls run in ``matmul_dtype``."""
        from lit_recover.models.flops import LoRATrainingFlops

        self.flop_model = LoRATrainingFlops.from_model(model, **kwargs)
        self.matmul_dtype = matmul_dtype

    def start(self) -> None:
        import torch

        self.peak_rss_reset = reset_peak_rss()
        rss = status_kib("VmRSS")
        self.rss_start_mb = rss / 1024 if rss is not None else None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._reset_window()
        self._last = time.perf_counter()
        self._last_cpu = time.process_time()

    def finish(self) -> None:
        import torch

        hwm = status_kib("VmHWM")
        if hwm is None:  # no /proc: the process-lifetime peak
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_rss_mb = hwm / 1024
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    # hooks ------------------------------------------------------------------------------------
    def forward_pre_hook(self, module, args, kwargs) -> None:
        """On the decoder stack: count non-pad tokens and padded positions of a training forward."""
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            return
        from lit_recover.models.flops import length_stats

        self._positions += ids.numel()
        batch = {"input_ids": ids, "attention_mask": mask if mask is not None and mask.dim() == 2 else None,
                 "position_ids": kwargs.get("position_ids")}
        tokens, squares = length_stats(batch)  # real tokens (left or right padding, packed rows) and Σ n²
        self._tokens += tokens
        self._squares += squares

    def add_loss(self, mean_nll: float, supervised: int) -> None:
        """One micro-batch's mean NLL over its ``supervised`` tokens."""
        self._nll_sum += mean_nll * supervised
        self._supervised += supervised

    def optimizer_step_hook(self, optimizer, args, kwargs) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        rss = status_kib("VmRSS")
        self.steps.append({
            "step": len(self.steps) + 1,
            "seconds": now - (self._last if self._last is not None else now),
            # CPU time of the whole process (all its threads): what the step cost, whatever else ran
            "cpu_seconds": cpu - (self._last_cpu if self._last_cpu is not None else cpu),
            "tokens": self._tokens,
            "positions": self._positions,
            "supervised": self._supervised,
            "loss": self._nll_sum / self._supervised if self._supervised else float("nan"),
            "flops": (self.flop_model.step(self._tokens, self._supervised, self._squares)["total"]
                      if self.flop_model is not None else None),
            "rss_mb": rss / 1024 if rss is not None else float("nan"),
        })
        self._last, self._last_cpu = now, cpu
        self._reset_window()

    def result(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "rss_start_mb": self.rss_start_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_rss_reset_at_train_start": self.peak_rss_reset,
            "cuda_peak_mb": self.cuda_peak_mb,
            "flop_model": None if self.flop_model is None else dataclasses.asdict(self.flop_model),
            "matmul_dtype": self.matmul_dtype,
        }
