"""The evaluation suite: one call that measures a model object and returns a plain results dict.

``evaluate_model`` runs, in order, the metrics named in ``EvalConfig.metrics``:

1. ``ppl``: perplexity on WikiText-2 test and PTB validation (LLM-Pruner's protocol);
2. ``zero_shot``: lm-eval on the seven commonsense tasks;
3. ``latency``: generation latency and forward throughput;
4. ``memory``: parameters, size, and the peak memory of steps 1-3.

A metric that cannot run here is recorded as skipped with its reason, one that raises as failed;
neither stops the others. The model comes back in the training mode it arrived in, with no
gradients or hooks left and the random number generators as they were.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from lit_recover import __version__
from lit_recover.evaluation.report import OK, SECTIONS, failed, measurement, new_results
from lit_recover.evaluation.zero_shot import DEFAULT_TASKS

log = logging.getLogger(__name__)

ALL_METRICS: tuple[str, ...] = SECTIONS


@dataclass
class EvalConfig:
    """What to measure and how.

    Attributes:
        metrics: metrics to run, any of ppl, zero_shot, latency, memory.
        ppl_datasets: perplexity datasets (wikitext2: WikiText-2 raw test; ptb: PTB validation).
        ppl_data_dir: folder with wikitext2_test.txt and ptb_validation.txt (e.g. ../shared/data/ppl); unset: the hub.
        ppl_texts: extra text files to score the same way, as {name: path}.
        ppl_seq_len: tokens per perplexity chunk (128: LLM-Pruner's tables; 2048: Wanda/SparseGPT).
        ppl_batch_size: chunks per forward pass.
        ppl_add_bos: start each perplexity stream with one BOS token.
        zero_shot_tasks: lm-eval task names.
        zero_shot_data_dir: folder of <task>/<split>.jsonl (e.g. ../shared/data/zeroshot); unset: the hub.
        zero_shot_batch_size: lm-eval batch size.
        zero_shot_add_bos: encode lm-eval's requests with the tokenizer's special tokens (BOS first for
            LLaMA); false encodes them without, as LLM-Pruner's lm-eval fork does.
        limit: quick runs only: examples per zero-shot task and chunks per perplexity text (count, or fraction < 1).
        latency_prompt_tokens: prompt length for the latency runs.
        latency_new_tokens: tokens generated per latency run.
        latency_runs: timed runs (the median is reported).
        latency_warmup: untimed runs before them.
        throughput_batch_size: sequences per forward pass for throughput.
        throughput_seq_len: tokens per sequence for throughput.
        base_model: the unpruned model (HF folder, pickle or hub id) to compare the parameter count with.
        progress: show progress bars.
        strict: a metric that was asked for and could not run (skipped or failed) is an error: the
            results are still written, then the command stops with exit status 2.
    """

    metrics: list[str] = field(default_factory=lambda: list(ALL_METRICS))
    ppl_datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb"])
    ppl_data_dir: str | None = None
    ppl_texts: dict[str, str] = field(default_factory=dict)
    ppl_seq_len: int = 128
    ppl_batch_size: int = 4
    ppl_add_bos: bool = True
    zero_shot_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    zero_shot_data_dir: str | None = None
    zero_shot_batch_size: int = 8
    zero_shot_add_bos: bool = False
    limit: int | float | None = None
    latency_prompt_tokens: int = 32
    latency_new_tokens: int = 32
    latency_runs: int = 3
    latency_warmup: int = 1
    throughput_batch_size: int = 4
    throughput_seq_len: int = 128
    base_model: str | None = None
    progress: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        # Settings errors surface at once, not after an hour of evaluation.
        from lit_recover.evaluation.ppl import PPL_SOURCES

        if isinstance(self.metrics, str):
            self.metrics = parse_metrics(self.metrics)
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)} or 'all'")
        unknown = [d for d in self.ppl_datasets if d not in PPL_SOURCES]
        if unknown:
            raise ValueError(f"unknown ppl_datasets {unknown}; choose from {list(PPL_SOURCES)}")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"limit must be a positive count or a fraction below 1, got {self.limit}")
        for name in ("ppl_seq_len", "ppl_batch_size", "zero_shot_batch_size", "latency_runs",
                     "throughput_batch_size", "throughput_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ppl_seq_len < 2:
            raise ValueError(f"ppl_seq_len must be at least 2, got {self.ppl_seq_len}")


def parse_metrics(spec: str | list[str]) -> list[str]:
    """``"all"`` or a comma list (``"ppl,latency"``) as a list in the suite's order."""
    items = spec if isinstance(spec, list) else [s.strip() for s in spec.split(",") if s.strip()]
    if items == ["all"]:
        return list(ALL_METRICS)
    unknown = [m for m in items if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)} or 'all'")
    return [m for m in ALL_METRICS if m in items]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment(model: nn.Module) -> dict:
    """Device, dtype, threads and library versions of this run."""
    weight = model.get_input_embeddings().weight
    return {
        "device": str(weight.device),
        "device_name": torch.cuda.get_device_name(weight.device) if weight.device.type == "cuda" else None,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "lit_recover": __version__} | {
            name: _version(dist) for name, dist in (
                ("torch", "torch"), ("transformers", "transformers"),
                ("lm_eval", "lm_eval"), ("datasets", "datasets"), ("peft", "peft"))},
    }


