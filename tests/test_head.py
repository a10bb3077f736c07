"""The chunked LM head + cross-entropy (``--model.chunked_head``): the full-logits loss and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_recover.head import chunkable, head_cross_entropy, supervised_cross_entropy
from lit_recover.module import IGNORE_INDEX, LoRARecoveryModule
from tests.helpers import lora_loss_and_grads

EPS64 = torch.finfo(torch.float64).eps


def _head(hidden: int, vocab: int, bias: bool, dtype=torch.float64) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, vocab, bias=bias, dtype=dtype)
    return head.requires_grad_(False)


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradient_equal_full_logits(chunk_size, bias):
    torch.manual_seed(0)
    head = _head(16, 50, bias)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    scale = 2.5  # the accumulation weighting multiplies the loss: the gradient must follow it
    loss = head_cross_entropy(hidden, head, labels, chunk_size=chunk_size)
    (loss * scale).backward()
    grad, hidden.grad = hidden.grad.clone(), None
    ref = F.cross_entropy(head(hidden), labels)
    (ref * scale).backward()
    # float64 sums of 50 logits and 37 positions in another order
    torch.testing.assert_close(loss, ref, rtol=0, atol=64 * 50 * EPS64 * float(ref.detach()))
    torch.testing.assert_close(grad, hidden.grad, rtol=0, atol=64 * 50 * EPS64 * float(hidden.grad.abs().max()))


def test_no_vocabulary_sized_tensor_is_kept_for_backward():
    torch.manual_seed(0)
    vocab, n = 500, 40
    head = _head(8, vocab, False, torch.float32)
    hidden = torch.randn(n, 8, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    kept: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        loss = head_cross_entropy(hidden, head, labels, chunk_size=8)
    assert kept and all(vocab not in shape for shape in kept)
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        F.cross_entropy(head(hidden), labels)
    assert any(vocab in shape for shape in kept)  # what the unchunked path keeps
    loss.backward()
    assert hidden.grad.shape == hidden.shape


def test_without_grad_only_the_loss():
    torch.manual_seed(0)
    head = _head(16, 50, False)
    hidden = torch.randn(9, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (9,))
    with torch.no_grad():
        loss = head_cross_entropy(hidden, head, labels, chunk_size=4)
    torch.testing.assert_close(loss, F.cross_entropy(head(hidden), labels), rtol=0, atol=1e-13)


def test_heads_it_cannot_serve_take_the_full_logits():
    trainable = torch.nn.Linear(4, 10)
    assert not chunkable(trainable) and chunkable(_head(4, 10, False))
    hidden = torch.randn(3, 4, dtype=torch.float32)
    labels = torch.tensor([1, 2, 3])
    loss = supervised_cross_entropy(hidden, trainable, labels)
    loss.backward()
    assert trainable.weight.grad is not None  # the plain path gives the head its gradient


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_module_loss_and_gradients_chunked_equal_unchunked(tiny_pruned_path, dtype):
    modules = [LoRARecoveryModule(str(tiny_pruned_path), lora_dropout=0.0, torch_dtype=dtype, chunked_head=c)
               for c in (False, True)]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 21), generator=gen)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = [lora_loss_and_grads(module, batch) for module in modules]
    (ref, ref_grads), (loss, grads) = results
    vocab = modules[0].lm_head.weight.shape[0]
    if dtype == "float64":
        torch.testing.assert_close(loss, ref, rtol=0, atol=64 * vocab * EPS64 * float(ref))
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=0, atol=64 * vocab * EPS64 * float(g.abs().max()), msg=k)
    else:
        # a bfloat16 base: the same logits (the same bf16 matmul rows), the loss in float32
        torch.testing.assert_close(loss, ref, rtol=0, atol=64 * vocab * torch.finfo(torch.float32).eps * float(ref))
        for k, g in ref_grads.items():
            # the logits' gradient is rounded to bfloat16 before the head's input-gradient matmul on both
            # sides; summation orders differ: a few bf16 ulps of the largest entry
            torch.testing.assert_close(grads[k], g, rtol=0, atol=8 * 2.0**-8 * float(g.abs().max()), msg=k)
