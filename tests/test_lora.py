"""The lean LoRA forward: PEFT's outputs, gradients and dropout draws, with fewer saved activations."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_recover.lora import LoRABranch, keep_mask, use_lean_lora


class MaskDropout(torch.nn.Module):
    """PEFT's dropout with the lean path's mask: the reference for exact comparisons."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return x.mul(keep_mask(x, self.p)).mul_(1.0 / (1.0 - self.p))


def _peft_model(dropout: float, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from lit_recover.demos.tiny import build_tiny_pruned
    from lit_recover.module import DEFAULT_TARGET_MODULES

    model, _ = build_tiny_pruned(seed=seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=DEFAULT_TARGET_MODULES,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the branch something to say
            torch.nn.init.normal_(p, std=0.05)
    peft_model.train()
    return peft_model


def _loss_and_grads(model, input_ids, attention_mask, seed: int):
    torch.manual_seed(seed)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.5])
def test_lean_lora_equals_peft(dropout):
    reference = _peft_model(dropout)
    lean = copy.deepcopy(reference)
    assert use_lean_lora(lean) == 4 * 7  # every adapted projection of the 4 layers
    for layer in reference.modules():
        if hasattr(layer, "lora_dropout"):
            layer.lora_dropout["default"] = MaskDropout(dropout)
    ids = torch.randint(3, 300, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in one row
    for seed in (1, 2):  # two draws: the dropout masks differ between them and agree between sides
        ref_loss, ref_grads = _loss_and_grads(reference, ids, mask, seed)
        lean_loss, lean_grads = _loss_and_grads(lean, ids, mask, seed)
        torch.testing.assert_close(lean_loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert ref_grads.keys() == lean_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(lean_grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_lean_lora_draws_one_mask_per_adapted_layer(dropout):
    """The global generator advances by exactly one ``torch.rand`` of its input's shape per adapted
    layer that drops (training, p > 0), in the order the layers run, and not at all otherwise: the
    draws activation checkpointing replays and resuming restores. Replayed by hand from the recorded
    input shapes, the next draw after the forward pass matches only if nothing else was drawn."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    lean = _peft_model(dropout)
    use_lean_lora(lean)
    shapes: list[torch.Size] = []
    for layer in lean.modules():
        if type(layer) is LoraLinear:
            layer.register_forward_pre_hook(lambda mod, args: shapes.append(args[0].shape))
    ids = torch.randint(3, 300, (2, 9))
    for training in (True, False):
        lean.train(training)
        shapes.clear()
        torch.manual_seed(3)
        lean(input_ids=ids)
        after = torch.rand(8)
        assert len(shapes) == 4 * 7  # every adapted projection ran once
        torch.manual_seed(3)
        if training and dropout > 0:
            for shape in shapes:
                torch.rand(shape)
        assert torch.equal(torch.rand(8), after), (training, dropout)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_rate(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.empty(400, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (400, 1000)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.003
    assert not torch.equal(mask, keep_mask(torch.empty(400, 1000), p))  # fresh draws each call


def test_lean_lora_dropout_statistics_match_peft():
    """With PEFT's own nn.Dropout the draws differ, but the branch has the same mean and spread."""
    reference = _peft_model(0.3)
    lean = copy.deepcopy(reference)
    use_lean_lora(lean)
    x = torch.randn(64, 64)
    ref_layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    lean_layer = lean.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        ref_out = torch.stack([ref_layer(x) for _ in range(200)])
        lean_out = torch.stack([lean_layer(x) for _ in range(200)])
    standard_error = ((lean_out.var(0) + ref_out.var(0)) / len(lean_out)).sqrt()
    assert ((lean_out.mean(0) - ref_out.mean(0)).abs() <= 6 * standard_error + 1e-6).all()
    torch.testing.assert_close(lean_out.std(0).mean(), ref_out.std(0).mean(), atol=0.0, rtol=0.05)


def test_lean_lora_eval_and_merge():
    reference = _peft_model(0.3)
    lean = copy.deepcopy(reference)
    use_lean_lora(lean)
    ids = torch.randint(3, 300, (2, 9))
    reference.eval()
    lean.eval()
    with torch.no_grad():
        torch.testing.assert_close(lean(input_ids=ids).logits, reference(input_ids=ids).logits)
        merged = lean.merge_and_unload()
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_lean_lora_falls_back_to_peft_when_adapters_are_disabled():
    reference = _peft_model(0.0)
    lean = copy.deepcopy(reference)
    use_lean_lora(lean)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad(), lean.disable_adapter(), reference.disable_adapter():
        base_logits = lean(input_ids=ids).logits
        torch.testing.assert_close(base_logits, reference(input_ids=ids).logits)
    with torch.no_grad():  # the adapters are back on
        assert not torch.allclose(lean(input_ids=ids).logits, base_logits)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_lean_lora_keeps_less_for_backward():
    reference = _peft_model(0.05)
    lean = copy.deepcopy(reference)
    use_lean_lora(lean)
    ids = torch.randint(3, 300, (4, 64))
    torch.manual_seed(0)
    ref_bytes = _saved_bytes(lambda: reference(input_ids=ids, labels=ids))
    torch.manual_seed(0)
    lean_bytes = _saved_bytes(lambda: lean(input_ids=ids, labels=ids))
    assert lean_bytes < 0.75 * ref_bytes, (lean_bytes, ref_bytes)


def test_lora_branch_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    mask = torch.rand(2, 3, 5) > 0.3
    assert torch.autograd.gradcheck(lambda x, a, b: LoRABranch.apply(x, a, b, mask, 1 / 0.7, 2.0), (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: LoRABranch.apply(x, a, b, None, 1.0, 0.5), (x, a, b))


def test_lean_lora_under_activation_checkpointing_draws_the_same_masks():
    """The recomputed forward redraws the dropout masks from the restored RNG state: same gradients."""
    plain = _peft_model(0.2)
    plain.config.use_cache = False
    checkpointed = copy.deepcopy(plain)
    checkpointed.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_lean_lora(plain)
    use_lean_lora(checkpointed)
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    loss, grads = _loss_and_grads(plain, ids, mask, seed=5)
    calls = []
    layer = checkpointed.base_model.model.model.layers[1].mlp.up_proj
    layer.register_forward_hook(lambda *args: calls.append(1))
    ck_loss, ck_grads = _loss_and_grads(checkpointed, ids, mask, seed=5)
    assert len(calls) == 2  # the layer ran again in the backward pass
    torch.testing.assert_close(ck_loss, loss)
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
