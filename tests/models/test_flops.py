"""The analytic FLOP count of a LoRA training step against torch's own counter on real steps.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul (``mm``, ``bmm``, ``addmm``) that
runs, forward and backward, from the shapes it sees. With eager attention (matmuls the counter
sees; torch's CPU SDPA kernel has no flop formula) and a micro-batch without padding, every matmul
that runs is a model FLOP, so the analytic total must match exactly: nothing is rounded, both are
integer counts of the same products. Under activation checkpointing the count is of the whole
forward recomputed, so those steps run with torch's early stop off (with it on, torch stops a
layer's recomputation once the last tensor the backward needs is saved: a trailing matmul that saves
only its inputs, such as a ``down_proj`` without adapter, is then skipped). What neither counts is
element-wise work (norms, softmax, dropout, the rotary outer product, the loss) and the optimizer.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lit_recover.models.flops import (
    PROJECTIONS,
    LoRATrainingFlops,
    length_stats,
    matmul_peak_flops,
    matmul_shapes,
    sum_squared_lengths,
)

IGNORE = -100


@functools.cache
def _tiny_pruned():
    from lit_recover.demos.tiny import build_tiny_pruned

    return build_tiny_pruned()[0]


def _lora_model(targets, gradient_checkpointing=False, lean=True, rank=4):
    from peft import LoraConfig, get_peft_model

    from lit_recover.lora import use_lean_lora

    model = copy.deepcopy(_tiny_pruned())
    model.config._attn_implementation = "eager"
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                                            target_modules=list(targets)))
    if lean:
        use_lean_lora(peft)
    return peft


def _counted_step(peft, batch) -> int:
    """FlopCounterMode's count of one forward + backward of the module's supervised loss."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    inner = peft.get_base_model()
    with FlopCounterMode(display=False) as counter, set_checkpoint_early_stop(False):
        hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = inner.lm_head(hidden[:, :-1][keep])
        torch.nn.functional.cross_entropy(logits, labels[keep]).backward()
    return counter.get_total_flops()


