"""Perplexity with LLM-Pruner's protocol (WikiText-2 test, PTB validation).

The protocol, as LLM-Pruner's ``evaluator/ppl.py`` and ``datasets/ppl_dataset.py`` run it:

1. the split's rows are joined with ``"\\n\\n"`` into one string;
2. that string is tokenized once, so the stream starts with one BOS and has no other;
3. the stream is cut into non-overlapping chunks of ``seq_len`` tokens, the tail dropped;
4. each chunk is one forward pass with no attention mask; every token but the chunk's first is
   scored (next-token cross-entropy);
5. PPL = exp(mean token NLL over all chunks).

Deviations, all documented in docs/evaluation.md: logits are upcast to fp32 before the loss and
the NLL is summed in float64 (LLM-Pruner takes the loss in the model's dtype); the BOS is added
by us (``add_bos``) rather than by the tokenizer, so a tokenizer that would also append EOS does
not change the stream; ``limit`` keeps only the first chunks, for quick checks (and then only
a long enough prefix of the text is tokenized).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lit_recover.errors import LitRecoverError
from lit_recover.evaluation.report import OK, failed, measurement, skipped

log = logging.getLogger(__name__)


class PPLDataError(LitRecoverError, ValueError):
    """A perplexity text that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class PPLSource:
    """Where one perplexity dataset comes from: a local file name, or the hub.

    Attributes:
        file: the joined text's file name under ``ppl_data_dir``.
        hub_path: the hub dataset (``load_dataset(hub_path, hub_name, split=split)``).
        hub_name: its configuration.
        split: the split the protocol scores.
        field: the column whose rows are joined.
        parquet: parquet files to read instead of ``hub_path`` (``data_files`` of
            ``load_dataset("parquet")``, ``hf://`` paths allowed): for datasets whose hub repository
            needs a loading script, which ``datasets`` >= 4 refuses to run.
    """

    file: str
    hub_path: str
    hub_name: str
    split: str
    field: str
    parquet: str | None = None


# ptb_text_only is a loading-script dataset; the hub's parquet conversion of it (branch
# refs/convert/parquet) holds the script's own rows (one stripped line of ptb.valid.txt per row, 3,370
# in validation), so "\n\n".join gives the string LLM-Pruner's protocol builds (see docs/evaluation.md).
PTB_PARQUET = ("hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/"
               "penn_treebank/validation/*.parquet")

