"""evaluate_model: schema completeness, skips and failures, and the model left as it was found."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from lit_recover.evaluation import EvalConfig, evaluate_model, parse_metrics, validate_results, with_deltas
from lit_recover.evaluation.report import is_measurement, iter_rows
from tests.evaluation.test_ppl import TEXT

FAST = dict(latency_prompt_tokens=8, latency_new_tokens=4, latency_runs=2, throughput_batch_size=2,
            throughput_seq_len=16, ppl_seq_len=32, progress=False)


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "demo.txt"
    path.write_text(TEXT)
    return path


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _walk_numbers(node, path=""):
    """Every number under node, with its path: each must sit in a measurement or a settings/info field."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_numbers(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_numbers(v, f"{path}/{i}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path


def test_results_are_complete_and_the_model_is_left_as_found(tiny_model_and_tokenizer, text_file):
    model, tok = tiny_model_and_tokenizer
    model.train()
    hooks = _hook_count(model)
    requires = [p.requires_grad for p in model.parameters()]
    config = EvalConfig(metrics=["ppl", "latency", "memory"], ppl_datasets=[], ppl_texts={"demo": str(text_file)},
                        **FAST)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    res = evaluate_model(model, tok, config, label="tiny")

    # The model and the process as they were.
    assert model.training and _hook_count(model) == hooks
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == requires
    assert torch.equal(torch.rand(3), expected_next)

    validate_results(res)
    assert res["label"] == "tiny" and res["settings"] == asdict(config)
    assert set(res["metrics"]) == {"ppl", "latency", "memory"}
    assert all(res["metrics"][s]["status"] == "ok" for s in res["metrics"])
    env = res["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["torch_threads"] >= 1
    assert {"torch", "transformers", "lm_eval", "datasets", "python", "lit_recover"} <= set(env["versions"])
    assert res["model"]["num_layers"] == 4 and len({s["intermediate_size"] for s in res["model"]["layer_shapes"]}) > 1

    demo = res["metrics"]["ppl"]["datasets"]["demo"]
    assert demo["status"] == "ok" and demo["unit"] == "perplexity" and demo["value"] > 1
    lat = res["metrics"]["latency"]
    for key, unit in [("time_to_first_token", "ms"), ("ms_per_token", "ms"), ("tokens_per_second", "tokens/s"),
                      ("forward_tokens_per_second", "tokens/s")]:
        assert lat[key]["unit"] == unit and lat[key]["value"] > 0 and len(lat[key]["runs"]) == 2
    assert lat["settings"]["device"] == "cpu" and lat["settings"]["new_tokens"] == 4
    mem = res["metrics"]["memory"]
    assert mem["parameters"]["value"] == sum(p.numel() for p in model.parameters())
    assert mem["size"]["value"] == pytest.approx(mem["parameters"]["value"] * 4 / 2**20, rel=0.01)
    assert mem["peak_cuda_allocated"]["status"] == "skipped" and "not CUDA" in mem["peak_cuda_allocated"]["reason"]
    assert mem["peak_rss"]["unit"] == "MiB" and mem["peak_rss"]["value"] > 10

    # Every number outside settings/model/environment is part of a measurement with a unit.
    for path in _walk_numbers(res["metrics"]):
        parts = path.strip("/").split("/")
        assert "settings" in parts or any(p in {"value", "runs", "stderr"} for p in parts) or parts[-1] in {
            "mean_nll", "n_chunks", "n_chunks_total", "n_tokens", "n_tokens_scored"}, path
    for _, leaf in iter_rows(res, details=True):
        assert is_measurement(leaf) or leaf["status"] in {"skipped", "failed"}


def test_a_failing_metric_does_not_stop_the_others(tiny_model_and_tokenizer, monkeypatch):
    import lit_recover.evaluation.latency as latency

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nwith detail")

    monkeypatch.setattr(latency, "evaluate_latency", broken)
    model, tok = tiny_model_and_tokenizer
    res = evaluate_model(model, tok, EvalConfig(metrics=["latency", "memory"], **FAST))
    assert res["metrics"]["latency"] == {"status": "failed", "reason": "RuntimeError: kernel exploded with detail",
                                         "elapsed": res["metrics"]["latency"]["elapsed"]}
    assert res["metrics"]["memory"]["status"] == "ok"
    assert not model.training  # it arrived in eval mode
    validate_results(res)


def test_offline_without_data_everything_says_why(tiny_model_and_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_model_and_tokenizer
    res = evaluate_model(model, tok, EvalConfig(metrics=["ppl", "zero_shot"], zero_shot_tasks=["piqa"], limit=2,
                                                **FAST))
    for section in ("ppl", "zero_shot"):
        assert res["metrics"][section]["status"] == "skipped" and res["metrics"][section]["reason"]
    assert not [leaf for _, leaf in iter_rows(res) if is_measurement(leaf)]  # no value stands in for a skip


def test_deltas_between_two_real_runs(tiny_model_and_tokenizer, text_file):
    model, tok = tiny_model_and_tokenizer
    config = EvalConfig(metrics=["ppl", "memory"], ppl_datasets=[], ppl_texts={"demo": str(text_file)}, **FAST)
    before = evaluate_model(model, tok, config, label="pruned")
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # flatter logits: a different, known-direction perplexity change
    after = evaluate_model(model, tok, config, label="recovered")
    d = with_deltas(before, after)["deltas"]
    ppl = d["ppl/datasets/demo"]
    assert ppl["before"] == before["metrics"]["ppl"]["datasets"]["demo"]["value"]
    assert ppl["delta"] == pytest.approx(ppl["after"] - ppl["before"]) and ppl["delta"] != 0
    assert d["memory/parameters"]["delta"] == 0


def test_config_validation_and_metric_lists():
    assert parse_metrics("all") == ["ppl", "zero_shot", "latency", "memory"]
    assert parse_metrics("memory, ppl") == ["ppl", "memory"]
    assert EvalConfig(metrics="latency").metrics == ["latency"]
    with pytest.raises(ValueError, match="unknown metrics"):
        EvalConfig(metrics=["ppl", "bleu"])
    with pytest.raises(ValueError, match="unknown ppl_datasets"):
        EvalConfig(ppl_datasets=["c4"])
    with pytest.raises(ValueError, match="limit must be"):
        EvalConfig(limit=0)
    with pytest.raises(ValueError, match="ppl_seq_len must be at least 2"):
        EvalConfig(ppl_seq_len=1)


def test_config_is_a_jsonargparse_section():
    """The lead's LightningCLI exposes these fields as --evaluation.<name>."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EvalConfig, "evaluation")
    cfg = parser.parse_args(["--evaluation.metrics=[ppl,memory]", "--evaluation.limit=20",
                             "--evaluation.ppl_data_dir=../shared/data/ppl", "--evaluation.ppl_seq_len=2048"])
    config = parser.instantiate_classes(cfg).evaluation
    assert isinstance(config, EvalConfig)
    assert (config.metrics, config.limit, config.ppl_data_dir, config.ppl_seq_len) == (
        ["ppl", "memory"], 20, "../shared/data/ppl", 2048)
    assert config.zero_shot_tasks == EvalConfig().zero_shot_tasks