def describe_model(model: nn.Module, source: str | None = None) -> dict:
    """Class, source and per-layer widths (a pruned model's shape)."""
    from lit_recover.models.anatomy import layer_shapes

    out: dict = {"class": type(model).__name__, "source": source}
    try:
        shapes = layer_shapes(model)
        out["num_layers"] = len(shapes)
        out["layer_shapes"] = shapes
    except Exception as exc:  # not a LLaMA-family layout: the rest of the suite still applies
        out["layer_shapes"] = None
        log.debug("no layer shapes: %s", exc)
    return out


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore Python, NumPy and torch RNG states on exit (lm-eval seeds them globally)."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _run(name: str, fn) -> dict:
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as exc:
        log.exception("%s failed", name)
        return {**failed(f"{type(exc).__name__}: {exc}"), "elapsed": measurement(time.perf_counter() - t0, "s")}


def evaluate_model(model: nn.Module, tokenizer, config: EvalConfig | None = None, *, label: str | None = None,
                   source: str | None = None) -> dict:
    """Measure a model and return the results as a plain dict (the schema in ``report.py``).

    Args:
        model: a Hugging Face causal LM (a merged LoRA model, a pruned model), on the device to use.
        tokenizer: its tokenizer, with a pad token.
        config: what to measure; ``EvalConfig()`` when ``None``.
        label: a name for these results in tables (``pruned``, ``recovered``).
        source: where the model was loaded from, recorded as ``model.source``.
    """
    from lit_recover.evaluation.latency import evaluate_latency
    from lit_recover.evaluation.memory import PeakMemory, evaluate_memory
    from lit_recover.evaluation.ppl import evaluate_ppl
    from lit_recover.evaluation.zero_shot import evaluate_zero_shot

    config = config or EvalConfig()
    results = new_results(label=label, settings=asdict(config), model=describe_model(model, source),
                          environment=environment(model))
    metrics = parse_metrics(list(config.metrics))
    device = model.get_input_embeddings().weight.device
    tracker = PeakMemory(device) if "memory" in metrics else None
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with preserve_rng(), torch.no_grad(), (tracker or contextlib.nullcontext()):
            if "ppl" in metrics:
                results["metrics"]["ppl"] = _run("ppl", lambda: evaluate_ppl(
                    model, tokenizer, datasets=config.ppl_datasets, data_dir=config.ppl_data_dir,
                    texts=config.ppl_texts, seq_len=config.ppl_seq_len, batch_size=config.ppl_batch_size,
                    limit=config.limit, add_bos=config.ppl_add_bos, progress=config.progress))
            if "zero_shot" in metrics:
                results["metrics"]["zero_shot"] = _run("zero_shot", lambda: evaluate_zero_shot(
                    model, tokenizer, tasks=config.zero_shot_tasks, data_dir=config.zero_shot_data_dir,
                    limit=config.limit, batch_size=config.zero_shot_batch_size,
                    add_bos=config.zero_shot_add_bos))
            if "latency" in metrics:
                results["metrics"]["latency"] = _run("latency", lambda: evaluate_latency(
                    model, tokenizer, prompt_tokens=config.latency_prompt_tokens,
                    new_tokens=config.latency_new_tokens, runs=config.latency_runs, warmup=config.latency_warmup,
                    throughput_batch_size=config.throughput_batch_size,
                    throughput_seq_len=config.throughput_seq_len, progress=config.progress))
        if "memory" in metrics:
            results["metrics"]["memory"] = _run("memory", lambda: evaluate_memory(
                model, tracker, base_model=config.base_model))
    finally:
        model.train(was_training)
    results["elapsed"] = measurement(time.perf_counter() - t0, "s")
    for name, section in results["metrics"].items():
        if section.get("status") != OK:
            log.warning("%s %s: %s", name, section.get("status"), section.get("reason"))
    return results


def failed_sections(results: dict) -> list[str]:
    """Names of the metric sections that failed (not the skipped ones)."""
    return [name for name, s in results.get("metrics", {}).items() if s.get("status") == "failed"]

