"""One measured run of the training benchmark, in a process of its own: the reference recipe or
lit-recover's ``main.py fit``, with the same :class:`~benchmarks.meter.StepMeter` attached.

``benchmarks.bench_fit`` starts it as ``python -m benchmarks.fit_workers <side> <settings.json>
<result.json>`` from the repository root; the result file holds the meter's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_fit import FitSettings
from benchmarks.common import ROOT
from benchmarks.meter import IGNORE_INDEX, StepMeter, supervised_count
from benchmarks.report import SIDES, write_result


def run_reference_worker(s: FitSettings, workdir: Path) -> dict[str, Any]:
    """The reference recipe with the meter attached."""
    from transformers import TrainerCallback

    from benchmarks.reference_trainer import ReferenceConfig, run_reference

    meter = StepMeter()

    def loss_hook(module, args, kwargs, output) -> None:
        if not module.training or getattr(output, "loss", None) is None or kwargs.get("labels") is None:
            return
        n = supervised_count(kwargs["labels"])
        window = kwargs.get("num_items_in_batch")
        loss = float(output.loss.detach())
        if window is not None:  # the Trainer normalised by the whole accumulation window's count
            loss = loss * float(window) / max(n, 1)
        meter.add_loss(loss, n)

    def on_model(model) -> None:
        # the recipe's matmuls run in its base weights' dtype (fp16 on CUDA: model.half() and fp16 autocast)
        frozen = next(p.dtype for p in model.parameters() if not p.requires_grad)
        meter.attach_flops(model, matmul_dtype=str(frozen).removeprefix("torch."))
        model.get_base_model().model.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
        model.register_forward_hook(loss_hook, with_kwargs=True)

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)
            inner.register_step_post_hook(meter.optimizer_step_hook)
            meter.start()

        def on_train_end(self, args, state, control, **kwargs):
            meter.finish()

    cfg = ReferenceConfig(
        prune_model=s.model, data_path=s.data, output_dir=str(workdir / "reference"),
        batch_size=s.batch_size, micro_batch_size=s.micro_batch_size, max_steps=s.steps,
        learning_rate=s.learning_rate, cutoff_len=s.cutoff_len, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout, group_by_length=s.group_by_length, sequential=s.sequential,
        warmup_steps=s.warmup_steps, seed=s.seed,
    )
    run_reference(cfg, callbacks=[Meter()], on_model=on_model)
    return meter.result()


def lit_cli_args(s: FitSettings, output_dir: Path) -> list[str]:
    """The ``main.py fit`` arguments that give lit-recover the reference's settings."""
    args = [
        "fit", "--config", str(ROOT / "configs" / "recover.yaml"),
        "--model.pruned_model", s.model,
        "--data.data_path", s.data,
        "--data.val_set_size", "0",
        "--data.cutoff_len", str(s.cutoff_len),
        "--data.group_by_length", str(s.group_by_length).lower(),
        "--data.batch_size", str(s.batch_size),
        "--data.micro_batch_size", str(s.micro_batch_size),
        "--data.padding_free", str(s.padding_free).lower(),
        "--model.learning_rate", str(s.learning_rate),
        "--model.warmup_steps", str(s.warmup_steps),
        "--model.lora_r", str(s.lora_r),
        "--model.lora_alpha", str(s.lora_alpha),
        "--model.lora_dropout", str(s.lora_dropout),
        "--trainer.max_steps", str(s.steps),
        # the Trainer clips at max_grad_norm=1.0 by default; the recipe keeps that default
        "--trainer.gradient_clip_val", "1.0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--seed_everything", str(s.seed),
        "--output_dir", str(output_dir),
        "--skip_evaluation", "true",
        # float32 as the reference computes on CPU, whatever this CPU's default (a bfloat16 base where
        # bf16 is native); the bf16_base lever measures that default
        "--trainer.precision", "32-true",
        "--model.torch_dtype", "float32",
    ]
    return args + list(s.lit_args)


def _full_logits_loss(pl_module):
    """The causal-LM loss over full logits (``LlamaForCausalLM(labels=...)``): the lever switched off."""
    import torch.nn.functional as F

    def loss(batch):
        hidden = pl_module.backbone(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state
        logits = pl_module.lm_head(hidden).float()
        labels = batch["labels"][:, 1:]
        n = supervised_count(batch["labels"])
        value = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX)
        return value, n

    return loss


