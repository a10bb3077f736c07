"""The command line end to end: configs, derived settings, outputs, guards."""

from pathlib import Path

import pytest
import torch
import yaml

from lit_recover.cli import ConfigError, RecoveryCLI, default_output_dir, gradient_accumulation
from lit_recover.outputs import RunFolder
from main import cli_main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# every recipe alone, and the recipe under each scale-out overlay (given after it: later files win)
CONFIGS = [[p] for p in sorted(CONFIG_DIR.glob("*.yaml"))] + [
    [CONFIG_DIR / "recover.yaml", p] for p in sorted((CONFIG_DIR / "scale").glob("*.yaml"))
]


def _merged(paths: list[Path]) -> dict:
    """The settings of config files given in this order: a later file's keys replace, section by section."""
    raw: dict = {}
    for path in paths:
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            both = isinstance(value, dict) and isinstance(raw.get(key), dict)
            raw[key] = {**raw[key], **value} if both else value
    return raw


@pytest.mark.parametrize("configs", CONFIGS, ids=lambda ps: "+".join(p.relative_to(CONFIG_DIR).as_posix() for p in ps))
def test_every_config_parses_and_instantiates(configs, tiny_pruned_path, alpaca_json, tmp_path):
    import importlib

    from lightning.pytorch.strategies import StrategyRegistry

    cli = RecoveryCLI(args=[
        *(arg for path in configs for arg in ("--config", str(path))), "--model.pruned_model", str(tiny_pruned_path),
        "--data.data_path", str(alpaca_json), "--output_dir", str(tmp_path / "out"),
    ], run=False)
    raw = _merged(configs)
    strategy = (raw.get("trainer") or {}).get("strategy")
    if strategy is not None:  # an overlay's strategy is the trainer's
        if isinstance(strategy, str):
            expected = StrategyRegistry[strategy]["strategy"]
        else:
            module, _, name = strategy["class_path"].rpartition(".")
            expected = getattr(importlib.import_module(module), name)
        assert isinstance(cli.trainer.strategy, expected), type(cli.trainer.strategy)
    for key, value in (raw.get("model") or {}).items():
        if key != "pruned_model":
            assert cli.model.hparams[key] == value, key
    for key, value in (raw.get("data") or {}).items():
        if key != "data_path":
            assert getattr(cli.datamodule, key) == value, key
    assert cli.datamodule.tokenizer is cli.model.tokenizer  # loaded once, handed over
    data = raw.get("data", {})
    assert cli.trainer.accumulate_grad_batches == data.get("batch_size", 64) // data.get("micro_batch_size", 4)


def test_recover_yaml_is_the_seed_defaults():
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "recover.yaml").read_text())
    assert raw["model"] | {"pruned_model": None} == {
        "pruned_model": None, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
        "learning_rate": 1e-4, "warmup_steps": 100,
    }
    assert raw["data"] == {
        "data_path": "yahma/alpaca-cleaned", "val_set_size": 2000, "cutoff_len": 256, "prompt_template_name": "alpaca",
        "train_on_inputs": False, "add_eos_token": False, "group_by_length": False, "batch_size": 64,
        "micro_batch_size": 4,
        "padding_free": True,  # not a seed flag: the same loss and gradients, less compute and memory
    }
    assert raw["trainer"]["max_epochs"] == 2


def test_accumulation_is_derived_and_must_divide():
    assert gradient_accumulation(64, 4, 1) == 16
    assert gradient_accumulation(128, 8, 16) == 1
    with pytest.raises(ConfigError, match="batch_size 64 is not a multiple of data.micro_batch_size 4 × world size 3"):
        gradient_accumulation(64, 4, 3)


def test_default_output_dir():
    assert default_output_dir("prune_log/llama_prune/pruned_model.bin") == str(Path("results/llama_prune_finetuned"))


def test_bad_batch_size_is_one_line_error(tiny_pruned_path, alpaca_json, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--model.pruned_model", str(tiny_pruned_path), "--data.data_path", str(alpaca_json),
                  "--data.batch_size", "10", "--output_dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.batch_size 10 is not a multiple")


def test_missing_checkpoint_is_reported(tiny_pruned_path, alpaca_json, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.pruned_model", str(tiny_pruned_path), "--data.data_path", str(alpaca_json),
                  "--output_dir", str(tmp_path / "o"), "--ckpt_path", "last"])
    assert "no checkpoint to resume from" in capsys.readouterr().err


