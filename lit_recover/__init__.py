"""lit-recover: recover structurally pruned LLMs with LoRA on PyTorch Lightning, then measure them.

Imports are lazy: ``import lit_recover.evaluation.report`` loads neither torch nor lm-eval, and
``lit_recover.load_pruned`` imports the loader on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_pruned": "lit_recover.models.load",
    "save_pruned": "lit_recover.models.load",
    "save_pruned_folder": "lit_recover.models.folder",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_recover' has no attribute {name!r}")
