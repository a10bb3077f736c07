"""Zero-shot through lm-eval: generated local task files, a real run on the shared data, skips."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from lit_recover.evaluation.zero_shot import (
    DEFAULT_TASKS,
    HEADLINE_METRICS,
    ZeroShotDataError,
    check_jsonl,
    evaluate_zero_shot,
    write_task_yaml,
)
from tests.conftest import shared_data


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_task_yaml_points_lm_eval_at_the_file(tmp_path):
    data = tmp_path / "data"
    _write_jsonl(data / "arc_easy" / "test.jsonl",
                 [{"id": "1", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                   "answerKey": "A"}])
    _write_jsonl(data / "boolq" / "validation.jsonl", [{"question": "q", "passage": "p", "idx": 0, "label": 1}])
    out = tmp_path / "tasks"
    out.mkdir()
    name, info = write_task_yaml("arc_easy", out, data)
    cfg = yaml.safe_load((out / f"{name}.yaml").read_text())
    assert name == "arc_easy_local" and cfg["task"] == name
    assert cfg["include"].endswith("arc/arc_easy.yaml")
    assert cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str((data / "arc_easy" / "test.jsonl").resolve())}}
    assert cfg["test_split"] == "test" and cfg["validation_split"] is None and cfg["training_split"] is None
    assert info["split"] == "test" and info["n_rows"] == 1
    name, info = write_task_yaml("boolq", out, data)
    cfg = yaml.safe_load((out / f"{name}.yaml").read_text())
    assert cfg["validation_split"] == "validation" and cfg["test_split"] is None
    assert info["source"] == str(data / "boolq" / "validation.jsonl")
    # Without a data folder the built-in hub task is kept under its own name.
    name, info = write_task_yaml("piqa", out, None)
    assert name == "piqa" and info["source"] == "hub"
    assert "dataset_path" not in yaml.safe_load((out / "piqa.yaml").read_text())


def test_check_jsonl_names_file_and_line(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"a": 1}, {"a": 2}])
    assert check_jsonl(good) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(ZeroShotDataError, match=r"bad\.jsonl:2: not valid JSON"):
        check_jsonl(bad)
    bad.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(ZeroShotDataError, match=r"bad\.jsonl:2: fields differ"):
        check_jsonl(bad)
    bad.write_text('[1, 2]\n')
    with pytest.raises(ZeroShotDataError, match=r"bad\.jsonl:1: expected a JSON object"):
        check_jsonl(bad)
    with pytest.raises(ZeroShotDataError, match="no such file"):
        check_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.slow
def test_lm_eval_runs_local_tasks_offline(tiny_model_and_tokenizer, no_network):
    zs_dir = shared_data("zeroshot")
    model, tok = tiny_model_and_tokenizer
    tok.pad_token = tok.unk_token
    out = evaluate_zero_shot(model, tok, tasks=["piqa", "arc_challenge"], data_dir=zs_dir, limit=4, batch_size=4)
    assert out["status"] == "ok", out
    assert out["settings"]["lm_eval_version"] and out["settings"]["limit"] == 4
    for task in ("piqa", "arc_challenge"):
        res = out["tasks"][task]
        assert res["status"] == "ok" and res["headline_metric"] == HEADLINE_METRICS[task]
        assert res["lm_eval_task"] == f"{task}_local" and res["n_examples"] == 4
        assert res["n_examples_total"] == res["n_rows"] > 1000
        assert res["value"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 examples: a real count, not a stand-in
        assert res["value"] == res["details"][res["headline_metric"]]["value"]
        assert set(res["details"]) == {"acc", "acc_norm"} and res["details"]["acc"]["stderr"] is not None
    avg = out["average"]
    assert avg["value"] == pytest.approx((out["tasks"]["piqa"]["value"] + out["tasks"]["arc_challenge"]["value"]) / 2)
    assert avg["over"] == ["piqa", "arc_challenge"] and avg["complete"] is True


def test_hub_tasks_offline_are_skipped_and_bad_local_files_fail(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_model_and_tokenizer
    out = evaluate_zero_shot(model, tok, tasks=["boolq", "piqa"], data_dir=None, limit=2)
    assert out["status"] == "skipped" and "average" not in out
    for task in ("boolq", "piqa"):
        assert out["tasks"][task]["status"] == "skipped"
        assert "zero_shot_data_dir" in out["tasks"][task]["reason"] and "value" not in out["tasks"][task]
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text("not json\n")
    out = evaluate_zero_shot(model, tok, tasks=["piqa", "boolq"], data_dir=tmp_path, limit=2)
    assert out["status"] == "failed"
    assert "validation.jsonl:1: not valid JSON" in out["tasks"]["piqa"]["reason"]
    assert "boolq" in out["tasks"]["boolq"]["reason"] and "no such file" in out["tasks"]["boolq"]["reason"]
    assert list(out["tasks"]) == ["piqa", "boolq"]


def test_default_tasks_and_headlines_match_llm_pruner_tables():
    assert DEFAULT_TASKS == ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    assert {t for t, m in HEADLINE_METRICS.items() if m == "acc_norm"} == {"hellaswag", "arc_challenge", "openbookqa"}
