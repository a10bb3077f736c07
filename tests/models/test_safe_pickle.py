"""Safe loading of pruned pickles: old releases, absent toolkits, malicious files."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from lit_recover.demos.tiny import build_tiny_pruned
from lit_recover.models.checks import PrunedModelError
from lit_recover.models.load import load_pruned, save_pruned
from lit_recover.models.safe_pickle import PickledObject, UnsafePickleError, safe_load, walk_records
from lit_recover.pruning import layer_shapes, prune_attention_groups, prune_mlp_channels

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pickles"
VERSIONED = sorted(p.stem for p in FIXTURES.glob("*.bin"))


def _expected(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_fixtures_are_present_and_small():
    made = {"llmpruner_tf4_31", "tf4_36_llama", "tf4_40_llama_sdpa_gqa", "tf4_45_llama_tied_gqa", "tf4_45_qwen2"}
    assert made <= set(VERSIONED)
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 1_000_000


@pytest.mark.parametrize("name", VERSIONED)
def test_old_pickle_rebuilds_with_same_logits_and_token_ids(name):
    expected = _expected(name)
    model, tok = load_pruned(FIXTURES / f"{name}.bin")
    assert not any(m.startswith("LLMPruner") for m in sys.modules)
    import transformers

    # A class of the installed release, whatever release or toolkit pickled it.
    assert type(model) is getattr(transformers, expected["model_class"].rsplit(".", 1)[-1])
    assert model.training and tok.pad_token is not None
    assert str(model.dtype).removeprefix("torch.") == expected["dtype"]
    shapes = [
        (s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"], s["intermediate_size"])
        for s in layer_shapes(model)
    ]
    assert shapes == [(s["q_out"], s["kv_out"], s["mlp"]) for s in expected["layer_shapes"]]
    assert len(set(shapes)) == len(shapes)  # every layer its own width
    model.float().eval()
    with torch.no_grad():
        logits = model(torch.tensor(expected["input_ids"])).logits
    assert (logits - torch.tensor(expected["logits"])).abs().max().item() < 1e-4
    assert [tok(t)["input_ids"] for t in expected["texts"]] == expected["text_ids"]
    for key, value in expected["special_tokens"].items():
        assert getattr(tok, key) == value


def test_safe_load_imports_nothing_and_records_toolkit_classes():
    before = set(sys.modules)
    obj, recorded = safe_load(FIXTURES / "llmpruner_tf4_31.bin")
    assert set(sys.modules) == before
    assert isinstance(obj["model"], PickledObject)
    assert obj["model"].class_path == "LLMPruner.models.hf_llama.modeling_llama.LlamaForCausalLM"
    assert "LLMPruner.models.hf_llama.modeling_llama.LlamaAttention" in recorded
    # the weights are real tensors, in the dtype LLM-Pruner saved (half)
    embed = obj["model"].get("_modules")["model"].get("_modules")["embed_tokens"].get("_parameters")["weight"]
    assert isinstance(embed, torch.nn.Parameter) and embed.dtype == torch.float16 and embed.shape == (96, 32)


def test_trusting_the_pickle_reproduces_the_original_errors():
    message = (r"llmpruner_tf4_31\.bin: the pickle refers to code that is not importable here "
               r"\(No module named 'LLMPruner'\)")
    with pytest.raises(PrunedModelError, match=message):
        load_pruned(FIXTURES / "llmpruner_tf4_31.bin", trust_pickle=True)
    from transformers.models.llama import modeling_llama

    if not hasattr(modeling_llama, "LlamaSdpaAttention"):  # gone since transformers 4.48
        with pytest.raises(PrunedModelError, match="LlamaSdpaAttention"):
            load_pruned(FIXTURES / "tf4_40_llama_sdpa_gqa.bin", trust_pickle=True)


def test_trust_pickle_loads_current_pickle_with_a_warning(tiny_pruned_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_recover.models.load"):
        model, tok = load_pruned(tiny_pruned_path, trust_pickle=True)
    assert "trust_pickle=True" in caplog.text
    assert model.training and tok.pad_token_id == 0


def test_mistral_family_uses_the_same_path(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from lit_recover.demos.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = MistralForCausalLM(config).eval()
    prune_attention_groups(model.model.layers[1].self_attn, [1])
    prune_mlp_channels(model.model.layers[2].mlp, range(0, 64, 2))
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        ref = model(ids).logits
    save_pruned(model, tok, tmp_path / "mistral.bin")
    loaded, _ = load_pruned(tmp_path / "mistral.bin")
    assert type(loaded) is MistralForCausalLM
    assert loaded.model.layers[1].self_attn.q_proj.out_features == 16
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref, atol=1e-5)


# --- malicious pickles -------------------------------------------------------------------------------

class _Reducer:
    """Pickles as a call of ``func(*args)``: what a malicious file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_os_system_and_eval_are_recorded_never_called(tmp_path):
    marker_sys, marker_eval = tmp_path / "system-ran", tmp_path / "eval-ran"
    payload = {
        "model": _Reducer(os.system, f"touch {marker_sys}"),
        "tokenizer": _Reducer(eval, f"open({str(marker_eval)!r}, 'w')"),
    }
    torch.save(payload, tmp_path / "evil.bin")
    obj, recorded = safe_load(tmp_path / "evil.bin")
    assert not marker_sys.exists() and not marker_eval.exists()
    assert obj["model"].class_path in {"posix.system", "os.system", "nt.system"}
    assert obj["model"].args == (f"touch {marker_sys}",)
    assert obj["tokenizer"].class_path == "builtins.eval"
    message = r"evil\.bin: record 'model': model class (posix|os|nt)\.system has no rebuild recipe"
    with pytest.raises(PrunedModelError, match=message):
        load_pruned(tmp_path / "evil.bin")
    assert not marker_sys.exists() and not marker_eval.exists()


