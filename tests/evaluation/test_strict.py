"""A metric asked for that could not run: the box at the end of fit and of evaluate, and strict's exit."""

from __future__ import annotations

import json
import re

import pytest

from lit_recover.outputs import RunFolder

OFFLINE_PPL = ["ppl wikitext2", "ppl ptb"]  # the hub datasets, unreachable offline


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _box_names(err: str) -> list[str]:
    """The metric names listed in the failure box printed on stderr."""
    inside = [line[2:-2].rstrip() for line in err.splitlines() if line.startswith("| ")]
    return [re.match(r"- (.*?): (skipped|failed): ", line).group(1) for line in inside if line.startswith("- ")]


def test_evaluate_prints_the_box_and_strict_exits_2(tiny_pruned_path, tmp_path, capsys, offline):
    from lit_recover.evaluation.command import main

    args = ["--model_path", str(tiny_pruned_path), "--metrics", "ppl,memory", "--quiet", "true",
            "--progress", "false"]
    assert main([*args, "--output", str(tmp_path / "a.json")]) == 0  # skipped with a reason: not an error
    err = capsys.readouterr().err
    # The CPU run's CUDA peak is not applicable, not missing; the two hub datasets are.
    assert _box_names(err) == OFFLINE_PPL and "could not load ptb from the hub" in err

    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as info:
        main([*args, "--output", str(out), "--strict", "true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert _box_names(err) == OFFLINE_PPL
    last = err.strip().splitlines()[-1]
    assert last == (f"error: strict evaluation: 2 metrics asked for could not run: ppl wikitext2 skipped, "
                    f"ppl ptb skipped (results written to {out})")
    assert json.loads(out.read_text())["settings"]["strict"] is True  # written before the error


@pytest.mark.slow
def test_fit_prints_the_box_and_strict_exits_2_after_writing(tiny_pruned_path, alpaca_json, tmp_path, capsys,
                                                           offline):
    from main import cli_main

    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(f"Add {i} and {i + 1}. The sum is {2 * i + 1}." for i in range(200)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--model.pruned_model", str(tiny_pruned_path), "--data.data_path", str(alpaca_json),
                  "--output_dir", str(out), "--data.batch_size", "4", "--data.micro_batch_size", "2",
                  "--data.cutoff_len", "64", "--data.val_set_size", "0", "--trainer.max_steps", "1",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                  "--evaluation.metrics", "[ppl,memory]", "--evaluation.ppl_texts", json.dumps({"held_out": str(text)}),
                  "--evaluation.limit", "2", "--evaluation.progress", "false", "--before_metrics", "[ppl]",
                  "--evaluation.strict", "true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    # Before (pruned) and after (recovered) each lost the two hub datasets; held_out ran on both sides.
    assert _box_names(err) == [f"{side}: {name}" for side in ("pruned", "recovered") for name in OFFLINE_PPL]
    path = RunFolder(out).evaluation
    assert err.strip().splitlines()[-1] == (
        "error: strict evaluation: 4 metrics asked for could not run: pruned: ppl wikitext2 skipped, pruned: ppl "
        f"ptb skipped, recovered: ppl wikitext2 skipped, recovered: ppl ptb skipped (results written to {path})")
    results = json.loads(path.read_text())  # the results and the model were written first
    assert results["after"]["metrics"]["ppl"]["datasets"]["held_out"]["status"] == "ok"
    assert RunFolder(out).merged_pickle.is_file()
