"""The results schema: writing without overwriting, deltas, the compare table and chart."""

from __future__ import annotations

import copy
import json
import math

import pytest

from lit_recover.errors import LitRecoverError
from lit_recover.evaluation.report import (
    DELTAS_SCHEMA,
    MissingMetricsError,
    ResultsFileError,
    compare_chart,
    compare_table,
    failed,
    failure_box,
    iter_rows,
    measurement,
    missing_metrics,
    new_results,
    raise_if_missing,
    read_results,
    skipped,
    validate_results,
    with_deltas,
    write_results,
)


def make_results(label: str, ppl: float, acc: float, ptb_skipped: bool = False) -> dict:
    res = new_results(label=label, settings={"ppl_seq_len": 128}, model={"class": "X"}, environment={"device": "cpu"})
    res["metrics"]["ppl"] = {
        "status": "ok", "settings": {"seq_len": 128}, "elapsed": measurement(1.0, "s"),
        "datasets": {
            "wikitext2": measurement(ppl, "perplexity", higher_is_better=False, status="ok"),
            "ptb": skipped("offline") if ptb_skipped else measurement(ppl * 2, "perplexity", higher_is_better=False),
        },
    }
    res["metrics"]["zero_shot"] = {
        "status": "ok", "settings": {},
        "tasks": {"piqa": measurement(acc, "fraction", higher_is_better=True, stderr=0.01,
                                      details={"acc": measurement(acc, "fraction"),
                                               "acc_norm": measurement(acc - 0.1, "fraction")})},
        "average": measurement(acc, "fraction", higher_is_better=True),
    }
    res["metrics"]["memory"] = {"status": "ok", "parameters": measurement(1000, "count"),
                                "peak_cuda_allocated": skipped("no CUDA", not_applicable=True)}
    return res


def test_write_results_is_atomic_and_refuses_to_overwrite(tmp_path):
    res = make_results("a", 10.0, 0.5)
    path = write_results(res, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text()) == res
    with pytest.raises(FileExistsError, match="r.json: already exists"):
        write_results(make_results("b", 1.0, 0.1), path)
    assert json.loads(path.read_text())["label"] == "a"  # untouched
    write_results(make_results("b", 1.0, 0.1), path, overwrite=True)
    assert json.loads(path.read_text())["label"] == "b"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary files left


def test_non_finite_numbers_become_null(tmp_path):
    m = measurement(math.inf, "perplexity")
    assert m["value"] is None and m["non_finite"] == "inf"
    res = make_results("a", 10.0, 0.5)
    res["metrics"]["ppl"]["datasets"]["wikitext2"]["mean_nll"] = math.nan
    path = write_results(res, tmp_path / "r.json")
    assert json.loads(path.read_text())["metrics"]["ppl"]["datasets"]["wikitext2"]["mean_nll"] is None


def test_validate_and_read_name_the_problem(tmp_path):
    validate_results(make_results("a", 1.0, 0.5))
    bad = make_results("a", 1.0, 0.5)
    bad["metrics"]["latency"] = {"status": "skipped"}
    with pytest.raises(ResultsFileError, match="latency is skipped without a reason"):
        validate_results(bad)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ResultsFileError, match=r"x\.json: not valid JSON"):
        read_results(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"schema": "other"}')
    with pytest.raises(ResultsFileError, match=r"y\.json: not an evaluation results file"):
        read_results(tmp_path / "y.json")


def test_with_deltas():
    before, after = make_results("pruned", 20.0, 0.5, ptb_skipped=True), make_results("recovered", 15.0, 0.6)
    out = with_deltas(before, after)
    assert out["schema"] == DELTAS_SCHEMA and out["before"] is before and out["after"] is after
    d = out["deltas"]["ppl/datasets/wikitext2"]
    assert (d["before"], d["after"], d["delta"], d["unit"]) == (20.0, 15.0, -5.0, "perplexity")
    assert d["relative"] == pytest.approx(-0.25) and d["improved"] is True
    acc = out["deltas"]["zero_shot/tasks/piqa"]
    assert acc["delta"] == pytest.approx(0.1) and acc["improved"] is True
    assert out["deltas"]["zero_shot/tasks/piqa/details/acc_norm"]["delta"] == pytest.approx(0.1)
    assert out["deltas"]["memory/parameters"]["delta"] == 0 and "improved" not in out["deltas"]["memory/parameters"]
    assert "ppl/datasets/ptb" not in out["deltas"]  # skipped before: no made-up delta
    assert "memory/peak_cuda_allocated" not in out["deltas"]


