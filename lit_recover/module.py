"""``LoRARecoveryModule``: the PEFT-wrapped pruned model, its training step, optimizer and metrics.

Options that turn features on: ``gradient_checkpointing`` (recompute activations in the backward
pass), ``lean_lora`` (on by default: LoRA layers keep boolean dropout masks and a shared input
for the backward pass instead of PEFT's two float copies per layer; same math), ``optimizer`` /
``lr_scheduler`` (any torch optimizer and scheduler through LightningCLI; default AdamW with
LLM-Pruner's linear warm-up then linear decay), ``trust_pickle`` (plain ``torch.load`` of the pruned
pickle instead of the safe loader).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from typing_extensions import override

from lit_recover.data import IGNORE_INDEX
from lit_recover.distill import DistillLoss, KDLoss, KDPositions
from lit_recover.distributed import ShardedModel, gather_merged, gather_trainable, shard_lora_model
from lit_recover.errors import LitRecoverError
from lit_recover.lora import use_lean_lora
from lit_recover.models.flops import LoRATrainingFlops, cached_peak_flops, length_stats, matmul_shapes
from lit_recover.models.load import cast_parameters, load_pruned, stored_dtype

log = logging.getLogger(__name__)

class NonFiniteLossError(LitRecoverError, RuntimeError):
    """The training loss became NaN or inf."""


class LossWeightingError(LitRecoverError, ValueError):
    """``loss_weighting`` cannot be served by this data module."""


class TeacherMismatchError(LitRecoverError, ValueError):
    """A teacher whose vocabulary, special tokens or (for the hidden-state loss) layers differ from the student's."""


def _supervised_targets(labels: Any) -> int:
    """Positions a causal LM predicts from one sequence's labels: not ``IGNORE_INDEX``, position 0
    excluded (the shift). The count the padding and packing collators both give, and the one
    transformers' Trainer puts in ``num_items_in_batch`` (``labels[..., 1:]`` in 5.x)."""
    return int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE_INDEX))


