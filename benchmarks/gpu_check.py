"""The GPU check: lit-recover and the reference recipe at LLaMA-7B shapes on one GPU, offline, in minutes.

Nothing large travels and nothing comes from the network: the model is a randomly initialised
LLaMA-7B-shaped decoder (hidden 4096, 32 layers, FFN 11008, 32 heads, vocabulary 32000) pruned 20 %
by the project's pruner (``random`` importance), the data are generated Alpaca-style records, the
tokenizer is a byte-level BPE trained on them and padded to the model's vocabulary. The stages, in
order, each recorded with its status (``ok``, ``failed``, ``skipped`` with the reason) and seconds:

1. ``model``: build, write the dense folder (the distillation's teacher), prune, write the pruned
   folder (``lit_recover.models.folder``), the records and a perplexity text;
2. ``peak``: the device's matmul rate at the pruned model's projection shapes and a micro-batch's
   tokens, in bfloat16 (lit-recover's ``bf16-mixed``) and float16 (the recipe's fp16), the median of
   repeats (``benchmarks.matmul_peak``): what MFU divides by;
3. ``evaluation``: the evaluation suite on the pruned model with a small limit (perplexity on the
   generated text, latency, memory; zero-shot only with lm-eval and ``--zero-shot-data-dir``, else
   recorded as skipped with the reason);
4. ``reference``: the steps through the reference recipe (``reference_trainer``: HF Trainer + PEFT,
   its fp16 on CUDA), in a process of its own;
5. ``fit``: ``main.py fit`` (``RecoveryCLI`` with ``configs/recover.yaml``) on 1 GPU, bf16-mixed,
   SDPA, the seed's micro-batch 4 and cutoff 256, under the ``configs/scale/ddp.yaml`` overlay packed
   (``data.padding_free``) and padded, then under ``configs/scale/fsdp.yaml`` (FSDP2, activation
   checkpointing) packed and padded: four runs one after the other in one process, each result
   written as it ends (a run cut short by the budget leaves the others');
6. ``distillation``: the same steps distilled from the dense 7B-shaped model (``--model.teacher``, the
   module's default distillation settings), ``configs/scale/ddp.yaml``, packed. Its MFU counts the
   student's LoRA FLOPs only: the teacher's forward pass is extra work the number leaves out, so its
   tokens/s and seconds per step against ``ddp_packed`` are the cost of distillation.

Every fit run carries the benchmark's meter (``benchmarks.meter``): tokens/s over the steps after the
first ``skip``, model FLOPs per step (``lit_recover.models.flops``), MFU against the measured peak
of the run's matmul dtype (and, for the recipe's fp16, against the bfloat16 peak too), the peak
CUDA memory, and lit-recover ÷ reference for each. The end-of-fit merge and save are left out of the
lit-recover runs (they write tens of GB and are not what is timed). A time budget (``--budget-s``)
skips the stages that no longer fit, so the check ends in time and says what it left out.

``--dry-run`` runs the same stages at tiny shapes on the CPU (float32, gloo, a few steps), so the
script is known to work before a GPU is at hand (``tests/test_gpu_check.py``).

Usage, from the repository root: ``bash benchmarks/gpu_check.sh [--dry-run] [--out FILE.json]``
(installs the carried wheels first), or ``python -m benchmarks.gpu_check …`` where every package is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_fit import FitSettings
from benchmarks.common import RESULTS, ROOT, WORKER_ENV
from benchmarks.report import fresh_tag, summarize_run, write_result

SCALE = ROOT / "configs" / "scale"
OPTIONAL = ("datasets", "jsonargparse", "lm_eval", "gguf")


# --- what runs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """A LLaMA decoder's dense shapes (before pruning)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int


LLAMA_7B = Shapes(hidden_size=4096, num_layers=32, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                  vocab_size=32000)
TINY = Shapes(hidden_size=64, num_layers=4, intermediate_size=176, num_heads=4, num_kv_heads=4, vocab_size=1024)

# name -> (scale overlay, packed micro-batches), in the order the fit stage runs them
FIT_RUNS = {"ddp_packed": ("ddp", True), "ddp_padded": ("ddp", False),
            "fsdp2_packed": ("fsdp", True), "fsdp2_padded": ("fsdp", False)}
# the distillation stage's run: the ddp_packed run with the dense model as its teacher
DISTILL_RUN = "distill_ddp_packed"


