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


@pytest.fixture(scope="module")
def recover_yaml_run(tiny_pruned_path, tmp_path_factory):
    """``configs/recover.yaml`` as a user runs it, up to the first step, on 3,400 records (enough for
    2 epochs of more than 100 steps of 64: the warm-up ends and the decay shows). Only the data path,
    the validation size (the file is small) and the output folder are given."""
    from tests.conftest import write_alpaca_records

    root = tmp_path_factory.mktemp("recover_yaml")
    data = write_alpaca_records(root / "alpaca.json", n=3400)
    cli = cli_main([
        "fit", "--config", str(CONFIG_DIR / "recover.yaml"), "--model.pruned_model", str(tiny_pruned_path),
        "--data.data_path", str(data), "--data.cache_dir", str(root / "cache"), "--data.val_set_size", "8",
        "--output_dir", str(root / "out"), "--skip_evaluation", "true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks+=tests.helpers.StopBeforeTraining",
    ])
    return cli, next(c for c in cli.trainer.callbacks if type(c).__name__ == "StopBeforeTraining")


@pytest.mark.slow
def test_recover_yaml_trains_as_the_recipe(recover_yaml_run, tmp_path):
    """recover.yaml builds what LLM-Pruner's post_training.py gives the Trainer: TrainingArguments
    defaults where the recipe leaves them (AdamW betas/eps/weight decay, max_grad_norm, linear
    schedule), warm-up 100, lr 1e-4, 2 epochs, batch 64 of micro-batches of 4, eval every 100 and
    save every 200 steps keeping the best, LoRA r 8 / alpha 16 / dropout 0.05 on the 7 projections.
    Compared with what the CLI instantiated, not with the YAML text."""
    from transformers import TrainingArguments, get_linear_schedule_with_warmup

    from lit_recover.callbacks import RecoveryCheckpoint, RecoveryOutputs

    cli, stop = recover_yaml_run
    hf = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, warmup_steps=100, num_train_epochs=2,
                           per_device_train_batch_size=4, gradient_accumulation_steps=16, eval_steps=100,
                           save_steps=200)
    # optimizer: torch AdamW ("adamw_torch") over the LoRA tensors alone
    optimizer = stop.optimizer
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == hf.learning_rate
    assert group["betas"] == (hf.adam_beta1, hf.adam_beta2) and group["eps"] == hf.adam_epsilon
    assert group["weight_decay"] == hf.weight_decay and not group["amsgrad"]
    lora = {id(p) for n, p in cli.model.named_parameters() if "lora_" in n}
    assert {id(p) for p in group["params"]} == lora
    # schedule: the Trainer's linear warm-up and decay over the same number of optimizer steps, per step
    config = stop.scheduler
    assert config.interval == "step" and config.frequency == 1
    total = stop.total_steps
    assert total == hf.num_train_epochs * -(-cli.datamodule.stats["train"] // 64)  # 2 epochs of ceil(n / 64)
    assert total > hf.warmup_steps + 5
    reference = get_linear_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), hf.warmup_steps, total)
    ours = config.scheduler.lr_lambdas[0]
    for step in range(total + 3):
        assert ours(step) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-12), step
    assert hf.lr_scheduler_type == "linear"
    # trainer: epochs, accumulation, clipping at max_grad_norm, precision, validation cadence
    trainer = cli.trainer
    assert trainer.max_epochs == hf.num_train_epochs and trainer.max_steps == -1
    assert trainer.accumulate_grad_batches == hf.gradient_accumulation_steps
    # clipping: the Trainer clips the global norm at max_grad_norm (clip_grad_norm_); run ours on known gradients
    lora_params = [p for n, p in cli.model.named_parameters() if "lora_" in n]
    for i, p in enumerate(lora_params):
        p.grad = torch.linspace(-1.0, 1.0 + i, p.numel()).reshape(p.shape)
    reference = [torch.nn.Parameter(torch.zeros_like(p)) for p in lora_params]
    for r, p in zip(reference, lora_params, strict=True):
        r.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(reference, hf.max_grad_norm)
    cli.model.configure_gradient_clipping(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
    for p, r in zip(lora_params, reference, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0.0)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in lora_params])) == pytest.approx(
        hf.max_grad_norm, rel=1e-5)
    assert trainer.precision == "32-true"  # on CPU (the recipe's fp16 is a GPU setting)
    assert trainer.val_check_interval == hf.eval_steps * hf.gradient_accumulation_steps  # micro-batches
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, RecoveryCheckpoint))
    assert checkpoint.save_steps == hf.save_steps and checkpoint.validation
    assert (checkpoint.monitor, checkpoint.mode) == ("val/loss", "min")
    outputs = next(c for c in trainer.callbacks if isinstance(c, RecoveryOutputs))
    assert not outputs.keep_last  # load_best_model_at_end=True
    # module: LoRA on the seven projections of every layer
    config = cli.model.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.05, "none")
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"}
    assert set(config.target_modules) == projections
    layers = cli.model.backbone.layers
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in cli.model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 7 * len(layers) and {a.rsplit(".", 1)[1] for a in adapted} == projections
    # the loss of an accumulation window weighted by its supervised tokens (transformers >= 4.46)
    assert cli.model.hparams.loss_weighting == "tokens"
    # data: batch 64 in micro-batches of 4 here; the records -> tokens -> labels -> batches side of
    # recover.yaml is compared with the recipe's token by token in a test of its own (recover_yaml_run
    # holds the data module set up from recover.yaml)
    assert (cli.datamodule.batch_size, cli.datamodule.micro_batch_size) == (64, 4)


