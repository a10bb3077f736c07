"""The training benchmark: the reference recipe's data path, the meter, the ratio table, and a
quick end-to-end run of both sides on the same batches."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_fit as fit
from benchmarks import bench_ppl, recover_kd
from benchmarks import reference_trainer as ref
from benchmarks.common import ROOT
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


def test_kd_cost_benchmark_trains_each_arm_on_the_recipes_batches(tmp_path, alpaca_json):
    """bench_kd_cost: the SFT arm's first loss is the CE of the untrained student on the first
    packed micro-batch (LoRA starts as the identity), computed here from its logits; the
    distillation arm's differs (the teacher's term), and both report seconds and memory."""
    import copy

    from benchmarks import bench_kd_cost
    from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer, prune_unevenly
    from lit_recover.models.load import save_pruned

    tok = build_tokenizer()
    base = build_tiny_llama(len(tok), seed=0).eval()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    pruned = copy.deepcopy(base)
    prune_unevenly(pruned, seed=0)
    student = save_pruned(pruned, tok, tmp_path / "pruned" / "pruned_model.bin")
    out = tmp_path / "out"
    report = bench_kd_cost.main(["--model", str(student), "--teacher", str(tmp_path / "base"), "--data",
                                 str(alpaca_json), "--arms", "sft,kd", "--steps", "2", "--skip", "0",
                                 "--pairs", "1", "--micro_batch_size", "2", "--cutoff_len", "64", "--out", str(out)])
    batch = bench_kd_cost.make_batches(str(student), alpaca_json, 2, 64, 1)[0]
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) == 2  # packed, 2 records
    with torch.no_grad():
        logits = pruned.float()(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    arms = report["arms"]
    assert arms["sft"]["losses"][0] == pytest.approx(float(ce), rel=1e-4)
    assert abs(arms["kd"]["losses"][0] - arms["sft"]["losses"][0]) > 1e-3
    for row in arms.values():
        assert row["s_per_step"] > 0 and row["rss_at_loop_start_mib"] > 0
    assert json.loads((out / "results.json").read_text())["arms"].keys() == {"sft", "kd"}
    assert "| kd |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="exists"):
        bench_kd_cost.main(["--model", str(student), "--arms", "sft", "--out", str(out)])


@pytest.mark.parametrize("arm", sorted(recover_kd.ARMS))
def test_every_recovery_benchmark_arm_is_a_valid_fit_command_line(arm, tiny_pruned_path, capsys):
    """The recovery benchmark's arms name real keys with valid values: the fit's parser takes each
    (``--print_config`` parses everything and stops before any model loads) and keeps its values."""
    import yaml

    from lit_recover.cli import run_cli

    extra = [a.replace("{teacher}", str(tiny_pruned_path)) for a in recover_kd.ARMS[arm]]
    with pytest.raises(SystemExit) as stop:
        run_cli(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.pruned_model", str(tiny_pruned_path),
                 "--data.padding_free", "true", "--trainer.max_time", "00:00:03:00", *extra, "--print_config"])
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        section, key = flag.removeprefix("--").split(".")
        got = config[section][key]
        assert (got == float(value)) if isinstance(got, float) else (str(got) == value), (flag, got)
