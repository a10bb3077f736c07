"""Scale-out on CPU with gloo: DDP, two "nodes" on localhost and FSDP2, each against one process.

The multi-process runs go through ``python main.py fit`` in subprocesses (Lightning launches the
second rank itself, or two launchers play two nodes); they share one small data file and one
tokenization cache. Every run trains 4 optimizer steps of a global batch of 8 over 16 records
(2 epochs of 2 steps), with LoRA dropout off, so one process and several must end with the same
adapter up to float reduction order. The multi-process runs take the recipe (``configs/recover.yaml``)
under a scale-out overlay, so they train its packed micro-batches (``padding_free``); the single
process trains padded ones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_recover.cli import gradient_accumulation, world_size
from lit_recover.distributed import (
    FSDP2Strategy,
    _meta_copy,
    rank_and_world,
    wait_for_rank_zero,
)
from lit_recover.outputs import OLD_SUFFIX, STAGING_SUFFIX, RunFolder, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
CONFIGS = REPO / "configs"
LAUNCH_TIMEOUT_S = 480
# variables a launcher sets for its children: never inherit them from the test process
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
            "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
N_RECORDS, BATCH, MICRO, STEPS = 16, 8, 2, 4
ATOL = 5e-5  # LoRA B weights reach 2e-2..2e-1 after 4 AdamW steps at lr 1e-2; reduction order (and the
# clipping norm summed in another order) moved them by up to 8e-6 here


# --- helpers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_records(path: Path, n: int = N_RECORDS) -> Path:
    """``n`` distinct records of varied length (distinct, so that samples can be told apart by tokens)."""
    records = []
    for i in range(n):
        words = " ".join(["low rank"] * (1 + (7 * i) % 5))
        records.append({"instruction": f"Record {i}: repeat the text.", "input": words if i % 2 else "",
                        "output": f"{words} ({i})."})
    path.write_text(json.dumps(records))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def launch(jobs: list[tuple[list[str], dict[str, str], Path]], log_dir: Path,
           timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run ``(argv, env, cwd)`` jobs side by side; fail on a non-zero exit or the timeout.

    Each job gets a session of its own, so that killing it also kills the ranks Lightning spawned
    from it; whatever is left of a session is killed at the end, success or not.
    """
    procs, logs = [], []
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for i, (argv, env, cwd) in enumerate(jobs):
            logs.append(log_dir / f"job{i}.log")
            with open(logs[-1], "w") as fh:
                procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break  # a failed rank leaves the others waiting in a collective: stop them all
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
    if codes != [0] * len(procs):
        def tail(log: Path) -> str:  # the Python tracebacks, not the C++ frames of the rank that was left waiting
            lines = [ln for ln in log.read_text().splitlines() if not ln.lstrip().startswith("frame #")]
            return "\n".join(lines[-40:])

        tails = "\n".join(f"--- job {i} (exit {c}) ---\n{tail(logs[i])}" for i, c in enumerate(codes))
        pytest.fail(f"launched jobs ended with {codes} (None: killed after {timeout:.0f} s)\n{tails}")


def scale_config(overlay: str) -> list[str]:
    """The recipe with a scale-out overlay on top, as a user gives them: ``--config`` twice."""
    return ["--config", str(CONFIGS / "recover.yaml"), "--config", str(CONFIGS / "scale" / f"{overlay}.yaml")]


def fit_args(model: Path, setting: dict[str, Path], out: str | Path, *extra: str) -> list[str]:
    return ["fit", "--model.pruned_model", str(model), "--data.data_path", str(setting["data"]),
            "--data.cache_dir", str(setting["cache"]), "--output_dir", str(out),
            "--data.val_set_size", "0", "--data.cutoff_len", "192", "--data.group_by_length", "false",
            "--data.batch_size", str(BATCH), "--data.micro_batch_size", str(MICRO),
            "--model.lora_dropout", "0", "--model.learning_rate", "0.01", "--model.warmup_steps", "0",
            "--trainer.max_steps", str(STEPS), "--save_steps", "2", "--skip_evaluation", "true",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.gradient_clip_val", "1.0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.precision", "32-true", *extra]  # runs compared by their numbers: float32 on any CPU


def recorder(out_dir: Path) -> list[str]:
    spec = {"class_path": "tests.dist_scripts.record_batches.RecordBatches", "init_args": {"out_dir": str(out_dir)}}
    return ["--trainer.callbacks+=" + json.dumps(spec)]


def nan_once(rank: int, batch_idx: int) -> list[str]:
    spec = {"class_path": "tests.dist_scripts.nan_once.NaNOnce", "init_args": {"rank": rank, "batch_idx": batch_idx}}
    return ["--trainer.callbacks+=" + json.dumps(spec)]


def load_adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(RunFolder(out).adapter / "adapter_model.safetensors")


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= atol, f"largest LoRA difference {worst:.3g} > {atol}"
    # and training moved them: B starts at zero
    assert min(want[k].abs().max().item() for k in want if "lora_B" in k) > 1e-3


def recorded(record_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record_dir.glob("batches-rank*.json"))]