def _batch(rows: int, n: int, prompt: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (rows, n), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize(("targets", "checkpointing", "lean"), [
    (PROJECTIONS, False, True),
    (PROJECTIONS, True, True),
    (PROJECTIONS, False, False),  # PEFT's own forward
    (("q_proj", "v_proj"), False, True),  # layer 0: no gradient for K, so one attention matmul less
    (("down_proj",), False, False),  # layer 0's attention needs no backward at all
    (("gate_proj", "o_proj"), True, True),
])
def test_analytic_count_equals_flop_counter_on_a_real_step(targets, checkpointing, lean):
    peft = _lora_model(targets, gradient_checkpointing=checkpointing, lean=lean)
    batch = _batch(rows=3, n=20, prompt=7)
    counted = _counted_step(peft, batch)
    model = LoRATrainingFlops.from_model(peft)
    assert model.lora_rank == 4 and set(model.lora_targets) == set(targets)
    assert model.gradient_checkpointing is checkpointing
    breakdown = model.batch(batch)
    assert breakdown["total"] == counted
    assert (breakdown["recompute"] > 0) is checkpointing


def test_padding_and_packing_count_only_the_real_tokens_of_each_sequence():
    """A padded and a packed micro-batch count what their sequences count run one by one, unpadded."""
    from lit_recover.data.collate import PackCollator, PadCollator

    peft = _lora_model(PROJECTIONS)
    gen = torch.Generator().manual_seed(1)
    features = []
    for n, prompt in ((5, 2), (11, 6), (8, 3)):
        ids = torch.randint(3, 300, (n,), generator=gen).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    alone = sum(_counted_step(peft, {"input_ids": torch.tensor([f["input_ids"]]),
                                     "labels": torch.tensor([f["labels"]])}) for f in features)
    model = LoRATrainingFlops.from_model(peft)
    padded, packed = PadCollator(0)(features), PackCollator(0)(features)
    assert model.batch(padded)["total"] == alone
    assert model.batch(packed)["total"] == alone
    # the padded batch itself runs more: its padding positions go through every matmul
    assert _counted_step(peft, padded) > alone


def test_length_stats_from_masks_and_positions():
    right = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    left = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
            "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    packed = {"input_ids": torch.zeros(1, 9, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0]])}
    no_mask = {"input_ids": torch.zeros(3, 4, dtype=torch.long)}
    assert length_stats(right) == (8, sum_squared_lengths([3, 5])) == (8, 34)
    assert length_stats(left) == (8, 34)
    assert length_stats(packed) == (9, sum_squared_lengths([3, 5, 1]))
    assert length_stats(no_mask) == (12, 48)


def test_causal_counts_the_kept_half_of_the_score_matrix():
    shapes = [{"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 40}] * 3
    lengths = [3, 5]
    full = LoRATrainingFlops(shapes, hidden_size=32, vocab_size=100)
    causal = LoRATrainingFlops(shapes, hidden_size=32, vocab_size=100, causal=True)
    tokens, squares = sum(lengths), sum_squared_lengths(lengths)
    width = 4 * 8
    pairs_full, pairs_causal = 9 + 25, 3 * 4 // 2 + 5 * 6 // 2
    assert full.step(tokens, 4, squares)["attention_forward"] == 3 * 2 * 2 * width * pairs_full
    assert causal.step(tokens, 4, squares)["attention_forward"] == 3 * 2 * 2 * width * pairs_causal
    a, b = full.step(tokens, 4, squares), causal.step(tokens, 4, squares)
    assert {k: v for k, v in a.items() if not k.startswith(("attention", "total"))} == \
        {k: v for k, v in b.items() if not k.startswith(("attention", "total"))}


def test_dense_7b_per_token_counts_its_weights_twice_per_pass():
    """Frozen forward per token = 2 × the decoder's projection weights, counted off a meta-device LLaMA-7B."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    weights = sum(m.weight.numel() for name, m in llama.model.layers.named_modules()
                  if name.rsplit(".", 1)[-1] in PROJECTIONS)
    model = LoRATrainingFlops.from_model(llama)
    per_token = model.per_token(seq_len=256, supervised_fraction=0.5)
    assert per_token["frozen_forward"] == 2 * weights
    assert per_token["frozen_input_grad"] == 2 * weights - 2 * 3 * 4096 * 4096  # layer 0's q/k/v
    assert per_token["lm_head_forward"] == 2 * 4096 * 32000 * 0.5
    assert per_token["attention_forward"] == 32 * 2 * 2 * 4096 * 256
    lora = 8 * sum(i + o for i, o in [(4096, 4096)] * 4 + [(4096, 11008)] * 3) * 32
    assert per_token["lora_forward"] == 2 * lora == per_token["lora_weight_grad"]
    assert matmul_shapes(model.layers, 4096) == [(4096, 4096), (4096, 11008), (11008, 4096)]


def test_unknown_lora_target_is_refused():
    with pytest.raises(ValueError, match="not decoder projections"):
        LoRATrainingFlops([], hidden_size=8, vocab_size=8, lora_targets=("qkv",))


def test_matmul_peak_is_the_flops_over_the_timed_seconds(monkeypatch):
    """With a clock that advances 10 ms per reading, every timed interval is 10 ms."""
    import lit_recover.models.flops as flops

    clock = iter(range(10**6))

    class FakeTime:
        @staticmethod
        def perf_counter():
            return next(clock) * 0.01

    monkeypatch.setattr(flops, "time", FakeTime)
    shapes = [(16, 24), (24, 16)]
    result = matmul_peak_flops(shapes, tokens=8, dtype=torch.float32, repeats=3, min_seconds=0.05)
    per_pass = 2 * 8 * (16 * 24 + 24 * 16)
    assert result["passes_per_repeat"] == 5
    # the clock readings are multiples of 0.01 s: their differences are exact to float rounding
    assert result["repeats"] == pytest.approx([per_pass * 5 / 0.01] * 3, rel=1e-12)
    assert result["flops_per_s"] == pytest.approx(per_pass * 5 / 0.01, rel=1e-12)
    assert result["dtype"] == "float32" and result["shapes"] == [[16, 24], [24, 16]]
