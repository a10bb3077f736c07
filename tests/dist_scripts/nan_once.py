"""A callback that makes one micro-batch's loss NaN on one rank only (through the decoder's final norm).

The norm, not the LM head: the chunked head multiplies by the head's weight without calling the module.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NaNOnce(Callback):
    """Turn the LM head's output into NaN for micro-batch ``batch_idx`` of epoch 0 on rank ``rank``.

    Args:
        rank: the global rank that sees the NaN.
        batch_idx: the micro-batch (counted in epoch 0) it happens in.
    """

    def __init__(self, rank: int = 1, batch_idx: int = 1) -> None:
        self.rank = rank
        self.batch_idx = batch_idx
        self._handle: Any = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            norm = pl_module.backbone.norm
            self._handle = norm.register_forward_hook(lambda module, args, out: out * torch.nan)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
