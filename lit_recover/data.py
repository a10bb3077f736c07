"""The Alpaca instruction data path, in separate stages.

records (hub id or local .json/.jsonl, checked one by one)
  → prompt template (``lit_recover.prompts``)
  → tokens and labels, computed once per record and cached on disk (``datasets`` fingerprinting)
  → a train/validation split held out by seed
  → ``ShardedBatchSampler``: seeded shuffling or length grouping, one disjoint shard per rank,
    the same number of micro-batches on every rank, resumable mid-epoch
  → ``PadCollator``: pads to the longest sequence of the micro-batch, nothing else.

Labels are final when they leave the tokenizer stage: prompt positions (``train_on_inputs=False``)
hold ``IGNORE_INDEX``; the collator only adds padding. Nothing searches the text for a response
marker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_recover.prompts import PromptTemplate, TemplateError, load_template

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss skips: prompt tokens (unless ``train_on_inputs``) and padding."""

# Bump when the tokenization below changes, so that old cache files are not reused.
_CACHE_VERSION = 1
_LOCAL_SUFFIXES = (".json", ".jsonl")
_TEXT_FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Unusable training data, with a one-line reason naming the file (and the record, when one is at fault)."""


# ---------------------------------------------------------------------------------------------
# Records


def is_local_path(data_path: str) -> bool:
    """Whether ``data_path`` names a local file rather than a hub dataset id."""
    path = Path(data_path).expanduser()
    return path.exists() or path.suffix in _LOCAL_SUFFIXES or data_path.startswith((".", "/", "~", "\\"))


def check_record(record: object) -> dict[str, str]:
    """The record as ``{instruction, input, output}`` strings, or ``ValueError`` saying what is wrong.

    ``input`` may be absent or null (no context); ``instruction`` and ``output`` must be present.
    Strings that cannot be encoded as UTF-8 (lone surrogates from a ``\\ud800`` escape) are refused
    here because the tokenizer would fail on them later with a far less useful message.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with 'instruction' and 'output', found {type(record).__name__}")
    clean = {}
    for key in _TEXT_FIELDS:
        value = record.get(key)
        if value is None:
            if key != "input":
                raise ValueError(f"missing '{key}'")
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"'{key}' is a {type(value).__name__}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"'{key}' is not valid Unicode (lone surrogate at character {exc.start})") from None
        clean[key] = value
    return clean


def _read_local(path: Path, source: str, max_records: int | None, skip_bad: bool) -> tuple[list[object], list[str]]:
    """Raw records of a .json list or a .jsonl file; unparsable .jsonl lines count as bad records."""
    if path.is_dir():
        raise DataError(f"{source}: is a directory; give a .json/.jsonl file or a hub dataset id")
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    if path.suffix not in _LOCAL_SUFFIXES:
        raise DataError(f"{source}: unsupported file type '{path.suffix}' (expected .json or .jsonl)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{source}: empty file, no records")
    problems: list[str] = []
    if path.suffix == ".jsonl":
        raw: list[object] = []
        index = 0
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if max_records is not None and index >= max_records:
                break
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                problem = f"{source}: record {index} (line {line_no}): invalid JSON: {exc.msg} at column {exc.colno}"
                if not skip_bad:
                    raise DataError(problem) from None
                problems.append(problem)
                raw.append(_UNPARSABLE)
            index += 1
        return raw, problems
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of records, found a {type(data).__name__}")
    return (data if max_records is None else data[:max_records]), problems


_UNPARSABLE = object()  # placeholder keeping record indices equal to line order in a .jsonl file


def _read_hub(name: str, cache_dir: str | None, max_records: int | None) -> list[object]:
    try:
        import datasets

        table = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
    except Exception as exc:  # offline, unknown id, no train split: all end the run the same way
        message = " ".join(str(exc).split())
        raise DataError(f"{name}: cannot load the hub dataset's train split ({type(exc).__name__}: {message})") from None
    if max_records is not None:
        table = table.select(range(min(max_records, len(table))))
    return table.to_list()