def test_payload_hidden_inside_a_real_model_stays_inert(tmp_path):
    marker = tmp_path / "ran"
    model, tok = build_tiny_pruned()
    model.model.layers[1].self_attn.extra = _Reducer(os.system, f"touch {marker}")
    model.model.layers[2].mlp.register_forward_hook(eval)  # a pickled reference to builtins.eval
    save_pruned(model, tok, tmp_path / "m.bin")
    loaded, _ = load_pruned(tmp_path / "m.bin")
    assert not marker.exists()
    assert not hasattr(loaded.model.layers[1].self_attn, "extra")
    assert not loaded.model.layers[2].mlp._forward_hooks


def test_module_named_by_the_pickle_is_not_imported(tmp_path, monkeypatch):
    """The control load (trusting the file) imports the module and runs it; the safe load does neither."""
    mod_name = "lr_payload_mod"
    marker_import, marker_call = tmp_path / "imported", tmp_path / "called"
    (tmp_path / f"{mod_name}.py").write_text(
        f"open({str(marker_import)!r}, 'w').close()\n"
        f"def boom(path):\n    open(path, 'w').close()\n"
    )
    fake = types.ModuleType(mod_name)  # only to write the pickle; removed before loading

    def boom(path):
        raise AssertionError("must not run while writing")

    boom.__module__, boom.__qualname__ = mod_name, "boom"
    fake.boom = boom
    monkeypatch.setitem(sys.modules, mod_name, fake)
    torch.save({"model": _Reducer(boom, str(marker_call)), "tokenizer": None}, tmp_path / "evil.bin")
    monkeypatch.delitem(sys.modules, mod_name)
    monkeypatch.syspath_prepend(str(tmp_path))

    obj, recorded = safe_load(tmp_path / "evil.bin")
    assert mod_name not in sys.modules and not marker_import.exists() and not marker_call.exists()
    assert recorded == {f"{mod_name}.boom"} and obj["model"].args == (str(marker_call),)

    torch.load(tmp_path / "evil.bin", weights_only=False)  # the control: the payload is real
    assert marker_import.exists() and marker_call.exists()
    sys.modules.pop(mod_name, None)


def test_records_keep_state_and_walk(tmp_path):
    obj, _ = safe_load(FIXTURES / "tf4_36_llama.bin")
    classes = {r.class_path for r in walk_records(obj)}
    assert "transformers.models.llama.tokenization_llama_fast.LlamaTokenizerFast" in classes
    config = obj["model"].get("config")
    assert config.get("num_attention_heads") == 4 and config.get("rope_theta") == 10000.0


# --- malformed files ---------------------------------------------------------------------------------

