"""The numbers and files of a benchmark: per-run summaries, ratios between arms, the loss check,
the markdown tables, and the result files (``<tag>.json`` and ``<tag>.md``, never replaced silently).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

SIDES = ("reference", "lit")


# --- the training benchmark: summaries and ratios -----------------------------------------------
def summarize_run(run: dict[str, Any], skip: int = 1) -> dict[str, Any]:
    """Rates and fractions of one run, its first ``skip`` steps left out of the timings."""
    steps = run["steps"]
    timed = steps[skip:] if len(steps) > skip else steps
    seconds = sum(x["seconds"] for x in timed)
    tokens = sum(x["tokens"] for x in timed)
    positions = sum(x["positions"] for x in steps)
    memory = run.get("cuda_peak_mb") or run.get("peak_rss_mb")
    cpu = sum(x.get("cpu_seconds", 0.0) for x in timed)
    flops = [x.get("flops") for x in timed]
    flops_per_s = sum(flops) / seconds if seconds > 0 and flops and None not in flops else None
    peak = (run.get("peak") or {}).get("flops_per_s")
    return {
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
        "model_tflops_per_s": flops_per_s / 1e12 if flops_per_s is not None else None,
        "mfu": flops_per_s / peak if flops_per_s is not None and peak else None,
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
    "model_tflops_per_s": ("TFLOP/s", "", "model FLOPs per second (lit_recover.models.flops, the same count for "
                           "both sides)"),
    "mfu": ("fraction", "", "model FLOP utilization: model FLOPs/s over the device's matmul peak at the model's "
            "shapes in the run's matmul dtype, measured in the run's process after training"),
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


def clear_goals(out: dict[str, Any]) -> None:
    """A lever compares lit-recover with itself: the goals (about the reference) do not apply."""
    out["goals_met"] = {}
    for row in out["metrics"].values():
        if "goal" in row:
            row["goal"] = ""


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


# --- the training benchmark: tables ------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def fit_markdown(report: dict[str, Any]) -> str:
    """The ratio tables of a training report, one per scenario."""
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


def render_fit(path: Path) -> dict[str, Any]:
    """Recompute every scenario's summary from the runs' per-step data; rewrite the JSON and markdown."""
    report = json.loads(path.read_text())
    for sc in report["scenarios"].values():
        arms = tuple(sc["arms"])
        first = sc["settings"][arms[0]]
        out = compare(sc["runs"], report["skip"], first["group_by_length"], arms)
        if sc["runs"][0]["side"] == sc["runs"][1]["side"]:  # a lever
            clear_goals(out)
        sc.update(out)
    report["units"] = {m: u for m, (u, _, _) in METRICS.items()}
    text = fit_markdown(report)
    write_result(path, json.dumps(report, indent=1))
    write_result(path.with_suffix(".md"), text + "\n")
    print(text)
    return report


# --- the perplexity benchmark ----------------------------------------------------------------------
def _lit_batch(report: dict[str, Any]) -> str:
    size = report.get("lit_batch_size")
    return f" (lit-recover {size})" if size and size != report["batch_size"] else ""


def ppl_markdown(report: dict[str, Any]) -> str:
    """The perplexity benchmark's table: both perplexities, tokens/s and their ratios."""
    r = report["result"]
    t = r["tokens_per_s"]
    pairs = ", ".join(f"{x:.2f}" for x in t["ratio_pairs"])
    cpu_pairs = ", ".join(f"{x:.2f}" for x in r["tokens_per_cpu_s_ratio"]["pairs"])
    return "\n".join([
        f"# {report['tag']}",
        "",
        f"`{report['command']}`",
        "",
        f"{report['n_chunks']} chunks × {report['seq_len']} tokens, batch {report['batch_size']}"
        f"{_lit_batch(report)}, {report.get('dtype', 'float32')}; "
        f"{report['hardware'].get('cpu')}, {report['hardware'].get('cores')} cores, "
        f"torch {report['hardware'].get('torch')}, "
        f"{report['threads']} thread(s); load average {report['load_avg_start'][0]:.1f} at the start",
        "",
        "| quantity | reference (LLM-Pruner loop) | lit-recover | lit ÷ ref, median (pairs) |",
        "|---|---:|---:|---|",
        f"| perplexity | {r['ppl']['reference']:.6f} | {r['ppl']['lit']:.6f} | relative difference "
        f"{r['ppl']['relative_difference']:.1e} |",
        f"| tokens/s | {t['reference']:.1f} | {t['lit']:.1f} | {t['ratio_median']:.2f} ({pairs}) |",
        f"| tokens/CPU-s | | | {r['tokens_per_cpu_s_ratio']['median']:.2f} ({cpu_pairs}) |",
    ])


# --- result files ------------------------------------------------------------------------------------
def fresh_tag(out: Path, tag: str, overwrite: bool) -> str:
    """``tag``, or, where ``<out>/<tag>.json|md`` exist and ``overwrite`` is off, ``tag`` with a time stamp:
    earlier results are never replaced silently."""
    if overwrite or not any((out / f"{tag}.{ext}").exists() for ext in ("json", "md")):
        return tag
    stamped = f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"{out}: earlier results kept; this run writes {stamped}.json/.md (--overwrite replaces them)")
    return stamped


def write_result(path: Path, text: str) -> Path:
    """Write one result file through lit-recover's atomic writer: a kill leaves the old file or the new one."""
    from lit_recover.outputs import write_text

    return write_text(path, text)


def write_report(out: Path, tag: str, report: dict[str, Any], text: str) -> None:
    """``<out>/<tag>.json`` (the numbers) and ``<tag>.md`` (the table)."""
    write_result(out / f"{tag}.json", json.dumps(report, indent=1))
    write_result(out / f"{tag}.md", text + "\n")
    print(f"wrote {out / (tag + '.json')} and {out / (tag + '.md')}")