def _items(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    fetch = getattr(dataset, "__getitems__", None)
    return list(fetch(indices)) if fetch is not None else [dataset[i] for i in indices]


def _adapter_key(name: str, model: torch.nn.Module) -> str:
    """The key of parameter ``name`` in PEFT's saved adapter: the adapter's name taken out
    (``….lora_A.default.weight`` → ``….lora_A.weight``), as ``get_peft_model_state_dict`` does."""
    adapter = getattr(model, "active_adapter", "default")
    return name.replace(f".{adapter}", "")


DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear ramp over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    The schedule of transformers' ``get_linear_schedule_with_warmup`` that LLM-Pruner's and
    alpaca-lora's Trainer use.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return factor


def _split_modules(value: list[str] | str) -> list[str]:
    if isinstance(value, str):
        value = value.strip().strip("[]")
        return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
    return list(value)


def _drop_checkpointing_settings(model: torch.nn.Module) -> None:
    """Undo what gradient checkpointing set on a model before it is saved for inference.

    transformers and PEFT each register an embedding hook that makes its output require grad (a
    local function: the pickle of the model would fail) and keep a handle to the last one only, so
    the hooks are found by name.
    """
    embeddings = model.get_input_embeddings()
    for key, hook in list(embeddings._forward_hooks.items()):
        if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
            del embeddings._forward_hooks[key]
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    model.config.use_cache = True


def resolve_base_dtype(torch_dtype: str | None, stored: torch.dtype) -> torch.dtype:
    """The dtype ``--model.torch_dtype`` gives the frozen base of weights stored in ``stored``."""
    from lit_recover.hardware import base_dtype
    from lit_recover.models.load import as_dtype

    if torch_dtype is None:
        return torch.float32
    if torch_dtype == "stored":
        return stored
    if torch_dtype == "auto":
        return base_dtype(stored, "cuda" if torch.cuda.is_available() else "cpu")
    return as_dtype(torch_dtype)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _merge(weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight + delta`` computed in float32 at least, rounded once to ``dtype``."""
    work = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    return (weight.to(work) + delta.to(weight.device, work)).to(dtype)


# --- distillation: the teacher ------------------------------------------------------------------
SMOLLM2 = "smollm2"  # the pruner's name for the packaged SmolLM2-135M-Instruct


def check_distillation_settings(kd_ratio: float, kd_temperature: float, kd_hidden_weight: float) -> None:
    """The distillation numbers are usable: ``kd_ratio`` in [0, 1], a positive temperature, a hidden weight ≥ 0."""
    from lit_recover.errors import ConfigError

    if not 0.0 <= kd_ratio <= 1.0:
        raise ConfigError(f"--model.kd_ratio {kd_ratio}: must lie in [0, 1]")
    if not kd_temperature > 0:
        raise ConfigError(f"--model.kd_temperature {kd_temperature}: must be positive")
    if not kd_hidden_weight >= 0:
        raise ConfigError(f"--model.kd_hidden_weight {kd_hidden_weight}: must be 0 or more")


def recorded_base(pruned_model: str) -> str:
    """The base model ``lit-recover prune`` recorded for ``pruned_model`` (``--model.teacher auto``).

    Read from the pruning report beside it (``pruned_model.bin`` and the folder ``pruned_model/``
    both have ``pruned_model.json``). A relative path is taken as it was given to the pruner (from
    the working directory), else from the report's folder; ``smollm2`` stays as it is (the packaged
    model, converted when it is loaded). Cheap: reads one JSON file, loads no model.
    """
    from lit_recover.errors import ConfigError
    from lit_recover.pruning.report import PruningReportError, read_report, report_path

    path = report_path(str(pruned_model).rstrip("/"))
    if not path.is_file():
        raise ConfigError(f"--model.teacher auto: {path} not found (lit-recover prune writes it beside the pruned "
                          f"model, naming the base model); pass --model.teacher PATH")
    try:
        report = read_report(path)
    except PruningReportError as exc:
        raise ConfigError(f"--model.teacher auto: {exc}") from exc
    base = report.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"--model.teacher auto: {path} records no base_model; pass --model.teacher PATH")
    if base == SMOLLM2 or Path(base).is_absolute() or Path(base).exists():
        return base
    beside = path.parent / base
    return str(beside) if beside.exists() else base


def teacher_source(teacher: str, pruned_model: str) -> str:
    """What ``--model.teacher`` names: itself, or for ``auto`` the recorded base (:func:`recorded_base`)."""
    return recorded_base(pruned_model) if teacher == "auto" else teacher


def teacher_mismatches(teacher: torch.nn.Module, teacher_tokenizer: Any, student: torch.nn.Module,
                       student_tokenizer: Any, hidden: bool = False) -> list[str]:
    """What differs between a teacher and its student where distillation needs them equal: the
    logits' vocabulary, the tokenizer's size and special-token ids (bos, eos, pad) and, for the
    hidden-state loss, the number of decoder layers and the hidden size. ``"vocabulary 384 vs 512"``:
    the teacher's value first."""
    from lit_recover.models.anatomy import decoder_layers

    def head_size(model: torch.nn.Module) -> int:
        head = model.get_output_embeddings()
        return int(getattr(head, "out_features", None) or head.weight.shape[0])

    pairs = [("vocabulary (logits)", head_size(teacher), head_size(student)),
             ("tokenizer size", len(teacher_tokenizer), len(student_tokenizer))]
    pairs += [(f"{name} id", getattr(teacher_tokenizer, f"{name}_token_id", None),
               getattr(student_tokenizer, f"{name}_token_id", None)) for name in ("bos", "eos", "pad")]
    if hidden:
        pairs += [("decoder layers", len(decoder_layers(teacher)), len(decoder_layers(student))),
                  ("hidden size", int(teacher.config.hidden_size), int(student.config.hidden_size))]
    return [f"{name} {a} vs {b}" for name, a, b in pairs if a != b]


class LoRARecoveryModule(L.LightningModule):
    """LoRA recovery fine-tuning of a structurally pruned causal LM.

    Args:
        pruned_model: path of the pruned model: an LLM-Pruner ``pruned_model.bin`` pickle, a pruned
            model folder, a Hugging Face model directory or a hub id.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names that get LoRA adapters (list or comma-separated string).
        learning_rate: peak learning rate of the default AdamW.
        weight_decay: weight decay of the default AdamW.
        warmup_steps: linear warm-up steps of the default schedule (LLM-Pruner uses 100).
        optimizer: optional optimizer factory (LightningCLI ``--model.optimizer``); overrides the default AdamW.
        lr_scheduler: optional scheduler factory; overrides the default warm-up/decay schedule.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        lean_lora: run the LoRA branches through ``lit_recover.lora.LoRABranch``: PEFT's outputs and
            gradients for the same dropout masks, with less activation memory and faster mask draws
            (``false``: PEFT's forward). Not used under autocast (mixed precision): PEFT's path runs.
        trust_pickle: load the pickle with plain ``torch.load`` (executes code named by the file).
        mmap_weights: keep the pickle's weights in a copy-on-write memory map of the file instead of
            reading them into process memory (``lit_recover.models.load.read_model``): the processes
            of one machine share one copy in the page cache, and under FSDP2 each rank's process
            memory ends up holding only its shard of the frozen base, not a whole model per rank.
            The values are the same either way; a base cast to another dtype (``torch_dtype``) is a
            copy in process memory all the same. ``false``: read the weights into memory (a file
            that may be rewritten in place during the run).
        torch_dtype: dtype of the frozen base weights: ``float32``, ``bfloat16``, ``float16``,
            ``float64``; ``stored`` (as the file holds them); ``auto`` (the stored dtype where this
            machine computes in it, else the closest one it does: ``lit_recover.hardware.base_dtype``);
            ``None``: float32. The command line fills it in from the precision (``--trainer.precision``
            unset: bfloat16 on a CPU with native bf16, else float32; ``auto`` on CUDA). The LoRA
            weights, their gradients and optimizer state stay float32 whatever it is (PEFT's
            ``autocast_adapter_dtype``), and the merged model is written in the stored dtype.
        attn_implementation: attention kernel (``sdpa``, ``eager``); ``None`` keeps the model's.
        peak_flops: the device's peak in FLOP/s that ``train/mfu`` (model FLOPs of the step's tokens /
            its seconds / peak, per device; ``lit_recover.models.flops``) divides by; ``None``: its
            matmul rate at the model's projection shapes in the dtype they run in, measured once per
            process after the first step (a fraction of a second).
        nonfinite_loss: on a NaN/inf training loss, ``stop`` the run with a message naming the step
            and the last good checkpoint, or ``skip`` the micro-batch and count it (``train/skipped_batches``).
        loss_weighting: how the micro-batches of one optimizer step (accumulation window, all ranks)
            are weighted. ``tokens`` (default): the sum of the window's token NLLs divided by its
            supervised tokens, as transformers >= 4.46's Trainer (``num_items_in_batch``, summed
            over ranks); the gradient equals that of one batch holding the whole window.
            ``micro_batch_mean``: the mean of the micro-batch means, as transformers < 4.46 and
            Lightning's own accumulation. With a teacher the CE part is weighted so, and the
            distillation parts (divergence, hidden states) by the window's distillation positions
            (``kd_positions``) in the same way: under ``tokens`` each part is the window's mean over
            its own positions on all ranks.
        teacher: distillation from the unpruned model: an HF folder, a hub id, an LLM-Pruner pickle
            (read by the safe loader unless ``trust_pickle``), or a pruned folder; ``auto``: the base
            model that ``lit-recover prune`` recorded in the report beside ``pruned_model``
            (``pruned_model.json``). Loaded like the student (same loader and dtype), frozen, in eval
            mode, run under ``no_grad`` on the student's device, sharded like it under FSDP2, never
            checkpointed. Its vocabulary and special tokens must equal the student's. ``None``: plain
            SFT, the seed's recipe.
        kd_ratio: the loss is ``(1 − kd_ratio)·CE + kd_ratio·T²·D + kd_hidden_weight·H``
            (``lit_recover.distill``). 0.5 (torchtune's default) is what the recovery benchmark
            kept: 1.0 did no better (benchmarks/README.md, "Distillation recovery").
        kd_temperature: ``T``, softening both distributions.
        kd_loss: the divergence ``D``: ``forward_kl`` (KL(teacher ‖ student)), ``reverse_kl`` or ``jsd``.
        kd_positions: ``all`` (every position predicting a real token of its own sequence, the prompt
            included, which the CE masks out) or ``response`` (the CE's supervised positions).
        kd_hidden_weight: weight of ``H``, the mean squared difference of every decoder layer's
            output hidden states (student vs teacher, same hidden size) on the distillation positions,
            averaged over layers; 0 (default) skips it. Needs the same number of layers.
        fuse_projections: one frozen matmul per layer for q/k/v and one for gate/up
            (``lit_recover.fused``): each group's base weights concatenated once (the separate weights
            become views of it: no extra memory), the output split and every LoRA branch added to its
            part as before. Same outputs and gradients, same adapter files. Done at the first step
            (:meth:`fuse_projections_now`), not under FSDP2; undone before the merge.
        chunked_head: the LM head and cross-entropy on the supervised positions in chunks, each chunk's
            gradient computed in the forward pass (``lit_recover.head``): never more than one chunk's
            vocabulary-sized logits alive. Same loss and gradients. Not under FSDP2 (unchunked there).
        compile: ``torch.compile`` every decoder layer (inductor; on CPU it needs a C++ compiler).
            The seconds spent compiling are logged (``train/compile_s``, and a log line whenever they grew).
    """

    def __init__(
        self,
        pruned_model: str,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str = DEFAULT_TARGET_MODULES,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_checkpointing: bool = False,
        lean_lora: bool = True,
        trust_pickle: bool = False,
        mmap_weights: bool = True,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        peak_flops: float | None = None,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        loss_weighting: Literal["tokens", "micro_batch_mean"] = "tokens",
        teacher: str | None = None,
        kd_ratio: float = 0.5,
        kd_temperature: float = 1.0,
        kd_loss: KDLoss = "forward_kl",
        kd_positions: KDPositions = "all",
        kd_hidden_weight: float = 0.0,
        fuse_projections: bool = True,
        chunked_head: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        # Checkpoints hold only the adapter: loading them must not demand the frozen base weights.
        self.strict_loading = False
        check_distillation_settings(kd_ratio, kd_temperature, kd_hidden_weight)  # before any model loads
        if compile:
            from lit_recover.compiling import check_compile

            check_compile()  # before any model loads

        base, self.tokenizer, self.stored_dtype = self._load_base(
            pruned_model, trust_pickle, torch_dtype, attn_implementation, mmap=mmap_weights
        )
        self.model = self._wrap_lora(base)
        self.val_nll = MeanMetric()
        self._init_teacher()
        # what the results JSON records of training: global counts restored on resume, plus this process's since
        self._progress_offset = {"tokens": 0, "supervised_tokens": 0, "seconds": 0.0}
        self._progress_local = {"tokens": 0, "supervised_tokens": 0}
        self._train_clock: float | None = None
        self.training_summary: dict[str, Any] | None = None
        self._step_started: float | None = None
        self._tokens_in_step = 0
        self._flops_in_step = 0
        self._flop_model: LoRATrainingFlops | None = None
        self._peak: float | None = peak_flops
        self.skipped_batches = 0
        # loss_weighting tokens: the epoch's batch plan, and the supervised tokens per rank of the window's steps
        self._epoch_plan: tuple[Any, list[list[int]]] | None = None
        self._window_plan: tuple[Any, dict[int, list[int]]] | None = None
        self._kd_window_plan: tuple[Any, dict[int, list[int]]] | None = None
        self._sharded: ShardedModel | None = None  # set by configure_model under FSDP2
        self._log_parameter_counts()

    # --- setup -----------------------------------------------------------------------------
    @staticmethod
    def _load_base(path: str, trust_pickle: bool, torch_dtype: str | None, attn_implementation: str | None,
                   mmap: bool = False) -> tuple[torch.nn.Module, Any, torch.dtype]:
        """``(model, tokenizer, stored dtype)``: the model cast to the base dtype ``torch_dtype`` names."""
        stored: list[torch.dtype] = []

        def choose(dtype: torch.dtype) -> torch.dtype:
            stored.append(dtype)
            return resolve_base_dtype(torch_dtype, dtype)

        kwargs: dict[str, Any] = {"dtype": choose}
        if mmap:
            kwargs["mmap"] = True
        if trust_pickle:
            kwargs["trust_pickle"] = True
        model, tokenizer = load_pruned(path, **kwargs)
        if attn_implementation is not None:
            model.config._attn_implementation = attn_implementation
        return model, tokenizer, stored[0]

    def _wrap_lora(self, base: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        hp = self.hparams
        config = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=_split_modules(hp.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
            base.config.use_cache = False
        model = get_peft_model(base, config)
        if hp.lean_lora:
            use_lean_lora(model)
        if hp.get("compile"):
            from lit_recover.compiling import compile_layers

            compile_layers(model)
        return model

    def _log_parameter_counts(self) -> None:
        trainable, total = self.parameter_counts()
        rank_zero_info(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        )

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the wrapped model."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    # --- distillation: the teacher ---------------------------------------------------------------
    def _init_teacher(self) -> None:
        """Load, check and freeze ``--model.teacher``; kept in a plain attribute, so that it is no
        submodule: not in the state dict or checkpoints, not in DDP's parameters, not optimised."""
        hp = self.hparams
        self.__dict__["_teacher"] = None
        self._teacher_sharded = self._teacher_converted = False
        if hp.teacher is None:
            return
        source = teacher_source(hp.teacher, hp.pruned_model)
        if source == SMOLLM2:
            from lit_recover.models.gguf import convert_smollm2

            source = str(convert_smollm2())
        teacher, tokenizer, _ = self._load_base(source, hp.trust_pickle, hp.torch_dtype, hp.attn_implementation,
                                                mmap=hp.mmap_weights)
        named = hp.teacher if hp.teacher == source else f"{hp.teacher} ({source})"
        problems = teacher_mismatches(teacher, tokenizer, self.model.get_base_model(), self.tokenizer,
                                      hidden=hp.kd_hidden_weight > 0)
        if problems:
            raise TeacherMismatchError(
                f"teacher {named} does not match the student {hp.pruned_model}: {'; '.join(problems)}")
        teacher.requires_grad_(False)
        teacher.eval()
        teacher.config.use_cache = False
        self.__dict__["_teacher"] = teacher
        self.teacher_source = source
        self.val_kd = MeanMetric()
        rank_zero_info(f"distillation from {named}: kd_ratio {hp.kd_ratio}, T {hp.kd_temperature}, "
                       f"{hp.kd_loss} on {hp.kd_positions} positions, hidden weight {hp.kd_hidden_weight}")

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen teacher (``--model.teacher``), or ``None`` for plain SFT."""
        return self.__dict__.get("_teacher")

    def _place_teacher(self) -> None:
        """The teacher on the student's device and in its frozen weights' dtype: what Lightning's
        device move and ``*-true`` precision did to the student, which is all it does, since the
        teacher is no submodule. Checked at every step (cheap), so it also follows a moved module."""
        teacher = self.teacher
        first = next(teacher.parameters())
        if self._teacher_sharded:  # FSDP2: converted and moved as Lightning does the student's shards
            if not self._teacher_converted and self._trainer is not None:
                self.trainer.precision_plugin.convert_module(teacher)
                self._teacher_converted = True
            if first.device != self.device:
                teacher.to(self.device)
            return
        dtype = self.base_dtype
        if stored_dtype(teacher) != dtype or first.device != self.device:
            # normal tensors even when the first step is a validation (inference mode)
            with torch.inference_mode(False), torch.no_grad():
                cast_parameters(teacher, dtype)
                teacher.to(self.device)

    @override
    def configure_model(self) -> None:
        # FSDP2 (ModelParallelStrategy gives the module a device mesh): shard once; nothing otherwise
        if self._device_mesh is not None and self._sharded is None:
            from lit_recover.fused import unfuse_projections

            unfuse_projections(self.model)  # FSDP2 keeps each weight's shard on its own
            reshard = getattr(self._trainer.strategy, "reshard_after_forward", True) if self._trainer else True
            self._sharded = shard_lora_model(self.model, self._device_mesh, reshard_after_forward=reshard)
        if self._device_mesh is not None and self.teacher is not None and not self._teacher_sharded:
            # the teacher sharded like the student (its skeleton is not needed: it is never merged)
            reshard = getattr(self._trainer.strategy, "reshard_after_forward", True) if self._trainer else True
            shard_lora_model(self.teacher, self._device_mesh, reshard_after_forward=reshard)
            self._teacher_sharded = True

    @override
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self._place_teacher()
        trainable, total = self.parameter_counts()
        for logger in self.loggers:
            logger.log_hyperparams({"params/trainable": trainable, "params/total": total})

    # --- the step ------------------------------------------------------------------------------
    @property
    def backbone(self) -> torch.nn.Module:
        """The decoder stack (``LlamaModel``) under the PEFT wrapper."""
        return self.model.get_base_model().model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_base_model().lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits, as the merged model would give them."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def fuse_projections_now(self) -> int:
        """Fuse the frozen q/k/v and gate/up projections (``fuse_projections``) unless done, sharded
        (FSDP2) or off; called at the first step, after the strategy placed and sharded the model
        (so FSDP2 ranks never copy memory-mapped weights). Returns the groups fused now."""
        if self.__dict__.get("_fusion_done") or not self.hparams.get("fuse_projections", False):
            return 0
        self._fusion_done = True
        if self._sharded is not None:
            return 0
        from lit_recover.distributed import is_sharded
        from lit_recover.fused import fuse_projections

        if is_sharded(self.model):
            return 0
        count = fuse_projections(self.model)
        log.info("fused frozen projections: %d groups (q/k/v, gate/up)", count)
        return count

    def supervised_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean next-token NLL over supervised positions, and their count.

        The LM head and cross-entropy run only where the shifted label is not ``IGNORE_INDEX``:
        the same mean as the causal-LM loss of ``LlamaForCausalLM(labels=...)``, without
        materialising vocabulary-sized logits for prompt and padding positions.
        """
        self.fuse_projections_now()
        hidden = self.backbone(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"), use_cache=False,
        ).last_hidden_state
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        n = int(keep.sum())
        if n == 0:  # nothing supervised (every response cut off): a zero loss that keeps the graph
            return hidden.sum() * 0.0, 0
        # the loss in fp32 at least (float64 stays float64); in chunks unless off or sharded (FSDP2)
        from lit_recover.head import supervised_cross_entropy

        chunked = bool(self.hparams.get("chunked_head", True)) and self._sharded is None
        loss = supervised_cross_entropy(hidden[:, :-1][keep], self.lm_head, labels[keep], chunked=chunked)
        return loss, n

    def distill_loss(self, batch: dict[str, torch.Tensor]) -> DistillLoss:
        """The distillation objective of one micro-batch (``lit_recover.distill``) and its parts.

        The teacher runs first, under ``no_grad``, on the same inputs and positions (packed rows
        included); only its final hidden states (and, for the hidden-state loss, every layer's output
        at the distillation positions) are kept for the student's loss. The heads and the divergence
        run in position chunks, nothing vocabulary-sized kept for the backward pass
        (``lit_recover.distill.distillation_loss``).
        """
        from contextlib import nullcontext

        from lit_recover.distill import chunk_count, distillation_loss, hidden_mse, kd_mask, layer_outputs
        from lit_recover.models.anatomy import decoder_layers

        hp = self.hparams
        teacher = self.teacher
        self._place_teacher()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                  "position_ids": batch.get("position_ids"), "use_cache": False}
        labels = batch["labels"]
        mask = kd_mask(labels, batch.get("attention_mask"), batch.get("position_ids"), hp.kd_positions)
        hidden = hp.kd_hidden_weight > 0

        def at_positions(states: torch.Tensor) -> torch.Tensor:
            return states[:, :-1][mask]

        with torch.no_grad():
            with layer_outputs(decoder_layers(teacher), at_positions) if hidden else nullcontext([]) as t_layers:
                t_hidden = teacher.model(**inputs).last_hidden_state
            reshard = getattr(teacher.model, "reshard", None)
            if reshard is not None:  # FSDP2: the root's gathered weights are not kept for a backward
                reshard()
        with layer_outputs(decoder_layers(self.model)) if hidden else nullcontext([]) as s_layers:
            s_hidden = self.backbone(**inputs).last_hidden_state
        min_chunks = 0
        if self._sharded is not None:  # every head call is a collective: the same number on every rank
            rows = int(((labels[:, 1:] != IGNORE_INDEX) | mask).sum())
            local = torch.tensor(float(chunk_count(rows, int(self.lm_head.weight.shape[0]))), device=self.device)
            min_chunks = int(self.trainer.strategy.reduce(local, reduce_op="max").item())
        out = distillation_loss(s_hidden, t_hidden, self.lm_head, teacher.lm_head, labels, mask,
                                kd_ratio=hp.kd_ratio, kind=hp.kd_loss, temperature=hp.kd_temperature,
                                min_chunks=min_chunks, ignore_index=IGNORE_INDEX)
        if hidden:
            out = out.with_hidden(hidden_mse([at_positions(h) for h in s_layers], t_layers), hp.kd_hidden_weight)
        self._distilled = out
        return out

    def _distill_weighted(self, batch_idx: int) -> torch.Tensor:
        """The distillation loss to backpropagate under ``loss_weighting``: the CE part weighted by
        supervised tokens as without a teacher (``_window_weighted``), the divergence and hidden-state
        parts by distillation positions (``_kd_window_weighted``)."""
        hp = self.hparams
        out = self._distilled
        ce_part = self._window_weighted((1.0 - hp.kd_ratio) * out.ce, out.ce_count, batch_idx)
        kd_part = (hp.kd_ratio * hp.kd_temperature**2) * out.kd
        if out.hidden is not None:
            kd_part = kd_part + hp.kd_hidden_weight * out.hidden
        return ce_part + self._kd_window_weighted(kd_part, out.kd_count, batch_idx)

    def _kd_window_weighted(self, part: torch.Tensor, n: int, batch_idx: int) -> torch.Tensor:
        """``_window_weighted`` for the distillation parts: each micro-batch's mean over its ``n``
        distillation positions times ``n × k × world / N``, ``N`` the window's distillation positions
        on all ranks (counted ahead from the sampler's plan, as the supervised tokens are)."""
        if self.hparams.loss_weighting == "micro_batch_mean" or self._trainer is None:
            return part
        trainer = self.trainer
        k = int(trainer.accumulate_grad_batches)
        window = self._window_kd_positions(batch_idx)
        if window is not None:
            mine, total, world = window
            if mine != n:
                raise RuntimeError(
                    f"micro-batch {batch_idx}: {n} distillation positions, but the sampler's plan gives it {mine}; "
                    "a collator that changes the sequences needs --model.loss_weighting micro_batch_mean"
                )
        elif k == 1:
            world = int(trainer.world_size)
            total = int(trainer.strategy.reduce(torch.tensor(float(n), device=part.device), reduce_op="sum").item())
        else:
            raise LossWeightingError(
                "--model.loss_weighting tokens needs the distillation positions of a whole accumulation window "
                "ahead: a data module with a ShardedBatchSampler (train_sampler) and its train_dataset; "
                "use --model.loss_weighting micro_batch_mean with another data module"
            )
        return part * (n * k * world / max(total, 1))

    def _window_kd_positions(self, batch_idx: int) -> tuple[int, int, int] | None:
        """``(this micro-batch's distillation positions, the window's on all ranks, world size)`` from
        the sampler's plan (``_window_targets`` for the supervised tokens), or ``None`` without a plan.
        Under ``kd_positions response`` they are the supervised tokens; under ``all`` a sequence of
        ``n`` tokens gives ``n − 1`` (``lit_recover.distill.kd_mask``)."""
        from lit_recover.distill import kd_position_count

        if self.hparams.kd_positions == "response":
            return self._window_targets(batch_idx)
        return self._window_counts(batch_idx, lambda item: kd_position_count(len(item["input_ids"]), "all", 0),
                                   "_kd_window_plan")

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        self.fuse_projections_now()
        distilled = self.distill_loss(batch) if self.teacher is not None else None
        if distilled is None:
            loss, n = self.supervised_loss(batch)
            ce = loss
        else:
            loss, ce, n = distilled.loss, distilled.ce, distilled.ce_count
        self._step_targets = n
        positions = batch.get("position_ids")  # a packed row holds several sequences
        bsz = int((positions == 0).sum()) if positions is not None else batch["input_ids"].shape[0]
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
            real, squares = length_stats(batch)  # non-pad tokens (a packed row has none) and Σ length²
            self.log("train/padding_fraction", 1.0 - real / batch["input_ids"].numel(), batch_size=bsz)
            self._tokens_in_step += real
            self._progress_local["tokens"] += real
            self._progress_local["supervised_tokens"] += n
            self._flops_in_step += self.flop_model.step(real, n, squares)["total"]
            if distilled is not None:
                self.log("train/ce_loss", distilled.ce.detach(), batch_size=bsz)
                self.log("train/kd_loss", distilled.kd.detach(), batch_size=bsz)
                if distilled.hidden is not None:
                    self.log("train/hidden_loss", distilled.hidden.detach(), batch_size=bsz)
        else:
            self.val_nll.update(ce.detach(), weight=max(n, 1))
            self.log("val/loss", self.val_nll, prog_bar=True, batch_size=bsz)
            if distilled is not None:
                self.val_kd.update(distilled.kd.detach(), weight=max(distilled.kd_count, 1))
                self.log("val/kd_loss", self.val_kd, batch_size=bsz)
        return loss

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        finite = bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            # one decision for all ranks: a rank that skipped backward (or stopped) alone would leave
            # the others waiting in the gradient all-reduce
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            if self.teacher is not None:
                return self._distill_weighted(batch_idx)
            return self._window_weighted(loss, self._step_targets, batch_idx)
        if self.hparams.nonfinite_loss == "skip":
            # returning None skips backward for this micro-batch; nothing reaches the weights
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            log.warning("non-finite loss at step %d (batch %d): skipped", self.global_step, batch_idx)
            if self.trainer.world_size > 1:
                # Lightning refuses None from a distributed training step: every rank backpropagates
                # zeros instead, so the gradient all-reduce runs and adds nothing
                return sum(p.sum() * 0.0 for p in self.trainable_parameters())
            return None
        raise NonFiniteLossError(
            f"loss is {loss.item()} at optimizer step {self.global_step} (batch {batch_idx}); "
            f"last good checkpoint: {self._last_checkpoint() or 'none yet'}. "
            "Lower the learning rate, use bf16 or fp32 instead of fp16, or set --model.nonfinite_loss skip"
        )

    # --- accumulation weighting ----------------------------------------------------------------
    def _window_weighted(self, loss: torch.Tensor, n: int, batch_idx: int) -> torch.Tensor:
        """The loss to backpropagate for this micro-batch under ``loss_weighting``.

        ``tokens``: ``sum of its token NLLs × k × world / N``, where ``N`` counts the supervised
        tokens of the whole accumulation window on every rank. Lightning divides what a step returns
        by ``k`` (``accumulate_grad_batches``) and DDP/FSDP2 average gradients over ``world`` ranks,
        so the gradient applied is the window's token-weighted mean NLL: that of one batch holding
        all its micro-batches. ``micro_batch_mean``: the micro-batch mean as it is.
        """
        if self.hparams.loss_weighting == "micro_batch_mean" or self._trainer is None:
            return loss
        trainer = self.trainer
        k = int(trainer.accumulate_grad_batches)
        window = self._window_targets(batch_idx)
        if window is not None:
            mine, total, world = window
            if mine != n:
                raise RuntimeError(
                    f"micro-batch {batch_idx}: {n} supervised tokens, but the sampler's plan gives it {mine}; "
                    "a collator that changes labels needs --model.loss_weighting micro_batch_mean"
                )
        elif k == 1:  # no look-ahead needed: the window is this micro-batch on every rank
            world = int(trainer.world_size)
            total = int(trainer.strategy.reduce(torch.tensor(float(n), device=loss.device), reduce_op="sum").item())
        else:
            raise LossWeightingError(
                "--model.loss_weighting tokens needs the supervised tokens of a whole accumulation window ahead: "
                "a data module with a ShardedBatchSampler (train_sampler) and its train_dataset; "
                "use --model.loss_weighting micro_batch_mean with another data module"
            )
        return loss * (n * k * world / max(total, 1))

    def _window_targets(self, batch_idx: int) -> tuple[int, int, int] | None:
        """``(this micro-batch's supervised tokens, the window's on all ranks, world size)`` from the
        data module's batch plan, or ``None`` when the data module has none (``_window_counts``)."""
        return self._window_counts(batch_idx, lambda item: _supervised_targets(item["labels"]), "_window_plan")

    def _window_counts(self, batch_idx: int, count: Callable[[dict[str, Any]], int],
                       cache: str) -> tuple[int, int, int] | None:
        """``(count over this micro-batch's items, over the window's on all ranks, world size)`` from the
        data module's batch plan, or ``None`` when the data module has none; the window's counts are
        kept in the attribute ``cache`` until the window changes.

        Lightning steps the optimizer after every ``k`` micro-batches of an epoch and after its last
        one, so window ``w`` holds the epoch's micro-batches ``w·k … w·k + k - 1``; the sampler's plan
        gives every rank's indices of each of them, and the dataset their items.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        sampler = getattr(datamodule, "train_sampler", None)
        dataset = getattr(datamodule, "train_dataset", None)
        if sampler is None or dataset is None or not hasattr(sampler, "plan"):
            return None
        k = int(self.trainer.accumulate_grad_batches)
        world, rank = int(sampler.world_size), int(sampler.rank)
        batches = len(sampler)
        if isinstance(self.trainer.num_training_batches, int):
            batches = min(batches, self.trainer.num_training_batches)
        start = (batch_idx // k) * k
        key = (id(sampler), sampler.epoch, start)
        cached = getattr(self, cache, None)
        if cached is None or cached[0] != key:
            if self._epoch_plan is None or self._epoch_plan[0] != key[:2]:
                self._epoch_plan = (key[:2], sampler.plan(sampler.epoch))
            plan = self._epoch_plan[1]
            counts: dict[int, list[int]] = {}
            for step in range(start, min(start + k, batches)):
                per_rank = [plan[step * world + r] for r in range(world)]
                items = _items(dataset, [i for indices in per_rank for i in indices])
                values = [count(item) for item in items]
                bounds = np.cumsum([0, *map(len, per_rank)])
                counts[step] = [int(sum(values[bounds[r]:bounds[r + 1]])) for r in range(world)]
            cached = (key, counts)
            setattr(self, cache, cached)
        counts = cached[1]
        if batch_idx not in counts:
            return None
        return counts[batch_idx][rank], sum(sum(c) for c in counts.values()), world

    def _last_checkpoint(self) -> str | None:
        callback = getattr(self.trainer, "checkpoint_callback", None) if self._trainer is not None else None
        return (getattr(callback, "last_step_checkpoint", None)
                or getattr(callback, "_last_checkpoint_saved", None) or None)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        # compute() already reduces over ranks; sync_dist averages identical values (and says so)
        self.log("val/ppl", torch.exp(self.val_nll.compute()), prog_bar=True, sync_dist=True)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._step_started is None:
            self._step_started = time.perf_counter()
            self._tokens_in_step = 0
            self._flops_in_step = 0

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # non-pad tokens processed since the previous optimizer step, over the wall time it took
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            if elapsed > 0:
                self.log("train/tokens_per_sec", self._tokens_in_step / elapsed)
                peak = self.peak_flops_per_s()
                if peak:
                    self.log("train/mfu", self._flops_in_step / elapsed / peak)
        if self.hparams.get("compile"):
            self._log_compile_time()
        self._step_started = None

    def _log_compile_time(self) -> None:
        """``train/compile_s``: the seconds this process spent compiling so far; a log line when it grew."""
        from lit_recover.compiling import compile_seconds

        seconds = compile_seconds()
        self.log("train/compile_s", seconds)
        if seconds > getattr(self, "_compile_logged", 0.0) + 0.05:
            rank_zero_info(f"torch.compile: {seconds:.1f} s compiling the decoder layers so far "
                           f"(optimizer step {self.global_step + 1})")
            self._compile_logged = seconds

    @property
    def flop_model(self) -> LoRATrainingFlops:
        """The model-FLOP count of this model's training steps, read off its shapes once."""
        if self._flop_model is None:
            self._flop_model = LoRATrainingFlops.from_model(
                self.model, gradient_checkpointing=bool(self.hparams.gradient_checkpointing)
            )
        return self._flop_model

    def peak_flops_per_s(self) -> float | None:
        """What ``train/mfu`` divides by: ``peak_flops``, else this device's matmul rate at the model's
        projection shapes and a micro-batch's tokens, in the dtype the matmuls run in, measured on the
        first call (at the end of the first step, outside any timed interval) and cached per process."""
        if self._peak is None and self._tokens_in_step > 0:
            k = max(1, int(self.trainer.accumulate_grad_batches)) if self._trainer is not None else 1
            tokens = -(-max(1, self._tokens_in_step // k) // 64) * 64  # one micro-batch, rounded up to 64s
            fm = self.flop_model
            shapes = matmul_shapes(fm.layers, fm.hidden_size, max_layers=3)
            self._peak = cached_peak_flops(shapes, tokens, self._matmul_dtype(), self.device)
        return self._peak

    def _matmul_dtype(self) -> torch.dtype:
        """The dtype the frozen matmuls run in: autocast's under a mixed precision, else the weights'."""
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if precision.endswith("-mixed"):
            return torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return self.lm_head.weight.dtype

    # --- optimisation ----------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @override
    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(
                params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay,
                foreach=None,
            )
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = self.trainer.estimated_stepping_batches
            total = int(total) if math.isfinite(total) else 10**9
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, linear_warmup_decay(self.hparams.warmup_steps, total)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- outputs -------------------------------------------------------------------------------
    def gather_adapter(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP2 the full adapter tensors for ``save_adapter`` (on rank zero; ``{}`` elsewhere),
        else ``None``. A collective under FSDP2: call it on every rank."""
        return gather_trainable(self.model) if self._sharded is not None else None

    def save_adapter(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the LoRA adapter with PEFT's ``save_pretrained`` (``PeftModel.from_pretrained`` reads it).

        Under FSDP2 pass ``state_dict=self.gather_adapter()`` (gathered on every rank first).
        """
        self.model.save_pretrained(path, state_dict=state_dict)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set this rank's LoRA tensors from a PEFT adapter state dict (the keys of
        ``adapter_model.safetensors``, as ``save_adapter`` writes them).

        Every rank passes the full tensors; under FSDP2 each keeps its own shard of them. Every
        adapter tensor must be present with its shape.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        names = {n: _adapter_key(n, self.model) for n in params}
        missing = sorted(key for key in names.values() if key not in state)
        if missing:
            raise ValueError(f"adapter lacks {len(missing)} of {len(names)} LoRA tensors (e.g. {missing[0]})")
        with torch.no_grad():
            for name, p in params.items():
                full = state[names[name]]
                if tuple(full.shape) != tuple(p.shape):
                    raise ValueError(f"{names[name]}: shape {tuple(full.shape)}, the model has {tuple(p.shape)}")
                if isinstance(p, DTensor):
                    full = full.to(device=p.device_mesh.device_type, dtype=p.dtype)
                    p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
                else:
                    p.copy_(full.to(device=p.device, dtype=p.dtype))

    def merged_model(self) -> torch.nn.Module | None:
        """Fold the LoRA weights into the base weights and return the plain model, in the stored dtype.

        Each merged weight is ``(W.float() + B @ A * scaling).to(stored dtype)``: the sum in float32
        at least, rounded once. ``W`` is the weight as the file holds it: when the base ran in a dtype
        that cannot hold every stored value (float16 or float32 weights trained as bfloat16 on a CPU),
        the model is read again from ``pruned_model`` and the adapter merged into that, so the written
        model is the input plus the adapter, not a bfloat16 rounding of it.

        Done in place where the base is reused: afterwards this module holds no adapter any more (the
        end of fit is the place). The model stays on the device it trained on; :meth:`for_evaluation`
        gives it the training dtype again after it is saved. Under FSDP2 a collective (call it on
        every rank): the merged model on rank zero (on the CPU), ``None`` on the other ranks.
        """
        from lit_recover.fused import unfuse_projections
        from lit_recover.hardware import is_lossless

        unfuse_projections(self.model)  # separate weights again: merged, saved and pickled as without fusion
        self._trained_dtype = self.base_dtype
        exact = is_lossless(self.stored_dtype, self._trained_dtype)
        if self._sharded is not None:
            if exact:
                merged = gather_merged(self.model, self._sharded)
                if merged is None:
                    return None
                if self.hparams.gradient_checkpointing:
                    _drop_checkpointing_settings(merged)  # the skeleton copied the hooks, which do not pickle
                return cast_parameters(merged, self.stored_dtype)
            tensors = gather_trainable(self.model)  # a collective; the full adapter on rank zero
            return self._merge_into_reloaded(tensors) if tensors else None
        if not exact:
            tensors = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
            return self._merge_into_reloaded(tensors)
        deltas = self._lora_deltas()
        with torch.no_grad():
            for name, module in self._lora_layers():
                weight = module.get_base_layer().weight
                weight.data = _merge(weight, deltas[name], self.stored_dtype)
        merged = self.model.unload()
        cast_parameters(merged, self.stored_dtype)  # exact: the base dtype holds every stored value
        if self.hparams.gradient_checkpointing:
            _drop_checkpointing_settings(merged)
        return merged

    def for_evaluation(self, merged: torch.nn.Module) -> torch.nn.Module:
        """The merged model (after it is written) in the dtype and on the device the base trained in:
        what the evaluation measures and records. Cast in place."""
        return cast_parameters(merged, getattr(self, "_trained_dtype", None) or self.base_dtype).to(self.device)

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the frozen base weights compute in (Lightning's ``*-true`` precisions cast them)."""
        counts: dict[torch.dtype, int] = {}
        for p in self.model.parameters():
            if not p.requires_grad and p.is_floating_point():
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
        return max(counts, key=counts.get) if counts else torch.float32

    def _lora_layers(self) -> Iterable[tuple[str, torch.nn.Module]]:
        from peft.tuners.lora.layer import LoraLayer

        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def _lora_deltas(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{LoRA layer name: B @ A * scaling in float32}``, from the layers or from full ``tensors``
        (parameter name → tensor, as ``gather_trainable`` gives them)."""
        from peft.tuners.lora.layer import Linear as LoraLinear

        out: dict[str, torch.Tensor] = {}
        for name, module in self._lora_layers():
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if len(adapters) != 1 or adapters[0] in getattr(module, "lora_variant", {}) or module.merged:
                raise RuntimeError(f"{name}: only one plain, unmerged LoRA adapter per layer can be merged here")
            adapter = adapters[0]
            if tensors is None:
                out[name] = _at_least_fp32(module.get_delta_weight(adapter))
                continue
            if type(module) is not LoraLinear:
                raise RuntimeError(f"{name}: a {type(module).__name__} adapter cannot be merged from gathered tensors")
            a = _at_least_fp32(tensors[f"{name}.lora_A.{adapter}.weight"])
            b = _at_least_fp32(tensors[f"{name}.lora_B.{adapter}.weight"])
            delta = (b @ a) * module.scaling[adapter]
            out[name] = delta.T if module.fan_in_fan_out else delta
        return out

    def _merge_into_reloaded(self, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The model read again from ``pruned_model`` in its stored dtype (on the CPU), the adapter in
        ``tensors`` merged into it."""
        hp = self.hparams
        deltas = self._lora_deltas(tensors)
        log.info("merging the adapter into %s as stored (%s): the base trained in %s",
                 hp.pruned_model, self.stored_dtype, self.base_dtype)
        kwargs: dict[str, Any] = {"check": False, "trust_pickle": True} if hp.trust_pickle else {"check": False}
        model, _ = load_pruned(hp.pruned_model, **kwargs)
        if stored_dtype(model) != self.stored_dtype:
            raise RuntimeError(f"{hp.pruned_model} changed during training: it now holds {stored_dtype(model)} "
                               f"weights, not {self.stored_dtype}")
        if hp.attn_implementation is not None:
            model.config._attn_implementation = hp.attn_implementation
        prefix = "base_model.model."
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = model.get_submodule(name.removeprefix(prefix)).weight
                if tuple(weight.shape) != tuple(delta.shape):
                    raise RuntimeError(f"{hp.pruned_model} changed during training: {name} is {list(weight.shape)}")
                weight.data = _merge(weight, delta, weight.dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    # --- checkpoints: the adapter, not the frozen base ----------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in self._trainable_names()
        }
        # RNG states, so that dropout after a resume draws what the uninterrupted run drew
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
        }
        # wall time and tokens so far (all ranks), so that a resumed run reports the whole run's
        checkpoint["training_progress"] = self.training_progress()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self._trainable_names() - set(checkpoint.get("state_dict", {}))
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} adapter tensors (e.g. {sorted(missing)[0]}): "
                "was it written with other LoRA settings?"
            )
        self._resume_data_order(checkpoint)
        # Applied in on_train_start: creating the dataloader iterator draws from the global RNG,
        # and on resume that happens after this hook.
        self._rng_to_restore = checkpoint.get("rng_states")
        progress = checkpoint.get("training_progress") or {}
        self._progress_offset = {"tokens": int(progress.get("tokens", 0)),
                                 "supervised_tokens": int(progress.get("supervised_tokens", 0)),
                                 "seconds": float(progress.get("seconds", 0.0))}
        self._progress_local = {"tokens": 0, "supervised_tokens": 0}

    @override
    def on_train_start(self) -> None:
        rng, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self._train_clock = time.perf_counter()

    @override
    def on_train_end(self) -> None:
        # a collective under DDP/FSDP2 (every rank ends training here); RecoveryOutputs records it
        self.training_summary = self.training_summary_now()
        teacher = self.teacher
        if teacher is not None and not self._teacher_sharded and next(teacher.parameters()).device.type != "cpu":
            # off the accelerator before the end-of-fit merge and evaluation, whose memory peaks it
            # would otherwise inflate (a later step moves it back: _place_teacher)
            teacher.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def training_progress(self) -> dict[str, Any]:
        """``{"tokens", "supervised_tokens", "seconds"}`` trained so far, resumed runs included: the
        non-pad and the supervised tokens of every training micro-batch on all ranks (a collective
        when a trainer with several ranks is attached: call it on every rank), and the seconds of the
        training loop on this rank's clock (validation inside it included, model loading and the
        end-of-fit evaluation not)."""
        local = [self._progress_local["tokens"], self._progress_local["supervised_tokens"]]
        if self._trainer is not None and int(self.trainer.world_size) > 1:
            summed = self.trainer.strategy.reduce(torch.tensor(local, dtype=torch.float64, device=self.device),
                                                  reduce_op="sum")
            local = [int(round(float(v))) for v in summed.tolist()]
        seconds = self._progress_offset["seconds"]
        if self._train_clock is not None:
            seconds += time.perf_counter() - self._train_clock
        return {"tokens": self._progress_offset["tokens"] + int(local[0]),
                "supervised_tokens": self._progress_offset["supervised_tokens"] + int(local[1]),
                "seconds": seconds}

    def training_summary_now(self) -> dict[str, Any]:
        """What the results JSON records of this fit (``lit_recover.evaluation.report.training_record``'s
        arguments): :meth:`training_progress`, the optimizer steps, the budget that stopped it, the recipe."""
        from lightning.pytorch.callbacks import Timer

        progress = self.training_progress()
        trainer = self.trainer
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        budget = getattr(timer, "_duration", None) if timer is not None else None
        max_steps = int(trainer.max_steps) if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        if timer is not None and budget is not None and timer.time_remaining("train") is not None \
                and timer.time_remaining("train") <= 0:
            stopped_by = "max_time"
        elif max_steps is not None and trainer.global_step >= max_steps:
            stopped_by = "max_steps"
        elif trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
            stopped_by = "max_epochs"
        else:
            stopped_by = "other"  # a callback or an interrupt
        hp = self.hparams
        recipe: dict[str, Any] = {"objective": "distillation" if self.teacher is not None else "sft",
                                  "learning_rate": hp.learning_rate, "lora_r": hp.lora_r}
        if self.teacher is not None:
            recipe.update(teacher=hp.teacher, teacher_source=self.teacher_source, kd_ratio=hp.kd_ratio,
                          kd_temperature=hp.kd_temperature, kd_loss=hp.kd_loss, kd_positions=hp.kd_positions,
                          kd_hidden_weight=hp.kd_hidden_weight)
        return {"seconds": progress["seconds"], "steps": int(trainer.global_step), "tokens": progress["tokens"],
                "supervised_tokens": progress["supervised_tokens"],
                "max_time_s": float(budget) if budget is not None else None, "max_steps": max_steps,
                "world_size": int(trainer.world_size), "stopped_by": stopped_by, "recipe": recipe}

    def _resume_data_order(self, checkpoint: dict[str, Any]) -> None:
        """Tell the data module where in which epoch the checkpointed run stopped.

        ``processed`` counts the micro-batches whose training step ran in the current epoch (Lightning
        prefetches one batch ahead, so counting what the loader yielded would be off by one).
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "resume_from"):
            return
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        consumed = int(progress.get("current", {}).get("processed", 0))
        datamodule.resume_from(int(checkpoint.get("epoch", 0)), consumed)

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}
