"""Fused frozen projections (``--model.fuse_projections``): the unfused model's numbers, one matmul per group."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lit_recover.fused import fuse_projections, projection_groups, unfuse_projections
from lit_recover.module import IGNORE_INDEX, LoRARecoveryModule

EPS64 = torch.finfo(torch.float64).eps


def _tolerance(reference: torch.Tensor, depth: int) -> float:
    """Rounding of float64 dot products of ``depth`` terms summed in another order, at the scale of ``reference``."""
    return 4 * depth * EPS64 * max(1.0, float(reference.abs().max()))


def _module(path, **kwargs) -> LoRARecoveryModule:
    kwargs.setdefault("fuse_projections", False)
    module = LoRARecoveryModule(str(path), torch_dtype="float64", **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:  # B starts at zero: give every branch, and A's gradient, something to carry
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    module.train()
    module.fuse_projections_now()  # what the first step does
    return module


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 19), generator=gen)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels[1, 15:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(module, batch, seed: int = 1):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both sides
    loss, _ = module.supervised_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lean_lora", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_outputs_and_gradients_equal_unfused(tiny_pruned_path, lean_lora, checkpointing):
    kwargs = {"lora_dropout": 0.1, "lean_lora": lean_lora, "gradient_checkpointing": checkpointing}
    plain = _module(tiny_pruned_path, **kwargs)
    fused = _module(tiny_pruned_path, fuse_projections=True, **kwargs)
    layers = plain.model.get_base_model().model.layers
    # the tiny model is GQA (k/v narrower than q) with uneven widths per layer
    assert len({layer.mlp.gate_proj.out_features for layer in layers}) > 1
    assert all(layer.self_attn.k_proj.out_features < layer.self_attn.q_proj.out_features for layer in layers)
    groups = projection_groups(fused.model)
    assert len(groups) == 2 * len(layers) and all(g.is_fused() for g in groups)

    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    before = sum(g.fused_calls for g in groups)
    loss, grads = _loss_and_grads(fused, batch)
    # one matmul per group and forward (twice with checkpointing: the recompute)
    assert sum(g.fused_calls for g in groups) - before == len(groups) * (2 if checkpointing else 1)
    hidden = int(plain.model.get_base_model().config.hidden_size)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=_tolerance(ref_loss, hidden))
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=_tolerance(g, 4 * hidden), msg=name)


def test_fused_weights_are_views_of_one_tensor(tiny_pruned_path):
    module = _module(tiny_pruned_path, fuse_projections=True)
    attn = module.model.get_base_model().model.layers[1].self_attn
    group = projection_groups(module.model)[2]  # layer 1: q/k/v
    q, k, v = (getattr(attn, n).base_layer.weight for n in ("q_proj", "k_proj", "v_proj"))
    assert group.weight.shape == (q.shape[0] + k.shape[0] + v.shape[0], q.shape[1])
    assert {w.untyped_storage().data_ptr() for w in (q, k, v)} == {group.weight.untyped_storage().data_ptr()}
    # no second copy: the frozen parameters' distinct storages hold what they held before fusing
    plain = _module(tiny_pruned_path)

    def stored_bytes(m):
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for p in m.parameters() if not p.requires_grad}
        return sum(storages.values())

    assert stored_bytes(module) == stored_bytes(plain)
    torch.testing.assert_close(torch.cat([q, k, v]), group.weight, rtol=0, atol=0)


def test_a_replaced_weight_is_fused_again(tiny_pruned_path):
    """A weight swapped for another tensor (a cast, a move, an in-place merge elsewhere) is read again."""
    plain = _module(tiny_pruned_path)
    fused = _module(tiny_pruned_path, fuse_projections=True)
    for module in (plain, fused):
        w = module.model.get_base_model().model.layers[0].self_attn.k_proj.base_layer.weight
        w.data = w.data * 2.0
    group = projection_groups(fused.model)[0]
    assert not group.is_fused()
    batch = _batch()
    ref_loss, _ = _loss_and_grads(plain, batch)
    loss, _ = _loss_and_grads(fused, batch)
    assert group.is_fused()
    hidden = int(plain.model.get_base_model().config.hidden_size)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=_tolerance(ref_loss, hidden))


def test_merged_model_and_adapter_files_equal_unfused(tiny_pruned_path, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from lit_recover.models.load import load_pruned

    plain = _module(tiny_pruned_path)
    fused = _module(tiny_pruned_path, fuse_projections=True)
    plain.save_adapter(str(tmp_path / "plain"))
    fused.save_adapter(str(tmp_path / "fused"))
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    batch = _batch()
    fused.eval()
    with torch.no_grad():
        logits = fused(batch["input_ids"], batch["attention_mask"])
    # the adapter written from the fused model, read by PEFT into an unfused base: the same outputs
    base, _ = load_pruned(str(tiny_pruned_path))
    reloaded = PeftModel.from_pretrained(base.double(), str(tmp_path / "fused")).eval()
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hidden = int(base.config.hidden_size)
    torch.testing.assert_close(again, logits, rtol=0, atol=_tolerance(logits, 4 * hidden))

    merged_plain, merged_fused = plain.merged_model(), fused.merged_model()
    sa, sb = merged_plain.state_dict(), merged_fused.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not projection_groups(merged_fused)  # unfused: each weight its own storage, pickles as before
    q = merged_fused.model.layers[0].self_attn.q_proj.weight
    k = merged_fused.model.layers[0].self_attn.k_proj.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    pickle.dumps(merged_fused)


def test_fusion_is_on_by_default_from_the_first_step(tiny_pruned_path):
    module = LoRARecoveryModule(str(tiny_pruned_path), torch_dtype="float64")
    assert not projection_groups(module.model)  # not before the strategy placed (and maybe sharded) it
    module.supervised_loss(_batch())
    layers = module.model.get_base_model().model.layers
    assert len(projection_groups(module.model)) == 2 * len(layers)


def test_unfuse_restores_separate_weights(tiny_pruned_path):
    module = _module(tiny_pruned_path, fuse_projections=True)
    copied = copy.deepcopy(module.model)
    n = len(projection_groups(copied))
    assert unfuse_projections(copied) == n > 0
    assert not projection_groups(copied)
    storages = [p.untyped_storage().data_ptr() for p in copied.parameters() if not p.requires_grad]
    assert len(storages) == len(set(storages))
    assert fuse_projections(copied) == n  # and it can be fused again