def _fit_args(model, data, out, *extra):
    return ["fit", "--model.pruned_model", str(model), "--data.data_path", str(data), "--output_dir", str(out),
            "--data.batch_size", "4", "--data.micro_batch_size", "2", "--data.cutoff_len", "64",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--skip_evaluation", "true", *extra]


@pytest.mark.slow
def test_fit_writes_all_outputs(tiny_pruned_path, alpaca_json, tmp_path):
    from peft import PeftModel

    from lit_recover.models.load import load_pruned

    out = tmp_path / "run"
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "8", "--trainer.max_steps", "4",
                       "--save_steps", "2"))
    run = RunFolder(out)
    for path in (run.config, run.adapter / "adapter_config.json", run.adapter / "adapter_model.safetensors",
                 run.adapter / "tokenizer.json", run.merged_pickle, run.checkpoint(2) / "lightning.ckpt",
                 run.checkpoint(4) / "adapter_model.safetensors", run.last_checkpoint / "lightning.ckpt"):
        assert path.exists(), path
    saved = yaml.safe_load(run.config.read_text())
    assert saved["trainer"]["accumulate_grad_batches"] == 2 and saved["trainer"]["max_steps"] == 4

    # the merged pickle loads as the seed shows and generates; it equals base + adapter
    merged, tok = load_pruned(run.merged_pickle)
    merged.eval()
    base, _ = load_pruned(tiny_pruned_path)
    peft_model = PeftModel.from_pretrained(base, run.adapter).eval()
    ids = tok(["Add 1 and 2."], return_tensors="pt")
    with torch.no_grad():
        assert (merged(**ids).logits - peft_model(**ids).logits).abs().max() < 1e-4
    gen = merged.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4

    # only the adapter is in a step checkpoint
    ckpt = torch.load(run.checkpoint(2) / "lightning.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]

    # results are never overwritten silently
    with pytest.raises(SystemExit):
        cli_main(_fit_args(tiny_pruned_path, alpaca_json, out, "--trainer.max_steps", "1"))


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(RunFolder(out).adapter / "adapter_model.safetensors"))


@pytest.mark.slow
def test_padding_free_trains_the_same_adapter(tiny_pruned_path, alpaca_json, tmp_path):
    """--data.padding_free packs the same micro-batches: the same updates as padded ones (dropout 0).

    In float64, so that the comparison measures the math and not a CPU's fp32 rounding: AdamW divides
    each gradient by its own running norm, which turns fp32 rounding in near-zero gradients into
    update differences of order lr. In float64 that rounding is ~1e-16 relative, so after 3 steps
    of lr 1e-2 (adapter values up to ~3e-2) the two runs agree to far better than 1e-9.
    """
    extra = ["--data.val_set_size", "6", "--trainer.max_steps", "3", "--model.lora_dropout", "0.0",
             "--model.warmup_steps", "1", "--model.learning_rate", "1e-2", "--trainer.precision", "64-true"]
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, tmp_path / "padded", *extra))
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, tmp_path / "packed", *extra, "--data.padding_free", "true"))
    padded, packed = _adapter(tmp_path / "padded"), _adapter(tmp_path / "packed")
    assert padded.keys() == packed.keys()
    assert any(v.abs().max() > 0 for k, v in packed.items() if "lora_B" in k)  # it trained
    for k in padded:
        assert packed[k].dtype == torch.float64, k
        torch.testing.assert_close(packed[k], padded[k], atol=1e-9, rtol=1e-7, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("validation", [False, True], ids=["no-val", "val"])
def test_resume_reproduces_the_straight_run(tiny_pruned_path, alpaca_json, tmp_path, validation):
    """2N steps straight == N steps, then resume from checkpoint-last for N more (mid-epoch, dropout on)."""
    # float32 pinned: the comparison is of two runs' numbers, whatever the CPU's default base dtype
    extra = ["--data.val_set_size", "6" if validation else "0", "--save_steps", "3",
             "--model.warmup_steps", "2", "--model.learning_rate", "1e-2", "--data.group_by_length", "true",
             "--trainer.precision", "32-true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, straight, "--trainer.max_steps", "6", *extra))
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, resumed, "--trainer.max_steps", "6", *extra,
                       "--trainer.callbacks+=tests.helpers.StopAtStep", "--trainer.callbacks.step=3"))
    first_half = _adapter(resumed)
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, resumed, "--trainer.max_steps", "6", "--ckpt_path", "last",
                       "--overwrite", "true", *extra))
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    assert any(not torch.allclose(first_half[k], b[k]) for k in a)  # the second half trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_checkpoint(tiny_pruned_path, alpaca_json, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit):
        cli_main(_fit_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "0", "--save_steps", "2",
                           "--trainer.max_steps", "5", "--trainer.callbacks+=tests.helpers.PoisonAtStep",
                           "--trainer.callbacks.step=3"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss is nan at optimizer step 3")
    run = RunFolder(out)
    assert run.checkpoint(2).name in err  # the last good checkpoint is named
    assert (run.checkpoint(2) / "lightning.ckpt").is_file() and not run.merged_pickle.exists()


@pytest.mark.slow
def test_nonfinite_loss_skip_counts_batches(tiny_pruned_path, alpaca_json, tmp_path):
    out = tmp_path / "skip"
    cli = cli_main(_fit_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "0", "--trainer.max_steps", "3",
                             "--model.nonfinite_loss", "skip", "--trainer.callbacks+=tests.helpers.NanLossAtBatch",
                             "--trainer.callbacks.batch=2"))
    assert cli.model.skipped_batches == 1
    assert cli.trainer.global_step == 3
    assert all(torch.isfinite(t).all() for t in _adapter(out).values())


