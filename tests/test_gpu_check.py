"""The GPU check (``benchmarks/gpu_check.sh``): its dry run end to end on the CPU, so that the script is
known to work before a GPU is at hand, and its parts (wheel list, tokenizer, budget, summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_wheels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports_mfu_and_ratios(tmp_path):
    """The wrapper as on the GPU machine, at tiny shapes, lm-eval and gguf treated as missing."""
    out = tmp_path / "gpu_check_dry.json"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--block-imports", "lm_eval,gguf"], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (tmp_path / "gpu_check_dry.log").read_text().strip().endswith(f"wrote {out}")
    stages = report["stages"]
    assert {k: v["status"] for k, v in stages.items()} == {
        "model": "ok", "peak": "ok", "evaluation": "ok", "reference": "ok", "fit": "ok", "distillation": "ok"}
    plan = report["plan"]
    model = stages["model"]
    assert model["tokenizer"]["vocab_size"] == plan["shapes"]["vocab_size"]
    assert abs(model["achieved_ratio"] - plan["pruning_ratio"]) < 0.01
    assert len({(s["num_key_value_heads"], s["intermediate_size"]) for s in model["layer_shapes"]}) > 1  # uneven
    evaluation = stages["evaluation"]["results"]["metrics"]
    assert evaluation["ppl"]["status"] == "ok" and evaluation["latency"]["status"] == "ok"
    assert evaluation["zero_shot"] == {"status": "skipped", "reason": "lm-eval is not installed"}
    assert report["environment"]["packages"]["lm_eval"] == "blocked (--block-imports)"

    peak = stages["peak"]["peaks"][plan["matmul_dtype"]]["flops_per_s"]
    runs, summary = report["runs"], report["summary"]
    assert set(runs) == {"ddp_packed", "ddp_padded", "fsdp2_packed", "fsdp2_padded", "distill_ddp_packed",
                         "reference"}
    flag, teacher = runs["distill_ddp_packed"]["lit_args"][-2:]
    assert flag == "--model.teacher" and Path(teacher).name == "dense_model"
    assert stages["model"]["dense_folder_mb"] > stages["model"]["folder_mb"]  # the teacher is the unpruned model
    for name, run in runs.items():
        assert run["status"] == "ok" and len(run["steps"]) == plan["steps"], name
        timed = run["steps"][plan["skip"]:]
        seconds = sum(s["seconds"] for s in timed)
        flops = sum(s["flops"] for s in timed)
        assert flops > 0
        row = summary[name]
        assert row["tokens_per_s"] == pytest.approx(sum(s["tokens"] for s in timed) / seconds, rel=1e-12)
        assert row["mfu"] == pytest.approx(flops / seconds / peak, rel=1e-12)
    assert runs["ddp_packed"]["steps"][0]["positions"] == runs["ddp_packed"]["steps"][0]["tokens"]  # packed
    assert summary["ddp_padded"]["padded_fraction"] > 0
    ref = summary["reference"]
    for name in ("ddp_packed", "ddp_padded", "fsdp2_packed", "fsdp2_padded", "distill_ddp_packed"):
        vs = summary[name]["vs_reference"]
        assert vs["tokens_per_s"] == pytest.approx(summary[name]["tokens_per_s"] / ref["tokens_per_s"], rel=1e-12)
        assert vs["peak_memory"] == pytest.approx(summary[name]["peak_memory_mb"] / ref["peak_memory_mb"], rel=1e-12)
    for name in ("ddp_packed", "reference", "fsdp2_padded"):
        assert name in proc.stdout


def test_wheel_list_pins_every_line_and_keeps_a_machines_own_copy_when_it_suffices():
    wheels = gpu_wheels.read_list()
    names = {w.name for w in wheels}
    assert {"jsonargparse", "datasets", "dill", "multiprocess", "pyarrow"} <= names
    assert all(w.version and w.version[0].isdigit() for w in wheels)
    have = {"jsonargparse": "4.40.0", "pyarrow": "23.0.0", "datasets": None, "dill": "0.3.8"}
    todo = dict((w.name, reason) for w, reason in gpu_wheels.needed(wheels, lambda n: have.get(n)))
    assert "jsonargparse" not in todo  # 4.40 meets lightning's >= 4.27.7
    assert todo["datasets"] == "missing" and todo["multiprocess"] == "missing"
    assert todo["pyarrow"] == "pyarrow 23.0.0 does not meet pyarrow>=24.0.0"
    assert "dill" not in todo
    have["pyarrow"] = "26.0.1"
    assert "pyarrow" not in dict((w.name, r) for w, r in gpu_wheels.needed(wheels, lambda n: have.get(n)))


def test_wheel_list_refuses_malformed_lines(tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_text("datasets>=2\n")
    with pytest.raises(ValueError, match="list.txt:1: expected"):
        gpu_wheels.read_list(bad)
    bad.write_text("datasets==5.2.0 pyarrow>=24\n")
    with pytest.raises(ValueError, match="is not about datasets"):
        gpu_wheels.read_list(bad)


def test_missing_wheel_files_warn_and_install_nothing(tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("surely-not-installed-pkg==1.0\n")
    assert gpu_wheels.install(tmp_path / "site", folder=tmp_path / "none", path=listing) == []
    assert "warning" in capsys.readouterr().out and not (tmp_path / "site").exists()


def test_tokenizer_is_padded_to_the_model_vocabulary_with_ids_no_text_uses():
    records = gpu_check.generate_records(20, (3, 20))
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in records]
    tokenizer, trained = gpu_check.build_tokenizer(texts, 4000)
    assert len(tokenizer) == 4000 and trained < 4000
    ids = tokenizer(texts)["input_ids"]
    assert max(max(row) for row in ids) < trained
    assert all(row[0] == tokenizer.bos_token_id for row in ids)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == texts[0]
    assert gpu_check.generate_records(20, (3, 20)) == records  # seeded


def test_stages_skip_on_budget_or_missing_requirement_and_record_failures(tmp_path):
    plan = gpu_check.plan_for(True, budget_s=5.0)
    check = gpu_check.Check.__new__(gpu_check.Check)  # the stage runner alone, no environment record
    check.plan, check.report = plan, {"stages": {}}
    check.started = gpu_check.time.perf_counter()
    calls = []
    check.stage("fits", lambda: calls.append(1), needs_s=60)
    check.stage("broken", lambda: 1 / 0)
    check.stage("after", lambda: calls.append(2), requires=("broken",))
    check.stage("fine", lambda: {"value": 3})
    st = check.report["stages"]
    assert st["fits"]["status"] == "skipped" and st["fits"]["reason"].startswith("time budget:")
    assert st["broken"]["status"] == "failed" and st["broken"]["reason"].startswith("ZeroDivisionError")
    assert st["after"] == {"status": "skipped", "reason": "needs stage broken"}
    assert st["fine"]["status"] == "ok" and st["fine"]["value"] == 3
    assert calls == []


def test_summary_mfu_against_each_dtype_peak_and_ratios_against_one_peak():
    def run(dtype, flops, seconds, tokens, memory):
        steps = [{"seconds": 1.0, "tokens": 1, "positions": 1, "supervised": 1, "loss": 1.0, "flops": 1}] + [
            {"seconds": seconds, "tokens": tokens, "positions": tokens, "supervised": 1, "loss": 1.0, "flops": flops}]
        return {"status": "ok", "steps": steps, "matmul_dtype": dtype, "cuda_peak_mb": memory}

    plan = gpu_check.plan_for(False)
    plan.skip = 1
    peaks = {"bfloat16": {"flops_per_s": 4e14}, "float16": {"flops_per_s": 5e14}}
    runs = {"ddp_packed": run("bfloat16", 2e14, 1.0, 1000, 300.0), "reference": run("float16", 1e14, 1.0, 500, 600.0)}
    summary = gpu_check.summarize(runs, peaks, plan)
    assert summary["ddp_packed"]["mfu"] == pytest.approx(0.5) and summary["reference"]["mfu"] == pytest.approx(0.2)
    assert summary["reference"]["mfu_vs_bf16_peak"] == pytest.approx(0.25)
    vs = summary["ddp_packed"]["vs_reference"]
    assert vs == pytest.approx({"tokens_per_s": 2.0, "mfu": 2.0, "peak_memory": 0.5})
