"""FSDP2 loading on CPU with gloo: two ranks of one machine hold about one model in their memory.

The ranks run ``benchmarks.fsdp_load_worker`` in processes of their own (each in a session of its
own, all killed when one fails or the time is up: the launching of tests/test_distributed.py), load
``LoRARecoveryModule`` from a pickle of ~50 MB with its weights memory-mapped (the default) and shard
it with FSDP2 through ``configure_model``, as ``ModelParallelStrategy`` does. Measured: the growth of
each rank's resident anonymous memory (``RssAnon``; the mapped file's pages are not in it) from just
before the load to its peak, summed over the ranks.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_fsdp_load import GOAL, QUICK, build_models, run_ranks, summarize, warmup_model
from benchmarks.fsdp_load_worker import logits_and_grads

WORLD = 2


@pytest.mark.slow
def test_fsdp2_ranks_hold_one_model_and_train_on_the_files_weights(tmp_path):
    from lit_recover.module import LoRARecoveryModule

    model = build_models(tmp_path / "model", QUICK, ("pickle",))["pickle"]
    checks_file = tmp_path / "checks.pt"
    ranks = run_ranks(model, WORLD, mmap=True, out_dir=tmp_path / "ranks", timeout=480, logits=checks_file,
                      warmup=warmup_model(tmp_path, model))
    s = summarize(ranks)
    size = s["model_bytes"]
    assert size > 40 * 2**20
    # about one model over both ranks, at the peak (reading the weights into each rank gives ~2.2 here)
    assert s["peak_anon_ratio"] <= GOAL, s
    # and the measure sees the shards: each rank owns its half of the frozen base after sharding
    per_rank = [r["stages"]["sharded"]["RssAnon"] - r["stages"]["start"]["RssAnon"] for r in ranks]
    assert min(per_rank) >= 0.45 * size, per_rank

    # every frozen tensor is sharded, and gathered back it is the file's, bit for bit, on every rank
    assert all(r["frozen_sharded"] == r["frozen_checked"] > 0 for r in ranks)
    assert s["frozen_mismatched"] == 0

    # the sharded model computes what the model read into one process computes (the loader as it
    # was: mmap_weights false): the same logits, loss and LoRA gradients of one training backward
    # (both ranks ran the same input, so FSDP2's average over them is that one input's gradient)
    got = torch.load(checks_file, weights_only=True)
    torch.set_num_threads(1)  # as the ranks ran
    torch.manual_seed(0)  # the ranks' LoRA initialisation
    plain = LoRARecoveryModule(str(model), mmap_weights=False, lora_dropout=0.0)
    want = logits_and_grads(plain)
    assert got["grads"].keys() == want["grads"].keys()
    # float32 sums over at most 1536 terms, in an order FSDP2's gathered buffers may change: a few
    # ulps of the largest value, far below the values themselves
    scale = want["logits"].abs().max()
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=float(scale) * 1e-5)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=0)
    for name, grad in want["grads"].items():
        assert grad.abs().max() > 0 or "lora_A" in name, name  # B starts at zero: A's gradient is zero
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=float(grad.abs().max()) * 1e-4)
