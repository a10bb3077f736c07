"""``train/mfu``: the model FLOPs of an optimizer step's tokens / its seconds / the device's peak.

The FLOPs a step really ran are counted by torch's ``FlopCounterMode`` around the step (forward and
backward of every micro-batch of the accumulation window), with eager attention and one sequence per
micro-batch, so that every matmul that runs is a model FLOP (no padding, no packing neighbours); the
seconds come from a clock that advances a fixed amount per reading.
"""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.loggers.logger import Logger
from torch.utils.flop_counter import FlopCounterMode

import lit_recover.module as module_mod
from lit_recover.data import AlpacaDataModule
from lit_recover.module import LoRARecoveryModule

TICK = 0.25  # seconds per clock reading: every step lasts one tick (one reading at its start, one at its end)
# Lightning keeps logged numbers as float32 tensors: one rounding, at most 2**-24 relative
FLOAT32 = 2.0**-23


class Collect(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name = "collect"
    version = "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class CountFlops(L.Callback):
    """FlopCounterMode from the first micro-batch of a step to just before the optimizer step."""

    def __init__(self) -> None:
        self.counter: FlopCounterMode | None = None
        self.per_step: list[int] = []
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.counter is None:
            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()
            self.tokens.append(0)
        self.tokens[-1] += int(batch["input_ids"].numel())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.counter.__exit__(None, None, None)
        self.per_step.append(self.counter.get_total_flops())
        self.counter = None


@pytest.fixture()
def fixed_clock(monkeypatch):
    readings = iter(range(10**6))

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return next(readings) * TICK

    monkeypatch.setattr(module_mod, "time", Clock)


def _fit(path, data, peak_flops, steps=2):
    module = LoRARecoveryModule(str(path), attn_implementation="eager", peak_flops=peak_flops)
    data = AlpacaDataModule(str(data), val_set_size=0, cutoff_len=256, batch_size=2, micro_batch_size=1,
                            tokenizer=module.tokenizer)
    logger, flops = Collect(), CountFlops()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=2, logger=logger,
                        log_every_n_steps=1, callbacks=[flops], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    logged = [m for _, m in logger.rows if "train/mfu" in m]
    return module, flops, logged


@pytest.mark.slow
def test_train_mfu_is_the_step_flops_over_its_time_over_the_peak(tiny_pruned_path, alpaca_json, fixed_clock):
    peak = 2.0e9
    _, flops, logged = _fit(tiny_pruned_path, alpaca_json, peak)
    assert len(logged) == len(flops.per_step) == 2
    for metrics, counted, tokens in zip(logged, flops.per_step, flops.tokens):
        assert counted > 0
        assert metrics["train/mfu"] == pytest.approx(counted / TICK / peak, rel=FLOAT32)
        assert metrics["train/tokens_per_sec"] == pytest.approx(tokens / TICK, rel=FLOAT32)


@pytest.mark.slow
def test_without_a_peak_the_device_matmul_rate_is_measured_once(tiny_pruned_path, alpaca_json, fixed_clock):
    module, flops, logged = _fit(tiny_pruned_path, alpaca_json, None, steps=1)
    peak = module.peak_flops_per_s()
    assert peak is not None and peak > 0
    for metrics, counted in zip(logged, flops.per_step):
        assert metrics["train/mfu"] == pytest.approx(counted / TICK / peak, rel=FLOAT32)