@dataclass
class Plan:
    """The settings of one check (``plan_for``)."""

    dry_run: bool
    shapes: Shapes
    device: str
    precision: str
    torch_dtype: str
    matmul_dtype: str
    reference_dtype: str
    steps: int
    skip: int
    batch_size: int
    micro_batch_size: int
    cutoff_len: int
    pruning_ratio: float
    records: int
    output_words: tuple[int, int]
    ppl_limit: int
    budget_s: float | None
    peak_repeats: int
    peak_min_seconds: float


def plan_for(dry_run: bool, steps: int | None = None, batch_size: int | None = None,
             budget_s: float | None = None) -> Plan:
    if dry_run:
        return Plan(
            dry_run=True, shapes=TINY, device="cpu", precision="32-true", torch_dtype="float32",
            matmul_dtype="float32", reference_dtype="float32", steps=steps or 2, skip=1,
            batch_size=batch_size or 4, micro_batch_size=2, cutoff_len=128, pruning_ratio=0.2, records=24,
            output_words=(3, 30), ppl_limit=2, budget_s=budget_s, peak_repeats=3, peak_min_seconds=0.01)
    # on CUDA what the command line gives by default: bf16-mixed over the base in its stored dtype (bf16)
    return Plan(
        dry_run=False, shapes=LLAMA_7B, device="cuda", precision="bf16-mixed", torch_dtype="auto",
        matmul_dtype="bfloat16", reference_dtype="float16", steps=steps or 20, skip=2,
        batch_size=batch_size or 16, micro_batch_size=4, cutoff_len=256, pruning_ratio=0.2, records=480,
        output_words=(5, 160), ppl_limit=8, budget_s=420.0 if budget_s is None else budget_s, peak_repeats=7,
        peak_min_seconds=0.2)


# --- offline inputs: records, a text, a tokenizer -----------------------------------------------
_WORDS = (
    "the a of and to in is that it for on with as was be by this are or from at an which have not but "
    "they you we can all one more their will has there when been would so if what about into some than "
    "other time people year way day thing man world life hand part child eye woman place work week case "
    "point number group problem fact water story house light music river city garden table letter "
    "friend school road market bridge island mountain forest window morning evening summer winter "
    "write read explain describe list give name find make keep build grow learn teach open close bring "
    "carry follow change answer choose compare measure count travel cook plant paint walk speak listen "
    "small large quick slow bright dark warm cold early late simple clear careful useful quiet strong "
    "three five seven ten twenty hundred first second last next every each many few several"
).split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(_sentence(rng, 4, 18))
    return " ".join(out)


