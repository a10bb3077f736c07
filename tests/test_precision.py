"""The precision chosen by the hardware: detecting native bf16/fp16 CPUs, the default precision and
base dtype, what an explicit precision does, and the lean LoRA path on a bfloat16 base."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_recover import hardware
from lit_recover.hardware import ENV_VAR, HardwareSettingError, base_dtype, cpu_detection, is_lossless

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def _cpuinfo(tmp_path, flags: str, name: str = "Some CPU"):
    path = tmp_path / f"cpuinfo_{abs(hash(flags))}"
    path.write_text(f"processor\t: 0\nmodel name\t: {name}\nflags\t\t: fpu sse2 {flags}\n\n"
                    f"processor\t: 1\nmodel name\t: {name}\nflags\t\t: fpu sse2 {flags}\n")
    return path


# --- detection ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "native"), [
    ("avx2 avx512f avx512bw", set()),                 # AVX-512 without BF16 (Skylake): emulated
    ("avx2 avx512f avx512_bf16", {BF16}),              # AMD Zen 4
    ("avx512_bf16 amx_bf16 amx_tile avx512_fp16", {BF16, FP16}),  # Intel Sapphire Rapids
    ("avx2 fma", set()),                               # AMD Zen 2/3
])
def test_native_dtypes_from_cpuinfo_flags(tmp_path, monkeypatch, flags, native):
    monkeypatch.delenv(ENV_VAR, raising=False)
    found = cpu_detection(_cpuinfo(tmp_path, flags, "AMD EPYC 9454"))
    assert set(found["native"]) == native
    assert found["source"] == "cpuinfo" and found["cpu"] == "AMD EPYC 9454"
    assert set(found["flags"]) == set(flags.split()) & {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"}


def test_no_cpuinfo_falls_back_to_torchs_check(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    for supported, native in ((True, [BF16]), (False, [])):
        monkeypatch.setattr(hardware, "_torch_bf16", lambda s=supported: s)
        found = cpu_detection(tmp_path / "no_such_cpuinfo")
        assert found["source"] == "torch" and found["native"] == native


@pytest.mark.parametrize(("value", "native"), [
    ("bf16", {BF16}), ("fp16", {FP16}), ("bf16,fp16", {BF16, FP16}), ("bfloat16", {BF16}),
    ("none", set()), ("NONE", set()), ("float32", set()),
])
def test_env_var_overrides_the_flags(tmp_path, monkeypatch, value, native):
    monkeypatch.setenv(ENV_VAR, value)
    found = cpu_detection(_cpuinfo(tmp_path, "avx512_bf16 amx_bf16 avx512_fp16"))
    assert set(found["native"]) == native and found["source"] == "env"
    assert hardware.cpu_native_bf16() == (BF16 in native)
    assert hardware.cpu_native_fp16() == (FP16 in native)


def test_bad_env_var_is_one_line_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "bf16,int4")
    with pytest.raises(HardwareSettingError, match=f"{ENV_VAR}='bf16,int4': int4 is not a dtype"):
        hardware.cpu_native_dtypes()


# --- the base dtype rule ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("native", "stored", "training", "inference"), [
    ("none", FP32, FP32, FP32),
    ("none", BF16, FP32, FP32),
    ("none", FP16, FP32, FP32),
    ("bf16", BF16, BF16, BF16),
    ("bf16", FP16, BF16, BF16),   # the closest native dtype: fp16's range fits in bf16's
    ("bf16", FP32, FP32, FP32),   # the rule keeps fp32 (the CLI's default picks bf16 on purpose)
    ("fp16", FP16, FP32, FP16),   # no fp16 base for training on a CPU: no loss scale there
    ("bf16,fp16", FP16, BF16, FP16),
    ("bf16,fp16", FP64, FP64, FP64),
])
def test_base_dtype_on_cpu(monkeypatch, native, stored, training, inference):
    monkeypatch.setenv(ENV_VAR, native)
    assert base_dtype(stored, "cpu") == training
    assert base_dtype(stored, "cpu", training=False) == inference


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_base_dtype_on_cuda_keeps_what_the_gpu_computes(monkeypatch, bf16_gpu):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert base_dtype(FP16, "cuda") == FP16
    assert base_dtype(FP32, "cuda") == FP32
    assert base_dtype(BF16, "cuda") == (BF16 if bf16_gpu else FP32)


def test_is_lossless():
    assert is_lossless(FP16, FP32) and is_lossless(BF16, FP32) and is_lossless(FP32, FP64)
    assert is_lossless(BF16, BF16)
    assert not is_lossless(FP16, BF16)   # 10 mantissa bits into 7
    assert not is_lossless(BF16, FP16)   # bf16's range overflows fp16
    assert not is_lossless(FP32, BF16)
    # and it says what a round trip does
    x = torch.randn(10_000, dtype=FP32).to(FP16)
    assert torch.equal(x.to(FP32).to(FP16), x)
    assert not torch.equal(x.to(BF16).to(FP16), x)


# --- the defaults of the command line ---------------------------------------------------------------------
@pytest.mark.parametrize(("native", "dtype"), [("bf16", "bfloat16"), ("none", "float32"), ("fp16", "float32")])
def test_default_precision_and_dtype_on_cpu(monkeypatch, native, dtype):
    from lit_recover.cli import default_precision, default_torch_dtype

    monkeypatch.setenv(ENV_VAR, native)
    for accelerator in ("cpu", "auto"):
        if accelerator == "auto" and torch.cuda.is_available():
            continue
        assert default_precision(accelerator) == "32-true"  # never autocast on CPU by default
        assert default_torch_dtype(accelerator) == dtype


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_default_precision_on_cuda_follows_the_base(monkeypatch, bf16_gpu):
    from lit_recover.cli import default_precision, default_torch_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert default_torch_dtype("auto") == "auto"
    assert default_precision("auto", FP16) == "16-mixed"   # float16 weights: fp16 autocast with a loss scale
    assert default_precision("gpu", FP32) == ("bf16-mixed" if bf16_gpu else "16-mixed")
    assert default_precision("auto", BF16) == ("bf16-mixed" if bf16_gpu else "16-mixed")
    assert default_precision("cpu", FP16) == "32-true"      # an explicit CPU run on a GPU machine


def _cli(tiny_pruned_path, alpaca_json, tmp_path, *extra):
    from lit_recover.cli import RecoveryCLI

    return RecoveryCLI(args=["--model.pruned_model", str(tiny_pruned_path), "--data.data_path", str(alpaca_json),
                             "--output_dir", str(tmp_path / "out"), "--trainer.accelerator", "cpu", *extra],
                       run=False)


@pytest.mark.parametrize(("native", "extra", "base", "plugin"), [
    ("bf16", [], BF16, "Precision"),                                          # the default on native bf16
    ("none", [], FP32, "Precision"),                                          # elsewhere
    ("bf16", ["--trainer.precision", "32-true"], FP32, "Precision"),          # explicit: what it says
    ("bf16", ["--trainer.precision", "bf16-mixed"], FP32, "MixedPrecision"),  # autocast over a float32 base
    ("none", ["--model.torch_dtype", "bfloat16"], BF16, "Precision"),
    ("bf16", ["--trainer.precision", "32-true", "--model.torch_dtype", "bfloat16"], BF16, "Precision"),
])
def test_cli_resolves_precision_and_base_dtype(tiny_pruned_path, alpaca_json, tmp_path, monkeypatch,
                                               native, extra, base, plugin):
    monkeypatch.setenv(ENV_VAR, native)
    cli = _cli(tiny_pruned_path, alpaca_json, tmp_path, *extra)
    assert cli.model.base_dtype == base
    assert cli.model.stored_dtype == FP32  # the tiny pickle is float32
    assert type(cli.trainer.precision_plugin).__name__ == plugin
    assert {p.dtype for p in cli.model.trainable_parameters()} == {FP32}  # LoRA weights stay float32
    frozen = {p.dtype for p in cli.model.model.parameters() if not p.requires_grad}
    assert frozen == {base}
    rotary = [b for n, b in cli.model.model.named_buffers() if n.endswith("inv_freq")]
    assert rotary and all(b.dtype == FP32 for b in rotary)  # the rotary table is never narrowed


# --- the lean LoRA path on a bfloat16 base -------------------------------------------------------------------
def _bf16_peft(dropout: float):
    from peft import LoraConfig, get_peft_model

    from lit_recover.demos.tiny import build_tiny_pruned
    from lit_recover.models.load import cast_parameters
    from lit_recover.module import DEFAULT_TARGET_MODULES

    model, _ = build_tiny_pruned(seed=1)
    cast_parameters(model, BF16)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                  target_modules=DEFAULT_TARGET_MODULES, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return peft_model.train()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_serves_a_bf16_base_with_fp32_adapters(dropout):
    """The lean path runs (it used to step aside on the dtype mismatch) and gives PEFT's loss and
    gradients. Both sides round the same bf16 activations; what can differ is the order in which
    autograd sums the bf16 gradients of an input read by several projections, so gradients agree to
    a few bf16 units in the last place (2^-8 relative), the loss to float32 rounding of the same."""
    from lit_recover.lora import use_lean_lora
    from tests.test_lora import MaskDropout

    reference = _bf16_peft(dropout)
    lean = copy.deepcopy(reference)
    assert {p.dtype for p in reference.parameters() if p.requires_grad} == {FP32}  # PEFT's autocast_adapter_dtype
    assert use_lean_lora(lean) == 4 * 7
    for layer in reference.modules():
        if hasattr(layer, "lora_dropout"):
            layer.lora_dropout["default"] = MaskDropout(dropout)
    calls = {"lean": 0}
    from lit_recover import lora as lora_mod

    original = lora_mod.LoRABranch.apply

    def counting(*args):
        calls["lean"] += 1
        return original(*args)

    lora_mod.LoRABranch.apply = counting
    try:
        ids = torch.randint(3, 300, (2, 13))
        results = []
        for model in (reference, lean):
            torch.manual_seed(5)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((out.loss.detach(), grads, out.logits.dtype))
    finally:
        lora_mod.LoRABranch.apply = original
    assert calls["lean"] == 4 * 7  # every adapted layer took the lean path, none fell back
    (ref_loss, ref_grads, ref_dtype), (lean_loss, lean_grads, lean_dtype) = results
    assert ref_dtype == lean_dtype
    ulp = 2.0 ** -8
    torch.testing.assert_close(lean_loss, ref_loss, rtol=4 * ulp, atol=0.0)
    assert ref_grads.keys() == lean_grads.keys()
    for name, ref in ref_grads.items():
        assert lean_grads[name].dtype == FP32
        scale = ref.abs().max().item()
        assert (lean_grads[name] - ref).abs().max().item() <= 8 * ulp * scale, name


# --- a fit on a bf16 base: LoRA, optimizer state and loss in fp32 ---------------------------------------------
@pytest.mark.slow
def test_bf16_base_fit_keeps_adapter_and_optimizer_in_fp32(tiny_pruned_path, alpaca_json, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from main import cli_main

    monkeypatch.setenv(ENV_VAR, "bf16")
    out = tmp_path / "run"
    cli = cli_main(["fit", "--model.pruned_model", str(tiny_pruned_path), "--data.data_path", str(alpaca_json),
                    "--output_dir", str(out), "--data.batch_size", "4", "--data.micro_batch_size", "2",
                    "--data.cutoff_len", "64", "--data.val_set_size", "0", "--trainer.max_steps", "2",
                    "--save_steps", "2", "--skip_evaluation", "true", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu",
                    "--trainer.log_every_n_steps", "1"])
    assert cli.trainer.precision == "32-true"
    ckpt = torch.load(out / "checkpoint-2" / "lightning.ckpt", map_location="cpu", weights_only=False)
    assert {t.dtype for t in ckpt["state_dict"].values()} == {FP32}
    moments = [t for s in ckpt["optimizer_states"][0]["state"].values() for k, t in s.items()
               if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {FP32}
    assert {t.dtype for t in load_file(str(out / "lora_adapter" / "adapter_model.safetensors")).values()} == {FP32}
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["torch_dtype"] == "bfloat16" and saved["trainer"]["precision"] == "32-true"
    import csv

    rows = list(csv.DictReader(next((out / "logs").rglob("metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


# --- the precision benchmark's arithmetic -------------------------------------------------------------------
def test_bench_precision_summary_and_tag(monkeypatch):
    from benchmarks.bench_precision import cpu_tag, markdown, summarize

    steps = {"float32": [{"cpu_s": 9.0, "wall_s": 9.5, "loss": 3.0, "tokens": 100},
                         {"cpu_s": 4.0, "wall_s": 5.0, "loss": 2.5, "tokens": 100},
                         {"cpu_s": 6.0, "wall_s": 7.0, "loss": 2.0, "tokens": 100}],
             "bfloat16": [{"cpu_s": 8.0, "wall_s": 8.0, "loss": 3.01, "tokens": 100},
                          {"cpu_s": 2.0, "wall_s": 3.0, "loss": 2.55, "tokens": 100},
                          {"cpu_s": 3.0, "wall_s": 4.0, "loss": 2.01, "tokens": 100}]}
    s = summarize(steps, skip=1)  # the first step is untimed
    assert s["float32"]["median_cpu_s_per_step"] == 5.0 and s["bfloat16"]["fastest_cpu_s_per_step"] == 2.0
    assert s["ratios"]["tokens_per_cpu_s"] == pytest.approx((200 / 5.0) / (200 / 10.0))
    assert s["loss_difference"]["max_abs"] == pytest.approx(0.05)
    assert s["loss_difference"]["max_relative"] == pytest.approx(0.05 / 2.5)
    report = {"tag": "t", "command": "c", "hardware": {}, "detection": {}, "load_avg_start": [0], "load_avg_end": [0],
              "settings": {"steps": 3, "micro_batch_size": 4, "cutoff_len": 128, "learning_rate": 1e-4, "skip": 1},
              "summary": s}
    assert "| tokens per CPU-second | 20 | 40 | 2.000 |" in markdown(report)
    monkeypatch.setenv(ENV_VAR, "bf16,fp16")
    assert cpu_tag().endswith("-bf16-fp16")
    monkeypatch.setenv(ENV_VAR, "none")
    assert cpu_tag().endswith("-no-native-16bit")
