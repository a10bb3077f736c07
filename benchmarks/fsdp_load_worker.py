"""One rank of the FSDP2 loading benchmark, in a process of its own.

``benchmarks.bench_fsdp_load`` starts one per rank as ``python -m benchmarks.fsdp_load_worker
--model PATH --mmap true|false --out RESULT.json`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. After the imports, the gloo process group and a warm-up (the same load and
sharding of a tiny model in the same format, so that modules imported and caches filled on first
use are not counted as the model's: about 15-30 MB a process here), each rank records its memory,
builds ``LoRARecoveryModule`` (the frozen base read from the file, the LoRA wrap, the load checks)
and shards it with FSDP2 as Lightning's ``ModelParallelStrategy`` does (``configure_model`` with the
module's device mesh set), recording its memory after each stage and, from a sampling thread, the
peak of its resident anonymous memory in between. Then it checks the sharded model: every frozen
tensor gathered back equals the file's, and (rank zero writes them) the logits of a fixed input and
the LoRA gradients of one training backward on it (``logits_and_grads``).

Memory, in bytes, from ``/proc/self/status`` and ``/proc/self/smaps_rollup``:

- ``RssAnon`` / ``Anonymous``: resident anonymous pages, the memory the process itself owns (heap,
  tensors it allocated, pages of a private file map it wrote to). What a rank costs the machine
  beyond the page cache, and what the bound is about.
- ``RssFile``: resident pages of mapped files; a memory-mapped model's pages count here once touched,
  in every process that touched them, although the machine holds them once (in the page cache).
- ``Pss``: resident pages, each shared page divided among the processes that map it; summed over
  the ranks it counts a shared file page once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
ROLLUP_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous", "Private_Clean", "Private_Dirty", "Shared_Clean")
FORWARD_IDS = [[1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 300, 2]]  # a fixed input for the logits check


def _kib_fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0]) * 1024
    return out


def memory() -> dict[str, int]:
    """This process's memory counters in bytes (``status`` and ``smaps_rollup`` fields, see above)."""
    return {**_kib_fields("/proc/self/status", STATUS_KEYS),
            **{f"smaps_{k}": v for k, v in _kib_fields("/proc/self/smaps_rollup", ROLLUP_KEYS).items()}}


def rss_anon() -> int:
    return _kib_fields("/proc/self/status", ("RssAnon",)).get("RssAnon", 0)


class AnonPeak(threading.Thread):
    """Samples ``RssAnon`` every ``period`` seconds; ``peak`` is the largest value seen."""

    def __init__(self, period: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self.samples = period, rss_anon(), 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_anon())
            self.samples += 1
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss_anon())
        return self.peak


def model_bytes(model: Any) -> int:
    """Bytes of the distinct storages of the model's frozen parameters and buffers: the pruned model's
    size in memory, the LoRA tensors (``trainable_bytes``) not counted."""
    seen: dict[int, int] = {}
    for t in [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _file_name(name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.base_layer.weight`` → ``model.layers.0.mlp.up_proj.weight``."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def logits_and_grads(module: Any) -> dict[str, Any]:
    """The sharded (or plain) module on ``FORWARD_IDS``: its logits in eval mode, then one training
    backward of its supervised loss (every next token supervised) and the full gradient of each
    LoRA tensor. Under FSDP2 a collective; every rank must run it on the same input."""
    import torch
    from torch.distributed.tensor import DTensor

    ids = torch.tensor(FORWARD_IDS)
    module.model.eval()
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits
    module.model.train()
    loss, _ = module.supervised_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    grads = {}
    for name, p in module.model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = grad.detach().clone()
    return {"logits": logits, "loss": loss.detach(), "grads": grads}


def run(model_path: str, mmap: bool, out: Path, logits_out: Path | None,
        warmup: str | None = None, seed: int = 0) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lit_recover.models.load import read_model
    from lit_recover.module import LoRARecoveryModule

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    if warmup:
        module = LoRARecoveryModule(warmup, mmap_weights=mmap, lora_dropout=0.0)
        module._device_mesh = mesh
        module.configure_model()
        del module
    gc.collect()
    dist.barrier()
    stages = {"start": memory()}
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the LoRA A initialisation
    module = LoRARecoveryModule(model_path, mmap_weights=mmap, lora_dropout=0.0)
    t_load = time.perf_counter() - t0
    dist.barrier()  # every rank holds its loaded model now: a page they share counts once in their Pss
    stages["loaded"] = memory()
    size = model_bytes(module.model)
    trainable = sum(p.numel() * p.element_size() for p in module.model.parameters() if p.requires_grad)
    module._device_mesh = mesh  # what ModelParallelStrategy sets before it calls configure_model
    t1 = time.perf_counter()
    module.configure_model()
    gc.collect()
    t_shard = time.perf_counter() - t1
    stages["sharded"] = memory()
    peak = sampler.stop()
    dist.barrier()

    # the checks, after the measurement: the shards hold the file's weights, and the model runs
    reference, _ = read_model(model_path, mmap=True)
    ref = reference.state_dict()
    sharded = mismatched = checked = 0
    for name, p in module.model.named_parameters():
        if p.requires_grad:
            continue
        checked += 1
        if isinstance(p, DTensor):
            sharded += 1
            full = p.full_tensor()  # a collective: every rank walks the same names in the same order
        else:
            full = p.detach()
        if not torch.equal(full, ref[_file_name(name)]):
            mismatched += 1
    checks = logits_and_grads(module)
    if rank == 0 and logits_out is not None:
        torch.save(checks, logits_out)
    dist.barrier()
    dist.destroy_process_group()
    result = {
        "rank": rank, "world": world, "model": model_path, "mmap": mmap,
        "model_bytes": size, "trainable_bytes": trainable, "file_bytes": _path_bytes(Path(model_path)),
        "stages": stages, "peak_rss_anon": peak, "peak_samples": sampler.samples,
        "load_s": t_load, "shard_s": t_shard,
        "frozen_sharded": sharded, "frozen_checked": checked, "frozen_mismatched": mismatched,
    }
    out.write_text(json.dumps(result, indent=1))
    return result


def _path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one rank of benchmarks.bench_fsdp_load")
    p.add_argument("--model", required=True)
    p.add_argument("--mmap", choices=["true", "false"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--logits", default=None,
                   help="where rank zero writes the logits, loss and LoRA gradients of the fixed input")
    p.add_argument("--warmup", default=None, help="a tiny model to load and shard first, unmeasured")
    a = p.parse_args(argv)
    run(a.model, a.mmap == "true", Path(a.out), Path(a.logits) if a.logits else None, a.warmup)


if __name__ == "__main__":
    main()