def samples_per_step(record_dir: Path) -> dict[int, list[tuple[int, ...]]]:
    """Optimizer step -> the sorted samples every rank trained on in it."""
    steps: dict[int, list[tuple[int, ...]]] = {}
    for rank in recorded(record_dir):
        for b in rank["batches"]:
            steps.setdefault(b["step"], []).extend(tuple(s) for s in b["samples"])
    return {k: sorted(v) for k, v in steps.items()}


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# --- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the launched processes get one each (OMP_NUM_THREADS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale")
    return {"root": root, "data": write_records(root / "records.json"), "cache": root / "cache"}


@pytest.fixture(scope="module")
def reference(tiny_pruned_path, setting) -> Path:
    """One process, no strategy: micro-batch 2 × accumulation 4 (the tokenization cache is filled here)."""
    from main import cli_main

    out = setting["root"] / "reference"
    cli_main(fit_args(tiny_pruned_path, setting, out, "--trainer.devices", "1", *recorder(out / "record")))
    return out


# --- fast checks ------------------------------------------------------------------------------------------
def test_rank_and_world_from_launcher_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert rank_and_world() == (5, 16)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert rank_and_world() == (3, 8)  # torchrun's variables win
    wait_for_rank_zero()  # no process group: returns at once


def test_global_batch_stays_global_across_nodes():
    # the seed's 64 / 4 on 2 nodes × 8 GPUs: one micro-batch per GPU per optimizer step
    assert gradient_accumulation(64, 4, world_size({"devices": 8, "num_nodes": 2, "accelerator": "gpu"})) == 1
    assert gradient_accumulation(128, 8, world_size({"devices": "0,1,2,3", "num_nodes": 2})) == 2
    assert gradient_accumulation(64, 4, world_size({"devices": 2, "accelerator": "cpu"})) == 8


