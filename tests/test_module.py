import pytest
import torch

from lit_recover.data.collate import PackCollator, PadCollator
from lit_recover.module import IGNORE_INDEX, LoRARecoveryModule, linear_warmup_decay


def _batch(tok):
    texts = ["### Instruction:\nAdd 1 and 2.\n\n### Response:\nThe sum is 3.", "List two colours. red, green"]
    enc = tok(texts, padding=True, return_tensors="pt")
    enc["input_ids"] = enc["input_ids"]
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = IGNORE_INDEX
    labels[:, :4] = IGNORE_INDEX  # a masked prompt
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def test_only_lora_trainable_and_counts(tiny_pruned_path):
    module = LoRARecoveryModule(str(tiny_pruned_path))
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    trainable, total = module.parameter_counts()
    assert trainable == sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    assert 0 < trainable < total
    # r=8 on all seven projections of every layer
    assert sum("lora_A" in n for n in names) == 7 * len(module.model.get_base_model().model.layers)


def test_supervised_loss_equals_causal_lm_loss(tiny_pruned_path):
    module = LoRARecoveryModule(str(tiny_pruned_path), lora_dropout=0.0)
    module.eval()
    batch = _batch(module.tokenizer)
    ours, n = module.supervised_loss(batch)
    ref = module.model(**batch).loss
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_micro_batch_gives_the_padded_loss_and_gradients(tiny_pruned_path, attn, train_on_inputs):
    """padding_free: one packed row with restarting positions has the padded batch's loss and gradients."""
    module = LoRARecoveryModule(str(tiny_pruned_path), lora_dropout=0.0, attn_implementation=attn)
    for name, p in module.named_parameters():
        if "lora_B" in name:  # B starts at zero: let the adapter take part in the forward pass
            torch.nn.init.normal_(p, std=0.05)
    gen = torch.Generator().manual_seed(0)
    features = []
    for n in (7, 12, 5, 9):
        ids = torch.randint(3, 300, (n,), generator=gen).tolist()
        features.append({"input_ids": ids, "labels": ids if train_on_inputs else [IGNORE_INDEX] * 3 + ids[3:]})
    packed = PackCollator()(features)
    assert packed["input_ids"].shape == (1, 33) and "attention_mask" not in packed
    assert packed["position_ids"][0, 7:9].tolist() == [0, 1]  # the second sequence restarts
    assert packed["labels"][0, 7] == IGNORE_INDEX  # nothing is predicted across the seam

    def loss_and_grads(batch):
        module.zero_grad(set_to_none=True)
        loss, n = module.supervised_loss(batch)
        loss.backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}

    padded_loss, padded_n, padded_grads = loss_and_grads(PadCollator(0)(features))
    packed_loss, packed_n, packed_grads = loss_and_grads(packed)
    assert padded_n == packed_n == sum(n - (1 if train_on_inputs else 3) for n in (7, 12, 5, 9))
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_merged_logits_equal_unmerged(tiny_pruned_path):
    module = LoRARecoveryModule(str(tiny_pruned_path), lora_dropout=0.0)
    torch.manual_seed(0)
    for n, p in module.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapter an effect to merge
            p.data.normal_(0, 0.05)
    module.eval()
    batch = _batch(module.tokenizer)
    with torch.no_grad():
        unmerged = module(batch["input_ids"], batch["attention_mask"])
        with module.model.disable_adapter():
            base = module(batch["input_ids"], batch["attention_mask"])
        merged_model = module.merged_model()
        merged = merged_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changed the output
    assert (merged - unmerged).abs().max() < 1e-4
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())


def test_warmup_then_linear_decay():
    f = linear_warmup_decay(100, 1000)
    assert f(0) == 0.0 and f(50) == 0.5 and f(100) == 1.0
    assert abs(f(550) - 0.5) < 1e-9 and f(1000) == 0.0 and f(2000) == 0.0


def test_checkpoint_holds_adapter_only(tiny_pruned_path):
    module = LoRARecoveryModule(str(tiny_pruned_path))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert "rng_states" in ckpt
    module.on_load_checkpoint(ckpt)  # round trip accepted
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    try:
        module.on_load_checkpoint(ckpt)
    except ValueError as exc:
        assert "lacks 1 adapter tensors" in str(exc)
    else:
        raise AssertionError("a checkpoint missing adapter tensors was accepted")
