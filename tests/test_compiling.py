"""``--model.compile``: a clear error where inductor cannot run, the same loss where it can."""

from __future__ import annotations

import pytest
import torch

from lit_recover import compiling
from lit_recover.errors import ConfigError
from lit_recover.module import IGNORE_INDEX, LoRARecoveryModule
from tests.helpers import lora_loss_and_grads


def test_no_cxx_compiler_is_one_clear_error(monkeypatch, tiny_pruned_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^--model.compile true: .*needs a C\+\+ compiler") as info:
        LoRARecoveryModule(str(tiny_pruned_path), compile=True)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_pruned_path):
    if compiling._cxx() is None:
        pytest.skip("no C++ compiler for inductor on this machine")
    torch._dynamo.reset()
    modules = [LoRARecoveryModule(str(tiny_pruned_path), lora_dropout=0.0, compile=c) for c in (False, True)]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 16), generator=gen)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    before = compiling.compile_seconds()
    out = [lora_loss_and_grads(module, batch) for module in modules]
    assert compiling.compile_seconds() > before  # compiling happened and was counted
    (ref, ref_grads), (loss, grads) = out
    # float32, inductor's fused kernels sum in other orders: a few ulps of the values' scale
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(loss, ref, rtol=0, atol=64 * 64 * eps * float(ref))
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=0, atol=64 * 64 * eps * float(g.abs().max()), msg=k)
