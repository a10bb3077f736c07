"""Perplexity: the protocol against an independent loop, local files, skips and bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lit_recover.evaluation import ppl
from lit_recover.evaluation.ppl import (
    PPLDataError,
    evaluate_ppl,
    make_chunks,
    perplexity,
    tokenize_stream,
)
from tests.conftest import shared_data

TEXT = "\n\n".join(
    f"Row {i}: the quick brown fox jumps over the lazy dog {i * 7} times, then explains what a function does."
    for i in range(5)
)


def reference_ppl(model, tokenizer, text: str, seq_len: int, max_chunks: int | None = None) -> tuple[float, int]:
    """LLM-Pruner's recipe written out plainly: tokenizer(text), cut, one chunk at a time, float64 NLL."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # the tiny tokenizer adds one BOS, like LLaMA's
    n = ids.numel() // seq_len if max_chunks is None else max_chunks
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            chunk = ids[i * seq_len:(i + 1) * seq_len]
            logits = model(chunk.unsqueeze(0)).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll -= logp.gather(1, chunk[1:].unsqueeze(1)).sum().item()
            count += seq_len - 1
    return math.exp(nll / count), n


def test_batched_ppl_matches_independent_loop(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    expected, n = reference_ppl(model, tok, TEXT, seq_len=32)
    assert n >= 7  # batches of 3 leave a partial last batch
    got = perplexity(model, tok, TEXT, seq_len=32, batch_size=3, progress=False)
    assert got["n_chunks"] == n and got["n_tokens_scored"] == n * 31
    assert got["value"] == pytest.approx(expected, rel=1e-4)
    assert got["unit"] == "perplexity" and got["higher_is_better"] is False


def test_stream_has_one_bos_and_tail_is_dropped(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    ids = tokenize_stream(tok, TEXT)
    assert torch.equal(ids, tok(TEXT, return_tensors="pt").input_ids[0])
    assert ids[0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum().item() == 1
    assert (tokenize_stream(tok, TEXT, add_bos=False) == tok.bos_token_id).sum().item() == 0
    chunks = make_chunks(ids, 32)
    assert chunks.shape == (ids.numel() // 32, 32)
    assert torch.equal(chunks.flatten(), ids[: chunks.numel()])
    assert make_chunks(ids, 32, limit=2).shape == (2, 32)
    assert make_chunks(ids, 32, limit=0.5).shape[0] == math.ceil(chunks.shape[0] * 0.5)
    with pytest.raises(PPLDataError, match="fewer than one chunk"):
        make_chunks(ids[:10], 32)


def test_limit_scores_the_first_chunks_of_the_whole_stream(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    long_text = "\n\n".join([TEXT] * 12)  # long enough that a limit tokenizes only a prefix
    first_two = perplexity(model, tok, long_text, seq_len=32, progress=False, limit=2)
    assert first_two["n_chunks"] == 2 and first_two["n_chunks_total"] is None
    ids = tokenize_stream(tok, long_text)[:64]  # the first two chunks of the whole stream
    nll = 0.0
    with torch.no_grad():
        for chunk in ids.view(2, 32):
            logp = torch.log_softmax(model(chunk[None]).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, chunk[1:, None]).sum().item()
    assert first_two["value"] == pytest.approx(math.exp(nll / 62), rel=1e-4)
    # A fraction needs the whole stream's length, so the whole text is tokenized.
    half = perplexity(model, tok, TEXT, seq_len=32, progress=False, limit=0.5)
    assert half["n_chunks"] == math.ceil(half["n_chunks_total"] / 2)


def test_local_protocol_files(tiny_model_and_tokenizer):
    ppl_dir = shared_data("ppl")
    model, tok = tiny_model_and_tokenizer
    out = evaluate_ppl(model, tok, datasets=["ptb"], data_dir=ppl_dir, seq_len=64, limit=3, progress=False)
    ptb = out["datasets"]["ptb"]
    assert out["status"] == "ok" and ptb["status"] == "ok"
    assert ptb["source"].endswith("ptb_validation.txt") and ptb["n_chunks"] == 3
    assert ptb["n_tokens_scored"] == 3 * 63
    # The whole file tokenized the protocol's way, its first three chunks scored in float64.
    text = (ppl_dir / "ptb_validation.txt").read_text(encoding="utf-8")
    expected, _ = reference_ppl(model, tok, text, seq_len=64, max_chunks=3)
    assert ptb["value"] == pytest.approx(expected, rel=1e-4)  # fp32 logits vs float64: ~1e-6 apart
    assert out["settings"]["seq_len"] == 64 and out["settings"]["limit"] == 3


PTB_ROWS = ["no it was n't black monday", "but while the new york stock exchange did n't fall apart friday",
            "the dow jones industrials closed at N", "<unk> & co. said its $ N million offer is ' fair '"]


def _ptb_parquet_stand_in(tmp_path, monkeypatch, rows: list[str]) -> str:
    """Point the PTB hub source at a local parquet file holding ``rows`` as its ``sentence`` column."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "penn_treebank" / "validation"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"sentence": rows}), folder / "0000.parquet")
    files = str(folder / "*.parquet")
    monkeypatch.setitem(ppl.PPL_SOURCES, "ptb", dataclasses.replace(ppl.PPL_SOURCES["ptb"], parquet=files))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return files


def test_ptb_from_the_hub_reads_its_parquet_conversion(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    """The script-free copy: the same rows joined with "\n\n", and the section names where they came from."""
    files = _ptb_parquet_stand_in(tmp_path, monkeypatch, PTB_ROWS)
    assert ppl.PPL_SOURCES["ptb"].hub_path == "ptb-text-only/ptb_text_only"  # not the loading script's name
    text, source = ppl.load_ppl_text("ptb")
    assert text == "\n\n".join(PTB_ROWS) and source == files
    model, tok = tiny_model_and_tokenizer
    out = evaluate_ppl(model, tok, datasets=["ptb"], seq_len=16, limit=1, progress=False)
    assert out["datasets"]["ptb"]["status"] == "ok" and out["datasets"]["ptb"]["source"] == files


def test_ptb_parquet_rows_give_back_the_protocol_string(tmp_path, monkeypatch):
    """The 3,370 stripped rows of PTB validation, as a parquet file, join to exactly the protocol's string."""
    joined = (shared_data("ppl") / "ptb_validation.txt").read_text(encoding="utf-8")
    rows = joined.split("\n\n")
    assert len(rows) == 3370 and all(r == r.strip() and r for r in rows)  # what ptb_text_only's script yields
    _ptb_parquet_stand_in(tmp_path, monkeypatch, rows)
    assert ppl.load_ppl_text("ptb")[0] == joined


def test_hub_offline_is_skipped_with_reason(tiny_model_and_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_model_and_tokenizer
    out = evaluate_ppl(model, tok, datasets=["wikitext2", "ptb"], data_dir=None, progress=False)
    assert out["status"] == "skipped"
    for name in ("wikitext2", "ptb"):
        assert out["datasets"][name]["status"] == "skipped"
        assert "ppl_data_dir" in out["datasets"][name]["reason"]
        assert "value" not in out["datasets"][name]


def test_bad_files_fail_with_the_file_named(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "good.txt").write_text(TEXT)
    texts = {n: str(tmp_path / f"{n}.txt") for n in ("empty", "latin1", "short", "missing", "good")}
    out = evaluate_ppl(model, tok, datasets=[], texts=texts, seq_len=32, progress=False)
    res = out["datasets"]
    assert res["good"]["status"] == "ok" and res["good"]["source"] == texts["good"]
    assert out["status"] == "ok"  # one text ran; the others say why they did not
    for name, problem in [("empty", "is empty"), ("latin1", "not UTF-8"), ("short", "fewer than one chunk"),
                          ("missing", "no such file")]:
        assert res[name]["status"] == "failed"
        assert texts[name] in res[name]["reason"] and problem in res[name]["reason"]
        assert "\n" not in res[name]["reason"]


def test_ppl_loss_is_fp32_for_bf16_models(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model.to(torch.bfloat16)
    got = perplexity(model, tok, TEXT, seq_len=32, batch_size=1, progress=False)
    # The reference takes the same bf16 logits (the same one-chunk calls) to float64 before the loss.
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in make_chunks(tokenize_stream(tok, TEXT), 32):
            logits = model(input_ids=chunk[None], use_cache=False).logits[0, :-1]
            assert logits.dtype == torch.bfloat16
            nll -= torch.log_softmax(logits.double(), -1).gather(1, chunk[1:, None]).sum().item()
            count += chunk.numel() - 1
    # An fp32 loss is within a few fp32 roundoffs (6e-8 each) of float64 per token, so its mean is well
    # inside 1e-6. A bf16 loss rounds each token's NLL to 8 significant bits (relative error up to
    # 2**-9 = 2e-3): even averaged over these 248 tokens that leaves a few 1e-5, far outside 1e-6.
    assert got["mean_nll"] == pytest.approx(nll / count, rel=1e-6)
    assert got["value"] == pytest.approx(math.exp(nll / count), rel=1e-6 * nll / count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_scores_what_full_logits_score(tiny_model_and_tokenizer, monkeypatch, dtype):
    """The head and loss run a few positions at a time on the decoder's output: the numbers of
    ``model(batch).logits`` (fp32 loss) in the model's own dtype, with and without the chunking."""
    model, tok = tiny_model_and_tokenizer
    model = model.to(dtype)
    chunks = make_chunks(tokenize_stream(tok, TEXT), 32)
    assert ppl._backbone_and_head(model) is not None
    monkeypatch.setattr(ppl, "HEAD_CHUNK_ELEMENTS", 7 * model.get_output_embeddings().weight.shape[0])
    chunked, count = ppl.chunks_nll(model, chunks, batch_size=3, progress=False)
    monkeypatch.setattr(ppl, "_backbone_and_head", lambda m: None)
    full, full_count = ppl.chunks_nll(model, chunks, batch_size=3, progress=False)
    assert count == full_count == chunks.shape[0] * 31
    # the same logits rows in the same dtype; fp32 sums over other groupings of positions
    assert chunked == pytest.approx(full, rel=count * torch.finfo(torch.float32).eps)
