"""Model objects and files: loading and saving pruned models (pickle, pickle-free folder, HF folder,
hub id), the safe unpickler and the rebuild it feeds, conversion, the packaged GGUF demo model, the
structure and forward checks, and the anatomy of a decoder (layers, head counts, per-layer widths).

``load_pruned(path) -> (model, tokenizer)`` and ``save_pruned(model, tokenizer, path)`` are the public face.
"""

from lit_recover.models.checks import PrunedModelError
from lit_recover.models.load import load_pruned, save_pruned

__all__ = ["PrunedModelError", "load_pruned", "save_pruned"]
