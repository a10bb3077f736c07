"""Scale-out on Lightning's engine: FSDP2 sharding of the LoRA model, gathering it back, rank helpers.

DDP needs nothing from this module (``--trainer.strategy ddp``). FSDP2 does:

- ``FSDP2Strategy`` (also ``--trainer.strategy fsdp2``): Lightning's ``ModelParallelStrategy`` set
  up for plain fully sharded data parallelism over every process of every node, whose checkpoints
  hold only the trainable (LoRA) tensors and their optimizer state, sharded or full, and resume.
- ``shard_lora_model``: ``fully_shard`` on each decoder layer, on the final norm together with the
  LM head, then on the decoder stack as the root; called from ``LoRARecoveryModule.configure_model``.
- ``gather_trainable`` / ``gather_merged``: the full adapter, and the merged model as a plain
  (unsharded, picklable) module, on rank zero, for the files written at the end of fit.
- ``rank_and_world`` and ``wait_for_rank_zero``: which process this is, and a barrier that
  outlasts the slow work rank zero does alone (saving a 13 GB pickle, the evaluation suite).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from typing_extensions import override

from lit_recover.models.anatomy import decoder_layers

log = logging.getLogger(__name__)

# How long the other ranks wait for rank zero's end-of-fit work; the process group's default
# (30 min) is shorter than the evaluation suite on a 7B model, and a timed-out NCCL barrier
# aborts the whole job, rank zero included.
RANK_ZERO_WAIT = timedelta(hours=24)


# --- ranks ------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """``(global rank, world size)`` of this process: from the process group once it exists, else
    from the launcher's environment (``RANK``/``WORLD_SIZE``, SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``),
    else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


def is_rank_zero() -> bool:
    """Whether this process is global rank zero (the one that writes files)."""
    return rank_and_world()[0] == 0


_long_wait_group: Any = None


def wait_for_rank_zero(name: str = "rank-zero") -> None:
    """A barrier over all ranks with a timeout of ``RANK_ZERO_WAIT``; a no-op without a process group.

    Uses a gloo group of its own, so that waiting ranks neither hold a GPU stream nor trip the NCCL
    watchdog while rank zero saves and evaluates. Every rank must call it at the same point.
    """
    global _long_wait_group
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if _long_wait_group is None:
        _long_wait_group = dist.new_group(backend="gloo", timeout=RANK_ZERO_WAIT)
    log.debug("waiting at %s", name)
    dist.barrier(group=_long_wait_group)


