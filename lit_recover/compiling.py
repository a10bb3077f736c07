"""``--model.compile``: ``torch.compile`` of the decoder layers, and the seconds it spent compiling.

Each decoder layer is compiled on its own (``nn.Module.compile``, inductor): the layers of a pruned
model have uneven widths, so they are distinct graphs, compiled on first use, forward and backward;
a new sequence length after the first makes the shapes dynamic (one recompile). On CPU inductor
writes C++ and needs a compiler (``g++``/``clang++``, or ``CXX``): :func:`check_compile` says so in
one line before anything loads. What compiling cost is :func:`compile_seconds` (dynamo's own
accounting of frame and backward compilation), logged as ``train/compile_s``.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from lit_recover.errors import ConfigError


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_compile(device: str = "cpu") -> None:
    """Raise a one-line :class:`ConfigError` when ``torch.compile`` cannot run here."""
    import torch

    if not hasattr(torch, "compile"):
        raise ConfigError(f"--model.compile true: torch {torch.__version__} has no torch.compile")
    if device == "cpu" and _cxx() is None:
        raise ConfigError("--model.compile true: torch.compile's inductor backend needs a C++ compiler on CPU "
                          "and none was found (install g++ or set CXX); or use --model.compile false")


def compile_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many."""
    from lit_recover.models.anatomy import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_seconds() -> float:
    """Seconds this process spent compiling so far (forward frames and backward graphs)."""
    try:
        from torch._dynamo.utils import calculate_time_spent
    except ImportError:  # not in this torch: nothing to report
        return 0.0
    return float(calculate_time_spent().get("total_wall_time", 0.0))