def run_lit_worker(s: FitSettings, workdir: Path) -> dict[str, Any]:
    """lit-recover's ``main.py fit`` (the RecoveryCLI) with the meter attached as a callback."""
    import lightning as L

    from lit_recover.cli import RecoveryCLI
    from lit_recover.data import sampler as data_module

    meter = StepMeter()
    if s.sequential:
        # the data module has no switch for file order: keep the sampler from shuffling
        original_init = data_module.ShardedBatchSampler.__init__

        def unshuffled_init(self, *args, **kwargs):
            original_init(self, *args, **{**kwargs, "shuffle": False})

        data_module.ShardedBatchSampler.__init__ = unshuffled_init

    class Meter(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            meter.attach_flops(pl_module.model, matmul_dtype=str(pl_module._matmul_dtype()).removeprefix("torch."))
            backbone = pl_module.backbone
            backbone.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
            original = pl_module.supervised_loss

            def supervised_loss(batch):
                loss, n = original(batch)
                if pl_module.training:
                    meter.add_loss(float(loss.detach()), n)
                return loss, n

            if s.full_logits:
                original = _full_logits_loss(pl_module)
            pl_module.supervised_loss = supervised_loss
            trainer.optimizers[0].register_step_post_hook(meter.optimizer_step_hook)
            if s.skip_outputs:  # a new list: the one Lightning is iterating stays as it is
                trainer.callbacks = [c for c in trainer.callbacks if type(c).__name__ != "RecoveryOutputs"]
            meter.start()

        def on_train_end(self, trainer, pl_module) -> None:
            meter.finish()
            if pl_module.hparams.get("compile"):
                from lit_recover.compiling import compile_seconds

                compile_s[0] = compile_seconds()

    compile_s: list[float | None] = [None]
    try:
        RecoveryCLI(args=lit_cli_args(s, workdir / "lit"), trainer_defaults={"max_epochs": 2, "callbacks": [Meter()]})
    except Exception as exc:
        if meter.peak_rss_mb is None:  # training itself failed
            raise
        # training finished and was measured; the end-of-fit outputs (merge, save) failed: keep the
        # numbers and say what failed
        result = meter.result()
        result["post_fit_error"] = f"{type(exc).__name__}: {exc}"
        result["compile_s"] = compile_s[0]
        return result
    return {**meter.result(), "compile_s": compile_s[0]}


def measure_peak(result: dict[str, Any], s: FitSettings) -> dict[str, Any] | None:
    """The device's matmul rate at the run's model shapes, in the dtype its matmuls ran in, for a
    micro-batch of the run's mean real tokens: measured in this process after training, what its MFU
    divides by (``benchmarks.matmul_peak``)."""
    import torch

    from benchmarks.matmul_peak import measure

    fm, steps = result.get("flop_model"), result.get("steps") or []
    if not fm or not steps:
        return None
    micro_batches = len(steps) * max(1, s.batch_size // s.micro_batch_size)
    tokens = -(-max(1, sum(x["tokens"] for x in steps) // micro_batches) // 64) * 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = measure(fm["layers"], fm["hidden_size"], tokens, result["matmul_dtype"], device, repeats=5, min_seconds=0.1)
    print(f"matmul peak {peak['gflops_per_s']:.1f} GFLOP/s ({peak['dtype']}, {device}, {tokens} tokens)", flush=True)
    return peak


def worker_main(side: str, settings_path: Path, out_path: Path) -> None:
    """Entry point of one measured run (a subprocess of the harness)."""
    import torch

    s = FitSettings(**json.loads(settings_path.read_text()))
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        result = (run_reference_worker if side == "reference" else run_lit_worker)(s, Path(tmp))
        result["peak"] = measure_peak(result, s)
    result.update({
        "side": side,
        "wall_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "load_avg_end": os.getloadavg(),
    })
    write_result(out_path, json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One measured run of the training benchmark (started by bench_fit).")
    p.add_argument("side", choices=SIDES)
    p.add_argument("settings", type=Path, help="the run's FitSettings as JSON")
    p.add_argument("result", type=Path, help="where the meter's numbers go")
    args = p.parse_args(argv)
    worker_main(args.side, args.settings, args.result)


if __name__ == "__main__":
    main()
