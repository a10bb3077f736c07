"""lit-recover: recover structurally pruned LLMs with LoRA on PyTorch Lightning, then measure them."""

__version__ = "0.1.0"

from lit_recover.model_io import load_pruned, save_pruned  # noqa: E402
from lit_recover.pruned_folder import save_pruned_folder  # noqa: E402

__all__ = ["__version__", "load_pruned", "save_pruned", "save_pruned_folder"]
