"""Callbacks: adapter-only step checkpoints in ``checkpoint-<step>/`` folders, and the end-of-fit
merge → save → evaluate of the recovered model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_recover.distributed import is_sharded, wait_for_rank_zero
from lit_recover.outputs import (
    CHECKPOINT_LAST,
    CHECKPOINT_PREFIX,
    TRAINER_STATE,
    RunFolder,
    atomic_dir,
    fresh_dir,
    replace_dir,
    staging_dir,
)

log = logging.getLogger(__name__)

class RecoveryCheckpoint(ModelCheckpoint):
    """Adapter-only checkpoints as folders: ``checkpoint-<step>/`` holds ``lightning.ckpt``
    (LoRA weights, optimizer, scheduler, loop and sampler state, RNG) and the PEFT adapter files.

    Folders are written to a temporary name and renamed, so a kill mid-save leaves the previous
    checkpoints whole. With validation, the best ``save_top_k`` by ``val/loss`` are kept; without,
    the newest ``save_top_k``. ``checkpoint-last/`` always holds the newest state for resuming.
    """

    FILE_EXTENSION = ""
    CHECKPOINT_NAME_LAST = CHECKPOINT_LAST

    def __init__(self, dirpath: str, save_steps: int = 200, save_top_k: int = 3, validation: bool = True) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=CHECKPOINT_PREFIX + "{step}",
            auto_insert_metric_name=False,
            monitor="val/loss" if validation else "step",
            mode="min" if validation else "max",
            save_top_k=save_top_k,
            save_last=True,
            # with validation, save when it ends (the CLI runs it every save_steps optimizer steps)
            every_n_train_steps=None if validation else save_steps,
            save_on_train_epoch_end=False if validation else None,
            enable_version_counter=False,
        )
        self.last_step_checkpoint: str | None = None

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # every rank writes into the same staging folder (FSDP2: its shard of the sharded state)
        tmp = staging_dir(filepath)
        if trainer.is_global_zero:
            fresh_dir(tmp)
        trainer.strategy.barrier("checkpoint-tmp")
        trainer.save_checkpoint(str(tmp / TRAINER_STATE), self.save_weights_only)
        module = trainer.lightning_module
        # under FSDP2 the adapter is gathered from every rank's shard first (a collective)
        adapter = module.gather_adapter() if hasattr(module, "gather_adapter") else None
        if trainer.is_global_zero:
            if hasattr(module, "save_adapter"):
                module.save_adapter(tmp, state_dict=adapter)
            replace_dir(tmp, filepath)
        trainer.strategy.barrier("checkpoint-done")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if Path(filepath).name != CHECKPOINT_LAST:
            self.last_step_checkpoint = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    @override
    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)


class RecoveryOutputs(Callback):
    """At the end of fit: save the adapter, merge it, save the merged model, evaluate.

    Writes into ``output_dir``: ``lora_adapter/`` (PEFT ``save_pretrained`` + tokenizer),
    ``pruned_model.bin`` (merged model + tokenizer, LLM-Pruner's pickle), ``pruned_model/`` (the same
    without pickle) and, unless ``skip_evaluation``, ``evaluation/evaluation_results.json`` with the
    pruned model's numbers before training (``evaluate_before``), the recovered model's after, and
    their deltas. Only rank zero writes or evaluates; the other ranks wait at a barrier.

    Args:
        output_dir: where the outputs go.
        skip_evaluation: write the model outputs only.
        evaluation: the evaluation settings (metrics, data folders, limit, …).
        evaluate_before: also evaluate the pruned model before training (metrics ``before_metrics``).
        before_metrics: metrics of the before-training evaluation (PPL by default: it is cheap; ``[]``
            for none).
        save_pickle_free: also write the pickle-free folder ``pruned_model/``.
    """

    def __init__(
        self,
        output_dir: str,
        skip_evaluation: bool = False,
        evaluation: Any = None,
        evaluate_before: bool = True,
        before_metrics: list[str] | None = None,
        save_pickle_free: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.run = RunFolder(output_dir)
        self.skip_evaluation = skip_evaluation
        self.evaluation = evaluation
        self.evaluate_before = evaluate_before
        self.before_metrics = ["ppl"] if before_metrics is None else list(before_metrics)
        self.save_pickle_free = save_pickle_free
        self.before: dict | None = None
        self.incomplete: tuple[dict, Path] | None = None  # evaluation.strict: results that miss a metric

    def _eval_config(self, metrics: list[str] | None = None):
        from lit_recover.evaluation import EvalConfig

        cfg = self.evaluation if self.evaluation is not None else EvalConfig()
        if metrics is not None:
            from dataclasses import replace

            cfg = replace(cfg, metrics=[m for m in cfg.metrics if m in metrics] or list(metrics))
        return cfg

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skip_evaluation or not self.evaluate_before or not self.before_metrics or trainer.ckpt_path:
            return
        # under FSDP2 every forward of the sharded model is a collective: all ranks run the evaluation
        if trainer.is_global_zero or is_sharded(pl_module):
            from lit_recover.evaluation import evaluate_model

            rank_zero_info("Evaluating the pruned model before recovery …")
            with pl_module.model.disable_adapter():
                before = evaluate_model(
                    pl_module.model, pl_module.tokenizer, self._eval_config(self.before_metrics), label="pruned"
                )
            if trainer.is_global_zero:
                self.before = before
        wait_for_rank_zero("evaluate-before")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # under FSDP2 gathering the adapter and the merged model are collectives: every rank calls them
        adapter = pl_module.gather_adapter() if hasattr(pl_module, "gather_adapter") else None
        if trainer.is_global_zero:
            self._write_adapter(pl_module, adapter)
        # the merge folds the adapter into the base weights in place: after the adapter is saved
        merged = pl_module.merged_model()
        if trainer.is_global_zero:
            self._write_merged(pl_module, merged)
        # rank zero may evaluate for hours: a barrier that outlasts the process group's timeout
        wait_for_rank_zero("recovery-outputs")
        # evaluation.strict: raised after the barrier, so that no rank is left waiting for rank zero
        if self.incomplete is not None:
            from lit_recover.evaluation import raise_if_missing

            raise_if_missing(*self.incomplete)

    def _write_adapter(self, pl_module: L.LightningModule, adapter: dict | None = None) -> None:
        with atomic_dir(self.run.adapter) as tmp:
            pl_module.save_adapter(tmp, state_dict=adapter)
            pl_module.tokenizer.save_pretrained(tmp)
        rank_zero_info(f"Saved the LoRA adapter to {self.run.adapter}")

    def _write_merged(self, pl_module: L.LightningModule, merged) -> None:
        from lit_recover.models.load import save_pruned

        tokenizer = pl_module.tokenizer
        merged.eval()
        # in the input's dtype, from CPU tensors: it loads on a machine without CUDA
        stored = getattr(pl_module, "stored_dtype", None)
        save_pruned(merged, tokenizer, self.run.merged_pickle, dtype=stored)
        rank_zero_info(f"Saved the merged model to {self.run.merged_pickle}")
        if self.save_pickle_free:
            try:
                from lit_recover.models.folder import save_pruned_folder
            except ImportError:  # the pickle-free format is optional
                pass
            else:
                save_pruned_folder(merged, tokenizer, self.run.merged_folder, overwrite=True, dtype=stored)
                rank_zero_info(f"Saved the merged model without pickle to {self.run.merged_folder}")

        if self.skip_evaluation:
            return
        from lit_recover.evaluation import evaluate_model, with_deltas, write_results

        if hasattr(pl_module, "for_evaluation"):  # measured in the dtype and on the device it trained in
            merged = pl_module.for_evaluation(merged)
        rank_zero_info("Evaluating the recovered model …")
        after = evaluate_model(merged, tokenizer, self._eval_config(), label="recovered")
        results = with_deltas(self.before, after) if self.before is not None else after
        path = write_results(results, self.run.evaluation, overwrite=True)
        rank_zero_info(f"Wrote {path}")
        from lit_recover.evaluation import failure_box, missing_metrics

        box = failure_box(results, path)
        if box is not None:  # the last thing a fit prints: a lost metric is seen, not found missing later
            import sys

            print(box, file=sys.stderr, flush=True)
        if self._eval_config().strict and missing_metrics(results):
            self.incomplete = (results, path)
