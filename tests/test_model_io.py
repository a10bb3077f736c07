import pytest
import torch

from lit_recover.model_io import PrunedModelError, load_pruned, save_pruned
from lit_recover.pruning import layer_shapes
from lit_recover.tiny import build_tiny_pruned


def test_load_pickle_train_mode_pad_and_uneven_shapes(tiny_pruned_path):
    model, tok = load_pruned(tiny_pruned_path)
    assert model.training
    assert tok.pad_token_id == 0
    shapes = layer_shapes(model)
    assert len({(s["num_attention_heads"], s["intermediate_size"]) for s in shapes}) > 1
    assert any(s["num_attention_heads"] // s["num_key_value_heads"] == 2 for s in shapes)  # GQA


def test_pickle_round_trip_same_logits(tmp_path):
    model, tok = build_tiny_pruned(seed=3)
    ids = torch.tensor([[1, 10, 20, 30]])
    ref = model(ids).logits
    save_pruned(model, tok, tmp_path / "m.bin")
    loaded, _ = load_pruned(tmp_path / "m.bin")
    loaded.eval()
    assert torch.allclose(loaded(ids).logits, ref, atol=1e-6)


def test_not_llm_pruner_structure(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.bin")
    with pytest.raises(PrunedModelError, match=r"x\.bin: expected an LLM-Pruner checkpoint .*found a dict with keys \['state_dict'\]"):
        load_pruned(tmp_path / "x.bin")


def test_missing_file(tmp_path):
    with pytest.raises(PrunedModelError, match="no such file"):
        load_pruned(tmp_path / "nope.bin")


def test_inconsistent_layer_is_named(tmp_path):
    model, tok = build_tiny_pruned()
    layer = model.model.layers[2]
    layer.mlp.down_proj = torch.nn.Linear(layer.mlp.down_proj.in_features - 1, 64, bias=False)
    save_pruned(model, tok, tmp_path / "bad.bin")
    with pytest.raises(PrunedModelError, match=r"bad\.bin: layer 2 shapes don't fit: MLP widths"):
        load_pruned(tmp_path / "bad.bin")


def test_hf_directory(tmp_path):
    model, tok = build_tiny_pruned()
    from lit_recover.tiny import build_tiny_llama

    dense = build_tiny_llama(len(tok))
    dense.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded, ltok = load_pruned(tmp_path / "hf")
    assert loaded.training and ltok.pad_token is not None
    assert layer_shapes(loaded)[1]["intermediate_size"] == 128
