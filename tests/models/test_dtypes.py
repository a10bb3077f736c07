"""Dtypes end to end: an fp16 pruned pickle trains, merges and is written back in fp16, from CPU
tensors; casts never narrow the rotary table; the disk estimate is what a fit writes."""

from __future__ import annotations

import json

import pytest
import torch

from lit_recover.hardware import ENV_VAR
from lit_recover.models.load import as_stored, cast_parameters, load_pruned, save_pruned, stored_dtype

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def _rotary(model) -> list[torch.Tensor]:
    return [b for n, b in model.named_buffers() if n.endswith("inv_freq")]


def test_cast_parameters_never_narrows_computed_tables(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    exact = _rotary(model)[0].clone()
    cast_parameters(model, BF16)
    assert {p.dtype for p in model.parameters()} == {BF16} and stored_dtype(model) == BF16
    assert torch.equal(_rotary(model)[0], exact)  # a bf16 inv_freq would be off by up to 2^-9 relative
    cast_parameters(model, torch.float64)
    assert _rotary(model)[0].dtype == torch.float64  # widened where the target holds more
    torch.testing.assert_close(_rotary(model)[0], exact.double(), rtol=0, atol=0)


def test_as_stored_copies_only_what_changes(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    assert as_stored(model) is model  # on the CPU in its dtype already: nothing to copy
    half = as_stored(model, FP16)
    assert half is not model and {p.dtype for p in half.parameters()} == {FP16}
    assert {p.dtype for p in model.parameters()} == {FP32}  # the model itself is untouched
    assert half.lm_head.weight is half.model.embed_tokens.weight  # tied weights stay one tensor
    assert all(b.dtype == FP32 for b in _rotary(half))
    torch.testing.assert_close(half.model.embed_tokens.weight, model.model.embed_tokens.weight.half(), rtol=0, atol=0)


def test_save_pruned_writes_the_asked_dtype(tiny_model_and_tokenizer, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    path = save_pruned(model, tokenizer, tmp_path / "m.bin", dtype="float16")
    saved = torch.load(path, weights_only=False)["model"]
    assert {p.dtype for p in saved.parameters()} == {FP16}
    assert {p.dtype for p in model.parameters()} == {FP32}
    reread, _ = load_pruned(path)  # and the safe loader reads it as fp16
    assert stored_dtype(reread) == FP16


def test_memory_reports_the_evaluated_dtype(tiny_model_and_tokenizer):
    from lit_recover.evaluation.memory import evaluate_memory, model_size_bytes

    model, _ = tiny_model_and_tokenizer
    n = sum(p.numel() for p in model.parameters())
    cast_parameters(model, BF16)
    out = evaluate_memory(model)
    assert out["settings"]["dtype"] == "bfloat16"
    assert out["settings"]["parameter_dtypes"] == {"bfloat16": n}
    assert out["size"]["dtype"] == "bfloat16"
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model_size_bytes(model) == 2 * n + buffers
    assert out["size"]["value"] == pytest.approx((2 * n + buffers) / 2**20)


# --- an fp16 pickle through fit ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_pruned_path(tmp_path_factory):
    from lit_recover.demos.tiny import build_tiny_pruned

    model, tokenizer = build_tiny_pruned(seed=3)
    model.half()  # as LLM-Pruner saves: model.half(), then torch.save({'model', 'tokenizer'})
    return save_pruned(model, tokenizer, tmp_path_factory.mktemp("fp16") / "pruned_model.bin")


def _fit_args(model, data, out, *extra):
    return ["fit", "--model.pruned_model", str(model), "--data.data_path", str(data), "--output_dir", str(out),
            "--data.batch_size", "4", "--data.micro_batch_size", "2", "--data.cutoff_len", "64",
            "--data.val_set_size", "0", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def _all_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a pickled module holds: parameters, buffers and plain tensor attributes."""
    found = [*model.state_dict().items(), *model.named_buffers()]
    for name, module in model.named_modules():
        found += [(f"{name}.{k}", v) for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("native", "trained"), [("bf16", BF16), ("none", FP32)])
def test_fp16_pickle_trains_and_is_written_back_in_fp16(fp16_pruned_path, alpaca_json, tmp_path, monkeypatch,
                                                        native, trained):
    """bf16: the base trains as bf16 (float16 is not native on this CPU kind), so the merge reads the
    fp16 input again; none: the base trains as fp32 (exact for fp16 values). Either way the written
    model is the fp16 input plus the fp32 adapter, summed in fp32 and rounded once to fp16."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from main import cli_main

    monkeypatch.setenv(ENV_VAR, native)
    out = tmp_path / "run"
    cli = cli_main(_fit_args(fp16_pruned_path, alpaca_json, out, "--trainer.max_steps", "3", "--save_steps", "3",
                             "--model.learning_rate", "1e-2", "--model.warmup_steps", "1",
                             "--skip_evaluation", "false", "--evaluation.metrics", "[memory]", "--before_metrics", "[]"))
    assert cli.model.stored_dtype == FP16

    # the pickle: fp16, CPU tensors only, loadable as the seed shows
    merged = torch.load(out / "pruned_model.bin", weights_only=False)["model"]
    tensors = _all_tensors(merged)
    assert tensors and all(t.device.type == "cpu" for _, t in tensors)
    assert {p.dtype for p in merged.parameters()} == {FP16}

    # the folder: fp16 safetensors, its config saying so, the same weights as the pickle
    with safe_open(str(out / "pruned_model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((out / "pruned_model" / "config.json").read_text())["dtype"] == "float16"
    folder, _ = load_pruned(out / "pruned_model", check=False)
    for (name, a), (_, b) in zip(merged.state_dict().items(), folder.state_dict().items()):
        assert torch.equal(a, b), name

    # the weights: input + adapter. The reference sums in float64 and rounds once; the fp32 sum can
    # round the other way only where the exact sum lies within fp32 rounding (2^-24 relative) of an
    # fp16 rounding boundary (2^-11 apart): a few in 10^4, and then by one fp16 step.
    source, _ = load_pruned(fp16_pruned_path, check=False)
    adapter = load_file(str(out / "lora_adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    merged_state, source_state = merged.state_dict(), source.state_dict()
    adapted = changed = mismatched = total = 0
    naive_differs = 0
    for key, w in source_state.items():
        a_key = "base_model.model." + key.removesuffix(".weight") + ".lora_A.weight"
        if a_key not in adapter:
            assert torch.equal(merged_state[key], w), key  # not adapted: byte for byte the input
            continue
        adapted += 1
        a, b = adapter[a_key], adapter[a_key.replace("lora_A", "lora_B")]
        assert a.dtype == b.dtype == FP32
        delta = (b.double() @ a.double()) * scaling
        reference = (w.double() + delta).to(FP16)
        got = merged_state[key]
        ulp = (reference.abs().float().clamp_min(2.0 ** -14) * 2.0 ** -10)
        assert ((got.float() - reference.float()).abs() <= ulp).all(), key
        mismatched += int((got != reference).sum())
        changed += int((got != w).sum())
        total += w.numel()
        # what merging into the bf16 training copy would have written instead
        naive = (w.to(BF16).float() + delta.float()).to(FP16)
        naive_differs += int((naive != reference).sum())
    assert adapted == 4 * 7
    assert mismatched <= 1e-3 * total
    assert changed > 0.5 * total  # the adapter moved most weights by at least one fp16 step
    assert naive_differs > 0.1 * total  # re-reading the fp16 input is what keeps them exact

    # the evaluation measured (and recorded) the model in the dtype it trained in
    results = json.loads((out / "evaluation" / "evaluation_results.json").read_text())
    memory = results["metrics"]["memory"] if "metrics" in results else results["after"]["metrics"]["memory"]
    env = results["environment"] if "environment" in results else results["after"]["environment"]
    dtype_name = str(trained).removeprefix("torch.")
    assert env["dtype"] == dtype_name and memory["settings"]["dtype"] == dtype_name
    n = sum(p.numel() for p in merged.parameters())
    assert memory["settings"]["parameter_dtypes"] == {dtype_name: n}


@pytest.mark.slow
def test_disk_estimate_is_what_a_fit_writes(alpaca_json, tmp_path, monkeypatch):
    """The pre-check's count against the bytes of the finished output folder (a wider tiny model,
    so that weights, not file headers, make up most of it, as they do for a real model)."""
    from lit_recover.cli import RecoveryCLI, estimate_output_bytes
    from lit_recover.demos.tiny import build_tiny_pruned
    from main import cli_main

    monkeypatch.setenv(ENV_VAR, "none")
    model, tokenizer = build_tiny_pruned(seed=2, hidden_size=128, intermediate_size=384)
    model.half()
    pruned = save_pruned(model, tokenizer, tmp_path / "wide" / "pruned_model.bin")
    out = tmp_path / "run"
    args = _fit_args(pruned, alpaca_json, out, "--trainer.max_steps", "4", "--save_steps", "1",
                     "--save_total_limit", "2", "--skip_evaluation", "true")
    estimate = estimate_output_bytes(RecoveryCLI(args=args[1:], run=False).model, save_total_limit=2)
    cli_main(args)
    written = {"total": 0}
    for f in out.rglob("*"):
        if f.is_file():
            top = f.relative_to(out).parts[0]
            written[top] = written.get(top, 0) + f.stat().st_size
            written["total"] += f.stat().st_size
    checkpoints = sum(v for k, v in written.items() if k.startswith("checkpoint-"))
    assert len([k for k in written if k.startswith("checkpoint-")]) == 3  # 2 kept + checkpoint-last
    assert estimate["merged_pickle"] == pytest.approx(written["pruned_model.bin"], rel=0.03)
    assert estimate["merged_folder"] == pytest.approx(written["pruned_model"], rel=0.03)
    assert estimate["checkpoints"] == pytest.approx(checkpoints, rel=0.05)
    assert estimate["total"] == pytest.approx(written["total"], rel=0.03), (estimate, written)
