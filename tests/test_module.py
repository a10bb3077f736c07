import lightning as L
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



class _WindowGrads(L.Callback):
    """Per optimizer step: the trainable tensors before its first micro-batch, and the gradient it applies."""

    def __init__(self):
        self.before, self.grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def _fit_windows(tiny_pruned_path, alpaca_json, cache, weighting):
    """7 micro-batches of 2 records in windows of 3 (the last window holds one), float64, no dropout."""
    from lit_recover.data import AlpacaDataModule

    module = LoRARecoveryModule(str(tiny_pruned_path), lora_dropout=0.0, loss_weighting=weighting)
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:  # B starts at zero, which zeroes A's gradient: give both a gradient
            torch.nn.init.normal_(p, std=0.05)
    datamodule = AlpacaDataModule(data_path=str(alpaca_json), val_set_size=0, cutoff_len=128, batch_size=6,
                                  micro_batch_size=2, tokenizer=module.tokenizer, cache_dir=str(cache))
    record = _WindowGrads()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="64-true", accumulate_grad_batches=3, max_epochs=1,
                        limit_train_batches=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[record])
    trainer.fit(module, datamodule=datamodule)
    windows = [[i for step in range(start, min(start + 3, 7)) for i in datamodule.train_sampler.plan(0)[step]]
               for start in (0, 3, 6)]
    micro = [datamodule.train_sampler.plan(0)[step] for step in range(7)]
    return module, datamodule, record, windows, micro


def _grads_of(module, datamodule, state, indices, scale=1.0):
    """The gradient of ``scale ×`` the mean token NLL of one padded batch of ``indices``, at trainable
    tensors ``state``. The scale goes into the backward pass as in the fit: LLaMA's RMSNorm computes in
    float32 whatever the model's dtype, so a gradient scaled afterwards would round differently there."""
    batch = PadCollator(module.tokenizer.pad_token_id)(datamodule.train_dataset.__getitems__(indices))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    module.zero_grad(set_to_none=True)
    loss, n = module.supervised_loss(batch)
    (loss * scale).backward()
    return {name: p.grad.detach().clone() for name, p in params.items()}, n


@pytest.mark.slow
def test_token_weighted_window_is_one_batch_of_its_micro_batches(tiny_pruned_path, alpaca_json, tmp_path):
    """loss_weighting tokens: the gradient of every accumulation window (also the short last one) is
    that of one batch holding all its micro-batches, i.e. sum of token NLLs / supervised tokens of the
    window (transformers >= 4.46); micro_batch_mean gives the mean of micro-batch means (divided by
    accumulate_grad_batches also in the short window, as Lightning and transformers < 4.46 do).
    Float64 (but for the RMSNorms, float32 in LLaMA's code, which see the same gradients on both sides),
    so the two sides agree to ~1e-15 and 1e-9 is far below the weighting's effect (> 1e-3)."""
    module, datamodule, record, windows, micro = _fit_windows(tiny_pruned_path, alpaca_json, tmp_path / "c", "tokens")
    assert module.dtype == torch.float64 and len(record.grads) == len(record.before) == 3
    for w, indices in enumerate(windows):
        want, _ = _grads_of(module, datamodule, record.before[w], indices)
        for name, grad in record.grads[w].items():
            torch.testing.assert_close(grad, want[name], rtol=1e-9, atol=1e-12, msg=f"window {w}: {name}")

    mean_module, mean_dm, mean_record, mean_windows, _ = _fit_windows(tiny_pruned_path, alpaca_json, tmp_path / "c",
                                                                      "micro_batch_mean")
    assert mean_windows == windows  # the same data order
    counts = [_grads_of(mean_module, mean_dm, mean_record.before[0], m)[1] for m in micro[:3]]
    assert len(set(counts)) > 1, counts  # micro-batches of different supervised counts: the options differ
    for w in range(3):
        want = {}
        for step in range(3 * w, min(3 * w + 3, 7)):
            grads, _ = _grads_of(mean_module, mean_dm, mean_record.before[w], micro[step], scale=1 / 3)
            for name, g in grads.items():
                want[name] = want.get(name, 0) + g
        for name, grad in mean_record.grads[w].items():
            torch.testing.assert_close(grad, want[name], rtol=1e-9, atol=1e-12, msg=f"window {w}: {name}")
    # and the two weightings apply different gradients to the same first window
    tokens, means = record.grads[0], mean_record.grads[0]
    diff = sum((tokens[k] - means[k]).square().sum() for k in tokens).sqrt()
    norm = sum(tokens[k].square().sum() for k in tokens).sqrt()
    assert diff > 1e-3 * norm


def test_token_weighting_needs_a_batch_plan_beyond_one_micro_batch(tiny_pruned_path):
    """Without the data module's plan the window cannot be counted ahead: a one-line error, except
    for windows of one micro-batch."""
    from types import SimpleNamespace

    from lit_recover.module import LossWeightingError

    module = LoRARecoveryModule(str(tiny_pruned_path))
    loss = torch.tensor(2.0)
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t * 2)  # two ranks with the same count
    module._trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=2, datamodule=None, strategy=strategy)
    # one micro-batch of 5 tokens on each of 2 ranks: sum 10 / 10 tokens, times 2 ranks (DDP averages)
    assert module._window_weighted(loss, 5, 0).item() == pytest.approx(2.0 * 5 * 1 * 2 / 10)
    module._trainer.accumulate_grad_batches = 4
    with pytest.raises(LossWeightingError, match="micro_batch_mean"):
        module._window_weighted(loss, 5, 0)
    module.hparams.loss_weighting = "micro_batch_mean"
    assert module._window_weighted(loss, 5, 0) is loss
