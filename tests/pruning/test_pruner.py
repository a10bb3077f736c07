"""Structural pruner: shapes, exact ratio accounting, GQA coupling, criteria, CLI output, generation."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer
from lit_recover.models.load import load_pruned
from lit_recover.outputs import MERGED_PICKLE
from lit_recover.pruning import count_parameters, default_layer_range, layer_shapes, prune_model
from lit_recover.pruning.__main__ import main as prune_main
from lit_recover.pruning.importance import (
    CalibrationDataError,
    accumulate_gradients,
    calibration_batches,
    mlp_channel_scores,
    read_calibration_texts,
)
from lit_recover.pruning.report import read_report

HIDDEN = 96


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny(tokenizer, seed: int = 0):
    """A dense 6-layer GQA LLaMA: 6 query heads in 3 KV groups of 2, head_dim 16."""
    model = build_tiny_llama(len(tokenizer), hidden_size=HIDDEN, num_layers=6, num_heads=6, num_kv_heads=3,
                             intermediate_size=128, seed=seed)
    return model.eval()


IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 60, 70, 80, 90, 100, 110]])


def logits(model, ids=IDS, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_default_layer_range_scales_llm_pruner_recipe():
    assert default_layer_range(32) == (4, 30)  # LLM-Pruner's LLaMA-7B setting
    assert default_layer_range(30) == (4, 28)  # SmolLM2-135M
    assert default_layer_range(6) == (1, 5)
    assert default_layer_range(4) == (1, 3)
    assert default_layer_range(2) == (0, 2)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_ratio_hit_and_reported_exactly(tokenizer, ratio):
    model = tiny(tokenizer)
    before = count_parameters(model)
    report = prune_model(model, tokenizer, ratio, criterion="l2")
    after = count_parameters(model)
    assert (report["params_before"], report["params_after"]) == (before, after)
    assert report["params_removed"] == before - after
    assert report["achieved_ratio"] == (before - after) / before
    # Whole KV groups are coarse, but the MLP absorbs the rounding: off by less than one channel.
    assert abs((before - after) - round(ratio * before)) <= 3 * HIDDEN
    shapes = layer_shapes(model)
    assert report["layer_shapes"] == shapes
    dense = {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16, "intermediate_size": 128}
    assert shapes[0] == dense and shapes[5] == dense  # first and last layers are left alone
    for s in shapes[1:5]:
        assert s["intermediate_size"] < 128 and s["head_dim"] == 16
        assert s["num_attention_heads"] == 2 * s["num_key_value_heads"]


def test_layer_ranges_are_respected(tokenizer):
    model = tiny(tokenizer)
    report = prune_model(model, tokenizer, 0.1, criterion="l1", block_attention_layer_start=2,
                         block_attention_layer_end=4, block_mlp_layer_start=3, block_mlp_layer_end=5)
    shapes = layer_shapes(model)
    assert [s["num_key_value_heads"] < 3 for s in shapes] == [False, False, True, True, False, False]
    assert [s["intermediate_size"] < 128 for s in shapes] == [False, False, False, True, True, False]
    assert (report["block_attention_layer_start"], report["block_mlp_layer_end"]) == (2, 5)


def test_ratio_zero_changes_nothing(tokenizer):
    model = tiny(tokenizer)
    reference = logits(model)
    report = prune_model(model, tokenizer, 0.0, criterion="taylor")
    assert report["params_removed"] == 0 and report["achieved_ratio"] == 0.0
    assert torch.equal(logits(model), reference)


def test_pruned_model_equals_original_with_removed_units_zeroed(tokenizer):
    """GQA coupling: dropping a KV group must remove exactly its query heads (q rows, o columns).

    Zeroing the ``o_proj`` columns of the removed query heads and the ``down_proj`` columns of the
    removed MLP channels in the dense model gives the same function as the pruned model, if and only
    if every coupled slice was cut consistently.
    """
    model = tiny(tokenizer, seed=1)
    dense = copy.deepcopy(model)
    report = prune_model(model, tokenizer, 0.25, criterion="random", seed=3)
    head_dim, per_group = 16, 2
    removed_some_group = False
    for i, entry in enumerate(report["layers"]):
        attn, mlp = dense.model.layers[i].self_attn, dense.model.layers[i].mlp
        pruned_attn = model.model.layers[i].self_attn
        kept = entry.get("kept_kv_groups", [0, 1, 2])
        assert pruned_attn.num_key_value_groups == per_group
        for g in set(range(3)) - set(kept):
            removed_some_group = True
            cols = slice(g * per_group * head_dim, (g + 1) * per_group * head_dim)
            attn.o_proj.weight.data[:, cols] = 0
        # which channels survived: match the pruned gate rows back to the dense ones
        pruned_gate = model.model.layers[i].mlp.gate_proj.weight
        survivors = [int(torch.where((mlp.gate_proj.weight == row).all(1))[0][0]) for row in pruned_gate]
        gone = sorted(set(range(128)) - set(survivors))
        assert len(gone) == 128 - entry["mlp_channels_after"]
        mlp.down_proj.weight.data[:, gone] = 0
        # k rows of the kept groups, in order
        k_dense = attn.k_proj.weight.view(3, head_dim, HIDDEN)[kept].reshape(-1, HIDDEN)
        assert torch.equal(pruned_attn.k_proj.weight, k_dense)
    assert removed_some_group
    mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    assert torch.allclose(logits(model, mask=mask), logits(dense, mask=mask), atol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "random"])
def test_every_criterion_prunes_and_leaves_a_working_model(tokenizer, criterion):
    model = tiny(tokenizer)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = prune_model(model, tokenizer, 0.2, criterion=criterion, num_examples=2, calibration_seq_len=16)
    assert report["criterion"] == criterion
    assert report["params_removed"] > 0
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert (report["calibration_loss"] is not None) == (criterion == "taylor")
    assert torch.isfinite(logits(model)).all()


def test_magnitude_keeps_the_largest_channels(tokenizer):
    model = tiny(tokenizer)
    mlp = model.model.layers[2].mlp
    w = mlp.gate_proj.weight.detach().abs().sum(1) + mlp.up_proj.weight.detach().abs().sum(1) \
        + mlp.down_proj.weight.detach().abs().sum(0)
    assert torch.allclose(mlp_channel_scores(mlp, "l1"), w)
    gate = mlp.gate_proj.weight.detach().clone()
    prune_model(model, tokenizer, 0.2, criterion="l1")
    kept = model.model.layers[2].mlp.gate_proj.out_features
    expected = torch.sort(torch.topk(w, kept).indices).values
    assert torch.equal(model.model.layers[2].mlp.gate_proj.weight, gate[expected])


def test_taylor_is_deterministic_and_differs_from_magnitude(tokenizer):
    runs = []
    for criterion in ("taylor", "taylor", "l2"):
        model = tiny(tokenizer)
        prune_model(model, tokenizer, 0.2, criterion=criterion, num_examples=2, calibration_seq_len=16)
        runs.append(model.model.layers[2].mlp.gate_proj.weight.detach())
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == runs[2].shape and not torch.equal(runs[0], runs[2])


def test_gradient_accumulation_matches_one_batch(tokenizer):
    batches = calibration_batches(tokenizer, num_examples=4, seq_len=16)
    assert batches.shape == (4, 16)
    grads = []
    for micro in (1, 4):
        model = tiny(tokenizer)
        layers = list(model.model.layers)
        loss = accumulate_gradients(model, layers, batches, micro_batch_size=micro)
        grads.append((loss, layers[1].mlp.up_proj.weight.grad.clone()))
        assert model.model.embed_tokens.weight.grad is None  # only the prunable projections
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_too_high_ratio_is_refused(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(ValueError, match=r"pruning_ratio 0.9 asks to remove .* can give at most"):
        prune_model(model, tokenizer, 0.9)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generate_with_padding_after_pruning(tokenizer, impl):
    model = tiny(tokenizer)
    prune_model(model, tokenizer, 0.25, criterion="l2")
    model.set_attn_implementation(impl)
    prompt = torch.tensor([[1, 40, 41, 42, 43]])
    alone = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                           do_sample=False, pad_token_id=0)
    batch = torch.tensor([[0, 0, 0, 1, 40, 41, 42, 43], [1, 50, 60, 70, 80, 90, 100, 110]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 8:], alone[0, 5:])  # left padding is masked out


def test_eager_and_sdpa_agree_after_pruning(tokenizer):
    model = tiny(tokenizer)
    prune_model(model, tokenizer, 0.25, criterion="l2")
    mask = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])
    model.set_attn_implementation("eager")
    eager = logits(model, mask=mask)
    model.set_attn_implementation("sdpa")
    real = mask.bool()  # padding positions attend to nothing; the two kernels fill them differently
    assert torch.allclose(eager[real], logits(model, mask=mask)[real], atol=1e-5)


@pytest.fixture()
def tiny_hf_dir(tokenizer, tmp_path):
    path = tmp_path / "base"
    tiny(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_writes_pickle_and_report_that_load_back(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "results" / "tiny20" / MERGED_PICKLE
    report = prune_main(["--base_model", str(tiny_hf_dir), "--pruning_ratio", "0.2", "--output", str(out),
                         "--criterion", "taylor", "--num_examples", "2", "--calibration_seq_len", "16"])
    assert "#Param before:" in capsys.readouterr().out
    saved = json.loads((out.parent / "pruned_model.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (saved["schema"], saved["schema_version"]) == ("lit-recover/pruning", 1)
    assert read_report(out.parent / "pruned_model.json") == saved
    assert saved["criterion"] == "taylor" and saved["pruning_ratio"] == 0.2
    model, tok = load_pruned(out)
    assert count_parameters(model) == saved["params_after"]
    assert layer_shapes(model) == saved["layer_shapes"]
    assert saved["params_before"] == count_parameters(tiny(build_tokenizer()))
    assert tok.pad_token is not None


def test_cli_never_overwrites_silently(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / MERGED_PICKLE
    out.write_bytes(b"earlier result")
    with pytest.raises(SystemExit) as exc:
        prune_main(["--base_model", str(tiny_hf_dir), "--output", str(out), "--criterion", "l2"])
    assert exc.value.code == 2
    assert re.fullmatch(rf"error: .*{re.escape(MERGED_PICKLE)}: already exists; pass --overwrite true .*\n",
                        capsys.readouterr().err)
    assert out.read_bytes() == b"earlier result"
    prune_main(["--base_model", str(tiny_hf_dir), "--output", str(out), "--criterion", "l2", "--overwrite", "true"])
    assert load_pruned(out)[0] is not None


def test_prune_an_already_pruned_pickle(tiny_pruned_path, tmp_path):
    """LLM-Pruner outputs have uneven layers; pruning them again keeps every layer consistent."""
    out = tmp_path / "again.bin"
    report = prune_main(["--base_model", str(tiny_pruned_path), "--pruning_ratio", "0.1", "--output", str(out),
                         "--criterion", "l1"])
    model, _ = load_pruned(out)
    assert abs(report["achieved_ratio"] - 0.1) < 0.01
    assert count_parameters(model) == report["params_after"]


def test_calibration_files(tokenizer, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("First paragraph of plain text.\n\nSecond one, a little longer than the first.\n")
    assert read_calibration_texts(text) == [
        "First paragraph of plain text.", "Second one, a little longer than the first."
    ]
    alpaca = tmp_path / "cal.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."},
                                  {"instruction": "Add.", "input": "1 + 1", "output": "2"}]))
    assert read_calibration_texts(alpaca) == ["Say hi.\nHi.", "Add.\n1 + 1\n2"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "ok", "output": "ok"}, {"instruction": "no output"}]))
    with pytest.raises(CalibrationDataError, match=r"bad\.json: record 1 has no string field 'output'"):
        read_calibration_texts(bad)
    batches = calibration_batches(tokenizer, read_calibration_texts(alpaca), num_examples=3, seq_len=4)
    assert batches.shape[1] == 4 and 1 <= batches.shape[0] <= 3