# --- sharding -----------------------------------------------------------------------------------------
@dataclass
class ShardedModel:
    """What ``shard_lora_model`` leaves behind besides the sharded parameters.

    Attributes:
        skeleton: a copy of the model taken before sharding, with every parameter on the meta device
            (no memory): the plain module classes the merged model is rebuilt into at the end of fit.
        mesh: the one-dimensional data-parallel device mesh the parameters are sharded over.
    """

    skeleton: nn.Module | None
    mesh: Any


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters live on the meta device; buffers (rotary tables) are copied."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The ``…ForCausalLM`` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shard_lora_model(model: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> ShardedModel:
    """Shard a (PEFT-wrapped) causal LM with FSDP2 over ``mesh``, in place.

    Units, each all-gathered just before it runs: every decoder layer (with its LoRA tensors: FSDP2
    keeps the frozen base weights and the trainable adapter side by side and reduces gradients only
    for the latter); the final norm together with the LM head (the training step calls the head on
    the supervised positions only, after the decoder stack returned); and the decoder stack
    (``…Model``: the embeddings) as the root, whose forward runs first in every step.

    Args:
        model: the PEFT-wrapped model (``PeftModel``) or a plain ``…ForCausalLM``.
        mesh: a device mesh; a two-dimensional one from ``ModelParallelStrategy`` must have a tensor
            parallel size of 1 and is reduced to its ``data_parallel`` dimension.
        reshard_after_forward: free each layer's gathered weights after its forward (less memory,
            one more all-gather per layer in the backward pass).
    """
    from torch.distributed.fsdp import fully_shard

    if mesh.ndim > 1:
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"tensor_parallel_size {mesh['tensor_parallel'].size()}: LoRA recovery shards with FSDP2 "
                "only; use lit_recover.distributed.FSDP2Strategy (tensor parallel size 1)"
            )
        mesh = mesh["data_parallel"]
    skeleton = _meta_copy(model)
    lm = _causal_lm(model)
    backbone = lm.model
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard([backbone.norm, lm.lm_head], mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(backbone, mesh=mesh, reshard_after_forward=reshard_after_forward)
    log.info("FSDP2: %d decoder layers sharded over %d ranks", len(decoder_layers(lm)), mesh.size())
    return ShardedModel(skeleton=skeleton, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


# --- gathering ----------------------------------------------------------------------------------------
def _full_cpu(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()  # a collective: every rank must come here in the same order
    return tensor.detach().to("cpu", copy=True) if keep else None


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable tensors of ``model`` by parameter name, on CPU, on rank zero (``{}`` elsewhere).

    A collective under FSDP2: call it on every rank.
    """
    keep = is_rank_zero()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = _full_cpu(p, keep)
            if t is not None:
                out[name] = t
    return out


def gather_merged(model: nn.Module, sharded: ShardedModel) -> nn.Module | None:
    """Gather the sharded PEFT model into its skeleton and merge the adapter; the merged plain model
    on rank zero (on CPU), ``None`` on the other ranks.

    A collective: call it on every rank. Rank zero holds the whole model in CPU memory afterwards
    (as the single-device merge would). The skeleton is used up: call it once.
    """
    if sharded.skeleton is None:
        raise RuntimeError("the sharded model was gathered already: the merge happens once, at the end of fit")
    keep = is_rank_zero()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = _full_cpu(tensor, keep)
        if t is not None:
            state[name] = t
    skeleton, sharded.skeleton = sharded.skeleton, None
    if not keep:
        return None
    skeleton.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"gathering the sharded model left {len(still_meta)} tensors empty (e.g. {still_meta[0]})")
    merged = skeleton.merge_and_unload() if hasattr(skeleton, "merge_and_unload") else skeleton
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


# --- the strategy ---------------------------------------------------------------------------------------
class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes of all nodes through Lightning's ``ModelParallelStrategy``.

    The model is sharded by ``LoRARecoveryModule.configure_model`` (``shard_lora_model``). The
    frozen base weights come from the pruned model file and are never written to or read from a
    checkpoint: checkpoints hold the trainable tensors, their optimizer state and the loop state.

    Args:
        save_distributed_checkpoint: ``True``: each rank writes its shard, the checkpoint is a folder
            (``checkpoint-<step>/lightning.ckpt/``) and resuming needs the same number of ranks or a
            reshard by ``torch.distributed.checkpoint``; ``False``: rank zero gathers and writes one
            file (the adapter is small, so this is cheap) that resumes on any number of ranks.
        reshard_after_forward: free each decoder layer's gathered weights after its forward.
        process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs unless named.
        timeout: the process group's timeout for collectives.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward

    @override
    def setup_environment(self) -> None:
        # one data-parallel dimension over every process (the parent's "auto" would be the node count)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True, ignore_frozen_params=True
        )
        return get_model_state_dict(self.model, options=options)

    @override
    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            # a full checkpoint: the parent loads the tensors it holds (strict_loading is off) and the
            # optimizer; hand the module's on_load_checkpoint the adapter it checks for
            adapter = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only).get("state_dict", {})
            checkpoint = super().load_checkpoint(path, weights_only=weights_only)
            checkpoint["state_dict"] = adapter
            return checkpoint
        return self._load_sharded(path, weights_only)

    def _load_sharded(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (path / _METADATA_FILENAME).is_file():
            raise FileNotFoundError(f"{path}: not a sharded checkpoint (no {_METADATA_FILENAME} inside)")
        assert self.model is not None
        # the trainable tensors only: the frozen ones were never saved
        state = {"state_dict": get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=True))}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        metadata["state_dict"] = state["state_dict"]
        return metadata


if FSDP2Strategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        FSDP2Strategy.strategy_name, FSDP2Strategy,
        description="FSDP2 (fully_shard) data parallelism with adapter-only checkpoints",
    )