def test_meta_skeleton_costs_no_memory_and_keeps_buffers(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    skeleton = _meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert [(n, p.shape, p.requires_grad) for n, p in skeleton.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in model.named_parameters()
    ]
    # the rotary table is a non-persistent buffer: it is not in a state dict, so it must be copied
    for (n, b), (_, b0) in zip(skeleton.named_buffers(), model.named_buffers(), strict=True):
        assert not b.is_meta and torch.equal(b, b0) and b.data_ptr() != b0.data_ptr(), n
    assert type(skeleton.model.layers[1]) is type(model.model.layers[1])


def test_merged_model_after_gradient_checkpointing_pickles(tiny_pruned_path):
    import io

    from lit_recover.module import LoRARecoveryModule

    module = LoRARecoveryModule(str(tiny_pruned_path), gradient_checkpointing=True)
    assert module.model.get_input_embeddings()._forward_hooks  # the hooks that broke the final save
    merged = module.merged_model()
    torch.save({"model": merged}, io.BytesIO())
    assert not merged.get_input_embeddings()._forward_hooks
    assert merged.config.use_cache and not merged.is_gradient_checkpointing


def test_fsdp2_strategy_by_name_is_pure_data_parallel():
    import lightning as L

    trainer = L.Trainer(strategy="fsdp2", accelerator="cpu", devices=2, num_nodes=1, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert trainer.strategy._tensor_parallel_size == 1 and trainer.strategy.reshard_after_forward


def test_resume_finds_a_sharded_checkpoint_folder(tmp_path):
    run = RunFolder(tmp_path)
    run.checkpoint(2).mkdir()
    (run.checkpoint(2) / "lightning.ckpt").write_bytes(b"x")
    time.sleep(0.01)
    shards = run.checkpoint(4) / "lightning.ckpt"
    shards.mkdir(parents=True)
    (shards / "meta.pt").write_bytes(b"x")
    assert resolve_checkpoint("last", tmp_path) == str(shards)  # the newest complete one
    assert resolve_checkpoint(run.checkpoint(4)) == str(shards)
    time.sleep(0.01)
    unfinished = run.checkpoint(6) / "lightning.ckpt"
    unfinished.mkdir(parents=True)
    (unfinished / "__0_0.distcp").write_bytes(b"x")  # shards written, metadata not yet
    assert resolve_checkpoint("last", tmp_path) == str(shards)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_checkpoint(run.checkpoint(6))


# --- multi-process runs -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_match_one(tiny_pruned_path, setting, reference, tmp_path):
    out = tmp_path / "ddp"
    argv = [sys.executable, str(MAIN), "fit", *scale_config("ddp"),
            *fit_args(tiny_pruned_path, setting, out, "--trainer.devices", "2", *recorder(out / "record"))[1:]]
    launch([(argv, clean_env(), REPO)], tmp_path / "logs")

    run = RunFolder(out)
    saved = yaml.safe_load(run.config.read_text())
    assert saved["trainer"]["accumulate_grad_batches"] == BATCH // (MICRO * 2)
    assert saved["data"]["padding_free"] is True  # the recipe's packed micro-batches, under the overlay
    # the data: two disjoint shards of equal length that together are the single process's steps
    ranks = recorded(out / "record")
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == STEPS * BATCH // (MICRO * 2)
    for epoch in range(2):
        shard = [{tuple(s) for b in r["batches"][epoch * 4:(epoch + 1) * 4] for s in b["samples"]} for r in ranks]
        assert not shard[0] & shard[1] and len(shard[0]) == len(shard[1]) == N_RECORDS // 2
    assert samples_per_step(out / "record") == samples_per_step(reference / "record")
    # the weights
    assert_same_adapter(load_adapter(out), load_adapter(reference))
    for path in (run.merged_pickle, run.checkpoint(2) / "lightning.ckpt",
                 run.checkpoint(4) / "adapter_model.safetensors", run.last_checkpoint / "lightning.ckpt"):
        assert path.is_file(), path
    assert not [p for p in out.iterdir() if p.name.endswith((STAGING_SUFFIX, OLD_SUFFIX))]


@pytest.fixture(scope="module")
def teacher_path(setting) -> Path:
    """The tiny pruned model's dense base (the same seed, unpruned) as a pickle: its teacher."""
    from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer
    from lit_recover.models.load import save_pruned

    tok = build_tokenizer()
    return save_pruned(build_tiny_llama(len(tok), seed=0).eval(), tok, setting["root"] / "teacher.bin")


# distillation settings that exercise every part: the hidden-state loss, a temperature, a CE share
KD_ARGS = ("--model.kd_hidden_weight", "0.5", "--model.kd_ratio", "0.7", "--model.kd_temperature", "2.0")


@pytest.fixture(scope="module")
def kd_reference(tiny_pruned_path, setting, teacher_path, reference) -> Path:
    """One process distilled from the teacher (padded micro-batches); it learnt something else than SFT."""
    from main import cli_main

    out = setting["root"] / "kd-reference"
    cli_main(fit_args(tiny_pruned_path, setting, out, "--trainer.devices", "1", "--model.teacher", str(teacher_path),
                      *KD_ARGS))
    sft, kd = load_adapter(reference), load_adapter(out)
    assert max((kd[k] - sft[k]).abs().max().item() for k in sft) > 1e-3
    return out


@pytest.mark.slow
def test_ddp_with_a_teacher_matches_one_process(tiny_pruned_path, setting, teacher_path, kd_reference, tmp_path):
    """Distillation under DDP (a teacher replica per rank, packed micro-batches, the divergence over
    all positions) gives the single padded process's adapter; checkpoints hold the adapter only."""
    two = tmp_path / "two"
    argv = [sys.executable, str(MAIN), "fit", *scale_config("ddp"),
            *fit_args(tiny_pruned_path, setting, two, "--trainer.devices", "2", "--model.teacher", str(teacher_path),
                      *KD_ARGS)[1:]]
    launch([(argv, clean_env(), REPO)], tmp_path / "logs")
    saved = yaml.safe_load(RunFolder(two).config.read_text())
    assert saved["model"]["teacher"] == str(teacher_path) and saved["data"]["padding_free"]
    assert_same_adapter(load_adapter(two), load_adapter(kd_reference))
    state = torch.load(RunFolder(two).checkpoint(4) / "lightning.ckpt", map_location="cpu", weights_only=False)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])


