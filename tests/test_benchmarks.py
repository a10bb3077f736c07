"""The training benchmark: the reference recipe's data path, the meter, the ratio table, and a
quick end-to-end run of both sides on the same batches."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_fit as fit
from benchmarks import bench_ppl
from benchmarks import reference_trainer as ref
from benchmarks.meter import StepMeter
from benchmarks.report import compare


@pytest.fixture(scope="module")
def tokenizer():
    from lit_recover.demos.tiny import build_tokenizer
    from lit_recover.models.load import prepare_tokenizer

    tok = build_tokenizer()
    prepare_tokenizer(tok)
    return tok


RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, exercise and sleep."},
    {"instruction": "Summarize the text in one sentence.", "input": "The model was pruned.",
     "output": "It was pruned."},
]


@pytest.mark.parametrize("add_eos_token", [False, True])
def test_reference_masks_the_prompt_and_always_ends_with_eos(tokenizer, add_eos_token):
    for record in RECORDS:
        out = ref.tokenize_record(tokenizer, record, cutoff_len=256, add_eos_token=add_eos_token)
        prompt = tokenizer(ref.generate_prompt(record["instruction"], record["input"]))["input_ids"]
        assert out["input_ids"][-1] == tokenizer.eos_token_id
        assert out["input_ids"][: len(prompt)] == prompt
        assert out["labels"][: len(prompt)] == [-100] * len(prompt)
        assert out["labels"][len(prompt):] == out["input_ids"][len(prompt):]
        assert len(out["attention_mask"]) == len(out["input_ids"])


def test_reference_truncates_without_eos(tokenizer):
    out = ref.tokenize_record(tokenizer, RECORDS[1], cutoff_len=12)
    assert len(out["input_ids"]) == 12
    assert out["input_ids"][-1] != tokenizer.eos_token_id
    assert out["labels"] == [-100] * 12  # the prompt alone fills the cutoff


@pytest.mark.parametrize("add_eos_token", [False, True])
def test_reference_labels_equal_lit_recover_labels(tokenizer, add_eos_token):
    """With the same flags both sides train on the same tokens (the benchmark keeps the defaults)."""
    from lit_recover.data.prompts import load_template
    from lit_recover.data.tokenize import tokenize_batch

    batch = {k: [r[k] for r in RECORDS] for k in ("instruction", "input", "output")}
    batch["index"] = [0, 1]
    for cutoff in (256, 30):
        ours = tokenize_batch(batch, tokenizer=tokenizer, template=load_template("alpaca"), cutoff_len=cutoff,
                              train_on_inputs=False, add_eos_token=add_eos_token)
        theirs = [ref.tokenize_record(tokenizer, r, cutoff_len=cutoff, add_eos_token=add_eos_token) for r in RECORDS]
        assert ours["input_ids"] == [t["input_ids"] for t in theirs]
        assert ours["labels"] == [t["labels"] for t in theirs]


class _Module(torch.nn.Module):
    pass


def test_step_meter_counts_tokens_and_weights_the_loss():
    meter = StepMeter()
    meter.start()
    module = _Module().train()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    meter.forward_pre_hook(module, (), {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})
    meter.add_loss(2.0, 3)
    meter.forward_pre_hook(module.eval(), (), {"input_ids": torch.zeros(2, 4, dtype=torch.long)})  # not training
    meter.add_loss(1.0, 1)
    meter.optimizer_step_hook(None, (), {})
    meter.finish()
    (step,) = meter.steps
    assert (step["tokens"], step["positions"], step["supervised"]) == (5, 8, 4)
    assert step["loss"] == pytest.approx((2.0 * 3 + 1.0) / 4)
    assert step["seconds"] >= 0
    assert meter.peak_rss_mb > 0


def _run(arm, tokens_per_step, seconds, peak, loss=2.0):
    steps = [{"step": i + 1, "seconds": seconds, "tokens": tokens_per_step, "positions": 2 * tokens_per_step,
              "supervised": 10, "loss": loss + 0.01 * i} for i in range(4)]
    return {"arm": arm, "side": arm, "steps": steps, "peak_rss_mb": peak}


def test_compare_reports_medians_and_per_pair_ratios():
    runs = [_run("reference", 100, 2.0, 1000), _run("lit", 100, 1.0, 700),
            _run("reference", 100, 4.0, 1000), _run("lit", 100, 1.0, 900)]
    out = compare(runs, skip=1, group_by_length=True)
    tps = out["metrics"]["tokens_per_s"]
    assert tps["pair_ratios"] == pytest.approx([2.0, 4.0])
    assert tps["ratio_median"] == pytest.approx(3.0)
    assert out["metrics"]["peak_memory_mb"]["pair_ratios"] == pytest.approx([0.7, 0.9])
    assert out["metrics"]["padded_fraction"]["lit_median"] == pytest.approx(0.5)
    assert out["goals_met"] == {"tokens_per_s": True, "peak_memory_mb": True, "padded_fraction": False}
    assert out["metrics"]["loss_check"]["within_noise"] is True


@pytest.mark.slow
def test_quick_mode_trains_both_sides_on_the_same_batches(alpaca_json, tmp_path):
    """Both sides in file order: the same tokens every step, and the same losses (the same math)."""
    report = fit.main(["--quick", "--data", str(alpaca_json), "--pairs", "1", "--steps", "2",
                       "--scenarios", "sequential", "--threads", "1", "--out", str(tmp_path), "--tag", "perf_t"])
    written = json.loads((tmp_path / "perf_t.json").read_text())
    assert (tmp_path / "perf_t.md").read_text().startswith("# Training benchmark")
    sc = written["scenarios"]["sequential"]
    ref, lit = (next(r for r in sc["runs"] if r["arm"] == arm) for arm in ("reference", "lit"))
    assert len(ref["steps"]) == len(lit["steps"]) == 2
    for a, b in zip(ref["steps"], lit["steps"]):
        assert (a["tokens"], a["supervised"]) == (b["tokens"], b["supervised"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert sc["metrics"]["tokens_per_s"]["ratio_median"] > 0
    assert report["hardware"]["torch"] == torch.__version__


def test_earlier_results_are_not_overwritten(tmp_path, capsys):
    for ext in ("json", "md"):
        (tmp_path / f"perf_x.{ext}").write_text("earlier")
    with pytest.raises(SystemExit):  # stops at the unknown scenario, after choosing the file name
        fit.main(["--quick", "--scenarios", "nope", "--out", str(tmp_path), "--tag", "perf_x"])
    assert "earlier results kept" in capsys.readouterr().out
    assert (tmp_path / "perf_x.json").read_text() == "earlier"


def test_ppl_benchmark_gives_the_reference_loops_perplexity(tmp_path):
    """bench_ppl: lit-recover's loop and LLM-Pruner's score the same chunks to the same perplexity."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Row {i}: the pruned model reads this sentence number {i}." for i in range(400)))
    report = bench_ppl.main(["--quick", "--data", str(text), "--limit", "6", "--pairs", "1",
                             "--out", str(tmp_path / "out")])
    result = report["result"]
    assert report["n_chunks"] == 6
    assert result["ppl"]["relative_difference"] < 1e-5
    assert 1.0 < result["ppl"]["lit"] < 1e4
    assert [r["side"] for r in result["runs"]] == ["reference", "lit"]
    saved = json.loads((tmp_path / "out" / "perf_ppl_quick.json").read_text())
    assert saved["result"]["ppl"] == result["ppl"]
    assert "| perplexity |" in (tmp_path / "out" / "perf_ppl_quick.md").read_text()
