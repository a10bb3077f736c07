"""Training benchmark: lit-recover against the reference recipe (``reference_trainer.py``).

Both sides fine-tune the same pruned model on the same Alpaca records with the same settings. The
runs alternate (reference, lit-recover, reference, lit-recover, …), each in its own subprocess, and
every run is measured the same way from inside its process:

- a forward pre-hook on the decoder stack counts the non-pad tokens and the padded positions of each
  training micro-batch;
- a step post-hook on the optimizer stamps the wall time of each optimizer step;
- the loss of each micro-batch is weighted by its supervised-token count, giving one loss per step
  (the mean next-token NLL over the step's supervised tokens, the quantity both sides optimise);
- the peak resident memory of the training loop (the kernel's high-water mark, reset when training
  starts), or the peak CUDA memory on a GPU.

The first ``--skip`` steps of each run are left out of the timings (allocator and thread-pool
warm-up). Results go to ``benchmarks/results/<tag>.json`` (numbers with units, settings, hardware)
and ``<tag>.md`` (the ratio table), and the table is printed.

Usage::

    python benchmarks/bench_fit.py --quick                       # tiny model, a few minutes
    python benchmarks/bench_fit.py --model prune_log/x/pruned_model.bin --steps 12 --pairs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_cleaned.json"
RESULTS = ROOT / "benchmarks" / "results"
SIDES = ("reference", "lit")
IGNORE_INDEX = -100

log = logging.getLogger(__name__)


@dataclass
class FitSettings:
    """What both sides of one scenario run with.

    Args:
        model: the pruned pickle ``{'model', 'tokenizer'}``.
        data: the Alpaca JSON subset both sides read.
        batch_size: examples per optimizer step.
        micro_batch_size: examples per forward/backward.
        cutoff_len: truncation length in tokens.
        steps: optimizer steps per run.
        group_by_length: length-grouped sampling on both sides.
        learning_rate: peak learning rate.
        warmup_steps: linear warm-up steps.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        sequential: keep the file's order on both sides (for step-by-step loss comparison).
        seed: seed of both sides.
        threads: torch intra-op threads (``None``: torch's default).
        lit_args: extra ``main.py fit`` arguments for the lit-recover side (levers to toggle).
        full_logits: lit-recover computes the LM head and cross-entropy over every position, as the
            reference does (turns the supervised-positions-only lever off, for measuring it).
        padding_free: lit-recover packs each micro-batch into one row with per-sequence position ids
            (``--data.padding_free true``: no compute on padding, the same loss).
    """

    model: str
    data: str
    batch_size: int = 16
    micro_batch_size: int = 4
    cutoff_len: int = 256
    steps: int = 12
    group_by_length: bool = False
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    sequential: bool = False
    seed: int = 42
    threads: int | None = None
    lit_args: list[str] = field(default_factory=list)
    full_logits: bool = False
    padding_free: bool = False


# --- measuring, inside a worker process ----------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StepMeter:
    """Per-optimizer-step counters, fed by hooks that both sides attach the same way."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.rss_start_mb: float | None = None
        self.peak_rss_mb: float | None = None
        self.peak_rss_reset = False
        self.cuda_peak_mb: float | None = None
        self._last: float | None = None
        self._last_cpu: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._tokens = self._positions = self._supervised = 0
        self._nll_sum = 0.0

    def start(self) -> None:
        import torch

        self.peak_rss_reset = _reset_peak_rss()
        rss = _status_kib("VmRSS")
        self.rss_start_mb = rss / 1024 if rss is not None else None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._reset_window()
        self._last = time.perf_counter()
        self._last_cpu = time.process_time()

    def finish(self) -> None:
        import torch

        hwm = _status_kib("VmHWM")
        if hwm is None:  # no /proc: the process-lifetime peak
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_rss_mb = hwm / 1024
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    # hooks ------------------------------------------------------------------------------------
    def forward_pre_hook(self, module, args, kwargs) -> None:
        """On the decoder stack: count non-pad tokens and padded positions of a training forward."""
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            return
        positions = ids.numel()
        self._positions += positions
        self._tokens += int(mask.sum()) if mask is not None and mask.dim() == 2 else positions

    def add_loss(self, mean_nll: float, supervised: int) -> None:
        """One micro-batch's mean NLL over its ``supervised`` tokens."""
        self._nll_sum += mean_nll * supervised
        self._supervised += supervised

    def optimizer_step_hook(self, optimizer, args, kwargs) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        rss = _status_kib("VmRSS")
        self.steps.append({
            "step": len(self.steps) + 1,
            "seconds": now - (self._last if self._last is not None else now),
            # CPU time of the whole process (all its threads): what the step cost, whatever else ran
            "cpu_seconds": cpu - (self._last_cpu if self._last_cpu is not None else cpu),
            "tokens": self._tokens,
            "positions": self._positions,
            "supervised": self._supervised,
            "loss": self._nll_sum / self._supervised if self._supervised else float("nan"),
            "rss_mb": rss / 1024 if rss is not None else float("nan"),
        })
        self._last, self._last_cpu = now, cpu
        self._reset_window()

    def result(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "rss_start_mb": self.rss_start_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_rss_reset_at_train_start": self.peak_rss_reset,
            "cuda_peak_mb": self.cuda_peak_mb,
        }


def _supervised_count(labels) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def run_reference_worker(s: FitSettings, workdir: Path) -> dict[str, Any]:
    """The reference recipe with the meter attached."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_trainer import ReferenceConfig, run_reference
    from transformers import TrainerCallback

    meter = StepMeter()

    def loss_hook(module, args, kwargs, output) -> None:
        if not module.training or getattr(output, "loss", None) is None or kwargs.get("labels") is None:
            return
        n = _supervised_count(kwargs["labels"])
        window = kwargs.get("num_items_in_batch")
        loss = float(output.loss.detach())
        if window is not None:  # the Trainer normalised by the whole accumulation window's count
            loss = loss * float(window) / max(n, 1)
        meter.add_loss(loss, n)

    def on_model(model) -> None:
        model.get_base_model().model.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
        model.register_forward_hook(loss_hook, with_kwargs=True)

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)
            inner.register_step_post_hook(meter.optimizer_step_hook)
            meter.start()

        def on_train_end(self, args, state, control, **kwargs):
            meter.finish()

    cfg = ReferenceConfig(
        prune_model=s.model, data_path=s.data, output_dir=str(workdir / "reference"),
        batch_size=s.batch_size, micro_batch_size=s.micro_batch_size, max_steps=s.steps,
        learning_rate=s.learning_rate, cutoff_len=s.cutoff_len, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout, group_by_length=s.group_by_length, sequential=s.sequential,
        warmup_steps=s.warmup_steps, seed=s.seed,
    )
    run_reference(cfg, callbacks=[Meter()], on_model=on_model)
    return meter.result()


def lit_cli_args(s: FitSettings, output_dir: Path) -> list[str]:
    """The ``main.py fit`` arguments that give lit-recover the reference's settings."""
    args = [
        "fit", "--config", str(ROOT / "configs" / "recover.yaml"),
        "--model.pruned_model", s.model,
        "--data.data_path", s.data,
        "--data.val_set_size", "0",
        "--data.cutoff_len", str(s.cutoff_len),
        "--data.group_by_length", str(s.group_by_length).lower(),
        "--data.batch_size", str(s.batch_size),
        "--data.micro_batch_size", str(s.micro_batch_size),
        # the recipe always appends EOS to prompt+response (its add_eos_token flag only changes
        # how the prompt length is counted); lit-recover does so with add_eos_token
        "--data.add_eos_token", "true",
        "--data.padding_free", str(s.padding_free).lower(),
        "--model.learning_rate", str(s.learning_rate),
        "--model.warmup_steps", str(s.warmup_steps),
        "--model.lora_r", str(s.lora_r),
        "--model.lora_alpha", str(s.lora_alpha),
        "--model.lora_dropout", str(s.lora_dropout),
        "--trainer.max_steps", str(s.steps),
        # the Trainer clips at max_grad_norm=1.0 by default; the recipe keeps that default
        "--trainer.gradient_clip_val", "1.0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--seed_everything", str(s.seed),
        "--output_dir", str(output_dir),
        "--skip_evaluation", "true",
    ]
    return args + list(s.lit_args)


def _full_logits_loss(pl_module):
    """The causal-LM loss over full logits (``LlamaForCausalLM(labels=...)``): the lever switched off."""
    import torch.nn.functional as F

    def loss(batch):
        hidden = pl_module.backbone(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state
        logits = pl_module.lm_head(hidden).float()
        labels = batch["labels"][:, 1:]
        n = _supervised_count(batch["labels"])
        value = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX)
        return value, n

    return loss


def run_lit_worker(s: FitSettings, workdir: Path) -> dict[str, Any]:
    """lit-recover's ``main.py fit`` (the RecoveryCLI) with the meter attached as a callback."""
    import lightning as L

    sys.path.insert(0, str(ROOT))
    from lit_recover.data import sampler as data_module
    from lit_recover.cli import RecoveryCLI

    meter = StepMeter()
    if s.sequential:
        # the data module has no switch for file order: keep the sampler from shuffling
        original_init = data_module.ShardedBatchSampler.__init__

        def unshuffled_init(self, *args, **kwargs):
            original_init(self, *args, **{**kwargs, "shuffle": False})

        data_module.ShardedBatchSampler.__init__ = unshuffled_init

    class Meter(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            backbone = pl_module.backbone
            backbone.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
            original = pl_module.supervised_loss

            def supervised_loss(batch):
                loss, n = original(batch)
                if pl_module.training:
                    meter.add_loss(float(loss.detach()), n)
                return loss, n

            if s.full_logits:
                original = _full_logits_loss(pl_module)
            pl_module.supervised_loss = supervised_loss
            trainer.optimizers[0].register_step_post_hook(meter.optimizer_step_hook)
            meter.start()

        def on_train_end(self, trainer, pl_module) -> None:
            meter.finish()

    try:
        RecoveryCLI(args=lit_cli_args(s, workdir / "lit"), trainer_defaults={"max_epochs": 2, "callbacks": [Meter()]})
    except Exception as exc:
        if meter.peak_rss_mb is None:  # training itself failed
            raise
        # training finished and was measured; the end-of-fit outputs (merge, save) failed: keep the
        # numbers and say what failed
        result = meter.result()
        result["post_fit_error"] = f"{type(exc).__name__}: {exc}"
        return result
    return meter.result()


def worker_main(side: str, settings_path: Path, out_path: Path) -> None:
    """Entry point of one measured run (a subprocess of the harness)."""
    import torch

    s = FitSettings(**json.loads(settings_path.read_text()))
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        result = (run_reference_worker if side == "reference" else run_lit_worker)(s, Path(tmp))
    result.update({
        "side": side,
        "wall_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "load_avg_end": os.getloadavg(),
    })
    out_path.write_text(json.dumps(result, indent=1))


# --- summarising ----------------------------------------------------------------------------
def summarize_run(run: dict[str, Any], skip: int = 1) -> dict[str, Any]:
    """Rates and fractions of one run, its first ``skip`` steps left out of the timings."""
    steps = run["steps"]
    timed = steps[skip:] if len(steps) > skip else steps
    seconds = sum(x["seconds"] for x in timed)
    tokens = sum(x["tokens"] for x in timed)
    positions = sum(x["positions"] for x in steps)
    memory = run.get("cuda_peak_mb") or run.get("peak_rss_mb")
    cpu = sum(x.get("cpu_seconds", 0.0) for x in timed)
    return {
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
        "supervised_tokens_per_s": sum(x["supervised"] for x in timed) / seconds if seconds > 0 else float("nan"),
        "s_per_step": statistics.median(x["seconds"] for x in timed) if timed else float("nan"),
        "peak_memory_mb": memory,
        "peak_increment_mb": (run["cuda_peak_mb"] if run.get("cuda_peak_mb") else
                              (run["peak_rss_mb"] - run["rss_start_mb"]) if run.get("rss_start_mb") else None),
        "padded_fraction": 1.0 - sum(x["tokens"] for x in steps) / positions if positions else float("nan"),
        "mean_loss": statistics.fmean(x["loss"] for x in steps) if steps else float("nan"),
        "steps": len(steps),
        "wall_s": run.get("wall_s"),
    }


# metric -> (unit, goal on the lit/reference ratio or on lit's value, description)
METRICS = {
    "tokens_per_s": ("non-pad tokens/s", "ratio >= 1.3", "non-pad training tokens per second"),
    "tokens_per_cpu_s": ("non-pad tokens/CPU-s", "", "non-pad training tokens per CPU-second of the process"),
    "s_per_step": ("s", "", "seconds per optimizer step (median)"),
    "peak_memory_mb": ("MiB", "ratio <= 0.8", "peak memory of the training loop (RSS, or CUDA)"),
    "peak_increment_mb": ("MiB", "", "peak RSS growth over the RSS at train start"),
    "padded_fraction": ("fraction", "", "padded positions / all positions"),
    "mean_loss": ("nats/token", "", "mean of the per-step losses"),
}


def compare(runs: list[dict[str, Any]], skip: int = 1, group_by_length: bool = False,
            arms: tuple[str, str] = SIDES) -> dict[str, Any]:
    """Medians per arm and per-pair ratios (second arm / first arm) of every metric.

    The arms are ``("reference", "lit")`` for the main comparison, ``("off", "on")`` for a lever.
    """
    base, cand = arms
    by_arm = {arm: [summarize_run(r, skip) for r in runs if r["arm"] == arm] for arm in arms}
    pairs = list(zip(by_arm[base], by_arm[cand]))
    table: dict[str, Any] = {}
    for metric, (unit, goal, desc) in METRICS.items():
        ref = [x[metric] for x in by_arm[base]]
        lit = [x[metric] for x in by_arm[cand]]
        ratios = [b[metric] / a[metric] for a, b in pairs if a[metric] and b[metric] is not None]
        table[metric] = {
            "unit": unit, "description": desc,
            "reference": ref, "lit": lit,
            "reference_median": _median(ref),
            "lit_median": _median(lit),
            "pair_ratios": ratios,
            "ratio_median": statistics.median(ratios) if ratios else None,
            "goal": goal,
        }
    table["padded_fraction"]["goal"] = "lit <= 0.10" if group_by_length else ""
    goals = {
        "tokens_per_s": _ok(table["tokens_per_s"]["ratio_median"], lambda r: r >= 1.3),
        "peak_memory_mb": _ok(table["peak_memory_mb"]["ratio_median"], lambda r: r <= 0.8),
    }
    if group_by_length:
        goals["padded_fraction"] = _ok(table["padded_fraction"]["lit_median"], lambda v: v <= 0.10)
    table["loss_check"] = loss_check(runs, arms)
    return {"arms": list(arms), "metrics": table, "goals_met": goals}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ok(value, test) -> bool | None:
    return None if value is None else bool(test(value))


def loss_check(runs: list[dict[str, Any]], arms: tuple[str, str] = SIDES) -> dict[str, Any]:
    """Do the two sides' loss curves agree within the run-to-run noise of the data order?

    Each run's per-step losses are pooled per side; the difference of the side means is compared
    with twice its standard error. With ``sequential`` order both sides see the same batches, and the
    per-step differences themselves are reported.
    """
    curves = {arm: [[x["loss"] for x in r["steps"]] for r in runs if r["arm"] == arm] for arm in arms}
    pooled = {arm: [v for c in cs for v in c] for arm, cs in curves.items()}
    out: dict[str, Any] = {"curves": curves}
    if all(len(v) >= 2 for v in pooled.values()):
        means = [statistics.fmean(pooled[a]) for a in arms]
        se = sum(statistics.variance(v) / len(v) for v in pooled.values()) ** 0.5
        out.update({
            "mean_first": means[0], "mean_second": means[1],
            "difference": means[1] - means[0], "two_standard_errors": 2 * se,
            "within_noise": abs(means[1] - means[0]) <= 2 * se,
        })
    stepwise = [
        abs(a - b) for first, second in zip(*(curves[a] for a in arms)) for a, b in zip(first, second)
    ]
    if stepwise:
        out["max_abs_stepwise_difference"] = max(stepwise)
    return out


# --- running the harness --------------------------------------------------------------------
def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for pkg in ("transformers", "peft", "lightning"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_subset(data: Path, n: int, out: Path, seed: int = 0) -> Path:
    """``n`` records drawn (seeded) from an Alpaca JSON file, written to ``out``."""
    try:
        records = json.loads(Path(data).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: {data}: cannot read the Alpaca JSON ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise SystemExit(f"error: {data}: expected a non-empty JSON list of records")
    if n < len(records):
        records = random.Random(seed).sample(records, n)
    out.write_text(json.dumps(records))
    return out


def run_worker(side: str, s: FitSettings, workdir: Path, index: int, timeout: float) -> dict[str, Any]:
    """One run in a fresh subprocess; its output goes to ``<workdir>/<index>-<side>.log``."""
    settings = workdir / f"{index}-{side}.settings.json"
    settings.write_text(json.dumps(dataclasses.asdict(s)))
    out = workdir / f"{index}-{side}.json"
    logfile = workdir / f"{index}-{side}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--settings", str(settings),
           "--result", str(out)]
    with logfile.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(logfile.read_text().splitlines()[-20:])
        raise RuntimeError(f"{side} run {index} failed (exit {proc.returncode}); log {logfile}:\n{tail}")
    result = json.loads(out.read_text())
    if not result["steps"]:
        raise RuntimeError(f"{side} run {index} recorded no optimizer step; log {logfile}")
    return result


def run_scenario(name: str, arms: list[tuple[str, str, FitSettings]], pairs: int, workdir: Path, skip: int,
                 timeout: float) -> dict[str, Any]:
    """``pairs`` × the arms ``(label, side, settings)``, alternating: A B A B …"""
    runs = []
    for p in range(pairs):
        for label, side, s in arms:
            t0, load = time.perf_counter(), os.getloadavg()
            r = run_worker(side, s, workdir, len(runs), timeout)
            r.update({"pair": p, "arm": label, "load_avg_start": load})
            runs.append(r)
            sm = summarize_run(r, skip)
            print(f"  [{name}] pair {p + 1}/{pairs} {label:9s}: {sm['tokens_per_s']:8.1f} tok/s, "
                  f"{sm['s_per_step']:6.2f} s/step, peak {sm['peak_memory_mb']:7.0f} MiB, "
                  f"pad {sm['padded_fraction']:.3f}, loss {sm['mean_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    settings = {label: _public_settings(s) for label, _, s in arms}
    first = arms[0][2]
    out = compare(runs, skip, first.group_by_length, (arms[0][0], arms[1][0]))
    if arms[0][1] == arms[1][1]:  # a lever (lit-recover on both arms): the goals are about the reference
        out["goals_met"] = {}
        for row in out["metrics"].values():
            if "goal" in row:
                row["goal"] = ""
    return {"settings": settings, "runs": runs, **out}


def _public_settings(s: FitSettings) -> dict[str, Any]:
    """Settings for the report, paths shown by file name only (they lie in a temporary folder)."""
    d = dataclasses.asdict(s)
    d["model"], d["data"] = Path(s.model).name, Path(s.data).name
    return d


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    """The ratio tables of a report, one per scenario."""
    lines = [f"# Training benchmark: `{report['tag']}`", "",
             f"Command: `{report['command']}`", "",
             "Hardware: " + ", ".join(f"{k} {v}" for k, v in report["hardware"].items()), "",
             f"Load average (1/5/15 min) before/after: {_loads(report['load_avg_start'])} / "
             f"{_loads(report['load_avg_end'])}; {report['examples']} records drawn from the data file "
             f"(seed 0); the first {report['skip']} step(s) of each run untimed.", ""]
    for name, sc in report["scenarios"].items():
        base, cand = sc["arms"]
        s = sc["settings"][base]
        # lit_args go to the lit-recover side only
        extra = {a: " ".join(sc["settings"][a]["lit_args"]) for a in sc["arms"]
                 if sc["settings"][a]["lit_args"] and a != "reference"}
        lines += [f"## {name}", "", sc.get("description", ""), "",
                  f"{len(sc['runs']) // 2} pair(s), {s['steps']} optimizer steps per run, batch {s['batch_size']} "
                  f"(micro {s['micro_batch_size']}), cutoff {s['cutoff_len']}, group_by_length "
                  f"{s['group_by_length']}, lr {s['learning_rate']}, warm-up {s['warmup_steps']}, LoRA r "
                  f"{s['lora_r']}/alpha {s['lora_alpha']}/dropout {s['lora_dropout']}, torch threads "
                  f"{s['threads'] or 'default'}, model `{s['model']}`"
                  + "".join(f"; {a} extra args `{v}`" for a, v in extra.items()), "",
                  f"| metric | unit | {base} (median) | {cand} (median) | {cand}/{base} (median of pairs) "
                  "| per-pair ratios | goal | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for metric, row in sc["metrics"].items():
            if metric == "loss_check":
                continue
            met = sc["goals_met"].get(metric)
            lines.append(
                f"| {row['description']} | {row['unit']} | {_fmt(row['reference_median'])} | {_fmt(row['lit_median'])} "
                f"| {_fmt(row['ratio_median'])} | {', '.join(_fmt(r) for r in row['pair_ratios'])} | {row['goal']} "
                f"| {'' if met is None else ('yes' if met else 'no')} |")
        lc = sc["metrics"]["loss_check"]
        lines.append("")
        if "difference" in lc:
            lines.append(
                f"Loss curves: mean per-step loss {base} {lc['mean_first']:.4f}, {cand} {lc['mean_second']:.4f}; "
                f"difference {lc['difference']:+.4f} vs 2 standard errors {lc['two_standard_errors']:.4f} → "
                f"{'within noise' if lc['within_noise'] else 'NOT within noise'}"
                + (f"; largest step-by-step difference {lc['max_abs_stepwise_difference']:.2e} (same batches)"
                   if s["sequential"] else "") + ".")
        lines += ["", "| step | " + " | ".join(f"{r['arm']} #{r['pair'] + 1}" for r in sc["runs"]) + " |",
                  "|---|" + "---|" * len(sc["runs"])]
        n = max(len(r["steps"]) for r in sc["runs"])
        for i in range(n):
            cells = [f"{r['steps'][i]['loss']:.4f}" if i < len(r["steps"]) else "" for r in sc["runs"]]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _loads(v: Any) -> str:
    return "/".join(f"{x:.1f}" for x in v)


SCENARIOS = {
    "defaults": "The seed's defaults (random order), both sides.",
    "group_by_length": "Length-grouped sampling on both sides.",
    "padding_free": "The seed's defaults; lit-recover with padding-free micro-batches (--data.padding_free).",
    "same_batches": "The seed's defaults, both sides in the order of the drawn records (a random order): the "
                    "same micro-batches on both sides, so memory and speed compare like for like.",
    "same_batches_padding_free": "As same_batches, lit-recover with padding-free micro-batches "
                                 "(--data.padding_free).",
    "sequential": "Both sides in the file's order with LoRA dropout 0: the same batches, so the per-step "
                  "losses must agree (the math check).",
}

_FUSED_ADAMW = ('{"class_path": "torch.optim.AdamW", "init_args": {"lr": %s, "weight_decay": 0.0, '
                '"fused": true}}')

# lever -> (what it is, settings with the lever off, settings with it on); lit-recover on both arms
LEVERS: dict[str, tuple[str, Any, Any]] = {
    "supervised_logits": (
        "LM head + cross-entropy only on positions whose label is not -100 (off: over every position, "
        "as LlamaForCausalLM(labels=...) does)",
        lambda s: dataclasses.replace(s, full_logits=True), lambda s: s),
    "sdpa": (
        "SDPA attention kernel (off: eager attention)",
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.attn_implementation", "eager"]),
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.attn_implementation", "sdpa"])),
    "fused_adamw": (
        "torch.optim.AdamW(fused=True) (off: the default foreach AdamW)",
        lambda s: s,
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.optimizer",
                                                   _FUSED_ADAMW % s.learning_rate])),
    "lean_lora": (
        "LoRA branches through lit_recover.lora.LoRABranch: boolean dropout masks drawn with torch.rand "
        "and the shared input kept for backward (off: PEFT's forward, two float copies per adapted layer)",
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.lean_lora", "false"]),
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.lean_lora", "true"])),
    "loader_worker": (
        "one DataLoader worker process (off: batches collated in the training process)",
        lambda s: s, lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--data.num_workers", "1"])),
    "padding_free": (
        "padding-free micro-batches: one packed row per micro-batch, block-causal attention from the "
        "position ids (off: padded to the longest sequence)",
        lambda s: s, lambda s: dataclasses.replace(s, padding_free=True)),
    "gradient_checkpointing": (
        "activation checkpointing of the decoder layers (recomputed in the backward pass)",
        lambda s: s,
        lambda s: dataclasses.replace(s, lit_args=[*s.lit_args, "--model.gradient_checkpointing", "true"])),
    "group_by_length": (
        "length-grouped sampling (off: random order)",
        lambda s: dataclasses.replace(s, group_by_length=False),
        lambda s: dataclasses.replace(s, group_by_length=True)),
}


def render(path: Path) -> dict[str, Any]:
    """Recompute every scenario's summary from the runs' per-step data; rewrite the JSON and markdown."""
    report = json.loads(path.read_text())
    for sc in report["scenarios"].values():
        arms = tuple(sc["arms"])
        first = sc["settings"][arms[0]]
        out = compare(sc["runs"], report["skip"], first["group_by_length"], arms)
        if sc["runs"][0]["side"] == sc["runs"][1]["side"]:  # a lever
            out["goals_met"] = {}
            for row in out["metrics"].values():
                if "goal" in row:
                    row["goal"] = ""
        sc.update(out)
    report["units"] = {m: u for m, (u, _, _) in METRICS.items()}
    text = markdown(report)
    path.write_text(json.dumps(report, indent=1))
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny pruned model built on the fly; a few minutes")
    p.add_argument("--model", help="pruned pickle (default: the tiny model with --quick)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca JSON (default ../shared/data/alpaca/alpaca_data_cleaned.json)")
    p.add_argument("--examples", type=int, default=None,
                   help="records drawn from --data (default: 4000, 256 with --quick: enough for HF's 50x megabatches)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8; 4 with --quick)")
    p.add_argument("--pairs", type=int, default=2, help="run pairs per scenario")
    p.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (default 16; 8 with --quick)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--scenarios", default="defaults,group_by_length",
                   help=f"comma-separated reference-vs-lit scenarios ({', '.join(SCENARIOS)}), or empty")
    p.add_argument("--levers", default="",
                   help=f"comma-separated lit-recover levers to toggle, off vs on ({', '.join(LEVERS)})")
    p.add_argument("--skip", type=int, default=1, help="untimed first steps of each run")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both sides (default: torch's)")
    p.add_argument("--lit-arg", action="append", default=[], help="extra main.py fit argument for lit-recover (repeatable)")
    p.add_argument("--tag", default=None, help="result file name under benchmarks/results/ (default perf_fit[_quick])")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--overwrite", action="store_true", help="replace results of the same --tag")
    p.add_argument("--render", metavar="JSON", help="recompute the tables of a results JSON from its per-step data and rewrite it")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in known:
            raise SystemExit(f"error: unknown {what} {n!r} (choose from {', '.join(known)})")
    return names


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, Path(args.settings), Path(args.result))
        return None
    if args.render:
        return render(Path(args.render))
    steps = args.steps or (4 if args.quick else 8)
    batch = args.batch_size or (8 if args.quick else 16)
    examples = args.examples or (256 if args.quick else 4000)
    command = "python benchmarks/bench_fit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    tag = args.tag or ("perf_fit_quick" if args.quick else "perf_fit")
    out = Path(args.out)
    if not args.no_write:
        tag = fresh_tag(out, tag, args.overwrite)
    scenarios, levers = _names(args.scenarios, SCENARIOS, "scenario"), _names(args.levers, LEVERS, "lever")
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            if not args.quick:
                raise SystemExit("error: --model is required without --quick")
            sys.path.insert(0, str(ROOT))
            from lit_recover.demos.tiny import write_tiny_pruned

            model = str(write_tiny_pruned(workdir / "tiny" / "pruned_model.bin"))
        if not Path(model).is_file():
            raise SystemExit(f"error: {model}: no such pruned model file")
        data = write_subset(Path(args.data), examples, workdir / "subset.json")
        base = FitSettings(model=str(Path(model).resolve()), data=str(data), batch_size=batch,
                           micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len, steps=steps,
                           learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                           lora_dropout=args.lora_dropout, threads=args.threads, lit_args=args.lit_arg)
        variants = {
            "defaults": base,
            "group_by_length": dataclasses.replace(base, group_by_length=True),
            "sequential": dataclasses.replace(base, sequential=True, lora_dropout=0.0),
            "padding_free": base,
            "same_batches": dataclasses.replace(base, sequential=True),
            "same_batches_padding_free": dataclasses.replace(base, sequential=True),
        }
        report: dict[str, Any] = {"tag": tag, "command": command, "hardware": hardware(), "skip": args.skip,
                                  "examples": examples, "load_avg_start": os.getloadavg(), "scenarios": {},
                                  "units": {m: u for m, (u, _, _) in METRICS.items()}}
        plan = [(name, SCENARIOS[name], [("reference", "reference", variants[name]),
                                         ("lit", "lit", dataclasses.replace(variants[name],
                                                                            padding_free=name.endswith("padding_free")))])
                for name in scenarios]
        plan += [(f"lever {name}", LEVERS[name][0], [("off", "lit", LEVERS[name][1](base)),
                                                       ("on", "lit", LEVERS[name][2](base))])
                 for name in levers]
        for name, description, arms in plan:
            print(f"scenario {name}:", flush=True)
            result = run_scenario(name, arms, args.pairs, workdir, args.skip, args.timeout)
            report["scenarios"][name] = {"description": description, **result}
        report["load_avg_end"] = os.getloadavg()
    text = markdown(report)
    print(text)
    if not args.no_write:
        write_report(out, tag, report, text)
    return report


def fresh_tag(out: Path, tag: str, overwrite: bool) -> str:
    """``tag``, or, where ``<out>/<tag>.json|md`` exist and ``overwrite`` is off, ``tag`` with a time stamp:
    earlier results are never replaced silently."""
    if overwrite or not any((out / f"{tag}.{ext}").exists() for ext in ("json", "md")):
        return tag
    stamped = f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"{out}: earlier results kept; this run writes {stamped}.json/.md (--overwrite replaces them)")
    return stamped


def write_report(out: Path, tag: str, report: dict[str, Any], text: str) -> None:
    """``<out>/<tag>.json`` (the numbers) and ``<tag>.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(report, indent=1))
    (out / f"{tag}.md").write_text(text + "\n")
    print(f"wrote {out / (tag + '.json')} and {out / (tag + '.md')}")


if __name__ == "__main__":
    main()
