"""Zero-shot accuracy through lm-eval (the library, not a re-implementation).

lm-eval's own task definitions (prompts, choices, metrics) are used unchanged. For each requested
task we write a small YAML into a temporary folder that ``include``s lm-eval's built-in task file:

- with ``data_dir``: it renames the task ``<task>_local`` and points it at
  ``<data_dir>/<task>/<split>.jsonl`` (``dataset_path: json``, ``dataset_name: null``,
  ``dataset_kwargs.data_files``; other splits null), where ``<split>`` is the split lm-eval scores
  (the task's test split when it has one, else validation);
- without: it keeps the built-in name and its hub dataset; offline, that task is skipped.

Each task is built on its own, so one unreachable dataset skips that task only; the tasks that
built are then scored together by ``lm_eval.evaluator.evaluate`` on the in-memory model
(``HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=add_bos)``).

Requests are encoded without special tokens by default, as LLM-Pruner's lm-eval fork does
(``tokenizer.encode(text, add_special_tokens=False)``): lm-eval 0.4 leaves ``add_special_tokens``
to the tokenizer when ``add_bos_token`` is unset, which starts every request of a LLaMA tokenizer
with BOS. ``add_bos=True`` passes ``add_bos_token=True``, i.e. the tokenizer's own special tokens
(one BOS for LLaMA tokenizers).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lit_recover.errors import LitRecoverError
from lit_recover.evaluation.report import OK, failed, measurement, skipped

log = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = (
    "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
)
# The number LLM-Pruner's tables report for each task.
HEADLINE_METRICS: dict[str, str] = {
    "boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
}
# Built-in task files under lm_eval/tasks/ (lm-eval 0.4.x), so the default tasks need no index scan.
BUILTIN_TASK_FILES: dict[str, str] = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
LOCAL_SUFFIX = "_local"
# lm-eval's default seeds (lm_eval/defaults.py), so that runs through this bridge match its CLI.
_RANDOM_SEED, _OTHER_SEED = 0, 1234


class ZeroShotDataError(LitRecoverError, ValueError):
    """A local task file that cannot be used; the message names the file, the line and the problem."""


def lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def builtin_task_file(task: str) -> Path:
    """The YAML that defines an lm-eval built-in task."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    if task in BUILTIN_TASK_FILES and (root / BUILTIN_TASK_FILES[task]).is_file():
        return root / BUILTIN_TASK_FILES[task]
    # Any other task: ask lm-eval's index (scans every built-in YAML, a few seconds).
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise KeyError(f"{task!r} is not an lm-eval task defined by a YAML file")
    if getattr(entry.kind, "name", None) != "TASK":
        raise KeyError(f"{task!r} is a group or tag in lm-eval, not a single task")
    return Path(entry.yaml_path)


def eval_split(task_file: Path) -> tuple[str, str]:
    """The split lm-eval scores for a task: ``("test_split", name)`` when it has one, else validation's."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(task_file, resolve_func=False)
    for key in ("test_split", "validation_split"):
        if cfg.get(key):
            return key, str(cfg[key])
    raise KeyError(f"{task_file}: the task has neither a test nor a validation split")


def check_jsonl(path: Path) -> int:
    """Check every line is a JSON object with the first line's keys; return the number of rows."""
    keys: set[str] | None = None
    rows = 0
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise ZeroShotDataError(f"{path}: no such file") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ZeroShotDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except UnicodeDecodeError:
                raise ZeroShotDataError(f"{path}:{lineno}: not UTF-8 text") from None
            if not isinstance(rec, dict):
                raise ZeroShotDataError(f"{path}:{lineno}: expected a JSON object, found {type(rec).__name__}")
            if keys is None:
                keys = set(rec)
            elif set(rec) != keys:
                missing, extra = sorted(keys - set(rec)), sorted(set(rec) - keys)
                raise ZeroShotDataError(
                    f"{path}:{lineno}: fields differ from line 1 (missing {missing}, extra {extra})")
            rows += 1
    if rows == 0:
        raise ZeroShotDataError(f"{path}: has no records")
    return rows