PPL_SOURCES: dict[str, PPLSource] = {
    "wikitext2": PPLSource("wikitext2_test.txt", "wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": PPLSource("ptb_validation.txt", "ptb-text-only/ptb_text_only", "penn_treebank", "validation",
                     "sentence", parquet=PTB_PARQUET),
}


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file, whole; a one-line error names the file when it is missing, empty or not text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PPLDataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise PPLDataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise PPLDataError(f"{path}: is a directory, expected a text file") from None
    if not text.strip():
        raise PPLDataError(f"{path}: is empty")
    return text


def load_ppl_text(name: str, data_dir: str | Path | None = None) -> tuple[str, str]:
    """The joined text of a protocol dataset and where it came from.

    Args:
        name: a key of :data:`PPL_SOURCES` (``wikitext2`` or ``ptb``).
        data_dir: a folder holding ``wikitext2_test.txt``/``ptb_validation.txt`` (exactly the joined
            strings); ``None`` loads the split from the Hugging Face hub with ``datasets`` (PTB from
            the parquet conversion of its repository).

    Returns:
        ``(text, source)``; ``source`` is the file path, ``hub:<path>/<name>:<split>``, or the
        parquet files read (``hf://datasets/...``).
    """
    src = PPL_SOURCES[name]
    if data_dir is not None:
        path = Path(data_dir) / src.file
        return read_text_file(path), str(path)
    from datasets import load_dataset

    if src.parquet is not None:
        rows = load_dataset("parquet", data_files={src.split: src.parquet}, split=src.split)[src.field]
        return "\n\n".join(rows), src.parquet
    rows = load_dataset(src.hub_path, src.hub_name, split=src.split)[src.field]
    return "\n\n".join(rows), f"hub:{src.hub_path}/{src.hub_name}:{src.split}"


def tokenize_stream(tokenizer, text: str, add_bos: bool = True) -> torch.Tensor:
    """Token ids of the whole text as one 1-D stream, with a single BOS first when ``add_bos``.

    Equal to LLM-Pruner's ``tokenizer(text).input_ids[0]`` for LLaMA tokenizers, which add exactly
    one BOS and nothing else.
    """
    # verbose=False: the stream is far longer than model_max_length on purpose.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)


def _resolve_limit(n: int, limit: int | float | None) -> int:
    """lm-eval's meaning of ``limit``: a count, or a fraction (< 1) of the total, rounded up."""
    if limit is None:
        return n
    if isinstance(limit, float) and limit < 1.0:
        return min(n, int(math.ceil(n * limit)))
    return min(n, int(limit))


def make_chunks(ids: torch.Tensor, seq_len: int, limit: int | float | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` chunks of the stream, the tail dropped; ``limit`` keeps the first."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token and one scored), got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise PPLDataError(f"the text has {ids.numel()} tokens, fewer than one chunk of seq_len={seq_len}")
    n = _resolve_limit(n, limit)
    if n == 0:
        raise ValueError(f"limit={limit} leaves no chunk")
    return ids[: n * seq_len].view(n, seq_len)


def chunk_stream(tokenizer, text: str, seq_len: int, limit: int | float | None,
                 add_bos: bool) -> tuple[torch.Tensor, int | None]:
    """The token stream and its number of chunks (``None`` when only a prefix was tokenized).

    With a whole-number ``limit`` only a prefix of the text is tokenized: cut at a row boundary
    and at least one chunk longer than needed, so the first ``limit`` chunks are those of the
    whole stream (tokenization is local; the margin absorbs the cut). Quick runs on WikiText-2
    thus skip tokenizing 1.3 MB for a few chunks.
    """
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        need = (limit + 1) * seq_len + 1
        cut = need * 8  # characters; grown until the prefix gives enough tokens
        while cut < len(text):
            row_end = text.rfind("\n\n", 0, cut)
            ids = tokenize_stream(tokenizer, text[:row_end] if row_end > cut // 2 else text[:cut], add_bos)
            if ids.numel() >= need:
                return ids, None
            cut *= 2
    ids = tokenize_stream(tokenizer, text, add_bos=add_bos)
    return ids, ids.numel() // seq_len


def _device_of(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


HEAD_CHUNK_ELEMENTS = 1 << 25
"""Positions × vocabulary of the logits scored at once: 128 MiB in float32 (682 positions of a
49,152-token vocabulary, 1,048 of LLaMA's 32,000): a whole batch of 4 × 128-token chunks in one head
matmul (narrower ones run the matmul less efficiently), a bounded share of a 2,048-token protocol's."""


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder stack and the plain linear LM head of a LLaMA-family causal LM, or ``None`` where
    the logits are more than ``head(last hidden state)`` (soft-capped or scaled logits, another head)."""
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: its LoRA layers sit inside the base model's modules
        model = model.get_base_model()
    backbone = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if backbone is None or type(head) is not nn.Linear or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) is not None:
        return None
    return backbone, head


def _scored_nll(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> float:
    """Summed next-token NLL (float64) of ``hidden`` ``[positions, hidden]`` against ``labels``: the
    head's logits in its dtype, the loss in float32, a few positions at a time (never all the logits)."""
    rows = max(1, HEAD_CHUNK_ELEMENTS // int(head.weight.shape[0]))
    total = 0.0
    for lo in range(0, hidden.shape[0], rows):
        logits = head(hidden[lo:lo + rows]).float()
        total += F.cross_entropy(logits, labels[lo:lo + rows], reduction="sum").double().item()
    return total


@torch.no_grad()  # not inference_mode: under FSDP2 the gathered weights would become inference tensors
def chunks_nll(model: nn.Module, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "ppl") -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of scored tokens over all chunks.

    The decoder runs ``batch_size`` chunks at a time; the LM head and the loss then run over the
    scored positions a few at a time (:func:`_scored_nll`), so the vocabulary-sized logits of a whole
    batch never exist (the last position of each chunk, which scores nothing, gets none). The
    numbers are those of ``model(batch).logits`` in the model's dtype with an fp32 loss.
    """
    from tqdm.auto import tqdm

    device = _device_of(model)
    parts = _backbone_and_head(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_size), desc=desc, unit="batch", disable=not progress,
                      leave=False):
        batch = chunks[start:start + batch_size].to(device)
        labels = batch[:, 1:].reshape(-1)
        if parts is not None:
            backbone, head = parts
            hidden = backbone(input_ids=batch, use_cache=False).last_hidden_state
            total += _scored_nll(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head, labels)
        else:
            logits = model(input_ids=batch, use_cache=False).logits
            # fp32 loss: a bf16/fp16 log-softmax over a 32k vocabulary loses digits that PPL shows.
            shift = logits[:, :-1, :].float()
            total += F.cross_entropy(shift.reshape(-1, shift.size(-1)), labels, reduction="sum").double().item()
        count += labels.numel()
    return total, count


def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 128, batch_size: int = 4,
               limit: int | float | None = None, add_bos: bool = True, progress: bool = True,
               desc: str = "ppl") -> dict:
    """Perplexity of one text under the protocol.

    Args:
        model: a causal LM (put it in eval mode first).
        tokenizer: its tokenizer.
        text: the whole text (rows already joined).
        seq_len: tokens per chunk (128 as in LLM-Pruner's tables, 2048 for the Wanda/SparseGPT protocol).
        batch_size: chunks per forward pass.
        limit: keep only the first chunks (count, or fraction < 1); ``None`` scores them all.
        add_bos: start the stream with one BOS.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        A measurement: ``{"value": ppl, "unit": "perplexity", "mean_nll", "n_chunks", "n_chunks_total",
        "n_tokens", "n_tokens_scored", ...}``; ``n_chunks_total`` and ``n_tokens`` describe the whole
        text, and are null when a whole-number ``limit`` tokenized only a prefix.
    """
    ids, n_total = chunk_stream(tokenizer, text, seq_len, limit, add_bos)
    chunks = make_chunks(ids, seq_len, limit)
    nll, count = chunks_nll(model, chunks, batch_size=batch_size, progress=progress, desc=desc)
    mean = nll / count
    return measurement(
        math.exp(mean) if mean < 700 else math.inf, "perplexity", higher_is_better=False,
        status=OK, mean_nll=mean, n_chunks=len(chunks), n_chunks_total=n_total,
        n_tokens=None if n_total is None else int(ids.numel()), n_tokens_scored=count,
    )


def evaluate_ppl(model: nn.Module, tokenizer, datasets: Sequence[str] = ("wikitext2", "ptb"),
                 data_dir: str | Path | None = None, texts: Mapping[str, str] | None = None,
                 seq_len: int = 128, batch_size: int = 4, limit: int | float | None = None,
                 add_bos: bool = True, progress: bool = True) -> dict:
    """The ``ppl`` section: each protocol dataset and each extra text file, skipped or failed one by one.

    Args:
        model: the model, in eval mode.
        tokenizer: its tokenizer.
        datasets: protocol datasets to score (keys of :data:`PPL_SOURCES`).
        data_dir: folder with the local protocol files; ``None`` uses the hub (skipped when unreachable).
        texts: extra ``{name: text file}`` to score the same way.
        seq_len: tokens per chunk.
        batch_size: chunks per forward pass.
        limit: first chunks only (quick checks; not the protocol).
        add_bos: one BOS at the start of each stream.
        progress: progress bars.
    """
    t0 = time.perf_counter()
    out: dict = {"status": OK, "settings": {
        "protocol": "LLM-Pruner (joined rows, one BOS, non-overlapping chunks, tail dropped, "
                    "first token of each chunk unscored)",
        "seq_len": seq_len, "batch_size": batch_size, "limit": limit, "add_bos": add_bos,
        "data_dir": None if data_dir is None else str(data_dir), "loss_dtype": "float32",
    }, "datasets": {}}
    jobs: list[tuple[str, str | None]] = [(name, None) for name in datasets]
    for name, path in (texts or {}).items():
        if name in {n for n, _ in jobs}:
            raise ValueError(f"ppl text name {name!r} is used twice")
        jobs.append((name, str(path)))
    for name, path in jobs:
        try:
            if path is None:
                text, source = load_ppl_text(name, data_dir)
            else:
                text, source = read_text_file(path), path
        except PPLDataError as exc:
            out["datasets"][name] = failed(str(exc))
            log.error("ppl %s: %s", name, exc)
            continue
        except Exception as exc:  # the hub unreachable, offline mode, a missing dataset script
            reason = f"could not load {name} from the hub ({type(exc).__name__}: {exc}); pass ppl_data_dir"
            out["datasets"][name] = skipped(reason)
            log.warning("ppl %s skipped: %s", name, reason)
            continue
        try:
            res = perplexity(model, tokenizer, text, seq_len=seq_len, batch_size=batch_size, limit=limit,
                             add_bos=add_bos, progress=progress, desc=f"ppl {name}")
        except PPLDataError as exc:
            out["datasets"][name] = failed(f"{source}: {exc}")
            continue
        res["source"] = source
        out["datasets"][name] = res
        log.info("ppl %s = %.4f (%d chunks of %d)", name, res["value"] or math.inf, res["n_chunks"], seq_len)
    ran = [d for d in out["datasets"].values() if d.get("status") == OK]
    if not ran and out["datasets"]:
        reasons = "; ".join(f"{k}: {v.get('reason')}" for k, v in out["datasets"].items())
        bad = any(d.get("status") == "failed" for d in out["datasets"].values())
        out.update(failed(reasons) if bad else skipped(reasons))
    out["elapsed"] = measurement(time.perf_counter() - t0, "s")
    return out
