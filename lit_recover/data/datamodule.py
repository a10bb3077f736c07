"""``AlpacaDataModule``: records → prompts → tokens and labels → split → sampler → collator."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lit_recover.data.collate import PackCollator, PadCollator, require_packing_support
from lit_recover.data.prompts import PromptTemplate, TemplateError, load_template
from lit_recover.data.records import DataError, is_local_path, load_records, read_hub
from lit_recover.data.sampler import SPLIT_SEED, ShardedBatchSampler, split_indices
from lit_recover.data.tokenize import TokenizedDataset, tokenize_records

log = logging.getLogger(__name__)


def _accumulation(trainer, batch_size: int, micro_batch_size: int, world: int) -> int:
    """Micro-batches per optimizer step on one rank: the trainer's, else derived from the batch sizes."""
    accumulate = getattr(trainer, "accumulate_grad_batches", None) if trainer is not None else None
    if isinstance(accumulate, int) and accumulate >= 1:
        return accumulate
    return max(1, batch_size // (micro_batch_size * world))


def _rank_and_world(trainer) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca-style instruction data for causal-LM fine-tuning.

    ``setup()`` reads and checks the records, renders them with the prompt template, tokenizes
    them once (cached on disk), builds the labels and holds out a validation split;
    ``train_dataloader()`` batches with :class:`ShardedBatchSampler` and :class:`PadCollator`.
    Tokens, labels, the split and the epoch order are those of LLM-Pruner's ``post_training.py``
    (alpaca-lora's ``finetune.py`` on the Hugging Face Trainer); ``docs/data.md`` lists each rule.
    Batches are ``{"input_ids", "attention_mask", "labels"}`` LongTensors, padded to the longest
    sequence of the micro-batch.

    With more than one device, give the trainer ``use_distributed_sampler=False``: the sampler
    shards the data itself (rank and world size come from the trainer).

    Args:
        data_path: a hub dataset id, or a local .json (list of records) / .jsonl file; records are
            ``{"instruction", "input" (optional), "output"}``.
        val_set_size: records held out for validation, as ``datasets``' ``train_test_split(
            test_size=val_set_size, shuffle=True, seed=split_seed)`` picks them; 0 turns validation off.
        cutoff_len: the maximum number of tokens of prompt + response; longer records are truncated.
        prompt_template_name: ``alpaca``, ``alpaca_short``, ``vigogne``, a name resolved as
            ``./templates/<name>.json``, or the path of a JSON template file.
        train_on_inputs: also train on the prompt tokens; when false their labels are ignored.
        add_eos_token: the recipe's flag, which only changes how the prompt is measured for the
            label mask: the prompt is tokenized with an EOS appended (when it is shorter than
            cutoff_len) and one token is taken off its length. EOS is appended to every
            prompt + response shorter than cutoff_len either way.
        group_by_length: batch records of similar length together (less padding), in the order
            of transformers' ``LengthGroupedSampler`` (megabatches of 50 optimizer steps).
        padding_free: pack each micro-batch into one row without padding (``PackCollator``): the
            same loss, no compute on padding, activation memory in proportion to the real tokens.
            Needs transformers >= 4.53 (block-causal masks from ``position_ids``).
        batch_size: the global batch size (gradient accumulation is derived from it elsewhere).
        micro_batch_size: records per forward pass on one device (the DataLoader batch).
        num_workers: DataLoader worker processes.
        seed: seed of every epoch's order (the Trainer's ``seed``, 42 by default): epoch ``e``
            draws from a ``torch.Generator`` seeded with ``seed + e``. Independent of
            ``--seed_everything``.
        split_seed: seed of the validation split; the recipe fixes it at 42.
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
        split_seed: int = SPLIT_SEED,
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
            raise DataError(
                f"batch sizes must be at least 1, got batch_size={batch_size}, micro_batch_size={micro_batch_size}"
            )
        self.data_path = data_path
        self.val_set_size = val_set_size
        self.cutoff_len = cutoff_len
        self.prompt_template_name = prompt_template_name
        self.train_on_inputs = train_on_inputs
        self.add_eos_token = add_eos_token
        self.group_by_length = group_by_length
        if padding_free:
            require_packing_support()
        self.padding_free = padding_free
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.split_seed = split_seed
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
        if tok.eos_token_id is None:
            raise DataError(f"{self.data_path}: the tokenizer has no EOS token to end each response with")
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
            read_hub(self.data_path, self.cache_dir, self.max_records)
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
                "as in the recipe, the prompt's token count is masked all the same",
                self.data_path, len(bad), ", ".join(map(str, bad[:5])), ", ..." if len(bad) > 5 else "",
            )
        # The recipe's split, in its order: the train order is what the epoch's permutation indexes.
        train_rows, val_rows = split_indices(n, self.val_set_size, self.split_seed)
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
            accumulation=_accumulation(self.trainer, self.batch_size, self.micro_batch_size, world),
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
