"""The pickle-free pruned folder and the convert command."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from lit_recover.convert import convert, main
from lit_recover.models.checks import PrunedModelError
from lit_recover.models.folder import (
    SHAPES_FILE,
    WEIGHTS_FILE,
    is_pruned_folder,
    load_pruned_folder,
    save_pruned_folder,
)
from lit_recover.models.load import load_pruned, save_pruned
from lit_recover.pruning import layer_shapes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pickles"
IDS = torch.tensor([[1, 10, 20, 30, 40, 50]])


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_keeps_uneven_layers_logits_and_tokenizer(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    ref = _logits(model)
    out = save_pruned_folder(model, tok, tmp_path / "pruned")
    names = {p.name for p in out.iterdir()}
    assert {WEIGHTS_FILE, "config.json", SHAPES_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # nothing executable
    shape_map = json.loads((out / SHAPES_FILE).read_text())
    assert shape_map["architecture"] == "LlamaForCausalLM" and shape_map["layers"] == layer_shapes(model)

    loaded, ltok = load_pruned(out)
    assert loaded.training and ltok.pad_token is not None
    assert layer_shapes(loaded) == layer_shapes(model)
    assert torch.allclose(_logits(loaded), ref, atol=1e-6)
    text = "The capital of France is Paris."
    assert ltok(text)["input_ids"] == tok(text)["input_ids"]
    assert not list(tmp_path.glob(".pruned*"))  # no temporary folder left behind


def test_plain_from_pretrained_gets_it_wrong_the_shape_map_gets_it_right(tmp_path, tiny_model_and_tokenizer):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model_and_tokenizer
    save_pruned_folder(model, tok, tmp_path / "p")
    widths = [s["intermediate_size"] for s in layer_shapes(model)]
    try:  # builds every layer at the config's width: a size-mismatch error, or re-initialised layers
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    except RuntimeError as exc:
        assert "mismatch" in str(exc)
    else:
        assert [s["intermediate_size"] for s in layer_shapes(plain)] != widths
    assert is_pruned_folder(tmp_path / "p")
    loaded, _ = load_pruned_folder(tmp_path / "p")
    assert [s["intermediate_size"] for s in layer_shapes(loaded)] == widths
    assert torch.equal(_logits(loaded), _logits(model))


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    target = tmp_path / "out"
    target.mkdir()
    (target / "results.json").write_text("{}")
    with pytest.raises(PrunedModelError, match=r"out: folder exists and is not empty; pass overwrite=True"):
        save_pruned_folder(model, tok, target)
    assert [p.name for p in target.iterdir()] == ["results.json"]
    save_pruned_folder(model, tok, target, overwrite=True)
    assert is_pruned_folder(target) and not (target / "results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone too

    empty = tmp_path / "empty"
    empty.mkdir()
    save_pruned_folder(model, tok, empty)  # an empty folder is fine without overwrite
    assert is_pruned_folder(empty)


def test_a_failed_write_leaves_the_old_folder_whole(tmp_path, tiny_model_and_tokenizer, monkeypatch):
    model, tok = tiny_model_and_tokenizer
    target = save_pruned_folder(model, tok, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_folder(model, tok, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    with pytest.raises(OSError, match="disk full"):
        save_pruned_folder(model, tok, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shape_map_that_does_not_fit_the_weights_is_named(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    target = save_pruned_folder(model, tok, tmp_path / "p")
    shape_map = json.loads((target / SHAPES_FILE).read_text())
    shape_map["layers"][1]["intermediate_size"] += 8
    (target / SHAPES_FILE).write_text(json.dumps(shape_map))
    message = (r"model\.safetensors: model\.layers\.1\.mlp\.gate_proj\.weight is \[\d+, 64\] in the weights, "
               r"the shape map makes it \[\d+, 64\]")
    with pytest.raises(PrunedModelError, match=message):
        load_pruned(target)
    del shape_map["layers"][2]["head_dim"]
    (target / SHAPES_FILE).write_text(json.dumps(shape_map))
    with pytest.raises(PrunedModelError, match=r"layer_shapes\.json: layer 2 lacks head_dim"):
        load_pruned(target)
    (target / SHAPES_FILE).write_text("{not json")
    with pytest.raises(PrunedModelError, match=r"layer_shapes\.json: not readable JSON"):
        load_pruned(target)


def test_missing_weights_file_is_named(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    target = save_pruned_folder(model, tok, tmp_path / "p")
    (target / WEIGHTS_FILE).unlink()
    with pytest.raises(PrunedModelError, match=r"p/model\.safetensors: missing"):
        load_pruned(target)


@pytest.mark.slow
def test_convert_old_pickles_both_ways(tmp_path):
    """A pickle from transformers 4.45 (tied, bfloat16) and LLM-Pruner's (sentencepiece, float16)."""
    for name in ("tf4_45_llama_tied_gqa", "llmpruner_tf4_31"):
        expected = json.loads((FIXTURES / f"{name}.json").read_text())
        folder = main([str(FIXTURES / f"{name}.bin"), str(tmp_path / name)])
        model, tok = load_pruned(folder)
        assert str(model.dtype).removeprefix("torch.") == expected["dtype"]
        if name.startswith("tf4_45"):
            assert model.lm_head.weight is model.model.embed_tokens.weight
        logits = _logits(model.float(), torch.tensor(expected["input_ids"]))
        assert (logits - torch.tensor(expected["logits"])).abs().max().item() < 1e-4
        assert [tok(t)["input_ids"] for t in expected["texts"]] == expected["text_ids"]

        back = main([str(folder), str(tmp_path / f"{name}.bin")])
        model2, tok2 = load_pruned(back)
        assert torch.equal(_logits(model2.float(), torch.tensor(expected["input_ids"])), logits)
        assert [tok2(t)["input_ids"] for t in expected["texts"]] == expected["text_ids"]


def test_convert_refuses_existing_targets(tmp_path, tiny_pruned_path, capsys):
    folder = convert(str(tiny_pruned_path), str(tmp_path / "f"))
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_pruned_path), str(folder)])
    assert exc.value.code == 2
    assert re.match(r"error: .*f: folder exists and is not empty", capsys.readouterr().err)
    (tmp_path / "exists.bin").write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exc:
        main([str(folder), str(tmp_path / "exists.bin")])
    assert exc.value.code == 2
    assert re.match(r"error: .*exists\.bin: exists; pass --overwrite true", capsys.readouterr().err)
    assert (tmp_path / "exists.bin").read_bytes() == b"keep me"
    main([str(folder), str(tmp_path / "exists.bin"), "--overwrite", "true", "--check", "false"])
    assert zipfile.is_zipfile(tmp_path / "exists.bin")


def test_folder_and_pickle_agree(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    save_pruned(model, tok, tmp_path / "m.bin")
    save_pruned_folder(model, tok, tmp_path / "m")
    a, _ = load_pruned(tmp_path / "m.bin")
    b, _ = load_pruned(tmp_path / "m")
    assert type(a) is type(b)
    assert torch.equal(_logits(a), _logits(b))