def test_not_a_zip_is_rejected_with_the_way_out(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(PrunedModelError, match=r"junk\.bin: not a torch zip checkpoint .*trust_pickle=True"):
        load_pruned(tmp_path / "junk.bin")


def test_legacy_format_needs_trust(tmp_path):
    model, tok = build_tiny_pruned()
    torch.save({"model": model, "tokenizer": tok}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(PrunedModelError, match="not a torch zip checkpoint"):
        load_pruned(tmp_path / "old.bin")
    loaded, _ = load_pruned(tmp_path / "old.bin", trust_pickle=True)
    assert layer_shapes(loaded) == layer_shapes(model)


def test_truncated_storage_is_rejected(tmp_path):
    src = FIXTURES / "tf4_36_llama.bin"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "cut.bin", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data[:-4] if info.filename.endswith("/data/3") else data)
    with pytest.raises(PrunedModelError, match=r"cut\.bin: storage 3 holds \d+ bytes, its reference says \d+"):
        load_pruned(tmp_path / "cut.bin")


def test_unknown_architecture_names_the_class(tmp_path):
    _, tok = build_tiny_pruned()
    torch.save({"model": torch.nn.Linear(2, 2), "tokenizer": tok}, tmp_path / "lin.bin")
    message = (r"lin\.bin: record 'model': model class torch\.nn\.modules\.linear\.Linear has no rebuild recipe: "
               r"its name 'Linear' is not one of LlamaForCausalLM")
    with pytest.raises(PrunedModelError, match=message):
        load_pruned(tmp_path / "lin.bin")


def test_tokenizer_without_vocabulary_is_named(tmp_path):
    model, _ = build_tiny_pruned()
    torch.save({"model": model, "tokenizer": _Reducer(dict)}, tmp_path / "t.bin")
    with pytest.raises(PrunedModelError, match=r"t\.bin: record 'tokenizer': 'tokenizer' is a dict"):
        load_pruned(tmp_path / "t.bin")


def test_bytearray_size_bomb_is_refused(tmp_path):
    torch.save({"model": _Reducer(bytearray, 10**12), "tokenizer": None}, tmp_path / "bomb.bin")
    with pytest.raises(UnsafePickleError, match="bytearray of a int"):
        safe_load(tmp_path / "bomb.bin")


def _torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A torch.save-style archive around a hand-written pickle stream."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/version", "3\n")
    return path


def test_state_cannot_be_pushed_into_allowlisted_objects(tmp_path):
    # torch.float32, then BUILD with a dict: on a real object that would call its __setstate__.
    stream = b"\x80\x02ctorch\nfloat32\n}b."
    with pytest.raises(UnsafePickleError, match="BUILD on a dtype is not allowed"):
        safe_load(_torch_zip(tmp_path / "build.bin", stream))
    # SETITEM on a torch.Size (a tuple): only dicts and records take items.
    stream = b"\x80\x02ctorch\nSize\n]\x85RK\x00K\x01s."
    with pytest.raises(UnsafePickleError, match="SETITEM on a Size is not allowed"):
        safe_load(_torch_zip(tmp_path / "setitem.bin", stream))


def test_protocol_0_global_is_recorded(tmp_path):
    stream = b"cos\nremove\n(S'/'\ntR."  # os.remove('/') written by hand, protocol 0
    obj, recorded = safe_load(_torch_zip(tmp_path / "p0.bin", stream))
    assert recorded == {"os.remove"} and obj.args == ("/",) and isinstance(obj, PickledObject)


def test_rotary_table_that_the_config_does_not_explain_is_reported(tmp_path, caplog):
    model, tok = build_tiny_pruned()
    with torch.no_grad():  # as if a rope scaling the config does not describe
        for name, buf in model.named_buffers():
            if name.endswith("inv_freq"):
                buf.mul_(0.5)
    save_pruned(model, tok, tmp_path / "rope.bin")
    with caplog.at_level(logging.WARNING, logger="lit_recover.models.rebuild"):
        load_pruned(tmp_path / "rope.bin")
    assert "rotary frequencies rebuilt from its config differ" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_recover.models.rebuild"):
        load_pruned(FIXTURES / "llmpruner_tf4_31.bin")  # float16 table, per layer: agrees
    assert "rotary" not in caplog.text