def test_save_steps_must_be_a_multiple_of_eval_steps():
    from lit_recover.cli import check_step_intervals

    check_step_intervals(100, 200, validation=True)
    check_step_intervals(3, 200, validation=False)  # without validation eval_steps does nothing
    with pytest.raises(ConfigError, match="save_steps 200 is not a multiple of eval_steps 3"):
        check_step_intervals(3, 200, validation=True)
    with pytest.raises(ConfigError, match="at least 1"):
        check_step_intervals(0, 200, validation=False)


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
    # lr 1e-2: the adapter moves the logits by far more than the merge's fp32 rounding (~1e-6)
    cli_main(_fit_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "8", "--trainer.max_steps", "4",
                       "--eval_steps", "2", "--save_steps", "2", "--model.learning_rate", "1e-2",
                       "--model.warmup_steps", "1"))
    run = RunFolder(out)
    for path in (run.config, run.adapter / "adapter_config.json", run.adapter / "adapter_model.safetensors",
                 run.adapter / "tokenizer.json", run.merged_pickle, run.checkpoint(2) / "lightning.ckpt",
                 run.checkpoint(4) / "adapter_model.safetensors", run.last_checkpoint / "lightning.ckpt"):
        assert path.exists(), path
    saved = yaml.safe_load(run.config.read_text())
    assert saved["trainer"]["accumulate_grad_batches"] == 2 and saved["trainer"]["max_steps"] == 4

    # the merged pickle loads as the seed shows and generates; it equals base + adapter, and differs
    # from the pruned input by what the adapter does (so a merge left out would fail)
    merged, tok = load_pruned(run.merged_pickle)
    merged.eval()
    base, _ = load_pruned(tiny_pruned_path)
    ids = tok(["Add 1 and 2."], return_tensors="pt")
    with torch.no_grad():
        pruned_logits = base.eval()(**ids).logits
        peft_model = PeftModel.from_pretrained(base, run.adapter).eval()  # wraps base in place
        unmerged, merged_logits = peft_model(**ids).logits, merged(**ids).logits
    assert (unmerged - pruned_logits).abs().max() >= 1e-2  # the adapter moved the logits
    assert (merged_logits - unmerged).abs().max() < 1e-4  # merged == base + adapter, to fp32 rounding
    assert (merged_logits - pruned_logits).abs().max() >= 1e-2  # and is not the pruned input
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
    extra = ["--data.val_set_size", "6" if validation else "0", "--eval_steps", "3", "--save_steps", "3",
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
    # 4 steps at lr 1e-2: training moves the held-out perplexity (the evaluation itself is deterministic)
    args = _fit_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "0", "--trainer.max_steps", "4",
                     "--model.learning_rate", "1e-2", "--model.warmup_steps", "1",
                     "--evaluation.metrics", "[ppl,memory]", "--evaluation.ppl_datasets", "[]",
                     "--evaluation.ppl_texts", json.dumps({"held_out": str(text)}), "--evaluation.limit", "3",
                     "--before_metrics", "[ppl,memory]")
    args[args.index("--skip_evaluation") + 1] = "false"
    cli_main(args)
    results = json.loads(RunFolder(out).evaluation.read_text())
    assert results["before"]["label"] == "pruned" and results["after"]["label"] == "recovered"
    assert "memory" in results["before"]["metrics"]  # --before_metrics widened the before-training suite
    delta = results["deltas"]["ppl/datasets/held_out"]
    before, after = (results[when]["metrics"]["ppl"]["datasets"]["held_out"]["value"] for when in ("before", "after"))
    assert delta["unit"] == "perplexity" and (delta["before"], delta["after"]) == (before, after)
    assert delta["delta"] == after - before and delta["relative"] == pytest.approx((after - before) / before)
    assert before > 1 and abs(after - before) > 0.01 * before  # training changed the perplexity
    assert delta["improved"] == (after < before)
    assert "memory" in results["after"]["metrics"]


