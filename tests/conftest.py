"""Shared fixtures: tiny unevenly pruned LLaMA models built on the fly (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(rel: str) -> Path:
    """A file under ../shared/data, or skip the test when it is absent (a user's machine)."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"../shared/data/{rel} is not present on this machine")
    return path


@pytest.fixture(scope="session")
def tiny_pruned_path(tmp_path_factory) -> Path:
    """An LLM-Pruner pickle of a tiny GQA LLaMA with unevenly pruned middle layers."""
    from lit_recover.tiny import write_tiny_pruned

    return write_tiny_pruned(tmp_path_factory.mktemp("tiny") / "pruned_model.bin")


@pytest.fixture()
def tiny_model_and_tokenizer():
    """A fresh ``(model, tokenizer)`` pair (tiny, pruned, eval mode) for each test."""
    from lit_recover.tiny import build_tiny_pruned

    return build_tiny_pruned()