def generate_records(n: int, output_words: tuple[int, int], seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca-style records of varied lengths (4 in 10 with an ``input``)."""
    rng = random.Random(seed)
    return [{"instruction": _sentence(rng, 4, 16),
             "input": _text(rng, rng.randint(5, 40)) if rng.random() < 0.4 else "",
             "output": _text(rng, rng.randint(*output_words))} for _ in range(n)]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts``, its vocabulary padded to ``vocab_size`` with ``<unused_N>``
    entries that no text maps to; ``(tokenizer, ids the training produced)``.

    The model's embedding and LM head keep their real size (32000 rows for LLaMA-7B), so every shape
    and FLOP is the real one; only the ids a text uses are fewer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    trained = len(vocab)
    if sorted(vocab.values()) != list(range(trained)):
        raise RuntimeError("the trained BPE vocabulary is not numbered 0..n-1")
    for i in range(vocab_size - trained):
        vocab[f"<unused_{i}>"] = trained + i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=4096)
    return fast, trained


def build_model(shapes: Shapes, tokenizer, device: str, dtype, seed: int = 0):
    """A randomly initialised dense ``LlamaForCausalLM`` at ``shapes``, made directly on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shapes.vocab_size, hidden_size=shapes.hidden_size,
                         intermediate_size=shapes.intermediate_size, num_hidden_layers=shapes.num_layers,
                         num_attention_heads=shapes.num_heads, num_key_value_heads=shapes.num_kv_heads,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


# --- the stages -----------------------------------------------------------------------------------
class Check:
    """The stages of one check, their records, and the time budget."""

    def __init__(self, plan: Plan, workdir: Path, block_imports: list[str], zero_shot_data_dir: str | None) -> None:
        self.plan = plan
        self.workdir = workdir
        self.block_imports = block_imports
        self.zero_shot_data_dir = zero_shot_data_dir
        self.started = time.perf_counter()
        self.report: dict[str, Any] = {
            "check": "lit-recover GPU check", "dry_run": plan.dry_run,
            "plan": {**dataclasses.asdict(plan), "shapes": dataclasses.asdict(plan.shapes)},
            "environment": environment(block_imports), "stages": {}, "runs": {}, "summary": {},
        }
        self.model = self.tokenizer = None
        self.folder: Path | None = None
        self.teacher: Path | None = None  # the dense model's folder, the distillation's teacher
        self.data: Path | None = None
        self.text: Path | None = None
        self.peaks: dict[str, dict[str, Any]] = {}

    def remaining(self) -> float:
        if self.plan.budget_s is None:
            return float("inf")
        return self.plan.budget_s - (time.perf_counter() - self.started)

    def stage(self, name: str, function, needs_s: float = 0.0, requires: tuple[str, ...] = ()) -> None:
        """Run ``function()`` as stage ``name`` unless a stage it ``requires`` did not succeed or fewer
        than ``needs_s`` seconds of the budget are left; record status, seconds and what it returned."""
        record: dict[str, Any]
        missing = [r for r in requires if self.report["stages"].get(r, {}).get("status") != "ok"]
        if missing:
            record = {"status": "skipped", "reason": f"needs stage {', '.join(missing)}"}
        elif self.remaining() < needs_s:
            left = self.remaining()
            record = {"status": "skipped", "reason": f"time budget: {left:.0f} s left, needs ~{needs_s:.0f} s"}
        else:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                out = function()
                record = {"status": "ok", **(out or {})}
            except Exception as exc:  # a failed stage is recorded and the check goes on
                record = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(limit=8)[-4000:]}
            record["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["stages"][name] = record
        line = record.get("reason") or f"{record.get('seconds', 0):.1f} s"
        print(f"   {name}: {record['status']} ({line})", flush=True)

    # 1 ---------------------------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        import torch

        from lit_recover.data.prompts import load_template
        from lit_recover.models.anatomy import layer_shapes
        from lit_recover.models.folder import save_pruned_folder
        from lit_recover.pruning.pruner import prune_model

        plan = self.plan
        records = generate_records(plan.records, plan.output_words)
        self.data = self.workdir / "records.json"
        self.data.write_text(json.dumps(records))
        rng = random.Random(1)
        self.text = self.workdir / "ppl_text.txt"
        self.text.write_text("\n\n".join(_text(rng, 120) for _ in range(plan.ppl_limit * 4)))
        template = load_template("alpaca")
        texts = [template.render(r["instruction"], r["input"], r["output"]) for r in records]
        t0 = time.perf_counter()
        self.tokenizer, trained = build_tokenizer([*texts, self.text.read_text()], plan.shapes.vocab_size)
        lengths = [min(plan.cutoff_len, len(ids)) for ids in self.tokenizer(texts)["input_ids"]]
        t1 = time.perf_counter()
        dtype = getattr(torch, plan.matmul_dtype)
        self.model = build_model(plan.shapes, self.tokenizer, plan.device, dtype)
        params_dense = sum(p.numel() for p in self.model.parameters())
        self.teacher = self.workdir / "dense_model"
        save_pruned_folder(self.model, self.tokenizer, self.teacher)
        t2 = time.perf_counter()
        pruning = prune_model(self.model, self.tokenizer, plan.pruning_ratio, criterion="random", seed=0)
        t3 = time.perf_counter()
        self.folder = self.workdir / "pruned_model"
        save_pruned_folder(self.model, self.tokenizer, self.folder)
        t4 = time.perf_counter()
        shapes = layer_shapes(self.model)
        return {"params_dense": params_dense, "params_pruned": pruning["params_after"],
                "achieved_ratio": pruning["achieved_ratio"], "layer_shapes": shapes,
                "tokenizer": {"vocab_size": len(self.tokenizer), "trained_ids": trained,
                              "padded_with_unused": len(self.tokenizer) - trained},
                "records": len(records), "mean_tokens": sum(lengths) / len(lengths),
                "at_cutoff": sum(n >= plan.cutoff_len for n in lengths),
                "folder_mb": round(sum(p.stat().st_size for p in self.folder.iterdir()) / 2**20, 1),
                "seconds_by_step": {"tokenizer": round(t1 - t0, 2), "model": round(t2 - t1, 2),
                                    "prune": round(t3 - t2, 2), "save": round(t4 - t3, 2)},
                "dense_folder_mb": round(sum(p.stat().st_size for p in self.teacher.iterdir()) / 2**20, 1)}

    # 2 ---------------------------------------------------------------------------------------------
    def peak(self) -> dict[str, Any]:
        from benchmarks.matmul_peak import measure

        plan, built = self.plan, self.report["stages"]["model"]
        tokens = -(-int(plan.micro_batch_size * built["mean_tokens"]) // 64) * 64
        for dtype in dict.fromkeys([plan.matmul_dtype, plan.reference_dtype]):
            self.peaks[dtype] = measure(built["layer_shapes"], plan.shapes.hidden_size, tokens, dtype, plan.device,
                                        repeats=plan.peak_repeats, min_seconds=plan.peak_min_seconds)
            print(f"   matmul peak {dtype}: {self.peaks[dtype]['gflops_per_s']:.1f} GFLOP/s at {tokens} tokens",
                  flush=True)
        return {"tokens": tokens, "peaks": self.peaks}

    # 3 ---------------------------------------------------------------------------------------------
    def evaluation(self) -> dict[str, Any]:
        from lit_recover.evaluation import EvalConfig, evaluate_model

        metrics, zero_shot = ["ppl", "latency", "memory"], None
        if "lm_eval" in self.block_imports or not _importable("lm_eval"):
            zero_shot = {"status": "skipped", "reason": "lm-eval is not installed"}
        elif not self.zero_shot_data_dir:
            zero_shot = {"status": "skipped", "reason": "no --zero-shot-data-dir (no network for the hub's copies)"}
        else:
            metrics.append("zero_shot")
        quick = self.plan.dry_run
        config = EvalConfig(metrics=metrics, ppl_datasets=[], ppl_texts={"generated": str(self.text)},
                            limit=self.plan.ppl_limit, zero_shot_data_dir=self.zero_shot_data_dir,
                            latency_prompt_tokens=16 if quick else 32, latency_new_tokens=4 if quick else 16,
                            latency_runs=2 if quick else 3, throughput_batch_size=2 if quick else 4,
                            throughput_seq_len=32 if quick else 128, progress=False)
        results = evaluate_model(self.model, self.tokenizer, config, label="pruned", source=str(self.folder))
        if zero_shot is not None:
            results["metrics"]["zero_shot"] = zero_shot
        statuses = {k: v.get("status") for k, v in results["metrics"].items()}
        return {"statuses": statuses, "results": results}

    def free_model(self) -> None:
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # 4-6 -------------------------------------------------------------------------------------------
    def settings(self, name: str | None) -> FitSettings:
        """The run's ``FitSettings``: the reference (``None``), a lit-recover run of ``FIT_RUNS`` or
        ``DISTILL_RUN``."""
        plan = self.plan
        lit_args: list[str] = []
        packed = False
        if name is not None:
            overlay, packed = FIT_RUNS["ddp_packed" if name == DISTILL_RUN else name]
            # the overlay first: a later --config would override what follows it
            lit_args = ["--config", str(SCALE / f"{overlay}.yaml"), "--trainer.devices", "1",
                        "--trainer.accelerator", "gpu" if plan.device == "cuda" else "cpu",
                        "--trainer.precision", plan.precision, "--model.torch_dtype", plan.torch_dtype,
                        "--model.attn_implementation", "sdpa"]
            if name == DISTILL_RUN:
                lit_args += ["--model.teacher", str(self.teacher)]
        return FitSettings(model=str(self.folder), data=str(self.data), batch_size=plan.batch_size,
                           micro_batch_size=plan.micro_batch_size, cutoff_len=plan.cutoff_len, steps=plan.steps,
                           lit_args=lit_args, padding_free=packed, skip_outputs=True)

    def fits(self, kind: str, names: list[str | None], label: str) -> dict[str, Any]:
        """The runs ``names`` in one worker process (``--worker``); their meter results into ``runs``."""
        runs = [{"name": n or "reference", "settings": dataclasses.asdict(self.settings(n))} for n in names]
        spec, result = self.workdir / f"{label}.runs.json", self.workdir / f"{label}.result.json"
        spec.write_text(json.dumps(runs))
        log = self.workdir / f"{label}.log"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", kind, "--runs", str(spec),
               "--result", str(result)]
        if self.block_imports:
            cmd += ["--block-imports", ",".join(self.block_imports)]
        # what is left of the budget, less a few seconds for the summary
        timeout = None if self.plan.budget_s is None else max(10.0, self.remaining() - 10.0)
        code: int | str
        with log.open("w") as fh:
            try:
                code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                      env={**os.environ, **WORKER_ENV}, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = f"stopped after {timeout:.0f} s (time budget)"
        done = json.loads(result.read_text()) if result.exists() else []
        for run in done:
            self.report["runs"][run["name"]] = run
        tail = "\n".join(log.read_text().splitlines()[-25:])
        failed = [r["name"] for r in done if r.get("status") != "ok"]
        if code != 0 or failed or len(done) < len(runs):
            raise RuntimeError(f"worker exit {code}; runs not ok: {failed or 'none'}; "
                               f"finished {len(done)} of {len(runs)}; log tail:\n{tail}")
        return {"runs": [r["name"] for r in done], "log_tail": tail}

    def run(self) -> dict[str, Any]:
        self.stage("model", self.build, needs_s=60)
        self.stage("peak", self.peak, needs_s=10, requires=("model",))
        self.stage("evaluation", self.evaluation, needs_s=30, requires=("model",))
        self.free_model()
        self.stage("reference", lambda: self.fits("reference", [None], "reference"), needs_s=60, requires=("model",))
        self.stage("fit", lambda: self.fits("lit", list(FIT_RUNS), "fit"), needs_s=90, requires=("model",))
        self.stage("distillation", lambda: self.fits("lit", [DISTILL_RUN], "distillation"), needs_s=90,
                   requires=("model",))
        self.report["summary"] = summarize(self.report["runs"], self.peaks, self.plan)
        self.report["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        return self.report


# --- the numbers ----------------------------------------------------------------------------------
def summarize(runs: dict[str, Any], peaks: dict[str, dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Per run: tokens/s, model TFLOP/s, MFU (against its dtype's measured peak and the bfloat16 one),
    peak memory; for each lit-recover run, its ratios to the reference."""
    out: dict[str, Any] = {}
    bf16 = (peaks.get("bfloat16") or {}).get("flops_per_s")
    for name, run in runs.items():
        if run.get("status") != "ok" or not run.get("steps"):
            continue
        peak = peaks.get(run.get("matmul_dtype") or "")
        sm = summarize_run({**run, "peak": peak}, plan.skip)
        flops = sm["model_tflops_per_s"] * 1e12 if sm["model_tflops_per_s"] is not None else None
        out[name] = {
            "tokens_per_s": sm["tokens_per_s"], "model_tflops_per_s": sm["model_tflops_per_s"],
            "mfu": sm["mfu"], "mfu_vs_bf16_peak": flops / bf16 if flops is not None and bf16 else None,
            "matmul_dtype": run.get("matmul_dtype"), "peak_memory_mb": sm["peak_memory_mb"],
            "cuda_baseline_mb": run.get("cuda_baseline_mb"), "padded_fraction": sm["padded_fraction"],
            "s_per_step": sm["s_per_step"], "mean_loss": sm["mean_loss"], "steps": sm["steps"],
        }
    ref = out.get("reference")
    if ref:
        # MFU against one peak for both sides (bfloat16's) where it was measured: the ratio of model FLOPs/s
        mfu = "mfu_vs_bf16_peak" if ref.get("mfu_vs_bf16_peak") is not None else "mfu"
        for name, row in out.items():
            if name != "reference":
                row["vs_reference"] = {"tokens_per_s": _ratio(row["tokens_per_s"], ref["tokens_per_s"]),
                                       "mfu": _ratio(row.get(mfu), ref.get(mfu)),
                                       "peak_memory": _ratio(row["peak_memory_mb"], ref["peak_memory_mb"])}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(report: dict[str, Any]) -> str:
    """The printed summary: one row per run, then the stages."""
    def f(v, spec=".3g"):
        return "–" if v is None else format(v, spec)

    lines = ["", "run            tokens/s  TFLOP/s  MFU(own) MFU(bf16)  peak MiB | ÷ref tok/s  ÷ref MFU  ÷ref mem"]
    for name, row in report["summary"].items():
        vs = row.get("vs_reference", {})
        lines.append(
            f"{name:13s} {f(row['tokens_per_s'], '9.1f')} {f(row['model_tflops_per_s'], '8.2f')} "
            f"{f(row['mfu'], '8.3f')} {f(row['mfu_vs_bf16_peak'], '9.3f')} {f(row['peak_memory_mb'], '9.0f')} | "
            f"{f(vs.get('tokens_per_s'), '10.2f')} {f(vs.get('mfu'), '9.2f')} {f(vs.get('peak_memory'), '9.2f')}")
    lines.append("")
    for name, st in report["stages"].items():
        lines.append(f"stage {name:13s} {st['status']:8s} {st.get('seconds', '')!s:>8} {st.get('reason', '')}")
    peaks = report["stages"].get("peak", {}).get("peaks", {})
    for dtype, p in peaks.items():
        lines.append(f"matmul peak {dtype}: {p['gflops_per_s']:.1f} GFLOP/s ({p['device']}, {p['tokens']} tokens)")
    lines.append(f"elapsed {report.get('elapsed_s')} s; {'dry run (tiny shapes, CPU)' if report['dry_run'] else 'GPU'}")
    return "\n".join(lines)


# --- the environment ----------------------------------------------------------------------------
def _importable(name: str) -> bool:
    import importlib.util

    if name in sys.modules and sys.modules[name] is None:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def block(names: list[str]) -> None:
    """Make ``import name`` fail as if the package were missing (``--block-imports``: what a machine
    without them does)."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


def environment(blocked: list[str]) -> dict[str, Any]:
    import importlib.metadata
    import importlib.util

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "platform": platform.platform(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "count": torch.cuda.device_count()}
    packages = {}
    for name in ("transformers", "peft", "lightning", "torchmetrics", "accelerate", "tokenizers", "pyarrow", *OPTIONAL):
        if name in blocked:
            packages[name] = "blocked (--block-imports)"
            continue
        try:
            dist = {"lm_eval": "lm_eval", "gguf": "gguf"}.get(name, name)
            version = importlib.metadata.version(dist)
            spec = importlib.util.find_spec(name)
            where = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
            packages[name] = {"version": version, "from": where}
        except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
            packages[name] = "missing"
    env["packages"] = packages
    return env


# --- worker processes -------------------------------------------------------------------------------
def worker_main(kind: str, runs_path: Path, result_path: Path) -> None:
    """Run the fits of ``runs_path`` one after the other in this process, the results written after each."""
    import torch

    from benchmarks.fit_workers import run_lit_worker, run_reference_worker

    results = []
    for run in json.loads(runs_path.read_text()):
        s = FitSettings(**run["settings"])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
        print(f"-- {run['name']}", flush=True)
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix=f"gpu-check-{run['name']}-") as tmp:
                result = (run_lit_worker if kind == "lit" else run_reference_worker)(s, Path(tmp))
            result["status"] = "ok"
        except Exception as exc:
            traceback.print_exc()
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        result.update({"name": run["name"], "wall_s": round(time.perf_counter() - t0, 1), "cuda_baseline_mb": baseline,
                       "lit_args": s.lit_args, "padding_free": s.padding_free})
        results.append(result)
        write_result(result_path, json.dumps(results, indent=1))
        print(f"-- {run['name']}: {result['status']} in {result['wall_s']} s", flush=True)


# --- the command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    p.add_argument("--out", type=Path, default=None,
                   help="the results JSON (default benchmarks/results/gpu_check[_dry].json, never replaced)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 20; 2 with --dry-run)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (default 16; 4 dry)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds the stages may take (default 420 on the GPU, none dry); later stages are skipped")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the model and data go (default: a temporary folder)")
    p.add_argument("--zero-shot-data-dir", default=None, help="<task>/<split>.jsonl for zero-shot (needs lm-eval)")
    p.add_argument("--block-imports", default="", help="comma-separated packages to treat as missing (lm_eval,gguf)")
    p.add_argument("--worker", choices=["lit", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    blocked = [n.strip() for n in args.block_imports.split(",") if n.strip()]
    block(blocked)
    if args.worker:
        worker_main(args.worker, args.runs, args.result)
        return None
    plan = plan_for(args.dry_run, args.steps, args.batch_size, args.budget_s)
    if not plan.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device: run with --dry-run on a machine without a GPU")
    out = args.out or RESULTS / ("gpu_check_dry.json" if plan.dry_run else "gpu_check.json")
    out = out.with_name(fresh_tag(out.parent, out.stem, args.overwrite) + ".json")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = Check(plan, workdir, blocked, args.zero_shot_data_dir).run()
    report["command"] = "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result(out, json.dumps(report, indent=1, default=str))
    print(table(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