def test_rows_leave_out_settings_and_keep_skips():
    rows = dict(iter_rows(make_results("a", 10.0, 0.5, ptb_skipped=True)))
    assert list(rows) == ["ppl/datasets/wikitext2", "ppl/datasets/ptb", "zero_shot/tasks/piqa", "zero_shot/average",
                          "memory/parameters", "memory/peak_cuda_allocated"]
    assert rows["ppl/datasets/ptb"]["status"] == "skipped"


def test_compare_table_side_by_side():
    a, b = make_results("pruned", 20.0, 0.5, ptb_skipped=True), make_results("recovered", 15.0, 0.625)
    table = compare_table([a, b], ["pruned", "recovered"]).splitlines()
    assert table[0] == "| metric | unit | pruned | recovered | Δ recovered − pruned |"
    assert "| ppl wikitext2 | perplexity | 20.000 | 15.000 | -5 |" in table
    assert "| ppl ptb | perplexity | skipped | 30.000 |  |" in table
    assert "| zero_shot piqa | fraction | 0.5000 ± 0.0100 | 0.6250 ± 0.0100 | +0.125 |" in table
    assert "| memory parameters | count | 1,000 | 1,000 | +0 |" in table
    with pytest.raises(ValueError, match="1 labels for 2 results"):
        compare_table([a, b], ["x"])


def test_compare_chart_writes_a_png(tmp_path):
    a, b = make_results("pruned", 20.0, 0.5, ptb_skipped=True), make_results("recovered", 15.0, 0.6)
    path = compare_chart([a, b], ["pruned", "recovered"], tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(FileExistsError):
        compare_chart([a, b], ["pruned", "recovered"], path)


def test_read_results_expands_a_deltas_file(tmp_path):
    out = with_deltas(make_results("pruned", 20.0, 0.5), make_results("recovered", 15.0, 0.6))
    path = write_results(out, tmp_path / "d.json")
    entries = read_results(path)
    assert [label for label, _ in entries] == ["pruned", "recovered"]
    assert copy.deepcopy(entries[1][1]) == out["after"]


def test_nothing_missing_gives_no_box_and_strict_passes():
    res = make_results("recovered", 15.0, 0.6)  # a CPU run: the CUDA peak is skipped as not applicable
    assert missing_metrics(res) == [] and failure_box(res) is None
    raise_if_missing(res)


def test_failure_box_lists_what_did_not_run_with_reasons(tmp_path):
    res = make_results("recovered", 15.0, 0.6, ptb_skipped=True)
    res["metrics"]["latency"] = failed("RuntimeError: generate() broke")
    res["metrics"]["memory"]["peak_cuda_allocated"] = skipped("no CUDA")  # not marked: asked for, so counted
    box = failure_box(res, tmp_path / "r.json", width=60)
    lines = box.splitlines()
    assert lines[0] == lines[-1] == "+" + "-" * 58 + "+"
    assert all(len(line) == 60 and line[0] == line[-1] == "|" for line in lines[1:-1])
    text = " ".join(line[1:-1].strip() for line in lines[1:-1])
    assert text.startswith("3 metrics asked for could not run:")
    assert "- ppl ptb: skipped: offline" in text and "- latency: failed: RuntimeError: generate() broke" in text
    assert "- memory peak_cuda_allocated: skipped: no CUDA" in text
    assert f"| (the reasons are also in {tmp_path / 'r.json'})" in failure_box(res, tmp_path / "r.json", width=200)
    # A reason longer than the box wraps inside it.
    res["metrics"]["ppl"]["datasets"]["ptb"] = skipped("could not reach the hub " * 10)
    assert all(len(line) == 60 for line in failure_box(res, width=60).splitlines())


def test_a_skipped_section_names_its_items_and_deltas_name_the_side():
    before, after = make_results("pruned", 20.0, 0.5), make_results("recovered", 15.0, 0.6)
    after["metrics"]["ppl"] = {"status": "skipped", "reason": "wikitext2: offline; ptb: offline",
                               "datasets": {"wikitext2": skipped("offline"), "ptb": skipped("offline")}}
    before["metrics"]["zero_shot"]["tasks"]["boolq"] = failed("boolq.jsonl:3: not valid JSON")
    names = [name for name, _ in missing_metrics(with_deltas(before, after))]
    assert names == ["pruned: zero_shot boolq", "recovered: ppl wikitext2", "recovered: ppl ptb"]


def test_strict_raises_one_line_naming_each_missing_metric(tmp_path):
    res = make_results("recovered", 15.0, 0.6, ptb_skipped=True)
    with pytest.raises(MissingMetricsError) as info:
        raise_if_missing(res, tmp_path / "r.json")
    assert isinstance(info.value, LitRecoverError)  # the commands' handler: one line, exit status 2
    msg = str(info.value)
    assert "\n" not in msg and "1 metric asked for could not run: ppl ptb skipped" in msg
    assert msg.endswith(f"(results written to {tmp_path / 'r.json'})")