@pytest.mark.slow
def test_fsdp2_with_a_teacher_matches_one_process(tiny_pruned_path, setting, teacher_path, kd_reference, tmp_path):
    """Distillation under FSDP2: the teacher sharded per decoder layer like the student, every rank
    running as many head chunks as the others; the adapter is the single process's. Activation
    checkpointing is off: what is tested here is the teacher's sharding."""
    two = tmp_path / "fsdp"
    argv = [sys.executable, str(MAIN), "fit", *scale_config("fsdp"),
            *fit_args(tiny_pruned_path, setting, two, "--trainer.devices", "2", "--model.teacher", str(teacher_path),
                      *KD_ARGS, "--model.gradient_checkpointing", "false")[1:]]
    launch([(argv, clean_env(), REPO)], tmp_path / "logs")
    assert_same_adapter(load_adapter(two), load_adapter(kd_reference))


@pytest.mark.slow
def test_two_nodes_on_localhost(tiny_pruned_path, setting, reference, tmp_path):
    """Two launchers, node rank 0 and 1, one CPU process each; node 1's folder stands for a machine
    without a shared file system: it must stay empty, so the outputs were written once, by rank 0.
    Also: length-grouped shards, and a NaN loss on one rank only."""
    port = str(free_port())
    jobs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        argv = [sys.executable, str(MAIN), "fit", *scale_config("multinode"),
                *fit_args(tiny_pruned_path, setting, "out", "--trainer.num_nodes", "2", "--trainer.devices", "1",
                          "--data.group_by_length", "true", *recorder(tmp_path / "record"),
                          "--model.nonfinite_loss", "skip", *nan_once(rank=1, batch_idx=1))[1:]]
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node))
        jobs.append((argv, env, cwd))
    launch(jobs, tmp_path / "logs")

    out0, out1 = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    run0 = RunFolder(out0)
    for path in (run0.config, run0.adapter / "adapter_model.safetensors", run0.merged_pickle,
                 run0.checkpoint(2) / "lightning.ckpt", run0.last_checkpoint / "lightning.ckpt"):
        assert path.is_file(), path
    assert files_under(out1) == []
    # a NaN loss on rank 1 alone: both ranks skipped that micro-batch together (nobody waited in the
    # gradient all-reduce for a backward that never came) and the adapter stayed finite
    for node in (0, 1):
        assert "non-finite loss at step 0 (batch 1): skipped" in (tmp_path / "logs" / f"job{node}.log").read_text()
    assert all(torch.isfinite(t).all() for t in load_adapter(out0).values())
    saved = yaml.safe_load(run0.config.read_text())
    assert saved["trainer"]["num_nodes"] == 2 and saved["trainer"]["accumulate_grad_batches"] == 2

    # the distributed length-grouped sampler: per epoch, disjoint equal shards covering the data; the
    # Trainer's LengthGroupedSampler order dealt out micro-batch by micro-batch. 16 records in groups of
    # micro 2 x accumulation 2 make megabatches of one group (the Trainer keeps at least 4), i.e. of one
    # sampler step: each step, read rank 0 then rank 1, runs longest first, the longest sample of all
    # opens the epoch, and the sample it displaced opens the longest's old megabatch.
    ranks = recorded(tmp_path / "record")
    assert [r["rank"] for r in ranks] == [0, 1]
    per_epoch = N_RECORDS // (MICRO * 2)
    for epoch in range(2):
        shards = [[tuple(s) for b in r["batches"][epoch * per_epoch:(epoch + 1) * per_epoch] for s in b["samples"]]
                  for r in ranks]
        assert len(shards[0]) == len(shards[1]) and not set(shards[0]) & set(shards[1])
        everything = shards[0] + shards[1]
        assert len(set(everything)) == N_RECORDS
        longest = max(len(s) for s in everything)
        steps = [[s for r in ranks for s in r["batches"][epoch * per_epoch + k]["samples"]] for k in range(per_epoch)]
        assert len(steps[0][0]) == longest
        for step in steps:
            tail = [len(s) for s in step[1:]]
            assert tail == sorted(tail, reverse=True), "a sampler step is not a megabatch sorted longest first"


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_resume(tiny_pruned_path, setting, reference, tmp_path):
    from peft import PeftModel

    from lit_recover.evaluation import EvalConfig, evaluate_model, with_deltas
    from lit_recover.models.load import load_pruned

    base_cmd = [sys.executable, str(MAIN), "fit", *scale_config("fsdp")]
    run_a = tmp_path / "fsdp"
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(f"Record {i}: low rank adapters recover pruned models." for i in range(60)))
    evaluation = EvalConfig(metrics=["ppl"], ppl_datasets=[], ppl_texts={"held_out": str(text)}, limit=3,
                            progress=False)
    args_a = fit_args(tiny_pruned_path, setting, run_a, "--trainer.devices", "2", "--save_steps", "1",
                      "--skip_evaluation", "false", "--evaluation.metrics", "[ppl]", "--evaluation.ppl_datasets", "[]",
                      "--evaluation.ppl_texts", json.dumps(evaluation.ppl_texts), "--evaluation.limit", "3",
                      "--evaluation.progress", "false")
    launch([([*base_cmd, *args_a[1:]], clean_env(), REPO)], tmp_path / "logs-a")

    # sharded checkpoints: one file per rank beside the metadata, LoRA tensors only
    folder_a = RunFolder(run_a)
    shards = folder_a.checkpoint(2) / "lightning.ckpt"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert (folder_a.checkpoint(2) / "adapter_model.safetensors").is_file()
    adapter = load_adapter(run_a)
    assert_same_adapter(adapter, load_adapter(reference))

    # the merged pickle was gathered into plain modules: it loads and equals base + adapter
    merged, tok = load_pruned(folder_a.merged_pickle)
    base, _ = load_pruned(tiny_pruned_path)
    # the evaluation: "before" ran on every rank through the sharded model with the adapter off, "after"
    # on rank 0's gathered model; both equal the same evaluation of the plain models here
    results = json.loads(folder_a.evaluation.read_text())
    here = with_deltas(evaluate_model(base.eval(), tok, evaluation, label="pruned"),
                       evaluate_model(merged.eval(), tok, evaluation, label="recovered"))
    key = next(k for k in here["deltas"] if k.endswith("held_out"))
    for when in ("before", "after"):
        assert results["deltas"][key][when] == pytest.approx(here["deltas"][key][when], rel=1e-4), when
    assert results["deltas"][key]["before"] != pytest.approx(results["deltas"][key]["after"], rel=1e-3)
    peft_model = PeftModel.from_pretrained(base, folder_a.adapter).eval()
    ids = tok(["Record 3: repeat the text."], return_tensors="pt")
    with torch.no_grad():
        assert (merged.eval()(**ids).logits - peft_model(**ids).logits).abs().max() < 1e-4
    assert "FSDP" not in "".join(type(m).__name__ for m in merged.modules())

    # resume from the sharded step-3 checkpoint (mid-epoch: 2 of each rank's 4 micro-batches of epoch 1
    # done), writing full checkpoints now
    run_b = tmp_path / "resumed"
    run_b.mkdir()
    shutil.copytree(folder_a.checkpoint(3), RunFolder(run_b).checkpoint(3))
    launch([([*base_cmd, *fit_args(tiny_pruned_path, setting, run_b, "--trainer.devices", "2", "--ckpt_path", "last",
                                   "--trainer.strategy.save_distributed_checkpoint", "false",
                                   *recorder(run_b / "record"))[1:]],
             clean_env(), REPO)], tmp_path / "logs-b")
    # it went on where the checkpoint stopped, with the records the single process had at that step
    assert samples_per_step(run_b / "record") == {3: samples_per_step(reference / "record")[3]}
    assert_same_adapter(load_adapter(run_b), adapter, atol=1e-6)
    full = RunFolder(run_b).checkpoint(4) / "lightning.ckpt"
    assert full.is_file()
    state = torch.load(full, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)


