"""What this machine computes in natively, and the dtype a frozen base model runs in.

A CPU runs ``bfloat16`` matmuls at native speed only with AVX512-BF16 or AMX-BF16 (AMD Zen 4 and
later, Intel Cooper Lake / Sapphire Rapids and later), and ``float16`` ones only with AVX512-FP16 or
AMX-FP16 (Intel Sapphire Rapids / Granite Rapids). Elsewhere torch emulates them, about 2x slower
than ``float32``. The flags are read from ``/proc/cpuinfo``; where that file does not exist
(macOS, Windows) torch's oneDNN check stands in for the bfloat16 one. ``LIT_RECOVER_CPU_NATIVE``
overrides the detection: ``bf16``, ``fp16``, ``bf16,fp16`` or ``none``.

The rule for the frozen base weights (:func:`base_dtype`): keep the dtype they are stored in
wherever the device computes in it, otherwise take the closest dtype it does compute in.

============  ===========================================  ==========================================
stored        CUDA                                         CPU
============  ===========================================  ==========================================
float32/64    kept                                         kept
bfloat16      kept (float32 on GPUs without bfloat16)      kept with native bf16, else float32
float16       kept                                         inference: kept with native fp16, else
                                                           bfloat16 with native bf16, else float32;
                                                           training: bfloat16 with native bf16, else
                                                           float32
============  ===========================================  ==========================================

Training never runs a float16 base on a CPU: without a loss scale (Lightning has none on CPU, its
``16-mixed`` becomes ``bf16-mixed`` there) gradients flowing back through float16 activations
underflow, and the CPUs with native float16 also have AMX-BF16, which is faster.

This module imports nothing of the project (it sits beside ``errors.py`` in the import order).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

ENV_VAR = "LIT_RECOVER_CPU_NATIVE"
CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flags (x86 "flags", ARM "Features") that mean native math in that dtype
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})
_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class HardwareSettingError(ValueError):
    """``LIT_RECOVER_CPU_NATIVE`` holds something that is not a list of dtypes."""


@functools.lru_cache(maxsize=4)
def _read_cpuinfo(path: Path) -> tuple[str, frozenset[str]] | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:  # the first processor speaks for all
            flags.update(value.split())
        elif key in ("model name", "cpu model", "hardware") and not name:
            name = value.strip()
    return name, frozenset(flags)


def cpu_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU feature flags from ``/proc/cpuinfo``; ``None`` where the file cannot be read."""
    info = _read_cpuinfo(path)
    return None if info is None else info[1]


def cpu_name(path: Path = CPUINFO) -> str:
    """The CPU model name (``AMD EPYC 9454``, …), or the platform's processor string."""
    info = _read_cpuinfo(path)
    if info is not None and info[0]:
        return info[0]
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _parse_override(value: str) -> frozenset[torch.dtype]:
    items = [v.strip().lower() for v in value.replace(";", ",").split(",") if v.strip()]
    if items in ([], ["none"], ["fp32"], ["float32"]):
        return frozenset()
    unknown = [v for v in items if v not in _NAMES]
    if unknown:
        raise HardwareSettingError(
            f"{ENV_VAR}={value!r}: {', '.join(unknown)} is not a dtype; use bf16, fp16, 'bf16,fp16' or none"
        )
    return frozenset(_NAMES[v] for v in items)


def _torch_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_native_dtypes(path: Path = CPUINFO) -> frozenset[torch.dtype]:
    """The 16-bit float dtypes this CPU computes in natively (a subset of bfloat16, float16)."""
    return frozenset(cpu_detection(path)["native"])


def cpu_detection(path: Path = CPUINFO) -> dict:
    """How the CPU's native dtypes were found: ``{"cpu", "native", "source", "flags"}``.

    ``source`` is ``env`` (``LIT_RECOVER_CPU_NATIVE``), ``cpuinfo`` (the flags of ``/proc/cpuinfo``)
    or ``torch`` (oneDNN's bfloat16 check, where there is no ``/proc/cpuinfo``).
    """
    override = os.environ.get(ENV_VAR)
    flags = cpu_flags(path)
    found = sorted((flags or frozenset()) & (_BF16_FLAGS | _FP16_FLAGS))
    if override is not None and override.strip():
        native, source = _parse_override(override), "env"
    elif flags is not None:
        native = set()
        if flags & _BF16_FLAGS:
            native.add(torch.bfloat16)
        if flags & _FP16_FLAGS:
            native.add(torch.float16)
        native, source = frozenset(native), "cpuinfo"
    else:
        native, source = (frozenset({torch.bfloat16}) if _torch_bf16() else frozenset()), "torch"
    return {"cpu": cpu_name(path), "native": sorted(native, key=str), "source": source, "flags": found}


def cpu_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 / AMX-BF16)."""
    return torch.bfloat16 in cpu_native_dtypes()


def cpu_native_fp16() -> bool:
    """Whether this CPU runs float16 matmuls natively (AVX512-FP16 / AMX-FP16)."""
    return torch.float16 in cpu_native_dtypes()


def computes_natively(dtype: torch.dtype, device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs matmuls in ``dtype`` at native speed (float32 and float64 always)."""
    kind = torch.device(device).type
    if dtype in (torch.float32, torch.float64):
        return True
    if kind == "cuda":
        return dtype == torch.float16 or (dtype == torch.bfloat16 and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        return dtype in cpu_native_dtypes()
    return False


def base_dtype(stored: torch.dtype, device: str | torch.device = "cpu", *, training: bool = True) -> torch.dtype:
    """The dtype to run frozen weights stored in ``stored`` in on ``device`` (the table above).

    Args:
        stored: the dtype of the weights as read from the file.
        device: where they run.
        training: gradients flow back through the activations (no float16 base on a CPU then).
    """
    if not stored.is_floating_point or computes_natively(stored, device) and not (
        training and stored == torch.float16 and torch.device(device).type == "cpu"
    ):
        return stored
    if torch.device(device).type == "cpu" and stored == torch.float16 and computes_natively(torch.bfloat16, "cpu"):
        return torch.bfloat16  # the closest native dtype: float16's exponent range fits in bfloat16's
    return torch.float32


def is_lossless(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every ``source`` value is exactly representable in ``target`` (float16 → float32: yes;
    float16 → bfloat16, float32 → bfloat16: no)."""
    if source == target:
        return True
    if not (source.is_floating_point and target.is_floating_point):
        return False
    s, t = torch.finfo(source), torch.finfo(target)
    return t.eps <= s.eps and t.max >= s.max and t.smallest_normal <= s.smallest_normal
