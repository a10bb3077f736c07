"""Collators: pad a micro-batch to its longest sequence, or pack it into one row without padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_recover.data.records import DataError
from lit_recover.data.tokenize import IGNORE_INDEX


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


def require_packing_support() -> None:
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
