"""Distillation recovery: the chunked loss against a full-logits float64 reference, the teacher in the
module (frozen, never trained or checkpointed, refused when it does not match), resume, the
training record and the share of the gap won back, and distillation against SFT on tiny models."""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_recover.data.collate import PackCollator, PadCollator
from lit_recover.distill import distillation_loss, divergence, hidden_mse, kd_mask
from lit_recover.module import IGNORE_INDEX, LoRARecoveryModule, TeacherMismatchError, teacher_source
from lit_recover.outputs import RunFolder
from main import cli_main

KINDS = ["forward_kl", "reverse_kl", "jsd"]
SHARPEN = 40.0  # the tiny random base's head scaled up: peaked distributions for pruning to disturb


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny dense base (a Hugging Face folder) and its unevenly pruned copy (an LLM-Pruner pickle
    with the pruner's report beside it naming the base), plus the base as a pickle."""
    from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer, prune_unevenly
    from lit_recover.models.load import save_pruned
    from lit_recover.pruning.report import build_report, report_path, write_report

    root = tmp_path_factory.mktemp("kd")
    tok = build_tokenizer()
    base = build_tiny_llama(len(tok), seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(SHARPEN)
    base.eval()
    folder = root / "base"
    base.save_pretrained(folder)
    tok.save_pretrained(folder)
    pruned = copy.deepcopy(base)
    prune_unevenly(pruned, seed=0)
    pruned_path = save_pruned(pruned, tok, root / "pruned" / "pruned_model.bin")
    before, after = sum(p.numel() for p in base.parameters()), sum(p.numel() for p in pruned.parameters())
    report = build_report({"params_before": before, "params_after": after, "achieved_ratio": 1 - after / before},
                          base_model=str(folder), output=pruned_path, calibration_data=None, device="cpu",
                          dtype="float32", versions={})
    write_report(report, report_path(pruned_path))
    return {"root": root, "base": folder, "pruned": pruned_path,
            "base_pickle": save_pruned(base, tok, root / "base.bin"), "tokenizer": tok}


def _features(n_list=(7, 12, 5, 9), prompt=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in n_list:
        ids = torch.randint(3, 300, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _lora_b_random(module, std=0.05, seed=0):
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if "lora_B" in name:  # B starts at zero: let the adapter take part
            torch.nn.init.normal_(p, std=std)


# --- the loss against a plain full-logits reference ----------------------------------------------------------
def _reference(s_hidden, t_hidden, s_head, t_head, labels, mask, kind, T, ratio):
    """Full-vocabulary logits of the whole batch, softmax and log written out, float64."""
    s = s_head(s_hidden)[:, :-1]
    t = t_head(t_hidden)[:, :-1].detach()
    y = labels[:, 1:]
    sup = y != IGNORE_INDEX
    ce = F.cross_entropy(s[sup], y[sup])
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    if kind == "forward_kl":
        d = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (q.log() - p.log())).sum(-1)
    else:
        m = (p + q) / 2
        d = 0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)
    kd = d[mask].mean()
    return (1 - ratio) * ce + ratio * T * T * kd, ce, kd


def _random_batch(seed=0, lengths=(10, 7, 4), prompt=3, hidden=16, teacher_hidden=24, vocab=40):
    gen = torch.Generator().manual_seed(seed)
    b, width = len(lengths), max(lengths)
    attention = torch.zeros(b, width, dtype=torch.long)
    labels = torch.randint(0, vocab, (b, width), generator=gen)
    for row, n in enumerate(lengths):
        attention[row, :n] = 1
        labels[row, n:] = IGNORE_INDEX
        labels[row, :prompt] = IGNORE_INDEX
    s_hidden = torch.randn(b, width, hidden, generator=gen, dtype=torch.float64).requires_grad_()
    t_hidden = torch.randn(b, width, teacher_hidden, generator=gen, dtype=torch.float64)
    s_head = torch.nn.Linear(hidden, vocab, bias=False).double()
    t_head = torch.nn.Linear(teacher_hidden, vocab, bias=False).double()
    with torch.no_grad():
        s_head.weight.copy_(torch.randn(vocab, hidden, generator=gen, dtype=torch.float64))
        t_head.weight.copy_(2 * torch.randn(vocab, teacher_hidden, generator=gen, dtype=torch.float64))
    return s_hidden, t_hidden, s_head, t_head, labels, attention


@pytest.mark.parametrize("heads", ["frozen", "trainable"])
@pytest.mark.parametrize("chunk", [None, 4], ids=["one-chunk", "chunks-of-4"])
@pytest.mark.parametrize("positions", ["all", "response"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_equals_the_full_logits_reference(kind, temperature, positions, chunk, heads):
    """Values and gradients (student hidden states, and the head's weight where it trains) equal the
    float64 reference, for frozen heads (gradients formed in the forward pass) and trainable ones
    (chunks recomputed in the backward pass); float64 rounding is ~1e-16 relative, so 1e-10 is far
    below any difference in the math."""
    s_hidden, t_hidden, s_head, t_head, labels, attention = _random_batch()
    t_head.requires_grad_(False)
    if heads == "frozen":
        s_head.requires_grad_(False)
    wrt = [s_hidden] if heads == "frozen" else [s_hidden, s_head.weight]
    real = attention.bool()
    want_mask = (real[:, 1:] & real[:, :-1]) if positions == "all" else labels[:, 1:] != IGNORE_INDEX
    mask = kd_mask(labels, attention, None, positions)
    assert torch.equal(mask, want_mask)
    if positions == "all":
        assert int(mask.sum()) == sum(n - 1 for n in (10, 7, 4))

    ref_loss, ref_ce, ref_kd = _reference(s_hidden, t_hidden, s_head, t_head, labels, mask, kind, temperature, 0.3)
    ref_grads = torch.autograd.grad(ref_loss, wrt)
    out = distillation_loss(s_hidden, t_hidden, s_head, t_head, labels, mask, kd_ratio=0.3, kind=kind,
                            temperature=temperature, chunk_size=chunk)
    grads = torch.autograd.grad(out.loss, wrt)
    assert out.ce_count == int((labels[:, 1:] != IGNORE_INDEX).sum()) and out.kd_count == int(mask.sum())
    assert ref_kd > 1e-3  # distributions far apart: the comparison is not of zeros
    for got, want in ((out.loss, ref_loss), (out.ce, ref_ce), (out.kd, ref_kd), *zip(grads, ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # validation: no recomputation, the same numbers
        again = distillation_loss(s_hidden, t_hidden, s_head, t_head, labels, mask, kd_ratio=0.3, kind=kind,
                                  temperature=temperature, chunk_size=chunk)
    torch.testing.assert_close(again.loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)


class _CountingHead(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head, self.rows, self.out_features = head, [], head.out_features

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.head(x)


def test_heads_run_in_chunks_and_nothing_vocabulary_sized_is_kept():
    """No call sees more than a chunk of positions: a head that is no frozen Linear runs once per
    chunk in the forward pass and once more per chunk in the backward pass; nothing vocabulary-sized
    is saved for the backward pass, whichever way the gradient is formed."""
    s_hidden, t_hidden, s_head, t_head, labels, attention = _random_batch()
    s_count, t_count = _CountingHead(s_head), _CountingHead(t_head)
    mask = kd_mask(labels, attention, None, "all")
    n = int(mask.sum())
    out = distillation_loss(s_hidden, t_hidden, s_count, t_count, labels, mask, chunk_size=4)
    chunks = math.ceil(n / 4)
    assert s_count.rows == t_count.rows == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    out.loss.backward()
    assert len(s_count.rows) == len(t_count.rows) == 2 * chunks and max(s_count.rows) == 4
    assert sorted(s_count.rows[chunks:]) == sorted(s_count.rows[:chunks])
    # frozen Linear heads (the usual case): gradients formed in the forward pass; either way the
    # graph keeps nothing vocabulary-sized for the backward pass
    for frozen in (True, False):
        s_head.requires_grad_(not frozen)
        t_head.requires_grad_(False)
        saved: list[tuple[int, ...]] = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            head = s_head if frozen else _CountingHead(s_head)
            kept = distillation_loss(s_hidden, t_hidden, head, t_head, labels, mask, chunk_size=4)
        assert saved and not [shape for shape in saved if 40 in shape], saved  # vocabulary 40
        torch.testing.assert_close(kept.loss, out.loss, rtol=1e-12, atol=0)
    # agreed chunk counts (FSDP2): empty chunks make up the difference and add nothing
    padded = distillation_loss(s_hidden, t_hidden, s_head, t_head, labels, mask, chunk_size=4, min_chunks=chunks + 2)
    torch.testing.assert_close(padded.loss, out.loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_of_equal_distributions_is_exactly_zero(kind):
    logits = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    value = divergence(logits, logits.detach().clone(), kind, 1.5)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.count_nonzero(value) == 0 and torch.count_nonzero(grad) == 0


def test_hidden_mse_is_the_mean_over_layers():
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(6, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(6, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    want = sum(((a - b) ** 2).mean() for a, b in zip(s, t)) / 3
    torch.testing.assert_close(hidden_mse(s, t), want, rtol=1e-12, atol=0)


def test_packed_rows_distill_like_padded_ones(pair):
    """padding_free: one packed row (restarting positions) has the padded batch's distillation loss,
    positions and gradients, the hidden-state loss included; float64 throughout."""
    module = LoRARecoveryModule(str(pair["pruned"]), teacher=str(pair["base"]), lora_dropout=0.0,
                                kd_hidden_weight=0.5).double()
    _lora_b_random(module)
    features = _features()

    def loss_and_grads(batch):
        module.zero_grad(set_to_none=True)
        out = module.distill_loss(batch)
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}

    padded, padded_grads = loss_and_grads(PadCollator(0)(features))
    packed, packed_grads = loss_and_grads(PackCollator()(features))
    assert padded.kd_count == packed.kd_count == sum(n - 1 for n in (7, 12, 5, 9))
    assert padded.ce_count == packed.ce_count
    assert padded.kd > 1e-3 and padded.hidden > 1e-6
    for a, b in ((packed.loss, padded.loss), (packed.kd, padded.kd), (packed.hidden, padded.hidden)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-8, atol=1e-12, msg=name)


def test_gradient_checkpointing_distills_the_same(pair):
    """With the student's gradient checkpointing (its layers run again in the backward pass, the
    hidden-state hooks long gone by then) the loss, its parts and the gradients are the same; float64."""
    features = _features()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A initialisation
        module = LoRARecoveryModule(str(pair["pruned"]), teacher=str(pair["base"]), lora_dropout=0.0,
                                    kd_hidden_weight=0.5, gradient_checkpointing=checkpointing).double()
        _lora_b_random(module)
        out = module.distill_loss(PadCollator(0)(features))
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    assert plain.hidden > 1e-6
    for a, b in ((checkpointed.loss, plain.loss), (checkpointed.kd, plain.kd), (checkpointed.hidden, plain.hidden)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-8, atol=1e-12, msg=name)


# --- the teacher in the module ------------------------------------------------------------------------------
def test_gradients_reach_only_the_lora_weights(pair):
    module = LoRARecoveryModule(str(pair["pruned"]), teacher=str(pair["base_pickle"]), lora_dropout=0.0,
                                kd_hidden_weight=0.1)
    teacher = module.teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    # no submodule: not in the parameters, the state dict or a checkpoint
    own = {id(p) for p in module.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())
    assert not [k for k in module.state_dict() if "teacher" in k]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _lora_b_random(module)
    out = module.distill_loss(PadCollator(0)(_features()))
    out.loss.backward()
    with_grad = [n for n, p in module.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad.abs().max() > 0 for n, p in module.named_parameters() if "lora_" in n)
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=1.0)
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


def test_a_student_identical_to_its_teacher_learns_nothing_from_it(pair):
    """The pruned model as its own teacher (the adapter starts as a no-op): for every divergence the
    divergence and its gradient are zero, while the CE of the same batch has a gradient. A different
    teacher gives one."""
    batch = PadCollator(0)(_features())
    itself, other = (LoRARecoveryModule(str(pair["pruned"]), teacher=str(t), lora_dropout=0.0, kd_temperature=2.0,
                                        torch_dtype="float64").double() for t in (pair["pruned"], pair["base"]))

    def grads(module, kind, ratio):
        module.hparams.kd_loss, module.hparams.kd_ratio = kind, ratio
        module.zero_grad(set_to_none=True)
        out = module.distill_loss(batch)
        out.loss.backward()
        return out, max(p.grad.abs().max().item() for p in module.trainable_parameters())

    _, ce_scale = grads(itself, "forward_kl", 0.0)
    assert ce_scale > 1e-4  # the CE does move the adapter (lora_B)
    for kind in KINDS:
        out, kd_scale = grads(itself, kind, 1.0)
        assert out.kd_count > 0 and abs(float(out.kd.detach())) <= 1e-14, kind
        # float64: rounding-level differences between the two forward passes would give ~1e-16 × the CE's scale
        assert kd_scale <= 1e-10 * ce_scale, kind
        out, kd_scale = grads(other, kind, 1.0)
        assert out.kd > 1e-3 and kd_scale > 1e-3 * ce_scale, kind


def test_a_mismatched_teacher_is_refused(pair, tmp_path):
    from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer
    from lit_recover.models.load import save_pruned

    tok = pair["tokenizer"]
    wider = save_pruned(build_tiny_llama(len(tok) + 8, seed=1), tok, tmp_path / "wider.bin")
    with pytest.raises(TeacherMismatchError) as exc:
        LoRARecoveryModule(str(pair["pruned"]), teacher=str(wider))
    message = str(exc.value)
    assert "\n" not in message and str(wider) in message and str(pair["pruned"]) in message
    assert f"vocabulary (logits) {len(tok) + 8} vs {len(tok)}" in message
    other_eos = build_tokenizer()
    other_eos.eos_token = "<unk>"
    eos = save_pruned(build_tiny_llama(len(tok), seed=1), other_eos, tmp_path / "eos.bin")
    with pytest.raises(TeacherMismatchError, match="eos id 0 vs 2"):
        LoRARecoveryModule(str(pair["pruned"]), teacher=str(eos))
    # the hidden-state loss also needs the layers to line up
    deeper = save_pruned(build_tiny_llama(len(tok), num_layers=5, seed=1), tok, tmp_path / "deeper.bin")
    LoRARecoveryModule(str(pair["pruned"]), teacher=str(deeper))  # logits alone: fine
    with pytest.raises(TeacherMismatchError, match="decoder layers 5 vs 4"):
        LoRARecoveryModule(str(pair["pruned"]), teacher=str(deeper), kd_hidden_weight=1.0)


def test_teacher_auto_reads_the_pruning_report(pair, tmp_path):
    from lit_recover.errors import ConfigError

    assert teacher_source("auto", str(pair["pruned"])) == str(pair["base"])
    assert teacher_source(str(pair["base_pickle"]), str(pair["pruned"])) == str(pair["base_pickle"])
    module = LoRARecoveryModule(str(pair["pruned"]), teacher="auto")
    assert module.teacher_source == str(pair["base"])
    lonely = tmp_path / "pruned_model.bin"
    lonely.write_bytes((pair["pruned"]).read_bytes())
    with pytest.raises(ConfigError, match="pruned_model.json not found"):
        teacher_source("auto", str(lonely))


def test_a_missing_teacher_stops_before_any_model_loads(pair, alpaca_json, tmp_path, capsys, monkeypatch):
    import lit_recover.module as module_mod

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the teacher path was checked")

    monkeypatch.setattr(module_mod, "load_pruned", no_loading)
    args = ["fit", "--model.pruned_model", str(pair["pruned"]), "--data.data_path", str(alpaca_json),
            "--output_dir", str(tmp_path / "o")]
    for teacher, expected in ((str(tmp_path / "nowhere.bin"), "nowhere.bin: no such file or folder (--model.teacher)"),
                              ("auto", None)):
        if teacher == "auto":
            (pair["pruned"].with_suffix(".json")).rename(tmp_path / "aside.json")
            expected = "--model.teacher auto:"
        try:
            with pytest.raises(SystemExit) as exc:
                cli_main([*args, "--model.teacher", teacher])
        finally:
            if teacher == "auto":
                (tmp_path / "aside.json").rename(pair["pruned"].with_suffix(".json"))
        assert exc.value.code == 2
        assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        cli_main([*args, "--model.teacher", "auto", "--model.kd_ratio", "1.5"])
    assert "--model.kd_ratio 1.5: must lie in [0, 1]" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["all", "response"])
def test_token_weighted_windows_with_a_teacher(pair, alpaca_json, tmp_path, positions):
    """loss_weighting tokens with a teacher: the gradient of every accumulation window (the short
    last one too) is that of one batch holding all its micro-batches: the CE its mean over the
    window's supervised tokens, the divergence and the hidden-state loss their means over its
    distillation positions. Float64: 1e-9 is far below the weighting's effect."""
    from lit_recover.data import AlpacaDataModule
    from tests.test_module import _WindowGrads

    module = LoRARecoveryModule(str(pair["pruned"]), teacher=str(pair["base"]), lora_dropout=0.0, kd_ratio=0.6,
                                kd_temperature=2.0, kd_hidden_weight=0.5, kd_positions=positions)
    _lora_b_random(module)
    datamodule = AlpacaDataModule(data_path=str(alpaca_json), val_set_size=0, cutoff_len=128, batch_size=6,
                                  micro_batch_size=2, tokenizer=module.tokenizer, cache_dir=str(tmp_path / "c"))
    record = _WindowGrads()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="64-true", accumulate_grad_batches=3, max_epochs=1,
                        limit_train_batches=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[record])
    trainer.fit(module, datamodule=datamodule)
    assert next(module.teacher.parameters()).dtype == torch.float64  # placed in the student's dtype
    plan = datamodule.train_sampler.plan(0)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for w, start in enumerate((0, 3, 6)):
        indices = [i for step in range(start, min(start + 3, 7)) for i in plan[step]]
        batch = PadCollator(module.tokenizer.pad_token_id)(datamodule.train_dataset.__getitems__(indices))
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(record.before[w][name])
        module.zero_grad(set_to_none=True)
        module.distill_loss(batch).loss.backward()
        for name, p in params.items():
            torch.testing.assert_close(record.grads[w][name], p.grad, rtol=1e-9, atol=1e-12, msg=f"window {w}: {name}")


@pytest.mark.slow
def test_a_fit_logs_the_distillation_parts(pair, alpaca_json, tmp_path):
    """train/ce_loss, train/kd_loss, train/hidden_loss and val/kd_loss are logged; train/loss is the
    whole objective and val/loss stays the CE."""
    from lit_recover.data import AlpacaDataModule

    module = LoRARecoveryModule(str(pair["pruned"]), teacher=str(pair["base"]), kd_hidden_weight=0.5, kd_ratio=0.4)
    datamodule = AlpacaDataModule(data_path=str(alpaca_json), val_set_size=4, cutoff_len=64, batch_size=2,
                                  micro_batch_size=2, tokenizer=module.tokenizer, cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, val_check_interval=1)
    trainer.fit(module, datamodule=datamodule)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("train/ce_loss", "train/kd_loss", "train/hidden_loss", "val/kd_loss", "val/loss"):
        assert key in m and math.isfinite(m[key]) and m[key] > 0, (key, m)
    want = 0.6 * m["train/ce_loss"] + 0.4 * m["train/kd_loss"] + 0.5 * m["train/hidden_loss"]
    assert m["train/loss"] == pytest.approx(want, rel=1e-5)
    with torch.no_grad():  # val/loss is the CE of the validation batch, not the objective
        batch = next(iter(datamodule.val_dataloader()))
        module.eval()
        ce, _ = module.supervised_loss(batch)
    assert m["val/loss"] == pytest.approx(float(ce), rel=1e-5)


# --- the share of the gap won back -----------------------------------------------------------------------------
def _results(label, wikitext, ptb, accuracy):
    from lit_recover.evaluation.report import measurement, new_results

    res = new_results(label=label, settings={}, model={}, environment={})
    res["metrics"]["ppl"] = {"status": "ok", "datasets": {
        "wikitext2": measurement(wikitext, "perplexity", higher_is_better=False),
        "ptb": measurement(ptb, "perplexity", higher_is_better=False)}}
    res["metrics"]["zero_shot"] = {"status": "ok", "average": measurement(accuracy, "fraction", higher_is_better=True)}
    return res


def test_compare_adds_the_share_of_the_gap_won_back(tmp_path, capsys):
    from lit_recover.evaluation.command import compare
    from lit_recover.evaluation.report import compare_table, recovery_shares, write_results

    # LLM-Pruner's LLaMA-7B at 20 %: WikiText-2 12.62 → 19.24 → 17.39
    runs = [_results("base", 12.62, 22.14, 0.60), _results("pruned", 19.24, 34.09, 0.50),
            _results("sft", 17.39, 30.00, 0.55), _results("kd", 12.62, 40.0, 0.45)]
    shares = {name: values for name, _, values in recovery_shares(runs)}
    wiki = (math.log(19.24) - math.log(17.39)) / (math.log(19.24) - math.log(12.62))
    assert shares["R ppl wikitext2"][:2] == [None, None]
    assert shares["R ppl wikitext2"][2] == pytest.approx(wiki) and 0.23 < wiki < 0.25
    assert shares["R ppl wikitext2"][3] == pytest.approx(1.0)  # back at the base
    assert shares["R ppl ptb"][3] < 0  # worse than pruned
    assert shares["R zero_shot average"][2:] == [pytest.approx(0.5), pytest.approx(-0.5)]
    table = compare_table(runs, ["base", "pruned", "sft", "kd"])
    row = next(line for line in table.splitlines() if line.startswith("| R ppl wikitext2"))
    assert f"{wiki:.3f}" in row and "1.000" in row
    assert "R ppl" not in compare_table(runs[:2], ["base", "pruned"])  # two columns: no base to measure against
    paths = [write_results(r, tmp_path / f"{r['label']}.json") for r in runs[:3]]
    compare([str(p) for p in paths])
    assert f"{wiki:.3f}" in capsys.readouterr().out


# --- fits ----------------------------------------------------------------------------------------------------------
class CountTokens(L.Callback):
    """Non-pad tokens of every training micro-batch, as the data gave them."""

    def __init__(self):
        self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _fit_args(pair, data, out, *extra):
    return ["fit", "--model.pruned_model", str(pair["pruned"]), "--data.data_path", str(data),
            "--output_dir", str(out), "--data.batch_size", "4", "--data.micro_batch_size", "2",
            "--data.cutoff_len", "64", "--data.val_set_size", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.precision", "32-true",
            "--model.learning_rate", "1e-2", "--model.warmup_steps", "1", "--skip_evaluation", "true", *extra]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(RunFolder(out).adapter / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_with_a_teacher_reproduces_the_straight_run(pair, alpaca_json, tmp_path):
    """6 steps straight == 3 steps, then 3 more from checkpoint-last (dropout on, the hidden-state loss
    on, the teacher reloaded from its path): the checkpoint holds no teacher and needs none."""
    extra = ["--model.teacher", str(pair["base"]), "--model.kd_hidden_weight", "0.1", "--save_steps", "3",
             "--trainer.max_steps", "6", "--data.group_by_length", "true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_main(_fit_args(pair, alpaca_json, straight, *extra))
    cli_main(_fit_args(pair, alpaca_json, resumed, *extra,
                       "--trainer.callbacks+=tests.helpers.StopAtStep", "--trainer.callbacks.step=3"))
    state = torch.load(RunFolder(resumed).last_checkpoint / "lightning.ckpt", map_location="cpu", weights_only=False)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    assert state["training_progress"]["tokens"] > 0
    first_half = _adapter(resumed)
    cli_main(_fit_args(pair, alpaca_json, resumed, *extra, "--ckpt_path", "last", "--overwrite", "true"))
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    assert any(not torch.allclose(first_half[k], b[k]) for k in a)  # the second half trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def _kl_to_base(model, base, tokenizer, text: str) -> float:
    """Mean KL(base ‖ model) per token of held-out text, in float64."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        p = torch.log_softmax(base(input_ids=ids).logits.double(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.slow
def test_distillation_ends_closer_to_the_base_than_sft(pair, alpaca_json, tmp_path):
    """The same 8 steps on the same batches: distilled from its base (the shipped defaults otherwise),
    the pruned model's next-token distributions on held-out text end closer to the base's than after
    SFT. The results JSON records what each fit cost."""
    from lit_recover.models.load import load_pruned

    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(f"Record {i}: the capital of France is Paris; add {i} and {i + 2}." for i in range(40)))
    evaluation = ["--evaluation.metrics", "[ppl]", "--evaluation.ppl_datasets", "[]", "--evaluation.ppl_texts",
                  json.dumps({"held_out": str(text)}), "--evaluation.limit", "2", "--before_metrics", "[]",
                  "--evaluation.progress", "false"]
    runs = {}
    for name, extra in (("sft", []), ("kd", ["--model.teacher", "auto"])):
        args = _fit_args(pair, alpaca_json, tmp_path / name, "--trainer.max_steps", "8", *evaluation, *extra,
                         "--trainer.callbacks+=tests.test_distill.CountTokens")
        args[args.index("--skip_evaluation") + 1] = "false"
        cli = cli_main(args)
        counter = next(c for c in cli.trainer.callbacks if isinstance(c, CountTokens))
        results = json.loads(RunFolder(tmp_path / name).evaluation.read_text())
        training = results["training"]
        assert training["optimizer_steps"]["value"] == 8 and training["wall_time"]["value"] > 0
        assert training["tokens_seen"]["value"] == counter.tokens
        assert 0 < training["supervised_tokens"]["value"] < counter.tokens
        assert training["settings"]["stopped_by"] == "max_steps"
        assert training["settings"]["recipe"]["objective"] == ("distillation" if extra else "sft")
        runs[name] = load_pruned(RunFolder(tmp_path / name).merged_pickle)[0].eval()
    assert training["settings"]["recipe"]["teacher_source"] == str(pair["base"])
    base, tok = load_pruned(pair["base"])
    pruned, _ = load_pruned(pair["pruned"])
    held_out = text.read_text()
    before = _kl_to_base(pruned.eval(), base.eval(), tok, held_out)
    sft, kd = (_kl_to_base(runs[name], base, tok, held_out) for name in ("sft", "kd"))
    # measured here: 2.4 before, 34.7 after SFT, 13.0 after distillation (lr 1e-2 pulls both far from a
    # random base; the distilled model half as far)
    assert kd < 0.5 * sft, (before, sft, kd)
