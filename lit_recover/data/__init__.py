"""The Alpaca instruction data path, in separate stages.

records (``records.py``: hub id or local .json/.jsonl, checked one by one)
  → prompt template (``prompts.py``, ``templates/``)
  → tokens and labels, computed once per record and cached on disk (``tokenize.py``)
  → the recipe's train/validation split (``datasets``' ``train_test_split``, seed 42) (``sampler.py``)
  → ``ShardedBatchSampler``: the Trainer's shuffling or length grouping, one disjoint shard per
    rank, the same number of micro-batches on every rank, resumable mid-epoch (``sampler.py``)
  → ``PadCollator`` / ``PackCollator`` (``collate.py``)
  → ``AlpacaDataModule`` ties them together (``datamodule.py``).
"""

from lit_recover.data.datamodule import AlpacaDataModule
from lit_recover.data.records import DataError
from lit_recover.data.tokenize import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "AlpacaDataModule", "DataError"]
