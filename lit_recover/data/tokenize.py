"""Tokens and labels, computed once per record and cached on disk (``datasets`` fingerprinting).

The rules are those of LLM-Pruner's ``post_training.py`` (alpaca-lora's ``finetune.py``):
``generate_and_tokenize_prompt`` with its ``tokenize(prompt, add_eos_token=True)``. Labels are
final when they leave this stage: prompt positions (``train_on_inputs=False``) hold
``IGNORE_INDEX``; the collators only add padding. Nothing searches the text for a response marker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lit_recover.data.prompts import PromptTemplate

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss skips: prompt tokens (unless ``train_on_inputs``) and padding."""

# Bump when the tokenization below changes, so that old cache files are not reused.
# 2: EOS after every response shorter than cutoff_len, the prompt length counted as the recipe does.
_CACHE_VERSION = 2


def _encode(tokenizer, texts: list[str], cutoff_len: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=cutoff_len, add_special_tokens=True)["input_ids"]


def _with_eos(ids: Sequence[int], eos: int, cutoff_len: int) -> list[int]:
    """The recipe's ``tokenize(..., add_eos_token=True)``: EOS appended when there is room and the
    ids do not already end in EOS, so a sequence truncated at ``cutoff_len`` gets none."""
    ids = list(ids)
    if len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def tokenize_batch(
    batch: dict[str, list],
    *,
    tokenizer,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos_token: bool,
) -> dict[str, list]:
    """Tokens and labels for a batch of records (the ``Dataset.map`` function), as the recipe's
    ``generate_and_tokenize_prompt`` makes them.

    - ``input_ids``: the rendered prompt + output, tokenized with the tokenizer's special tokens
      (BOS for LLaMA) and truncated to ``cutoff_len``; then EOS is appended when the result is
      shorter than ``cutoff_len`` and does not already end in EOS. This happens whatever
      ``add_eos_token`` says, so every response that fits ends in a supervised EOS and a truncated
      one has none.
    - ``labels``: a copy of ``input_ids`` where, unless ``train_on_inputs``, the first
      ``user_prompt_len`` positions are ``IGNORE_INDEX``. ``user_prompt_len`` is the length of the
      prompt tokenized alone (same truncation); with ``add_eos_token`` the prompt is tokenized with
      the EOS rule above and one is taken off, which differs only when the prompt alone fills
      ``cutoff_len``: then its last position stays a label.
    - ``prompt_is_prefix``: whether the prompt's ids are a prefix of the full ids (a merge across
      the prompt/response boundary breaks it); the mask is the recipe's either way, the flag lets
      the caller count and report such records.
    - ``length``: ``len(input_ids)``; ``n_targets``: label positions the loss can use (position 0 is
      never a target after the causal shift); ``record``: the record's index in the source.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to end each response with")
    appends_eos = tokenizer("")["input_ids"][-1:] == [eos]
    prompts = [template.render(i, x) for i, x in zip(batch["instruction"], batch["input"])]
    fulls = [p + o for p, o in zip(prompts, batch["output"])]
    full_ids = _encode(tokenizer, fulls, cutoff_len)
    prompt_ids = None if train_on_inputs else _encode(tokenizer, prompts, cutoff_len)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_targets": [], "prompt_is_prefix": []}
    for row, full in enumerate(full_ids):
        ids = _with_eos(full, eos, cutoff_len)
        labels = list(ids)
        prefix_ok = True
        if prompt_ids is not None:
            prompt = list(prompt_ids[row])
            n = len(_with_eos(prompt, eos, cutoff_len)) - 1 if add_eos_token else len(prompt)
            # Only when the prompt's tokens outnumber the full sequence's (a merge across the
            # boundary): the recipe would make more labels than ids.
            n = min(n, len(ids))
            labels[:n] = [IGNORE_INDEX] * n
            if appends_eos and prompt and prompt[-1] == eos:
                prompt.pop()  # the tokenizer's own EOS ends the full sequence, not the prompt
            prefix_ok = ids[: len(prompt)] == prompt
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["n_targets"].append(sum(1 for label in labels[1:] if label != IGNORE_INDEX))
        out["prompt_is_prefix"].append(prefix_ok)
    out["record"] = list(batch["index"])
    return out


def tokenization_fingerprint(
    records: list[dict[str, Any]],
    tokenizer,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos_token: bool,
) -> str:
    """A ``datasets`` fingerprint of everything the tokenized table depends on."""
    from datasets.fingerprint import Hasher

    # JSON + sha256 of the records is ~40x faster than letting Hasher pickle 50k dicts.
    records_digest = hashlib.sha256(json.dumps(records, ensure_ascii=False).encode("utf-8")).hexdigest()
    return Hasher.hash(
        (
            _CACHE_VERSION,
            records_digest,
            tokenizer,
            template.prompt_input,
            template.prompt_no_input,
            cutoff_len,
            train_on_inputs,
            add_eos_token,
        )
    )


def default_cache_dir() -> Path:
    """``<Hugging Face datasets cache>/lit_recover``: where tokenized tables go by default."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "lit_recover"


def tokenize_records(
    records: list[dict[str, Any]],
    tokenizer,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    add_eos_token: bool = False,
    cache_dir: str | Path | None = None,
):
    """The tokenized table of ``records`` (a ``datasets.Dataset``), read from the cache when present.

    The cache file is ``<cache_dir>/alpaca-tokenized-<fingerprint>.arrow``; the fingerprint covers the
    records, the tokenizer, the template text, ``cutoff_len`` and both flags.
    """
    import datasets

    fingerprint = tokenization_fingerprint(records, tokenizer, template, cutoff_len, train_on_inputs, add_eos_token)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(records)
    function = functools.partial(
        tokenize_batch,
        tokenizer=tokenizer,
        template=template,
        cutoff_len=cutoff_len,
        train_on_inputs=train_on_inputs,
        add_eos_token=add_eos_token,
    )
    return table.map(
        function,
        batched=True,
        batch_size=1000,
        remove_columns=table.column_names,
        cache_file_name=str(cache / f"alpaca-tokenized-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        desc="Tokenizing",
    )


class TokenizedDataset(Dataset):
    """Some rows of a tokenized table, as ``{"input_ids", "labels"}`` lists of ints.

    Args:
        table: the output of :func:`tokenize_records`.
        rows: which rows of ``table`` this dataset holds, in order.
    """

    def __init__(self, table, rows: Sequence[int]):
        self.table = table.select_columns(["input_ids", "labels"])
        self.rows = np.asarray(rows, dtype=np.int64)
        self.lengths = np.asarray(table.data.column("length").to_numpy(), dtype=np.int64)[self.rows]
        self.record_ids = np.asarray(table.data.column("record").to_numpy(), dtype=np.int64)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.table[int(self.rows[i])]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, list[int]]]:
        # One Arrow take for the whole micro-batch instead of a row lookup per sample.
        columns = self.table[[int(self.rows[i]) for i in indices]]
        return [{"input_ids": ids, "labels": labels} for ids, labels in zip(columns["input_ids"], columns["labels"])]
