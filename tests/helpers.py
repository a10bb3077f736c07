"""Callbacks used by tests through the command line (``--trainer.callbacks+=tests.helpers.…``), and
shared test steps."""

import lightning as L
import torch


class StopAtStep(L.Callback):
    """Stop fitting after optimizer step ``step`` — the run's schedule still spans ``max_steps``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class PoisonAtStep(L.Callback):
    """Make the adapter produce NaN from optimizer step ``step`` on (a stand-in for fp16 overflow)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for name, p in pl_module.named_parameters():
                    if "lora_B" in name:
                        p.fill_(float("nan"))


class NanLossAtBatch(L.Callback):
    """Make the loss of one micro-batch NaN (the decoder's final norm: the chunked head multiplies by the
    head's weight without calling the module), leaving the weights alone."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            self._hook = pl_module.backbone.norm.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class ScrambleAtStep(L.Callback):
    """Shift every adapter tensor by ``shift`` once, at the start of optimizer step ``step``: the
    validation losses after it are far worse than before (a stand-in for a run that diverges late).
    No random draw (the run's RNG stream stays as it was) and sharded (FSDP2) tensors work too."""

    def __init__(self, step: int, shift: float = 0.5) -> None:
        self.step = step
        self.shift = shift
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                for name, p in pl_module.named_parameters():
                    if "lora_" in name:
                        p.add_(torch.ones_like(p), alpha=self.shift)


class StopBeforeTraining(L.Callback):
    """Keep what fit built (optimizer, scheduler config, step count) and end the fit before its first step."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.optimizer = trainer.optimizers[0]
        self.scheduler = trainer.lr_scheduler_configs[0]
        self.total_steps = trainer.estimated_stepping_batches
        trainer.should_stop = True


def lora_loss_and_grads(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The supervised loss of ``module`` on ``batch`` and the gradients of its trainable parameters,
    after setting its LoRA weights to the same random values (seed 1, N(0, 0.05)) as any other
    module of the same shapes gets: so that two implementations are compared with a nonzero adapter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    loss, _ = module.supervised_loss(batch)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in module.named_parameters() if p.requires_grad}
