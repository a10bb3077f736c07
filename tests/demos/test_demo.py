"""The demo's orchestration on a tiny dense model: prune, recover by SFT and by distillation under the
same budget, measure all four models the same way, and write the table, the chart and the results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lit_recover.demos.demo import COLUMNS, demo, main, max_time_spec, skipped_column


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory) -> Path:
    """A tiny dense LLaMA as a Hugging Face folder: the demo's ``--base_model`` instead of SmolLM2."""
    from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer

    folder = tmp_path_factory.mktemp("dense") / "tiny-llama"
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_max_time_spec_is_lightnings_days_hours_minutes_seconds():
    assert max_time_spec(150) == "00:00:02:30"
    assert max_time_spec(90061) == "01:01:01:01"


def test_bad_options_stop_the_demo_before_any_work(tmp_path, tiny_dense, capsys):
    for argv, message in ((["--recovery_time", "0"], "--recovery_time must be at least 1 second"),
                          (["--base_model", str(tmp_path / "none")], "(--base_model)")):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--output_dir", str(tmp_path / "demo")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_a_column_that_did_not_run_says_why():
    from lit_recover.evaluation.report import compare_table, measurement, new_results, validate_results

    sft = new_results(label="sft", settings={}, model={}, environment={})
    sft["metrics"]["ppl"] = {"status": "ok", "datasets": {"demo": measurement(9.0, "perplexity")}}
    column = skipped_column(COLUMNS[3], "skipped: distillation not available", sft)
    validate_results(column)
    assert column["metrics"] == {"ppl": {"status": "skipped", "reason": "skipped: distillation not available"}}
    table = compare_table([sft, column], ["sft", COLUMNS[3]], recovery=False)
    assert "| ppl | | – | skipped |" in table.replace("|  |", "| |")


@pytest.mark.slow
def test_demo_recovers_both_ways_under_one_budget_and_compares_four_columns(tmp_path, tiny_dense):
    import matplotlib.pyplot as plt

    from lit_recover.evaluation.report import chart_figure, read_results

    out = tmp_path / "demo"
    result = demo(output_dir=str(out), base_model=str(tiny_dense), recovery_time=300, max_steps=2)

    # both recoveries ran under the same budget: 300 s of training, 2 optimizer steps at most
    training = result["training"]
    sft, kd = COLUMNS[2], COLUMNS[3]
    for label in (sft, kd):
        record = training[label]
        assert record["settings"]["max_time_s"] == 300.0 and record["settings"]["max_steps"] == 2
        assert record["optimizer_steps"]["value"] == 2 and record["settings"]["stopped_by"] == "max_steps"
        assert record["wall_time"]["value"] > 0 and record["tokens_seen"]["value"] > 0
    assert training[sft]["settings"]["recipe"]["objective"] == "sft"
    recipe = training[kd]["settings"]["recipe"]
    assert recipe["objective"] == "distillation" and recipe["teacher"] == str(tiny_dense)
    # the same data and seed: the same tokens seen in the same number of steps
    assert training[sft]["tokens_seen"]["value"] == training[kd]["tokens_seen"]["value"]

    # four columns, each measured on the same metrics in a process of its own
    files = result["files"]
    assert list(files["results"]) == list(COLUMNS)
    results = [read_results(files["results"][label])[0][1] for label in COLUMNS]
    assert [r["label"] for r in results] == list(COLUMNS)
    for r in results:
        assert set(r["metrics"]) == {"ppl", "latency", "memory"}
        assert all(r["metrics"][name]["status"] == "ok" for name in r["metrics"])
        assert r["settings"] == results[0]["settings"]
    ppl = [r["metrics"]["ppl"]["datasets"]["demo_held_out"]["value"] for r in results]
    params = [r["metrics"]["memory"]["parameters"]["value"] for r in results]
    assert params[0] > params[1] == params[2] == params[3]  # pruned, and the merged adapters add nothing
    # the results JSON of each recovery records what it cost
    assert read_results(files["results"][kd])[0][1]["training"] == training[kd]
    assert "training" not in results[0] and "training" not in results[1]

    # the table: four columns and the share of the log-gap won back by each recovery
    table = (out / "summary.md").read_text()
    assert table.splitlines()[0].startswith("| metric | unit | " + " | ".join(COLUMNS) + " |")
    assert "| training wall_time | s |" in table and "| training optimizer_steps | count | – | – | 2 | 2 |" in table
    gap = math.log(ppl[1]) - math.log(ppl[0])
    shares = [(math.log(ppl[1]) - math.log(p)) / gap for p in ppl[2:]]
    saved = json.loads(Path(files["demo"]).read_text())
    assert saved["columns"] == list(COLUMNS)
    assert saved["budget"] == {"max_time": "00:00:05:00", "max_time_s": 300, "max_steps": 2}
    r_row = saved["recovery_shares"]["R ppl demo_held_out"]
    assert r_row == pytest.approx(dict(zip(COLUMNS[2:], shares, strict=True)), rel=1e-12)
    assert f"| R ppl demo_held_out | share of log-PPL gap | – | – | {shares[0]:.3f} | {shares[1]:.3f} |" in table

    # the chart: every panel has a bar for each of the four models
    assert Path(files["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = chart_figure(results, list(COLUMNS))
    try:
        assert [ax.get_ylabel() for ax in fig.get_axes()] == ["perplexity", "ms", "tokens/s", "MiB"]
        for ax in fig.get_axes():
            assert [c.get_label() for c in ax.containers] == list(COLUMNS)
            assert len({len(c.patches) for c in ax.containers}) == 1 and len(ax.containers[0].patches) > 0
    finally:
        plt.close(fig)
