"""``RecoveryCLI``: LightningCLI with the recovery job's top-level options.

Top-level keys (beside ``model``, ``data`` and ``trainer``): ``output_dir``, ``overwrite``,
``skip_evaluation``, ``before_metrics``, ``evaluation``, ``wandb_project``, ``eval_steps``, ``save_steps``,
``save_total_limit``, ``keep_last``. Derived
for you: gradient accumulation (``batch_size / (micro_batch_size × world size)``), precision and
the frozen base's dtype (:func:`default_precision`, :func:`default_torch_dtype`: a bfloat16 base
without autocast on CPUs with native bf16, float32 on other CPUs, the stored dtype under a matching
autocast on CUDA), the logger, the checkpoint and end-of-fit
callbacks, and ``--ckpt_path`` (``last``, a ``checkpoint-<step>`` folder, or a ``.ckpt`` file).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

from lit_recover.callbacks import RecoveryCheckpoint, RecoveryOutputs
from lit_recover.data import AlpacaDataModule
from lit_recover.errors import ConfigError, exit_on_user_error
from lit_recover.module import LoRARecoveryModule
from lit_recover.outputs import CONFIG_FILE, RunFolder, resolve_checkpoint, write_text

log = logging.getLogger(__name__)


def default_output_dir(pruned_model: str) -> str:
    """``results/<folder of the pruned model>_finetuned`` (LLM-Pruner keeps models in ``prune_log/<name>/``)."""
    p = Path(pruned_model)
    name = p.name if p.is_dir() or p.suffix == "" else p.parent.name
    name = name or p.stem
    return str(Path("results") / f"{name.replace('/', '_')}_finetuned")


def world_size(trainer_cfg: Any) -> int:
    """Processes of the run: devices per node × nodes, resolving ``auto`` like Lightning does."""
    devices = trainer_cfg.get("devices", "auto")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif str(devices).strip() not in ("auto", "-1"):  # an int from YAML or a string from the command line
        text = str(devices)
        per_node = len([d for d in text.split(",") if d.strip()]) if "," in text else int(text)
    elif accelerator in ("cpu",) or not torch.cuda.is_available():
        per_node = 1
    else:
        per_node = torch.cuda.device_count()
    return max(1, int(per_node)) * max(1, int(trainer_cfg.get("num_nodes", 1) or 1))


def gradient_accumulation(batch_size: int, micro_batch_size: int, world: int) -> int:
    """``batch_size / (micro_batch_size × world)``; an error when it does not divide."""
    per_step = micro_batch_size * world
    if batch_size % per_step:
        raise ConfigError(
            f"data.batch_size {batch_size} is not a multiple of data.micro_batch_size {micro_batch_size} "
            f"× world size {world} = {per_step}"
        )
    return batch_size // per_step


def check_step_intervals(eval_steps: int, save_steps: int, validation: bool) -> None:
    """Both at least 1; with validation, checkpoints are taken at validated steps, so ``save_steps``
    is a multiple of ``eval_steps`` (the Trainer's rule for ``load_best_model_at_end``)."""
    if eval_steps < 1 or save_steps < 1:
        raise ConfigError(f"eval_steps {eval_steps} and save_steps {save_steps} must be at least 1")
    if validation and save_steps % eval_steps:
        raise ConfigError(
            f"save_steps {save_steps} is not a multiple of eval_steps {eval_steps}: checkpoints are taken at "
            "validated steps (set --eval_steps to a divisor of --save_steps, or --data.val_set_size 0)"
        )


def _on_cuda(accelerator: str) -> bool:
    return accelerator != "cpu" and torch.cuda.is_available()


def default_precision(accelerator: str, base: torch.dtype | None = None) -> str:
    """``--trainer.precision`` when it is not given, for a frozen base computing in ``base``.

    CPU: ``32-true`` (no autocast); the base's dtype (:func:`default_torch_dtype`) brings bfloat16
    where the CPU computes in it. CUDA: the autocast that matches the base: ``16-mixed`` (with its
    loss scale) for a float16 base, else ``bf16-mixed`` where the GPU has bfloat16, else ``16-mixed``.
    """
    if _on_cuda(accelerator):
        if base == torch.float16 or not torch.cuda.is_bf16_supported():
            return "16-mixed"
        return "bf16-mixed"
    return "32-true"


def default_torch_dtype(accelerator: str) -> str:
    """``--model.torch_dtype`` when neither it nor ``--trainer.precision`` is given.

    CUDA: ``auto`` (the stored dtype, which the GPU computes in; bfloat16 becomes float32 on GPUs
    without it). CPU: ``bfloat16`` where the CPU has native bf16 math (AVX512-BF16, AMX-BF16:
    ``lit_recover.hardware``), the LoRA weights, their optimizer state and the loss staying float32;
    ``float32`` elsewhere, where bfloat16 is emulated and slower than float32.
    """
    if _on_cuda(accelerator):
        return "auto"
    from lit_recover.hardware import cpu_native_bf16

    return "bfloat16" if cpu_native_bf16() else "float32"


# What a fit writes beyond the tensors, per file or folder (measured on the tiny model, rounded up):
# zip entry headers and 64-byte alignment of torch.save, safetensors' JSON header, per tensor; the
# trainer state's loop, scheduler and RNG records; PEFT's adapter_config.json and model card.
_TENSOR_OVERHEAD = 256  # torch.save of a state dict; safetensors takes about half
_PICKLED_TENSOR_OVERHEAD = 832  # a pickled model: the tensor's zip entry and the module holding it
_CHECKPOINT_OVERHEAD = 48 * 1024
_ADAPTER_FILES = 8 * 1024
_FOLDER_FILES = 8 * 1024
_RUN_FILES = 16 * 1024  # config.yaml, CSV logs


def _tokenizer_bytes(tokenizer: Any) -> tuple[int, int]:
    """``(pickled, files)``: the tokenizer's size inside a pickle and as ``save_pretrained`` files."""
    import pickle
    import tempfile

    try:
        pickled = len(pickle.dumps(tokenizer, protocol=2))
    except Exception:  # a tokenizer that does not pickle fails at saving anyway
        pickled = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return pickled, files


def estimate_output_bytes(module: LoRARecoveryModule, save_total_limit: int,
                          pickle_free: bool = True) -> dict[str, int]:
    """Bytes a fit of ``module`` writes into its output_dir, by part, and their ``total``.

    The merged pickle and the pickle-free folder hold every base parameter (a tied embedding once)
    in the stored dtype, plus the tokenizer; the adapter its LoRA weights in float32; each step
    checkpoint (``save_total_limit`` of them and ``checkpoint-last``) the LoRA weights twice (trainer
    state and adapter files) and AdamW's two moments, all float32.
    """
    base = module.model.get_base_model()
    stored = torch.empty((), dtype=module.stored_dtype).element_size()
    seen: set[int] = set()
    frozen = tensors = 0
    for p in base.parameters():
        if not p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            frozen += p.numel()
            tensors += 1
    buffers = sum(b.numel() * b.element_size() for b in base.buffers())
    lora = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    lora_tensors = sum(1 for p in module.model.parameters() if p.requires_grad)
    pickled_tok, tok_files = _tokenizer_bytes(module.tokenizer)
    weights = frozen * stored
    parts = {
        "merged_pickle": weights + tensors * _PICKLED_TENSOR_OVERHEAD + buffers + pickled_tok,
        "merged_folder": (weights + tensors * _TENSOR_OVERHEAD // 2 + tok_files + _FOLDER_FILES) if pickle_free else 0,
        "adapter": lora * 4 + lora_tensors * _TENSOR_OVERHEAD + tok_files + _ADAPTER_FILES,
        "checkpoints": (max(save_total_limit, 0) + 1) * (
            16 * lora + 4 * lora_tensors * _TENSOR_OVERHEAD + _CHECKPOINT_OVERHEAD + _ADAPTER_FILES),
        "run_files": _RUN_FILES,
    }
    parts["total"] = sum(parts.values())
    return parts


class OutputDirConfig(SaveConfigCallback):
    """Save the resolved config as ``<output_dir>/config.yaml`` (rank zero)."""

    def __init__(self, parser, config, output_dir: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("config_filename", CONFIG_FILE)
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self.output_dir = output_dir

    @override
    def save_config(self, trainer, pl_module, stage: str) -> None:
        # one file, written atomically (the resolved config, every value spelled out)
        path = Path(self.output_dir or trainer.default_root_dir) / self.config_filename
        write_text(path, self.parser.dump(self.config, skip_unset=False))


class RecoveryCLI(LightningCLI):
    """The recovery job's command line (``python main.py fit|validate …``)."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("auto_configure_optimizers", False)  # the module's --model.optimizer covers it
        kwargs.setdefault("trainer_defaults", {"max_epochs": 2})
        kwargs.setdefault("save_config_callback", OutputDirConfig)
        kwargs["parser_kwargs"] = _raising_parsers(kwargs.get("parser_kwargs"))
        super().__init__(LoRARecoveryModule, AlpacaDataModule, args=args, run=run, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None,
                            help="Where outputs go (default results/<folder of the pruned model>_finetuned).")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Allow an output_dir that already holds results.")
        parser.add_argument("--skip_evaluation", type=bool, default=False,
                            help="Skip the end-of-fit evaluation suite.")
        parser.add_argument("--before_metrics", type=list[str] | None, default=None,
                            help="Metrics of the pruned model measured before training (default [ppl]; [] for none).")
        parser.add_argument("--wandb_project", type=str | None, default=None,
                            help="Log to Weights & Biases under this project (offline without credentials).")
        parser.add_argument("--eval_steps", type=int, default=100,
                            help="Validate every N optimizer steps (when there are validation records).")
        parser.add_argument("--save_steps", type=int, default=200,
                            help="Checkpoint every N optimizer steps; with validation a multiple of eval_steps.")
        parser.add_argument("--save_total_limit", type=int, default=3,
                            help="Keep this many step checkpoints (the best by val/loss, else the newest).")
        parser.add_argument("--keep_last", type=bool, default=False,
                            help="Write the last step's adapter, not the checkpoint with the best val/loss.")
        try:
            from lit_recover.evaluation import EvalConfig
        except ImportError:  # evaluation extras absent
            pass
        else:
            parser.add_class_arguments(EvalConfig, "evaluation")
        parser.link_arguments("model", "data.tokenizer", compute_fn=lambda m: m.tokenizer, apply_on="instantiate")

    # --- config resolution, before anything heavy is loaded -----------------------------------
    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        cfg = self._cfg()
        if cfg.get("output_dir") is None and cfg.model.get("pruned_model"):
            cfg.output_dir = default_output_dir(cfg.model.pruned_model)
        if cfg.get("ckpt_path"):
            try:
                cfg.ckpt_path = resolve_checkpoint(cfg.ckpt_path, cfg.get("output_dir"))
            except FileNotFoundError as exc:
                raise ConfigError(str(exc)) from exc
        self._check_inputs(cfg)  # seconds, before the seed is set and the model (minutes for a 7B pickle) loads

    def _cfg(self) -> Any:
        """The namespace of the running subcommand (or the whole config with ``run=False``)."""
        sub = self.config.get("subcommand")
        return self.config[sub] if sub else self.config

    @override
    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self._cfg()
        trainer = cfg.trainer
        accelerator = str(trainer.get("accelerator") or "auto")
        self._precision_defaulted = trainer.get("precision") is None
        if self._precision_defaulted:
            trainer.precision = default_precision(accelerator)
            if cfg.model.get("torch_dtype") is None:
                # an explicit precision means what it says (a float32 base unless torch_dtype is given)
                cfg.model.torch_dtype = default_torch_dtype(accelerator)
        world = world_size(trainer)
        trainer.accumulate_grad_batches = gradient_accumulation(
            cfg.data.batch_size, cfg.data.micro_batch_size, world
        )
        if cfg.get("output_dir") is None:
            raise ConfigError("set --model.pruned_model (or --output_dir)")
        out = Path(cfg.output_dir)
        trainer.default_root_dir = str(out)
        if trainer.get("logger") in (None, True):
            trainer.logger = self._logger_config(cfg, out)
        validation = bool(cfg.data.get("val_set_size", 0))
        check_step_intervals(cfg.get("eval_steps", 100), cfg.save_steps, validation)
        if validation and trainer.get("val_check_interval") is None:
            # validate every eval_steps optimizer steps, across epoch boundaries; checkpoints are taken
            # at the validations of every save_steps-th step
            trainer.val_check_interval = cfg.get("eval_steps", 100) * trainer.accumulate_grad_batches
            trainer.check_val_every_n_epoch = None
        if sub == "fit":
            self._check_output_dir(cfg, out)
        trainer.use_distributed_sampler = False  # the data module shards by rank itself

    @staticmethod
    def _check_inputs(cfg: Any) -> None:
        """Before any model is loaded: the pruned model and the teacher (local paths; ``auto``: its
        pruning report and the base it names) exist, the distillation numbers are usable, the data file
        exists and parses."""
        from lit_recover.data.records import is_local_path, load_records
        from lit_recover.module import SMOLLM2, check_distillation_settings, teacher_source

        model_path = cfg.model.get("pruned_model")
        if model_path and _is_local_model_path(model_path) and not Path(model_path).exists():
            raise ConfigError(f"{model_path}: no such file or folder (--model.pruned_model)")
        teacher = cfg.model.get("teacher")
        if teacher:
            check_distillation_settings(cfg.model.get("kd_ratio", 0.5), cfg.model.get("kd_temperature", 1.0),
                                        cfg.model.get("kd_hidden_weight", 0.0))
            source = teacher_source(teacher, model_path) if model_path else teacher
            if source != SMOLLM2 and _is_local_model_path(source) and not Path(source).exists():
                named = "" if source == teacher else f" (the base recorded for {model_path})"
                raise ConfigError(f"{source}: no such file or folder (--model.teacher{named})")
        data = cfg.get("data") or {}
        data_path = data.get("data_path")
        if data_path and is_local_path(data_path):
            # every record read and checked now: a bad one is named before the model load, not after
            load_records(data_path, skip_bad_records=bool(data.get("skip_bad_records")),
                         max_records=data.get("max_records"))

    @staticmethod
    def _logger_config(cfg: Any, out: Path) -> dict[str, Any]:
        if cfg.get("wandb_project"):
            offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not (
                os.environ.get("WANDB_API_KEY") or Path.home().joinpath(".netrc").exists()
            )
            return {"class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": cfg.wandb_project, "save_dir": str(out), "offline": offline}}
        return {"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out), "name": "logs"}}

    @staticmethod
    def _check_output_dir(cfg: Any, out: Path) -> None:
        """Refuse to clobber results; report an unwritable folder or a full disk before training."""
        existing = RunFolder(out).existing_results()
        if existing and not cfg.get("overwrite") and not cfg.get("ckpt_path"):
            raise ConfigError(
                f"{out}: already holds results ({', '.join(existing)}); pass --overwrite true, "
                "--ckpt_path last to resume, or another --output_dir"
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"{out}: output_dir is not writable ({exc.strerror or exc})") from exc
        model_path = Path(cfg.model.pruned_model)
        if model_path.is_file():
            # before the model is loaded: the merged pickle alone is about the input's size (same
            # dtype); the full count follows once the model is loaded (check_disk)
            need = model_path.stat().st_size
            free = shutil.disk_usage(out).free
            if free < need:
                raise ConfigError(
                    f"{out}: {free / 2**20:.0f} MiB free, the merged model alone needs about {need / 2**20:.0f} MiB"
                )

    @staticmethod
    def check_disk(out: Path, module: LoRARecoveryModule, save_total_limit: int) -> dict[str, int]:
        """Once the model is loaded: free disk for everything the fit writes (:func:`estimate_output_bytes`),
        plus one checkpoint being written while the others still exist."""
        parts = estimate_output_bytes(module, save_total_limit)
        in_flight = parts["checkpoints"] // (max(save_total_limit, 0) + 1)
        free = shutil.disk_usage(out).free
        need = parts["total"] + in_flight  # files are replaced through temporary copies: count them whole
        if free < need:
            detail = ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.1f}" for k, v in parts.items() if k != "total")
            raise ConfigError(
                f"{out}: {free / 2**20:.0f} MiB free, the run writes about {need / 2**20:.0f} MiB ({detail} MiB)"
            )
        return parts

    # --- trainer ---------------------------------------------------------------------------------
    @override
    def instantiate_trainer(self, **kwargs: Any):
        cfg = self._cfg()
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if getattr(self, "_precision_defaulted", False) and isinstance(self.model, LoRARecoveryModule):
            # on CUDA the autocast follows the dtype the base was loaded in (16-mixed for float16)
            precision = default_precision(str(cfg.trainer.get("accelerator") or "auto"), self.model.base_dtype)
            trainer_cfg["precision"] = cfg.trainer.precision = precision
        if self.subcommand == "fit":
            if isinstance(self.model, LoRARecoveryModule):
                self.check_disk(Path(cfg.output_dir), self.model, cfg.save_total_limit)
            validation = bool(cfg.data.get("val_set_size", 0))
            callbacks.append(RecoveryCheckpoint(
                dirpath=cfg.output_dir, save_steps=cfg.save_steps, save_top_k=cfg.save_total_limit,
                validation=validation,
            ))
            callbacks.append(RecoveryOutputs(
                output_dir=cfg.output_dir,
                skip_evaluation=cfg.skip_evaluation,
                evaluation=self._get(self.config_init, "evaluation"),
                before_metrics=cfg.get("before_metrics"),
                keep_last=bool(cfg.get("keep_last", False)),
            ))
            if trainer_cfg.get("logger"):
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        trainer_cfg["callbacks"] = callbacks
        self.save_config_kwargs = {**self.save_config_kwargs, "output_dir": cfg.get("output_dir")}
        return super().instantiate_trainer(**kwargs)


_MODEL_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _is_local_model_path(path: str) -> bool:
    """Whether ``--model.pruned_model`` names a local file or folder rather than a hub id (``org/name``).

    The loader's rule: what exists, a pickle suffix, an absolute or ``.``-relative path; and a path
    of more than two parts, which no hub id has.
    """
    p = Path(path)
    return (p.exists() or p.suffix in _MODEL_SUFFIXES or p.is_absolute() or path.startswith((".", "~"))
            or len(p.parts) > 2)


def _raising_parsers(parser_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``parser_kwargs`` with ``exit_on_error=False`` for the main parser and each subcommand's.

    A bad flag or value then raises jsonargparse's ``ArgumentError``, which
    :func:`lit_recover.errors.exit_on_user_error` prints as one line (exit status 2) instead of the usage text.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (parser_kwargs or {}).items()}
    out.setdefault("exit_on_error", False)
    for sub in LightningCLI.subcommands():
        out.setdefault(sub, {}).setdefault("exit_on_error", False)
    return out


def run_cli(args: Any = None) -> RecoveryCLI | None:
    """Run the CLI (``python main.py fit …``, ``lit-recover fit …``); a user or usage error ends with one line.

    ``args`` given (tests, the demo, ``lit-recover``'s own dispatch) replaces ``sys.argv``, as intended:
    LightningCLI's warning about having both is not shown.
    """
    import warnings

    with warnings.catch_warnings():
        if args is not None:
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return exit_on_user_error(RecoveryCLI, args=args)
