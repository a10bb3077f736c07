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
    task_result,
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


PIQA_ROWS = [
    {"goal": "How do you open a jar?", "sol1": "Twist the lid.", "sol2": "Bake the lid.", "label": 0},
    {"goal": "To keep bread fresh,", "sol1": "leave it in the rain.", "sol2": "wrap it in a bag.", "label": 1},
    {"goal": "Which tool cuts paper?", "sol1": "Scissors.", "sol2": "A spoon.", "label": 0},
]


def _capture_inputs(model) -> list:
    """Record the input ids of every forward pass of ``model`` (lm-eval's batches, right-padded)."""
    seen: list = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input_ids"]).clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_requests_are_encoded_without_bos_unless_asked(tiny_model_and_tokenizer, tmp_path, no_network):
    """LLM-Pruner's lm-eval fork encodes with add_special_tokens=False; HFLM's default would add BOS."""
    from lit_recover.evaluation.suite import EvalConfig, evaluate_model

    model, tok = tiny_model_and_tokenizer
    assert tok("x").input_ids[0] == tok.bos_token_id  # the tokenizer itself starts with BOS, as LLaMA's does
    _write_jsonl(tmp_path / "piqa" / "validation.jsonl", PIQA_ROWS)
    first = tok("Question:", add_special_tokens=False).input_ids[0]  # piqa's prompt starts so
    seen = _capture_inputs(model)
    config = dict(metrics=["zero_shot"], zero_shot_tasks=["piqa"], zero_shot_data_dir=str(tmp_path),
                  zero_shot_batch_size=2, progress=False)

    res = evaluate_model(model, tok, EvalConfig(**config))
    assert res["metrics"]["zero_shot"]["tasks"]["piqa"]["n_examples"] == len(PIQA_ROWS), res
    assert res["settings"]["zero_shot_add_bos"] is False
    assert res["metrics"]["zero_shot"]["settings"]["add_bos"] is False
    rows = [row for batch in seen for row in batch]
    assert len(rows) == 2 * len(PIQA_ROWS)  # one row per (question, answer) request
    assert all(row[0] == first for row in rows) and not any((row == tok.bos_token_id).any() for row in rows)

    seen.clear()
    res = evaluate_model(model, tok, EvalConfig(**config, zero_shot_add_bos=True))
    assert res["settings"]["zero_shot_add_bos"] is True
    assert res["metrics"]["zero_shot"]["settings"]["add_bos"] is True
    rows = [row for batch in seen for row in batch]
    assert len(rows) == 2 * len(PIQA_ROWS)
    assert all(row[0] == tok.bos_token_id and row[1] == first for row in rows)


# LLM-Pruner's tables: acc for these, acc_norm for the others.
TABLE_METRIC = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
                "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


@pytest.mark.parametrize("task", sorted(TABLE_METRIC))
def test_headline_is_picked_from_lm_eval_results(task):
    """lm-eval's output with acc != acc_norm: the task's value is the table's metric, with its stderr."""
    name = f"{task}_local"
    res = {"results": {name: {"alias": name, "acc,none": 0.25, "acc_stderr,none": 0.01,
                              "acc_norm,none": 0.75, "acc_norm_stderr,none": 0.02}},
           "n-samples": {name: {"original": 40, "effective": 8}}, "versions": {name: 1.0}}
    entry = task_result(task, res, name, {"source": "x.jsonl"})
    want = TABLE_METRIC[task]
    assert entry["status"] == "ok" and entry["headline_metric"] == want
    assert (entry["value"], entry["stderr"]) == ((0.25, 0.01) if want == "acc" else (0.75, 0.02))
    assert entry["n_examples"] == 8 and entry["n_examples_total"] == 40 and entry["source"] == "x.jsonl"
    assert {k: v["value"] for k, v in entry["details"].items()} == {"acc": 0.25, "acc_norm": 0.75}
    # lm-eval without the table's metric: the task fails with the reason, no other metric stands in.
    del res["results"][name][f"{want},none"]
    missing = task_result(task, res, name)
    assert missing["status"] == "failed" and f"no {want}" in missing["reason"] and "value" not in missing


def test_default_tasks_are_llm_pruner_s():
    assert DEFAULT_TASKS == ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    assert set(HEADLINE_METRICS) == set(DEFAULT_TASKS)