def write_task_yaml(task: str, out_dir: Path, data_dir: str | Path | None = None) -> tuple[str, dict]:
    """Write ``out_dir/<name>.yaml`` for one task; return lm-eval's task name and what it reads.

    Raises:
        ZeroShotDataError: the local file is missing or malformed.
        KeyError: lm-eval has no such task.
    """
    import yaml

    base = builtin_task_file(task)
    cfg: dict = {"include": str(base.resolve())}
    info: dict = {"lm_eval_task": task}
    if data_dir is None:
        name = task
        info["source"] = "hub"
    else:
        split_key, split = eval_split(base)
        path = Path(data_dir) / task / f"{split}.jsonl"
        info.update(source=str(path), split=split, n_rows=check_jsonl(path))
        name = f"{task}{LOCAL_SUFFIX}"
        cfg.update({
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(path.resolve())}},
            "training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None,
            "tag": [],  # the built-in's tags would group our copies with the hub tasks
        })
        cfg[split_key] = split
    cfg["task"] = name
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return name, info


def _metrics(task_results: dict) -> dict[str, dict]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` as ``{"acc": {"value": x, "stderr": s}}``."""
    out: dict[str, dict] = {}
    for key, value in task_results.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        name = metric if filt == "none" else f"{metric},{filt}"
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        out[name] = measurement(
            float(value) if isinstance(value, (int, float)) else value,
            "fraction" if metric.startswith("acc") else "score",
            higher_is_better=True if metric.startswith("acc") else None,
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
        )
    return out


def headline_metric(task: str, metrics: dict) -> str | None:
    """The metric LLM-Pruner reports for a task; for other tasks acc_norm, else acc, else the first."""
    if task in HEADLINE_METRICS:
        return HEADLINE_METRICS[task]
    for name in ("acc_norm", "acc"):
        if name in metrics:
            return name
    return next(iter(metrics), None)


def task_result(task: str, lm_eval_results: dict, name: str | None = None, info: dict | None = None) -> dict:
    """One task's entry from ``lm_eval.evaluator.evaluate``'s output: its headline metric, with every metric.

    Args:
        task: the requested task (``boolq``); its headline metric is LLM-Pruner's (:data:`HEADLINE_METRICS`).
        lm_eval_results: what ``evaluate`` returned (``results``, ``n-samples``, ``versions``).
        name: lm-eval's name of the task (``boolq_local``); ``task`` when ``None``.
        info: where the task's data came from (from :func:`write_task_yaml`).
    """
    name = name or task
    metrics = _metrics(lm_eval_results.get("results", {}).get(name, {}))
    head = headline_metric(task, metrics)
    if head not in metrics:
        return failed(f"lm-eval returned no {head} for {task} (got {sorted(metrics)})")
    n = lm_eval_results.get("n-samples", {}).get(name, {})
    return {
        **metrics[head], "status": OK, "headline_metric": head,
        "n_examples": n.get("effective"), "n_examples_total": n.get("original"),
        "lm_eval_task": name, "task_version": lm_eval_results.get("versions", {}).get(name),
        **{k: v for k, v in (info or {}).items() if k != "lm_eval_task"},
        "details": metrics,
    }


def evaluate_zero_shot(model: nn.Module, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS,
                       data_dir: str | Path | None = None, limit: int | float | None = None,
                       batch_size: int = 8, num_fewshot: int = 0,
                       bootstrap_iters: int = 100_000, add_bos: bool = False) -> dict:
    """The ``zero_shot`` section: lm-eval on the in-memory model, each task ok, skipped or failed.

    Args:
        model: a Hugging Face causal LM, in eval mode.
        tokenizer: its tokenizer (with a pad token).
        tasks: lm-eval task names.
        data_dir: folder of ``<task>/<split>.jsonl`` in the hub datasets' schemas; ``None`` uses the hub.
        limit: examples per task (count, or fraction < 1); ``None`` for all.
        batch_size: lm-eval batch size.
        num_fewshot: shots (0 for LLM-Pruner's tables).
        bootstrap_iters: lm-eval's bootstrap iterations for the stderr of metrics without a closed form.
        add_bos: encode requests with the tokenizer's special tokens (a LLaMA tokenizer: BOS first);
            ``False`` (default) encodes them without, as LLM-Pruner's lm-eval fork does.
    """
    t0 = time.perf_counter()
    tasks = list(dict.fromkeys(tasks))
    out: dict = {"status": OK, "settings": {
        "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
        "data_dir": None if data_dir is None else str(data_dir), "lm_eval_version": lm_eval_version(),
        "headline_metrics": {t: HEADLINE_METRICS.get(t) for t in tasks},
        "add_bos": add_bos,
    }, "tasks": {}}
    if data_dir is not None and not Path(data_dir).is_dir():
        out.update(failed(f"{data_dir}: zero_shot_data_dir is not a folder"))
        out["elapsed"] = measurement(time.perf_counter() - t0, "s")
        return out

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="lit_recover_tasks_") as tmp:
        names: dict[str, str] = {}
        infos: dict[str, dict] = {}
        for task in tasks:
            try:
                names[task], infos[task] = write_task_yaml(task, Path(tmp), data_dir)
            except (ZeroShotDataError, KeyError) as exc:
                msg = exc.args[0] if isinstance(exc, KeyError) else str(exc)
                out["tasks"][task] = failed(msg)
                log.error("zero-shot %s: %s", task, msg)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        built = {}
        for task, name in names.items():
            try:
                # Building a task loads its dataset: the hub unreachable shows up here, per task.
                built[task] = manager.load([name])["tasks"][name]
            except Exception as exc:
                if data_dir is None:
                    reason = (f"could not load {task}'s dataset from the hub ({type(exc).__name__}: {exc}); "
                              "pass zero_shot_data_dir")
                    out["tasks"][task] = skipped(reason)
                else:
                    reason = f"{infos[task]['source']}: lm-eval could not build the task ({type(exc).__name__}: {exc})"
                    out["tasks"][task] = failed(reason)
                log.warning("zero-shot %s: %s", task, reason)
        if built:
            for task_obj in built.values():
                # As lm-eval's simple_evaluate does; it also collects environment info for ~10 s,
                # which we record ourselves, so the lower-level evaluate() is called instead.
                if task_obj.get_config("num_fewshot") != num_fewshot:
                    task_obj.set_config(key="num_fewshot", value=num_fewshot)
                task_obj.set_fewshot_seed(seed=_OTHER_SEED)
            # The suite restores the caller's RNG state afterwards (see suite.preserve_rng).
            random.seed(_RANDOM_SEED)
            np.random.seed(_OTHER_SEED)
            torch.manual_seed(_OTHER_SEED)
            # add_bos_token is lm-eval's add_special_tokens for every request: False as LLM-Pruner's fork.
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
            res = evaluate(lm=lm, task_dict={"tasks": {t.task_name: t for t in built.values()}, "groups": {},
                                             "group_map": {}},
                           limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False)
            del lm
            for task in built:
                out["tasks"][task] = task_result(task, res, names[task], infos[task])
    # Keep the requested order, whatever order tasks finished or failed in.
    out["tasks"] = {t: out["tasks"][t] for t in tasks if t in out["tasks"]}
    ran = {t: r for t, r in out["tasks"].items() if r.get("status") == OK}
    if ran:
        values = [r["value"] for r in ran.values() if isinstance(r["value"], float)]
        out["average"] = measurement(sum(values) / len(values), "fraction", higher_is_better=True,
                                     over=list(ran), complete=len(ran) == len(tasks))
    elif out.get("status") == OK:
        reasons = "; ".join(f"{k}: {v.get('reason')}" for k, v in out["tasks"].items())
        bad = any(r.get("status") == "failed" for r in out["tasks"].values())
        out.update(failed(reasons) if bad else skipped(reasons))
    out["elapsed"] = measurement(time.perf_counter() - t0, "s")
    return out
