"""MFU in the training benchmark: the meter's per-step model FLOPs and the report's rates."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.meter import StepMeter
from benchmarks.report import compare, summarize_run


def test_meter_counts_the_flops_a_step_runs(tiny_model_and_tokenizer):
    """One unpadded row per micro-batch and eager attention: every matmul FlopCounterMode sees is a
    model FLOP, so the meter's step count equals it."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model_and_tokenizer
    model.config._attn_implementation = "eager"
    model.train()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    meter = StepMeter()
    meter.attach_flops(peft, matmul_dtype="float32")
    peft.get_base_model().model.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
    optimizer = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1)
    optimizer.register_step_post_hook(meter.optimizer_step_hook)
    meter.start()
    gen = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        for n, prompt in ((9, 3), (14, 5)):  # two micro-batches of one step
            ids = torch.randint(3, 300, (1, n), generator=gen)
            labels = ids.clone()
            labels[:, :prompt] = -100
            out = peft(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            meter.add_loss(float(out.loss.detach()), int((labels[:, 1:] != -100).sum()))
            out.loss.backward()
    optimizer.step()
    meter.finish()
    step = meter.steps[0]
    assert step["tokens"] == 23 and step["supervised"] == 6 + 9
    # the causal-LM loss ran the head on all 9 + 14 positions, the model FLOPs count it on the 15
    # supervised ones: the difference is the head's forward and input gradient on the other 8
    head = 2 * 2 * model.config.hidden_size * model.config.vocab_size
    assert step["flops"] == counter.get_total_flops() - head * (23 - 15)
    result = meter.result()
    assert result["flop_model"]["lora_rank"] == 4 and result["matmul_dtype"] == "float32"


def _run(arm, flops, seconds, peak):
    steps = [{"seconds": s, "tokens": 100, "positions": 100, "supervised": 50, "loss": 2.0, "flops": f}
             for f, s in zip(flops, seconds)]
    return {"arm": arm, "steps": steps, "peak_rss_mb": 100.0, "peak": {"flops_per_s": peak}}


def test_report_mfu_is_the_timed_flops_over_their_seconds_over_the_peak():
    run = _run("lit", [7e9, 4e9, 6e9], [9.0, 2.0, 3.0], 1e10)
    summary = summarize_run(run, skip=1)  # the first step is untimed
    assert summary["model_tflops_per_s"] == pytest.approx((4e9 + 6e9) / 5.0 / 1e12, rel=1e-15)
    assert summary["mfu"] == pytest.approx((4e9 + 6e9) / 5.0 / 1e10, rel=1e-15)
    ref = _run("reference", [7e9, 4e9, 6e9], [9.0, 4.0, 6.0], 2e10)
    table = compare([ref, run], skip=1)["metrics"]
    assert table["mfu"]["ratio_median"] == pytest.approx((1.0 / 1e10) / (0.5 / 2e10), rel=1e-12)


def test_runs_without_flops_report_no_mfu():
    run = _run("lit", [None, None], [1.0, 1.0], None)
    summary = summarize_run(run, skip=0)
    assert summary["mfu"] is None and summary["model_tflops_per_s"] is None
