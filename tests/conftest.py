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
    from lit_recover.demos.tiny import write_tiny_pruned
    from lit_recover.outputs import MERGED_PICKLE

    return write_tiny_pruned(tmp_path_factory.mktemp("tiny") / MERGED_PICKLE)


@pytest.fixture()
def tiny_model_and_tokenizer():
    """A fresh ``(model, tokenizer)`` pair (tiny, pruned, eval mode) for each test."""
    from lit_recover.demos.tiny import build_tiny_pruned

    return build_tiny_pruned()


def write_alpaca_records(path: Path, n: int = 64) -> Path:
    """A deterministic Alpaca-format file of ``n`` varied records (some with ``input``)."""
    import json

    records = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        if i % 3 == 0:
            records.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"The sum is {a + b}."})
        elif i % 3 == 1:
            records.append({
                "instruction": "Summarize the text in one sentence.",
                "input": " ".join(["The model was pruned and then fine-tuned."] * (1 + i % 5)),
                "output": "A pruned model was recovered" + " with low-rank adapters" * (i % 4) + ".",
            })
        else:
            records.append({"instruction": f"List {1 + i % 6} colours.", "output": ", ".join(["red", "green", "blue", "black", "white", "grey"][: 1 + i % 6])})
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture()
def alpaca_json(tmp_path) -> Path:
    return write_alpaca_records(tmp_path / "alpaca.json")
