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
from lit_recover.errors import LitRecoverError
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


class MissingCheckpointError(LitRecoverError, FileNotFoundError):
    """The checkpoint chosen for the outputs is no longer in the run folder."""


class RecoveryCheckpoint(ModelCheckpoint):
    """Adapter-only checkpoints as folders: ``checkpoint-<step>/`` holds ``lightning.ckpt``
    (LoRA weights, optimizer, scheduler, loop and sampler state, RNG) and the PEFT adapter files.

    Folders are written to a temporary name and renamed, so a kill mid-save leaves the previous
    checkpoints whole. With validation (which the CLI runs every ``eval_steps`` optimizer steps), a
    checkpoint is taken when a validation at a multiple of ``save_steps`` ends, scored by its
    ``val/loss``: the best ``save_top_k`` are kept, and ``validated`` maps every checkpointed step
    to its score (kept across resumes), the candidates of ``RecoveryOutputs``' best-adapter choice.
    Without validation, every ``save_steps`` optimizer steps, the newest ``save_top_k`` kept.
    ``checkpoint-last/`` always holds the newest state for resuming.
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
        self.save_steps = int(save_steps)
        self.validation = bool(validation)
        self.validated: dict[int, float] = {}
        self.last_step_checkpoint: str | None = None

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validation:
            step = int(trainer.global_step)
            # validations between checkpoints (eval_steps < save_steps) and the sanity check save nothing
            if trainer.sanity_checking or step == 0 or step % self.save_steps:
                return
            score = trainer.callback_metrics.get(self.monitor)
            if score is not None and self._last_global_step_saved != step:
                self.validated[step] = float(score)  # before the save: the checkpoint carries it
        super().on_validation_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "validated": dict(self.validated)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.validated = {int(k): float(v) for k, v in (state_dict.get("validated") or {}).items()}

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
    """At the end of fit: choose the adapter, save it, merge it, save the merged model, evaluate.

    The adapter written is, as the Trainer's ``load_best_model_at_end`` with the validation loss as
    ``metric_for_best_model``, the step checkpoint with the lowest ``val/loss`` among those taken at
    validated save steps (the earliest of equal ones), loaded into every rank's model before the
    gather and the merge; the last step's with ``keep_last``, without validation, or when no
    checkpoint was validated. ``adapter_choice`` (``{"step", "reason", …}``) says which and why, and
    goes into the results JSON as ``after.model.adapter``.

    Writes into ``output_dir``: ``lora_adapter/`` (PEFT ``save_pretrained`` + tokenizer),
    ``pruned_model.bin`` (merged model + tokenizer, LLM-Pruner's pickle), ``pruned_model/`` (the same
    without pickle) and, unless ``skip_evaluation``, ``evaluation/evaluation_results.json`` with the
    pruned model's numbers before training (``evaluate_before``), the recovered model's after, and
    their deltas. The before-training numbers are also written to ``evaluation/before_training.json``
    when they are measured and read back from there when a run resumes (``--ckpt_path``), so a
    resumed run reports them too. Only rank zero writes or evaluates; the other ranks wait at a barrier.

    Args:
        output_dir: where the outputs go.
        skip_evaluation: write the model outputs only.
        evaluation: the evaluation settings (metrics, data folders, limit, …).
        evaluate_before: also evaluate the pruned model before training (metrics ``before_metrics``).
        before_metrics: metrics of the before-training evaluation (PPL by default: it is cheap; ``[]``
            for none).
        save_pickle_free: also write the pickle-free folder ``pruned_model/``.
        keep_last: write the last step's adapter instead of the best validated checkpoint's.
    """

    def __init__(
        self,
        output_dir: str,
        skip_evaluation: bool = False,
        evaluation: Any = None,
        evaluate_before: bool = True,
        before_metrics: list[str] | None = None,
        save_pickle_free: bool = True,
        keep_last: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.run = RunFolder(output_dir)
        self.skip_evaluation = skip_evaluation
        self.evaluation = evaluation
        self.evaluate_before = evaluate_before
        self.before_metrics = ["ppl"] if before_metrics is None else list(before_metrics)
        self.save_pickle_free = save_pickle_free
        self.keep_last = keep_last
        self.before: dict | None = None
        self.adapter_choice: dict | None = None
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
        if self.skip_evaluation or not self.evaluate_before or not self.before_metrics:
            return
        if trainer.ckpt_path:
            # a resumed run: the numbers measured when the run started (rank zero holds the folder)
            saved = self._read_before() if trainer.is_global_zero else None
            if trainer.is_global_zero:
                self.before = saved
            if trainer.strategy.broadcast(saved is not None, src=0):
                return
        # under FSDP2 every forward of the sharded model is a collective: all ranks run the evaluation
        if trainer.is_global_zero or is_sharded(pl_module):
            from lit_recover.evaluation import evaluate_model, write_results

            rank_zero_info("Evaluating the pruned model before recovery …")
            # the adapter off is the pruned model, also on resume (the checkpoint's adapter is loaded)
            with pl_module.model.disable_adapter():
                before = evaluate_model(
                    pl_module.model, pl_module.tokenizer, self._eval_config(self.before_metrics), label="pruned"
                )
            if trainer.is_global_zero:
                self.before = before
                write_results(before, self.run.before_training, overwrite=True)
        wait_for_rank_zero("evaluate-before")

    def _read_before(self) -> dict | None:
        """The before-training results kept in the run folder, or ``None`` (absent or unreadable)."""
        from lit_recover.evaluation.report import ResultsFileError, read_results

        path = self.run.before_training
        if not path.is_file():
            return None
        try:
            (_, before), *rest = read_results(path)
        except (ResultsFileError, ValueError) as exc:
            log.warning("%s: %s; measuring the pruned model again", path, exc)
            return None
        if rest:
            log.warning("%s: holds before/after results, not the before-training ones; measuring again", path)
            return None
        rank_zero_info(f"Before-training numbers from {path}")
        return before

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the best checkpoint's adapter into every rank's model first (a broadcast from rank zero)
        self.adapter_choice = self._choose_adapter(trainer, pl_module)
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

    def _choose_adapter(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Which step's adapter the outputs get, and why; loads it into ``pl_module`` when it is not
        the model at hand. Call it on every rank (``validated`` is the same on all of them)."""
        step = int(trainer.global_step)
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, RecoveryCheckpoint)]
        checkpoint = checkpoints[0] if checkpoints else None
        if self.keep_last:
            choice = {"step": step, "reason": "keep_last: the last step"}
        elif checkpoint is None or not checkpoint.validation:
            choice = {"step": step, "reason": "no validation: the last step"}
        elif not checkpoint.validated:
            choice = {"step": step, "reason": f"no validated checkpoint (save_steps {checkpoint.save_steps}): "
                                              "the last step"}
        else:
            scores = checkpoint.validated
            best = min(scores, key=lambda s: (scores[s], s))  # the earliest of equal scores, as the Trainer
            steps = ", ".join(str(s) for s in sorted(scores))
            choice = {"step": best, "reason": f"best val/loss {scores[best]:.6g} of checkpoints {steps}",
                      "val_loss": {str(s): scores[s] for s in sorted(scores)}}
            if best != step:
                folder = RunFolder(checkpoint.dirpath).checkpoint(best)
                choice["checkpoint"] = folder.name
                self._load_adapter(trainer, pl_module, folder)
        rank_zero_info(f"Writing the adapter of step {choice['step']}: {choice['reason']}")
        return choice

    @staticmethod
    def _load_adapter(trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        """Rank zero reads ``folder``'s adapter and broadcasts it; every rank loads it."""
        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        state: dict | str | None = None
        if trainer.is_global_zero:
            path = folder / SAFETENSORS_WEIGHTS_NAME
            if path.is_file():
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:  # told to every rank, so that none waits for a broadcast that never comes
                state = (f"{path}: the best checkpoint's adapter is missing; "
                         "pass --keep_last true to write the last step")
        state = trainer.strategy.broadcast(state, src=0)
        if isinstance(state, str):
            raise MissingCheckpointError(state)
        pl_module.load_adapter_state(state)

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
        if self.adapter_choice is not None:  # which step's adapter was measured, and why
            after["model"]["adapter"] = dict(self.adapter_choice)
        summary = getattr(pl_module, "training_summary", None)
        if summary is not None:  # wall time, steps and tokens of the fit: runs compared at equal time
            from lit_recover.evaluation.report import training_record

            after["training"] = training_record(**summary)
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