@pytest.mark.slow
def test_fit_evaluates_before_and_after(tiny_pruned_path, alpaca_json, tmp_path):
    import json

    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(f"Add {i} and {i + 1}. The sum is {2 * i + 1}." for i in range(200)))
    out = tmp_path / "eval"
    args = _fit_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "0", "--trainer.max_steps", "2",
                     "--evaluation.metrics", "[ppl,memory]", "--evaluation.ppl_datasets", "[]",
                     "--evaluation.ppl_texts", json.dumps({"held_out": str(text)}), "--evaluation.limit", "3",
                     "--before_metrics", "[ppl,memory]")
    args[args.index("--skip_evaluation") + 1] = "false"
    cli_main(args)
    results = json.loads(RunFolder(out).evaluation.read_text())
    assert results["before"]["label"] == "pruned" and results["after"]["label"] == "recovered"
    assert "memory" in results["before"]["metrics"]  # --before_metrics widened the before-training suite
    delta = results["deltas"]["ppl/texts/held_out"] if "ppl/texts/held_out" in results["deltas"] else next(
        v for k, v in results["deltas"].items() if k.endswith("held_out"))
    assert delta["unit"] == "perplexity" and delta["before"] > 1 and delta["after"] > 1
    assert "memory" in results["after"]["metrics"]


def test_before_metrics_default_and_none(tmp_path):
    """``before_metrics``: None measures perplexity before training, [] measures nothing."""
    from types import SimpleNamespace

    from lit_recover.callbacks import RecoveryOutputs

    assert RecoveryOutputs(str(tmp_path)).before_metrics == ["ppl"]
    none = RecoveryOutputs(str(tmp_path), before_metrics=[])
    none.on_fit_start(SimpleNamespace(ckpt_path=None), None)  # returns before touching the model
    assert none.before is None


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_adapter(tiny_pruned_path, alpaca_json, tmp_path):
    """SIGKILL at several points (between steps, inside a checkpoint save, between its renames):
    each resumed run ends with the uninterrupted run's adapter."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    common = ["--data.val_set_size", "0", "--save_steps", "2", "--model.warmup_steps", "2",
              "--model.learning_rate", "1e-2", "--trainer.max_steps", "6", "--trainer.precision", "32-true"]
    straight = tmp_path / "straight"
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, straight, *common))
    reference = _adapter(straight)

    def run_killed(out, driver_point=None):
        args = _fit_args(tiny_pruned_path, alpaca_json, out, *common)
        if driver_point:
            cmd = [sys.executable, "-m", "tests.kill_driver", driver_point, "4", *args]
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, timeout=600)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        else:  # from outside, once the first checkpoint exists
            proc = subprocess.Popen([sys.executable, str(repo / "main.py"), *args], cwd=repo,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.time() + 600
                while not (RunFolder(out).checkpoint(2) / "lightning.ckpt").exists() and proc.poll() is None:
                    assert time.time() < deadline
                    time.sleep(0.05)
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
        assert not RunFolder(out).adapter.exists()  # really interrupted before the end
        cli_main(_fit_args(tiny_pruned_path, alpaca_json, out, *common, "--ckpt_path", "last"))
        return _adapter(out)

    for name, point in (("outside", None), ("mid_swap", "mid-swap"), ("before_rename", "before-rename")):
        resumed = run_killed(tmp_path / name, point)
        for k in reference:
            assert torch.allclose(reference[k], resumed[k], atol=1e-6), (name, k)
