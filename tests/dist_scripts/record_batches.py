"""A callback that writes, per rank, the samples of every training micro-batch it saw.

The distributed tests add it with ``--trainer.callbacks+=`` to see which samples each rank trained
on at which optimizer step: the shards must be disjoint, and the samples of an optimizer step must be
those of the single-process run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class RecordBatches(Callback):
    """Append ``{"step", "samples"}`` per micro-batch; write ``<out_dir>/batches-rank<r>.json`` at the end.

    A sample is the token ids of one record: a padded row without its padding, or one sequence of a
    packed row (``padding_free``: its positions restart at 0 where a sequence starts).

    Args:
        out_dir: where the per-rank files go.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ids = batch["input_ids"]
        if "attention_mask" in batch:
            samples = [row[m.bool()].tolist() for row, m in zip(ids, batch["attention_mask"], strict=True)]
        else:  # one packed row
            row, positions = ids[0].tolist(), batch["position_ids"][0].tolist()
            starts = [i for i, pos in enumerate(positions) if pos == 0] + [len(row)]
            samples = [row[a:b] for a, b in zip(starts, starts[1:])]
        self.batches.append({"step": trainer.global_step, "samples": samples})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"batches-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank, "world": trainer.world_size, "batches": self.batches}))
