"""Perplexity benchmark: lit-recover's evaluation against LLM-Pruner's plain loop, same numbers, tokens/s.

The reference is the loop LLM-Pruner's ``evaluator/ppl.py`` runs (reimplemented here): chunks of
``seq_len`` tokens in batches of 4, ``model(batch).logits`` in the model's dtype, a per-token
``CrossEntropyLoss(reduction="none")`` on the shifted logits, the token losses concatenated and
``exp(mean)``. lit-recover's side is ``lit_recover.evaluation.ppl.chunks_nll`` (summed fp32 loss in
float64, no KV cache). Both score the very same chunks (lit-recover's stream of the text), in one
process on one loaded model, alternating (reference, lit-recover, reference, …). Reported: both
perplexities and their difference, non-pad tokens/s per run, medians and per-pair ratios
(lit-recover ÷ reference). Results go to ``benchmarks/results/<tag>.json|md``.

Usage, from the repository root::

    python -m benchmarks.bench_ppl --quick                                  # tiny model, seconds
    python -m benchmarks.bench_ppl --model results/smollm2_taylor20/pruned_model.bin \\
        --data ../shared/data/ppl/wikitext2_test.txt --limit 32 --pairs 3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import DEFAULT_TEXT, RESULTS, command_line, default_tag, hardware
from benchmarks.report import fresh_tag, ppl_markdown, write_report


# --- settings --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny pruned model built on the fly")
    p.add_argument("--model", help="pruned pickle, pruned folder or HF folder (default: tiny with --quick)")
    p.add_argument("--data", default=str(DEFAULT_TEXT),
                   help="text file (default ../shared/data/ppl/wikitext2_test.txt)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="the reference loop's chunks per forward (LLM-Pruner: 4)")
    p.add_argument("--lit-batch-size", type=int, default=None,
                   help="lit-recover's chunks per forward (default: --batch-size)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's dtype, the same for both loops (default float32)")
    p.add_argument("--limit", type=int, default=None, help="first chunks only (default: 32, 8 with --quick)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tag", default=None, help="results name (default perf_ppl[_quick])")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--overwrite", action="store_true", help="replace results of the same --tag")
    return p.parse_args(argv)


# --- the two loops ---------------------------------------------------------------------------------
@torch.no_grad()
def reference_ppl(model: nn.Module, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """LLM-Pruner's loop: per-token losses in the logits' dtype, concatenated, exp of their mean."""
    nlls = []
    loss_fct = nn.CrossEntropyLoss(reduction="none")
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        lm_logits = model(batch).logits
        shift_logits = lm_logits[:, :-1, :].contiguous()
        shift_labels = batch[:, 1:].contiguous()
        nlls.append(loss_fct(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.view(-1)))
    return float(torch.cat(nlls, dim=-1).mean().exp().item())


def lit_ppl(model: nn.Module, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """lit-recover's evaluation loop on the same chunks."""
    from lit_recover.evaluation.ppl import chunks_nll

    nll, count = chunks_nll(model, chunks, batch_size=batch_size, progress=False)
    return math.exp(nll / count)


def timed(fn, *args) -> tuple[float, float, float]:
    """``(result, wall seconds, process CPU seconds)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def run(model: nn.Module, chunks: torch.Tensor, pairs: int, batch_size: int,
        lit_batch_size: int | None = None) -> dict[str, Any]:
    """Alternate the two loops ``pairs`` times (after one untimed warm-up of each)."""
    lit_batch_size = lit_batch_size or batch_size
    reference_ppl(model, chunks[:batch_size], batch_size)
    lit_ppl(model, chunks[:lit_batch_size], lit_batch_size)
    tokens = chunks.numel()
    runs: list[dict[str, Any]] = []
    for pair in range(pairs):
        for side, fn, size in (("reference", reference_ppl, batch_size), ("lit", lit_ppl, lit_batch_size)):
            ppl, wall, cpu = timed(fn, model, chunks, size)
            runs.append({"side": side, "pair": pair, "ppl": ppl, "seconds": wall, "cpu_seconds": cpu,
                         "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
                         "load_avg": os.getloadavg()[0]})
            print(f"pair {pair} {side:9s} ppl {ppl:.6f}  {tokens / wall:8.1f} tokens/s", flush=True)
    ref = [r for r in runs if r["side"] == "reference"]
    lit = [r for r in runs if r["side"] == "lit"]
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(ref, lit)]
    cpu_ratios = [b["tokens_per_cpu_s"] / a["tokens_per_cpu_s"] for a, b in zip(ref, lit)]
    return {
        "runs": runs,
        "ppl": {"reference": ref[0]["ppl"], "lit": lit[0]["ppl"],
                "relative_difference": abs(lit[0]["ppl"] - ref[0]["ppl"]) / ref[0]["ppl"]},
        "tokens_per_s": {"reference": statistics.median(r["tokens_per_s"] for r in ref),
                         "lit": statistics.median(r["tokens_per_s"] for r in lit),
                         "ratio_median": statistics.median(ratios), "ratio_pairs": ratios},
        "tokens_per_cpu_s_ratio": {"median": statistics.median(cpu_ratios), "pairs": cpu_ratios},
    }


# --- the run ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from lit_recover.evaluation.ppl import chunk_stream, make_chunks, read_text_file
    from lit_recover.models.load import load_pruned

    if args.threads:
        torch.set_num_threads(args.threads)
    limit = args.limit or (8 if args.quick else 32)
    tag = args.tag or default_tag("ppl", args.quick)
    out = Path(args.out)
    tag = fresh_tag(out, tag, args.overwrite)
    with tempfile.TemporaryDirectory(prefix="bench-ppl-") as tmp:
        model_path = args.model
        if model_path is None:
            if not args.quick:
                raise SystemExit("error: --model is required without --quick")
            from lit_recover.demos.tiny import write_tiny_pruned

            model_path = str(write_tiny_pruned(Path(tmp) / "pruned_model.bin"))
        model, tokenizer = load_pruned(model_path)
    model = model.to(getattr(torch, args.dtype)).eval()
    # the protocol's stream; for a limit only the prefix that the first chunks need is tokenized
    ids, _ = chunk_stream(tokenizer, read_text_file(args.data), args.seq_len, limit, add_bos=True)
    chunks = make_chunks(ids, args.seq_len, limit)
    command = command_line("bench_ppl", argv)
    report = {"tag": tag, "command": command, "hardware": hardware(), "threads": torch.get_num_threads(),
              "model": str(model_path) if args.model else "tiny", "data": args.data, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "lit_batch_size": args.lit_batch_size or args.batch_size,
              "dtype": args.dtype, "n_chunks": len(chunks), "load_avg_start": os.getloadavg(),
              "units": {"ppl": "perplexity", "tokens_per_s": "scored chunk tokens per wall second",
                        "seconds": "s"},
              "result": run(model, chunks, args.pairs, args.batch_size, args.lit_batch_size)}
    text_md = ppl_markdown(report)
    print(text_md)
    write_report(out, tag, report, text_md)
    return report


if __name__ == "__main__":
    main()