def load_records(
    data_path: str,
    *,
    skip_bad_records: bool = False,
    max_records: int | None = None,
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Read and check Alpaca records.

    Args:
        data_path: a hub dataset id or a local ``.json`` (a list) / ``.jsonl`` (one object a line) file.
        skip_bad_records: drop records that fail the checks (and log how many) instead of raising.
        max_records: keep only the first ``max_records`` records of the source (before any check).
        cache_dir: where the hub download goes; ``None`` uses the Hugging Face datasets cache.

    Returns:
        ``[{"index", "instruction", "input", "output"}, ...]``, ``index`` being the position in the source.

    Raises:
        DataError: naming the source, the record index and the problem.
    """
    if max_records is not None and max_records < 1:
        raise DataError(f"{data_path}: max_records must be at least 1, got {max_records}")
    problems: list[str] = []
    if is_local_path(data_path):
        raw, problems = _read_local(Path(data_path).expanduser(), data_path, max_records, skip_bad_records)
    else:
        raw = _read_hub(data_path, cache_dir, max_records)
    if not raw:
        raise DataError(f"{data_path}: no records")
    records = []
    for index, record in enumerate(raw):
        if record is _UNPARSABLE:
            continue  # already counted in problems
        try:
            clean = check_record(record)
        except ValueError as exc:
            problem = f"{data_path}: record {index}: {exc}"
            if not skip_bad_records:
                raise DataError(problem) from None
            problems.append(problem)
            continue
        records.append({"index": index, **clean})
    if problems:
        log.warning("%s: skipped %d bad record(s) of %d; first: %s", data_path, len(problems), len(raw), problems[0])
    if not records:
        raise DataError(f"{data_path}: no usable records ({len(problems)} bad)")
    return records


# ---------------------------------------------------------------------------------------------
# Tokens and labels


def _encode(tokenizer, texts: list[str], cutoff_len: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=cutoff_len, add_special_tokens=True)["input_ids"]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_batch(
    batch: dict[str, list],
    *,
    tokenizer,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos_token: bool,
) -> dict[str, list]:
    """Tokens and labels for a batch of records (the ``Dataset.map`` function).

    - ``input_ids``: the rendered prompt + output, tokenized with the tokenizer's special tokens
      (BOS for LLaMA) and truncated to ``cutoff_len``; with ``add_eos_token``, EOS is appended when
      the result is shorter than ``cutoff_len`` and does not already end in EOS (alpaca-lora), so a
      truncated sequence never gets an EOS.
    - ``labels``: a copy of ``input_ids`` where, unless ``train_on_inputs``, the prompt positions
      are ``IGNORE_INDEX``. The prompt is tokenized alone (same truncation); its ids must be a
      prefix of the full ids. When a merge across the prompt/response boundary breaks that, only
      the common prefix is masked (the first differing token carries response text) and
      ``prompt_is_prefix`` is False so that the caller can count and report the record.
    - ``length``: ``len(input_ids)``; ``n_targets``: label positions the loss can use (position 0 is
      never a target after the causal shift); ``record``: the record's index in the source.
    """
    eos = tokenizer.eos_token_id
    appends_eos = eos is not None and tokenizer("")["input_ids"][-1:] == [eos]
    prompts = [template.render(i, x) for i, x in zip(batch["instruction"], batch["input"])]
    fulls = [p + o for p, o in zip(prompts, batch["output"])]
    full_ids = _encode(tokenizer, fulls, cutoff_len)
    prompt_ids = None if train_on_inputs else _encode(tokenizer, prompts, cutoff_len)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_targets": [], "prompt_is_prefix": []}
    for row, ids in enumerate(full_ids):
        ids = list(ids)
        if add_eos_token and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
        prefix_ok = True
        if prompt_ids is not None:
            prompt = list(prompt_ids[row])
            if appends_eos and prompt and prompt[-1] == eos:
                # The tokenizer's own EOS is not part of the prompt: the full sequence has it after
                # the response.
                prompt.pop()
            n = len(prompt)
            if ids[:n] != prompt:
                prefix_ok = False
                n = _common_prefix_len(prompt, ids)
            labels[:n] = [IGNORE_INDEX] * n
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


# ---------------------------------------------------------------------------------------------
# Batching


def _check_features(features: Sequence[dict[str, Sequence[int]]]) -> None:
    """A collatable micro-batch: not empty, and as many labels as input ids in every row."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    for row, f in enumerate(features):
        if len(f["labels"]) != len(f["input_ids"]):
            raise ValueError(f"batch row {row}: {len(f['input_ids'])} input ids but {len(f['labels'])} labels")


class PadCollator:
    """Pad a list of ``{"input_ids", "labels"}`` to the longest one, on the right.

    Inputs are padded with ``pad_id``, labels with ``IGNORE_INDEX``, the attention mask with 0.
    Right padding keeps every sequence at positions 0..n-1, as in training without padding.

    Args:
        pad_id: the tokenizer's pad token id.
    """

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, features: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        _check_features(features)
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _require_packing_support() -> None:
    """Packed rows are only safe where transformers masks across sequences from ``position_ids``."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.53"):
        raise DataError(
            f"padding_free needs transformers >= 4.53 (found {transformers.__version__}): older versions "
            "would let packed sequences attend to each other; set --data.padding_free false"
        )


class PackCollator:
    """A micro-batch as one row without padding: the sequences back to back (``padding_free``).

    ``position_ids`` restart at 0 for every sequence and there is no attention mask: transformers
    (>= 4.53) then builds a block-causal mask from the positions, so no token attends to another
    sequence. The first label of every sequence is ``IGNORE_INDEX``, so no token is predicted from
    the end of the previous sequence. The loss equals that of the padded micro-batch (tested); the
    decoder computes nothing on padding, and its activations grow with the real tokens, not with
    ``micro_batch_size ×`` the longest sequence.

    Args:
        pad_id: unused (no padding); kept so that both collators are built alike.
    """

    def __init__(self, pad_id: int = 0):
        self.pad_id = int(pad_id)

    def __call__(self, features: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        _check_features(features)
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            n = len(f["input_ids"])
            ids.extend(int(t) for t in f["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(int(t) for t in list(f["labels"])[1:])
            positions.extend(range(n))
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """The share of positions in a padded batch that are padding (0 = no waste)."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel() if mask.numel() else 0.0


class ShardedBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices for one rank: seeded shuffling or length grouping, resumable.

    Every epoch is planned globally, then dealt out: step ``s`` gives rank ``r`` the batch
    ``s * world_size + r``. So the shards are disjoint, together cover the data, and every rank
    gets ``len(self)`` batches. All steps but the last hold ``batch_size`` samples per rank; the last
    one splits the remainder evenly over the ranks (when fewer samples than ranks remain, the
    first samples of the epoch are repeated so that no rank gets an empty batch).

    With ``group_by_length`` (and ``shuffle``), the shuffled indices are cut into megabatches of
    ``megabatch_steps`` steps, each sorted by length (longest first) before being cut into
    batches, so a micro-batch holds similar lengths; the steps are then shuffled, except that the
    step holding the longest sample goes first (an out-of-memory shows up at once). Without
    ``shuffle`` (validation) the order is the data order, or longest first when grouping.

    Resuming: ``set_epoch(e)`` picks the epoch's plan (the same on every rank for the same seed);
    ``set_start_batch(k)`` skips the first ``k`` batches of the current epoch without touching
    them, until the epoch changes. ``len()`` stays the full epoch length, which is what Lightning
    expects when it restores its own batch counter on resume.

    Args:
        lengths: the token count of every sample.
        batch_size: samples per micro-batch on one rank.
        shuffle: a new seeded order every epoch; off for validation.
        group_by_length: put samples of similar length in the same batch.
        seed: the base seed; the epoch's order depends on ``(seed, epoch)`` only.
        rank: this process's rank.
        world_size: the number of ranks.
        megabatch_steps: steps per megabatch when grouping; ``None`` means 50 (HF's multiplier), or
            the whole epoch when it is shorter. Smaller megabatches mix lengths more between
            epochs and group them less well.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        group_by_length: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        megabatch_steps: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.megabatch_steps = megabatch_steps
        self.epoch = 0
        self._start: tuple[int, int] = (0, 0)  # (epoch, batches to skip in it)

    @property
    def sampler(self) -> ShardedBatchSampler:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler``; point it at us.
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s plan from the next iteration on; moving to another epoch ends a skip."""
        self.epoch = int(epoch)
        if self._start[0] != self.epoch:
            self._start = (self.epoch, 0)

    def set_start_batch(self, batches_consumed: int) -> None:
        """Skip the first ``batches_consumed`` batches of the current epoch (they were already trained on)."""
        if not 0 <= batches_consumed <= len(self):
            raise ValueError(f"cannot skip {batches_consumed} batches of an epoch of {len(self)}")
        self._start = (self.epoch, int(batches_consumed))

    @property
    def start_batch(self) -> int:
        """How many batches the next iteration of the current epoch skips."""
        epoch, skip = self._start
        return skip if epoch == self.epoch else 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / (self.batch_size * self.world_size))

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches of an epoch, step-major: rank ``r`` gets ``plan[r::world_size]``."""
        epoch = self.epoch if epoch is None else epoch
        n, world = len(self.lengths), self.world_size
        if n == 0:
            return []
        per_step = self.batch_size * world
        steps = len(self)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            if self.shuffle:
                mega_steps = self.megabatch_steps or min(50, steps)
                mega = per_step * mega_steps
                order = np.concatenate(
                    [c[np.argsort(-self.lengths[c], kind="stable")] for c in np.split(order, range(mega, n, mega))]
                )
            else:
                order = np.argsort(-self.lengths, kind="stable")
        full = (steps - 1) * per_step
        batches = [order[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
        rest = order[full:]
        if len(rest) < world:
            rest = np.concatenate([rest, order[: world - len(rest)]])
        batches.extend(np.array_split(rest, world))
        if self.group_by_length and self.shuffle and steps > 1:
            step_max = [max(self.lengths[b].max() for b in batches[s * world : (s + 1) * world]) for s in range(steps)]
            first = int(np.argmax(step_max))
            rest_steps = [s for s in rng.permutation(steps).tolist() if s != first]
            batches = [b for s in [first, *rest_steps] for b in batches[s * world : (s + 1) * world]]
        return [b.tolist() for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the plan is made at the first next(), after Lightning's set_epoch.
        yield from self.plan()[self.rank :: self.world_size][self.start_batch :]


# ---------------------------------------------------------------------------------------------
# The data module


def _rank_and_world(trainer) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def split_indices(n: int, val_set_size: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` positions out of ``range(n)``: ``val_set_size`` held out at random by ``seed``, both sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[val_set_size:].tolist()), sorted(perm[:val_set_size].tolist())


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca-style instruction data for causal-LM fine-tuning.

    ``setup()`` reads and checks the records, renders them with the prompt template, tokenizes
    them once (cached on disk), builds the labels and holds out a validation split;
    ``train_dataloader()`` batches with :class:`ShardedBatchSampler` and :class:`PadCollator`.
    Batches are ``{"input_ids", "attention_mask", "labels"}`` LongTensors, padded to the longest
    sequence of the micro-batch.

    With more than one device, give the trainer ``use_distributed_sampler=False``: the sampler
    shards the data itself (rank and world size come from the trainer).

    Args:
        data_path: a hub dataset id, or a local .json (list of records) / .jsonl file; records are
            ``{"instruction", "input" (optional), "output"}``.
        val_set_size: records held out for validation, chosen by ``seed``; 0 turns validation off.
        cutoff_len: the maximum number of tokens of prompt + response; longer records are truncated.
        prompt_template_name: ``alpaca``, ``alpaca_short``, ``vigogne``, a name resolved as
            ``./templates/<name>.json``, or the path of a JSON template file.
        train_on_inputs: also train on the prompt tokens; when false their labels are ignored.
        add_eos_token: append EOS to every sequence that was not truncated.
        group_by_length: batch records of similar length together (less padding).
        padding_free: pack each micro-batch into one row without padding (``PackCollator``): the
            same loss, no compute on padding, activation memory in proportion to the real tokens.
            Needs transformers >= 4.53 (block-causal masks from ``position_ids``).
        batch_size: the global batch size (gradient accumulation is derived from it elsewhere).
        micro_batch_size: records per forward pass on one device (the DataLoader batch).
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and of the per-epoch shuffling.
        skip_bad_records: skip malformed records (logging how many) instead of stopping.
        cache_dir: where tokenized data (and hub downloads) are cached; default: the Hugging Face
            datasets cache.
        max_records: use only the first N records of the source (demos, tests).
        tokenizer: the model's tokenizer, with a pad token; usually linked from the model.
    """

    def __init__(
        self,
        data_path: str = "yahma/alpaca-cleaned",
        val_set_size: int = 2000,
        cutoff_len: int = 256,
        prompt_template_name: str = "alpaca",
        train_on_inputs: bool = False,
        add_eos_token: bool = False,
        group_by_length: bool = False,
        padding_free: bool = False,
        batch_size: int = 64,
        micro_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        skip_bad_records: bool = False,
        cache_dir: str | None = None,
        max_records: int | None = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        if val_set_size < 0:
            raise DataError(f"val_set_size must be at least 0, got {val_set_size}")
        if cutoff_len < 2:
            raise DataError(f"cutoff_len must be at least 2, got {cutoff_len}")
        if micro_batch_size < 1 or batch_size < 1:
            raise DataError(f"batch sizes must be at least 1, got batch_size={batch_size}, micro_batch_size={micro_batch_size}")
        self.data_path = data_path
        self.val_set_size = val_set_size
        self.cutoff_len = cutoff_len
        self.prompt_template_name = prompt_template_name
        self.train_on_inputs = train_on_inputs
        self.add_eos_token = add_eos_token
        self.group_by_length = group_by_length
        if padding_free:
            _require_packing_support()
        self.padding_free = padding_free
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.skip_bad_records = skip_bad_records
        self.cache_dir = cache_dir
        self.max_records = max_records
        self.tokenizer = None
        self.template: PromptTemplate | None = None
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.train_sampler: ShardedBatchSampler | None = None
        self.stats: dict[str, int] = {}
        self._resume: tuple[int, int] | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer) -> None:
        """Use this tokenizer (it needs a pad token); a later ``setup()`` tokenizes with it."""
        if tokenizer is not self.tokenizer:
            self.train_dataset = self.val_dataset = None
        self.tokenizer = tokenizer

    def resume_from(self, epoch: int, batches_consumed: int) -> None:
        """Start training at micro-batch ``batches_consumed`` (per rank) of epoch ``epoch``.

        Call it before the training dataloader is iterated (e.g. when restoring a checkpoint); the
        skipped batches are never loaded. Later epochs are whole.
        """
        if epoch < 0 or batches_consumed < 0:
            raise ValueError(f"cannot resume from epoch {epoch}, batch {batches_consumed}")
        self._resume = (int(epoch), int(batches_consumed))
        if self.train_sampler is not None:
            self._apply_resume(self.train_sampler)

    def _apply_resume(self, sampler: ShardedBatchSampler) -> None:
        if self._resume is not None:
            epoch, consumed = self._resume
            if consumed >= len(sampler):  # saved at the end of an epoch: the next one starts whole
                epoch, consumed = epoch + 1, 0
            sampler.set_epoch(epoch)
            sampler.set_start_batch(consumed)

    def _tokenizer_ids(self) -> tuple[int, int | None]:
        tok = self.tokenizer
        if tok is None:
            raise DataError(f"{self.data_path}: no tokenizer; pass tokenizer= or call set_tokenizer() before setup()")
        if tok.pad_token_id is None:
            raise DataError(
                f"{self.data_path}: the tokenizer has no pad token; load it with load_pruned() or prepare_tokenizer()"
            )
        if self.add_eos_token and tok.eos_token_id is None:
            raise DataError(f"{self.data_path}: add_eos_token is set but the tokenizer has no EOS token")
        return tok.pad_token_id, tok.eos_token_id

    def _load_template(self) -> PromptTemplate:
        try:
            return load_template(self.prompt_template_name)
        except TemplateError as exc:
            raise DataError(str(exc)) from None

    def _tokenized(self):
        self._tokenizer_ids()
        template = self._load_template()
        records = load_records(
            self.data_path,
            skip_bad_records=self.skip_bad_records,
            max_records=self.max_records,
            cache_dir=self.cache_dir,
        )
        table = tokenize_records(
            records,
            self.tokenizer,
            template,
            self.cutoff_len,
            train_on_inputs=self.train_on_inputs,
            add_eos_token=self.add_eos_token,
            cache_dir=self.cache_dir,
        )
        return template, records, table

    def prepare_data(self) -> None:
        """Download a hub dataset and fill the tokenization cache (runs once per node, before ``setup``)."""
        if not is_local_path(self.data_path):
            _read_hub(self.data_path, self.cache_dir, self.max_records)
        if self.tokenizer is not None:
            self._tokenized()  # other ranks then read the cache instead of tokenizing too

    def setup(self, stage: str | None = None) -> None:
        """Load, check, tokenize (or read from the cache) and split the records."""
        if self.train_dataset is not None:
            return
        template, records, table = self._tokenized()
        n = len(records)
        if self.val_set_size >= n:
            raise DataError(
                f"{self.data_path}: val_set_size={self.val_set_size} leaves no training records (only {n} records)"
            )
        prefix_ok = np.asarray(table.data.column("prompt_is_prefix").to_numpy(zero_copy_only=False), dtype=bool)
        n_targets = table.data.column("n_targets").to_numpy()
        lengths = table.data.column("length").to_numpy()
        record_ids = table.data.column("record").to_numpy()
        if not prefix_ok.all():
            bad = record_ids[~prefix_ok].tolist()
            log.warning(
                "%s: %d record(s) whose prompt tokens are not a prefix of prompt+response tokens (records %s%s); "
                "only their common prefix is masked",
                self.data_path, len(bad), ", ".join(map(str, bad[:5])), ", ..." if len(bad) > 5 else "",
            )
        train_rows, val_rows = split_indices(n, self.val_set_size, self.seed)
        usable = n_targets > 0
        # A record with no response token inside cutoff_len trains nothing, and a micro-batch of
        # such records would make the mean loss 0/0.
        dropped = int((~usable).sum())
        if dropped:
            log.warning(
                "%s: dropping %d record(s) with no response token within cutoff_len=%d (first: record %d)",
                self.data_path, dropped, self.cutoff_len, int(record_ids[~usable][0]),
            )
        train_rows = [r for r in train_rows if usable[r]]
        val_rows = [r for r in val_rows if usable[r]]
        if not train_rows:
            raise DataError(
                f"{self.data_path}: no training record has a response token within cutoff_len={self.cutoff_len}"
            )
        self.template = template
        self.train_dataset = TokenizedDataset(table, train_rows)
        self.val_dataset = TokenizedDataset(table, val_rows) if val_rows else None
        self.stats = {
            "records": n,
            "train": len(train_rows),
            "val": len(val_rows),
            "dropped_no_target": dropped,
            "prompt_not_prefix": int((~prefix_ok).sum()),
            "at_cutoff": int((lengths >= self.cutoff_len).sum()),
        }
        log.info("%s: %s", self.data_path, ", ".join(f"{k}={v}" for k, v in self.stats.items()))

    def _sampler(self, dataset: TokenizedDataset, shuffle: bool) -> ShardedBatchSampler:
        """This rank's batch sampler over ``dataset`` (shuffled for training, fixed for validation)."""
        rank, world = _rank_and_world(self.trainer)
        return ShardedBatchSampler(
            dataset.lengths,
            self.micro_batch_size,
            shuffle=shuffle,
            group_by_length=self.group_by_length,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )

    def _loader(self, dataset: TokenizedDataset, sampler: ShardedBatchSampler) -> DataLoader:
        pad_id, _ = self._tokenizer_ids()
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=(PackCollator if self.padding_free else PadCollator)(pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _require_setup(self) -> TokenizedDataset:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return self.train_dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or length-grouped) micro-batches of this rank's shard."""
        dataset = self._require_setup()
        sampler = self._sampler(dataset, shuffle=True)
        self._apply_resume(sampler)
        self.train_sampler = sampler
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        """This rank's shard of the validation records in a fixed order; ``[]`` when there are none."""
        self._require_setup()
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self._sampler(self.val_dataset, shuffle=False))