@pytest.mark.slow
def test_fsdp2_full_checkpoint_resumes_in_one_process(tiny_pruned_path, setting, reference, tmp_path):
    """FSDP2 on a world of one, in this process: full (single-file) checkpoints save and resume, and
    the sharded-then-gathered model trains exactly like the plain one."""
    from main import cli_main

    saved_env = dict(os.environ)  # Lightning's launcher exports MASTER_PORT, LOCAL_RANK, … for its children
    # OMP_NUM_THREADS set keeps Lightning from raising the thread count to the core count
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    common = ["fit", *scale_config("fsdp"), "--trainer.strategy.save_distributed_checkpoint", "false"]
    try:
        run = tmp_path / "full"
        cli_main([*common, *fit_args(tiny_pruned_path, setting, run, "--trainer.devices", "1")[1:]])
        full = RunFolder(run).checkpoint(2) / "lightning.ckpt"
        assert full.is_file()
        ckpt = torch.load(full, map_location="cpu", weights_only=False)
        assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
        assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["global_step"] == 2
        assert_same_adapter(load_adapter(run), load_adapter(reference))

        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(RunFolder(run).checkpoint(2), RunFolder(resumed).checkpoint(2))
        cli_main([*common, *fit_args(tiny_pruned_path, setting, resumed, "--trainer.devices", "1",
                                     "--ckpt_path", "last")[1:]])
        assert_same_adapter(load_adapter(resumed), load_adapter(run), atol=1e-6)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