def _checkpoint_adapter(out, step):
    from safetensors.torch import load_file

    return load_file(str(RunFolder(out).checkpoint(step) / "adapter_model.safetensors"))


def _written_adapter(out) -> dict:
    import json

    return json.loads(RunFolder(out).evaluation.read_text())["model"]["adapter"]


def _best_run_args(model, data, out, *extra):
    """6 steps, checkpoints at 2, 4 and 6; the adapter is scrambled at the start of step 3, so the
    validation loss of step 2 is the best and the last step's is not. A cheap evaluation (memory) so
    that the results JSON is written; nothing measured before training."""
    args = _fit_args(model, data, out, "--trainer.max_steps", "6", "--eval_steps", "1", "--save_steps", "2",
                     "--model.learning_rate", "1e-2", "--model.warmup_steps", "1", "--model.lora_dropout", "0",
                     "--trainer.callbacks+=tests.helpers.ScrambleAtStep", "--trainer.callbacks.step=2",
                     "--evaluation.metrics", "[memory]", "--before_metrics", "[]", *extra)
    args[args.index("--skip_evaluation") + 1] = "false"
    return args


@pytest.mark.slow
def test_the_best_validated_checkpoint_is_written(tiny_pruned_path, alpaca_json, tmp_path):
    """load_best_model_at_end with val loss as the metric: lora_adapter/ (and so the merged model and
    the evaluation) is checkpoint-<best>'s adapter, and the results JSON says which step and why."""
    import csv

    out = tmp_path / "best"
    cli_main(_best_run_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "8"))
    choice = _written_adapter(out)
    scores = {int(k): v for k, v in choice["val_loss"].items()}
    assert sorted(scores) == [2, 4, 6]  # the checkpointed steps; the validations of steps 1, 3, 5 save nothing
    assert not RunFolder(out).checkpoint(3).exists()
    assert min(scores, key=scores.get) == 2 < 6 and scores[2] < min(scores[4], scores[6])
    assert choice["step"] == 2 and choice["checkpoint"] == "checkpoint-2"
    assert choice["reason"] == f"best val/loss {scores[2]:.6g} of checkpoints 2, 4, 6"
    # the scores are the logged validation losses of those steps
    with open(next(RunFolder(out).logs.rglob("metrics.csv"))) as fh:
        logged = {int(r["step"]) + 1: float(r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/loss")}
    for step, score in scores.items():
        assert score == pytest.approx(logged[step], rel=1e-6), step
    written, best, last = _adapter(out), _checkpoint_adapter(out, 2), _checkpoint_adapter(out, 6)
    assert written.keys() == best.keys()
    for k in written:
        assert torch.equal(written[k], best[k]), k
    assert max((written[k] - last[k]).abs().max().item() for k in written) > 0.1  # the last step is another adapter
    # the merged model is base + the best adapter (its logits, to fp32 rounding), not the last one
    from peft import PeftModel

    from lit_recover.models.load import load_pruned

    merged, tok = load_pruned(RunFolder(out).merged_pickle)
    ids = tok(["Add 1 and 2."], return_tensors="pt")
    with torch.no_grad():
        logits = {}
        for step in (2, 6):
            base, _ = load_pruned(tiny_pruned_path)
            logits[step] = PeftModel.from_pretrained(base, RunFolder(out).checkpoint(step)).eval()(**ids).logits
        got = merged.eval()(**ids).logits
    assert (got - logits[2]).abs().max() < 1e-4 < (got - logits[6]).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("validation", [True, False], ids=["keep_last", "no-val"])
def test_the_last_step_is_written_with_keep_last_or_without_validation(tiny_pruned_path, alpaca_json, tmp_path,
                                                                       validation):
    out = tmp_path / "last"
    extra = ["--data.val_set_size", "8", "--keep_last", "true"] if validation else ["--data.val_set_size", "0"]
    cli_main(_best_run_args(tiny_pruned_path, alpaca_json, out, *extra))
    choice = _written_adapter(out)
    assert choice == {"step": 6, "reason": "keep_last: the last step" if validation else "no validation: the last step"}
    written, last, early = _adapter(out), _checkpoint_adapter(out, 6), _checkpoint_adapter(out, 2)
    for k in written:
        assert torch.equal(written[k], last[k]), k
    assert max((written[k] - early[k]).abs().max().item() for k in written) > 0.1


@pytest.mark.slow
def test_a_resumed_run_keeps_the_before_training_numbers(tiny_pruned_path, alpaca_json, tmp_path):
    """The before-training evaluation is written when it is measured and read back on --ckpt_path: the
    resumed run's results have the straight run's "before" and its deltas."""
    import json

    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(f"Add {i} and {i + 1}. The sum is {2 * i + 1}." for i in range(200)))

    def args(out, *extra):
        a = _fit_args(tiny_pruned_path, alpaca_json, out, "--data.val_set_size", "0", "--trainer.max_steps", "4",
                      "--save_steps", "2", "--model.learning_rate", "1e-2", "--model.warmup_steps", "1",
                      "--evaluation.metrics", "[ppl]", "--evaluation.ppl_datasets", "[]",
                      "--evaluation.ppl_texts", json.dumps({"held_out": str(text)}), "--evaluation.limit", "2",
                      *extra)
        a[a.index("--skip_evaluation") + 1] = "false"
        return a

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_main(args(straight))
    cli_main(args(resumed, "--trainer.callbacks+=tests.helpers.StopAtStep", "--trainer.callbacks.step=2"))
    kept = json.loads(RunFolder(resumed).before_training.read_text())
    cli_main(args(resumed, "--ckpt_path", "last"))
    a, b = (json.loads(RunFolder(o).evaluation.read_text()) for o in (straight, resumed))
    assert b["before"] == kept  # read back, not measured again
    key = "ppl/datasets/held_out"
    assert b["before"]["metrics"]["ppl"]["datasets"]["held_out"] == a["before"]["metrics"]["ppl"]["datasets"]["held_out"]
    assert b["deltas"][key]["before"] == a["deltas"][key]["before"]
    assert b["deltas"][key]["delta"] == b["deltas"][key]["after"] - b["deltas"][key]["before"]
    assert b["deltas"][key]["after"] == pytest.approx(a["deltas"][key]["after"], rel=1e-5)  # same adapter


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
