import torch

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
