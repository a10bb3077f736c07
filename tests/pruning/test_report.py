"""The pruning report: its header, writing (atomic, never replacing silently) and reading old and new files."""

from __future__ import annotations

import json
import math
import os

import pytest

from lit_recover.errors import LitRecoverError
from lit_recover.evaluation.report import SCHEMA as EVAL_SCHEMA
from lit_recover.evaluation.report import new_results
from lit_recover.pruning.report import (
    SCHEMA,
    SCHEMA_VERSION,
    PruningReportError,
    build_report,
    read_report,
    report_path,
    write_report,
)

STATS = {"criterion": "l2", "pruning_ratio": 0.2, "params_before": 1000, "params_after": 801,
         "params_removed": 199, "achieved_ratio": 0.199, "calibration_loss": None,
         "layer_shapes": [{"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                           "intermediate_size": 32}]}


def report(**stats):
    return build_report({**STATS, **stats}, base_model="base", output="out/pruned_model.bin", calibration_data=None,
                        device="cpu", dtype="float32", versions={"torch": "2", "transformers": "4"})


def test_report_path_is_beside_the_pickle(tmp_path):
    assert report_path(tmp_path / "x" / "pruned_model.bin") == tmp_path / "x" / "pruned_model.json"


def test_the_header_is_the_one_evaluation_results_use():
    built = report()
    assert list(built)[:2] == ["schema", "schema_version"]
    assert (built["schema"], built["schema_version"]) == (SCHEMA, SCHEMA_VERSION) == ("lit-recover/pruning", 1)
    results = new_results(label=None, settings={}, model={}, environment={})
    assert list(results)[:2] == list(built)[:2] and results["schema"] == EVAL_SCHEMA
    assert built["output"] == "out/pruned_model.bin" and built["params_after"] == 801


def test_write_then_read_gives_the_report_back(tmp_path):
    built = report()
    path = write_report(built, tmp_path / "sub" / "pruned_model.json")
    assert read_report(path) == built
    assert os.listdir(path.parent) == ["pruned_model.json"]


def test_a_non_finite_number_is_written_as_null_and_returned_so(tmp_path):
    built = report(calibration_loss=math.nan)
    assert built["calibration_loss"] is None
    path = write_report(built, tmp_path / "r.json")
    assert json.loads(path.read_text()) == built


def test_never_replaced_silently(tmp_path):
    path = write_report(report(), tmp_path / "r.json")
    with pytest.raises(FileExistsError, match=r"r\.json: already exists"):
        write_report(report(params_after=700), path)
    assert read_report(path)["params_after"] == 801
    write_report(report(params_after=700), path, overwrite=True)
    assert read_report(path)["params_after"] == 700


def test_a_report_from_before_the_tag_is_read(tmp_path):
    old = {k: v for k, v in report().items() if k not in ("schema", "schema_version")}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old, indent=2))  # what pruning wrote before reports were tagged
    assert read_report(path) == old


@pytest.mark.parametrize(("content", "message"), [
    (None, r"missing\.json: no such file"),
    ("{not json", r"bad\.json: not readable JSON"),
    ("[1, 2]", r"bad\.json: expected a JSON object, found list"),
    (json.dumps({"schema": EVAL_SCHEMA, "schema_version": 1, "params_before": 1}),
     r"bad\.json: not a pruning report \(schema is 'lit-recover/evaluation'"),
    (json.dumps({"format": "lit-recover-pruned", "version": 1, "layers": []}),
     r"bad\.json: not a pruning report \(schema is 'lit-recover-pruned'"),
    (json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION + 1, **STATS}),
     r"bad\.json: schema_version 2 is not readable here"),
    (json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                 **{k: v for k, v in STATS.items() if k != "params_after"}}),
     r"bad\.json: 'params_after' is missing, expected a number"),
    (json.dumps({**STATS, "achieved_ratio": "20%"}), r"bad\.json: 'achieved_ratio' is '20%', expected a number"),
])
def test_unreadable_reports_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(PruningReportError, match=message) as info:
        read_report(path)
    assert isinstance(info.value, LitRecoverError) and isinstance(info.value, ValueError)
