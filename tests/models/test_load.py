import pytest
import torch

from lit_recover.demos.tiny import build_tiny_pruned
from lit_recover.models.checks import PrunedModelError
from lit_recover.models.load import load_pruned, save_pruned
from lit_recover.pruning import layer_shapes


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
    from lit_recover.demos.tiny import build_tiny_llama

    dense = build_tiny_llama(len(tok))
    dense.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded, ltok = load_pruned(tmp_path / "hf")
    assert loaded.training and ltok.pad_token is not None
    assert layer_shapes(loaded)[1]["intermediate_size"] == 128


def test_signature_is_backward_compatible():
    import inspect

    params = inspect.signature(load_pruned).parameters
    assert list(params) == ["path", "dtype", "check", "trust_pickle", "mmap"]
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("dtype", "check", "trust_pickle", "mmap"))
    assert params["trust_pickle"].default is False and params["check"].default is True
    assert params["mmap"].default is False  # weights read into memory unless asked


def test_default_path_never_calls_torch_load(tiny_pruned_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not run on the safe path")

    monkeypatch.setattr(torch, "load", refuse)
    model, tok = load_pruned(tiny_pruned_path)
    assert model.training and tok.pad_token_id == 0
    with pytest.raises(PrunedModelError, match="must not run"):  # the opt-out is the one that unpickles
        load_pruned(tiny_pruned_path, trust_pickle=True)


def test_read_model_keeps_the_stored_state_and_dtype_casts(tmp_path):
    from lit_recover.models.folder import save_pruned_folder
    from lit_recover.models.load import read_model

    model, tok = build_tiny_pruned()
    save_pruned_folder(model, tok, tmp_path / "f")
    raw, raw_tok = read_model(tmp_path / "f")
    assert not raw.training and raw_tok.pad_token is None  # load_pruned's preparation not applied
    loaded, _ = load_pruned(tmp_path / "f", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.training


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os

    from lit_recover.models.folder import save_pruned_folder

    umask = os.umask(0o022)
    try:
        model, tok = build_tiny_pruned()
        path = save_pruned(model, tok, tmp_path / "m.bin")
        folder = save_pruned_folder(model, tok, tmp_path / "f")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
