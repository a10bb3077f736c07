"""Memory and size: parameter counts against a base model on disk, and the peak tracker."""

from __future__ import annotations

import time

import pytest
import torch

from lit_recover.demos.tiny import build_tiny_llama
from lit_recover.evaluation.memory import (
    PeakMemory,
    count_parameters_at,
    evaluate_memory,
    model_size_bytes,
    parameter_count,
)


def test_parameter_ratio_to_a_base_model_folder_and_pickle(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    dense = build_tiny_llama(len(tok))
    dense.save_pretrained(tmp_path / "base")  # safetensors: counted from the header alone
    tok.save_pretrained(tmp_path / "base")
    dense_count = sum(p.numel() for p in dense.parameters())
    assert count_parameters_at(tmp_path / "base") == dense_count
    from lit_recover.models.load import save_pruned

    save_pruned(model, tok, tmp_path / "pruned.bin")
    assert count_parameters_at(tmp_path / "pruned.bin") == parameter_count(model)

    out = evaluate_memory(model, None, base_model=str(tmp_path / "base"))
    assert out["parameters"]["value"] == parameter_count(model) < dense_count
    assert out["base_parameters"]["value"] == dense_count
    assert out["parameter_ratio"]["value"] == pytest.approx(parameter_count(model) / dense_count)
    assert 0 < out["parameter_ratio"]["value"] < 1
    missing = evaluate_memory(model, None, base_model=str(tmp_path / "nope.bin"))
    assert missing["parameter_ratio"]["status"] == "skipped" and "nope.bin" in missing["parameter_ratio"]["reason"]


def test_size_counts_tied_weights_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as in models with tie_word_embeddings
    assert parameter_count(model) == 40
    assert model_size_bytes(model) == 40 * 4
    model.half()
    assert model_size_bytes(model) == 40 * 2


def test_peak_rss_sees_an_allocation_made_while_tracking():
    with PeakMemory("cpu", interval=0.01) as tracker:
        start = tracker.peak_rss
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block.add_(1)
        time.sleep(0.1)  # several sampling intervals
        del block
    report = tracker.report()
    assert report["peak_rss"]["value"] * 2**20 - start >= 48 * 2**20
    assert report["peak_cuda_allocated"]["status"] == "skipped"
    assert report["process_peak_rss"]["value"] >= report["peak_rss"]["value"]
