"""Importance of the prunable units of a LLaMA decoder layer: KV groups of attention, MLP channels.

A unit is everything that goes away together. For attention that is one KV head with the query
heads that read it (GQA; with plain multi-head attention a group is one head): its rows of
``q_proj``/``k_proj``/``v_proj`` and its columns of ``o_proj``. For the MLP it is one intermediate
channel: a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``.

A unit's score sums an element-wise salience over all of those coupled weights (LLM-Pruner's
block-wise grouping with the ``sum`` reduction):

- ``l1``: ``|w|``;  ``l2``: ``w**2`` (magnitude);
- ``taylor``: ``|w * dL/dw|``, the first-order Taylor estimate of the loss change when the weight is
  zeroed, with the gradient of the language-model loss on a few calibration texts
  (LLM-Pruner's element-wise first-order criterion);
- ``random``: a seeded uniform draw per unit, the baseline.

Lower scores are pruned first. Calibration texts for ``taylor`` are a few built-in paragraphs, a
plain text file or an Alpaca JSON file (``calibration_batches``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lit_recover.errors import LitRecoverError
from lit_recover.models.anatomy import attention_head_counts

log = logging.getLogger(__name__)

Criterion = Literal["l1", "l2", "taylor", "random"]
CRITERIA: tuple[str, ...] = ("l1", "l2", "taylor", "random")

# Plain expository English, written for this project, used when no calibration file is given.
BUILTIN_CALIBRATION_TEXTS: tuple[str, ...] = (
    "The river runs through the middle of the old town, and most of the houses on its banks were built "
    "of grey stone quarried in the hills to the north. In spring the water rises and the lower streets "
    "are sometimes closed for a few days.",
    "A library is more than a room full of books. It keeps newspapers, maps and letters, lends music and "
    "films, and offers a quiet place to work. Many libraries now run reading groups for children and "
    "classes for adults who want to learn to use a computer.",
    "To bake bread, mix flour, water, salt and a little yeast, then knead the dough until it is smooth. "
    "Leave it in a warm place for an hour so that it doubles in size, shape it into a loaf, and bake it "
    "in a hot oven until the crust is brown and sounds hollow when tapped.",
    "The committee met on Tuesday to discuss the new budget. After a long debate it agreed to spend more "
    "on roads and schools, and to delay the building of the sports hall until next year, when the cost "
    "of materials is expected to fall.",
    "Light travels faster than sound, which is why we see lightning before we hear the thunder. By "
    "counting the seconds between the flash and the sound, you can estimate how far away the storm is: "
    "about three seconds for every kilometre.",
    "She had worked at the hospital for twenty years, first as a nurse and later as the head of the "
    "children's ward. When she retired, her colleagues gave her a garden bench with her name carved "
    "into the back.",
    "Computers store numbers in binary, using only the digits zero and one. A group of eight binary "
    "digits is called a byte, and one byte can represent any whole number from zero to two hundred and "
    "fifty-five.",
    "The island has no airport, so visitors arrive by ferry from the mainland. The crossing takes about "
    "two hours in good weather, and in summer dolphins often follow the boat for part of the way.",
    "Good sleep matters for health. Adults need between seven and nine hours a night, and going to bed "
    "and getting up at the same time every day helps the body keep a steady rhythm.",
    "The museum's new exhibition shows tools, pottery and jewellery found during the excavation of a "
    "Roman villa. The most striking object is a mosaic floor that shows the four seasons as young women "
    "carrying flowers, wheat, grapes and wood.",
    "When the company moved its offices out of the city centre, many staff had to change the way they "
    "travelled to work. Some bought bicycles, others shared cars, and the company started a bus service "
    "from the railway station.",
    "Mountains shape the weather around them. Moist air that is pushed up a slope cools and drops its "
    "rain, so one side of a range can be green and wet while the other side, in the rain shadow, is dry.",
    "The first trains were slow and noisy, and many people believed that travelling at thirty miles an "
    "hour would harm the human body. Within a few decades, railways linked most large towns, and "
    "timetables forced the whole country to agree on a single time.",
    "If you want to learn a language, practise a little every day rather than a lot once a week. Read "
    "simple stories, listen to the radio, and do not be afraid of making mistakes when you speak.",
    "The bridge was closed for repairs after engineers found cracks in two of its steel supports. "
    "Traffic was sent along the coast road, which added about twenty minutes to most journeys.",
)


class CalibrationDataError(LitRecoverError, ValueError):
    """A calibration file that cannot be used; the message names the file, record and problem."""


def read_calibration_texts(path: str | Path) -> list[str]:
    """Texts from a plain text file (paragraphs split on blank lines) or an Alpaca JSON/JSONL file.

    An Alpaca record becomes ``instruction``, ``input`` (when non-empty) and ``output`` joined by
    newlines.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such calibration file")
    text = path.read_text(encoding="utf-8")
    if path.suffix not in {".json", ".jsonl"}:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        if not paragraphs:
            raise CalibrationDataError(f"{path}: the calibration text file is empty")
        return paragraphs
    try:
        records = json.loads(text) if path.suffix == ".json" else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as exc:
        raise CalibrationDataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise CalibrationDataError(f"{path}: expected a non-empty JSON list of Alpaca records")
    texts = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise CalibrationDataError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise CalibrationDataError(f"{path}: record {i} has no string field {key!r}")
        parts = [rec["instruction"], rec.get("input") or "", rec["output"]]
        texts.append("\n".join(p for p in parts if p))
    return texts


def calibration_batches(
    tokenizer,
    texts: Sequence[str] | None = None,
    num_examples: int = 10,
    seq_len: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """``num_examples`` token windows of ``seq_len`` ids, shape ``(n, seq_len)``.

    The texts are shuffled with ``seed``, tokenized, joined with EOS into one stream and cut into
    consecutive windows. When the texts are too short for ``num_examples`` windows, fewer are used
    (at least one, possibly shorter), with a warning.
    """
    texts = list(texts) if texts is not None else list(BUILTIN_CALIBRATION_TEXTS)
    random.Random(seed).shuffle(texts)
    stream: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need = num_examples * seq_len
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + sep
        if len(stream) >= need:
            break
    if not stream:
        raise CalibrationDataError("the calibration texts produce no tokens")
    n = min(num_examples, len(stream) // seq_len)
    if n < num_examples:
        log.warning("calibration texts give %d tokens: using %d window(s) instead of %d x %d",
                    len(stream), max(n, 1), num_examples, seq_len)
    if n == 0:
        return torch.tensor([stream[:seq_len]])
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def _prunable_weights(layers: Iterable[nn.Module]) -> list[nn.Parameter]:
    params = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            params += [p for p in lin.parameters()]
    return params


def accumulate_gradients(
    model: nn.Module,
    layers: Sequence[nn.Module],
    batches: torch.Tensor,
    micro_batch_size: int = 1,
) -> float:
    """Put ``dL/dw`` of the language-model loss on ``batches`` into ``.grad`` of ``layers``' projections.

    Only those projections get gradients (the embeddings and norms are not pruned, and skipping
    them saves memory). The loss is the mean over all windows, accumulated over micro-batches.

    Returns:
        The mean calibration loss.
    """
    wanted = {id(p) for p in _prunable_weights(layers)}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()  # no dropout: the estimate should be deterministic
    total = 0.0
    try:
        for start in range(0, len(batches), micro_batch_size):
            ids = batches[start:start + micro_batch_size].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            share = len(ids) / len(batches)
            (loss * share).backward()
            total += float(loss.detach()) * share
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.train(was_training)
    return total


def _salience(param: torch.Tensor, criterion: str) -> torch.Tensor:
    w = param.detach().float()
    if criterion == "l1":
        return w.abs()
    if criterion == "l2":
        return w.pow(2)
    if criterion == "taylor":
        if param.grad is None:
            raise RuntimeError("taylor importance needs gradients: call accumulate_gradients first")
        return (w * param.grad.detach().float()).abs()
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def attention_group_scores(
    attn: nn.Module, criterion: Criterion, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One score per KV group of an attention module (shape ``(kv_heads,)``)."""
    q_heads, kv_heads, head_dim = attention_head_counts(attn)
    if criterion == "random":
        return torch.rand(kv_heads, generator=generator)
    per_group = q_heads // kv_heads
    scores = torch.zeros(kv_heads)
    # Rows of q_proj are ordered head by head and query head h reads KV head h // per_group, so a
    # group's query rows are one contiguous block.
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        for p in lin.parameters():  # weight (out, in) and bias (out,): rows follow the heads
            s = _salience(p, criterion)
            scores += s.reshape(kv_heads, -1).sum(1).cpu()
    s = _salience(attn.o_proj.weight, criterion)  # (hidden, q_heads * head_dim): columns follow the heads
    scores += s.reshape(s.shape[0], kv_heads, per_group * head_dim).sum((0, 2)).cpu()
    return scores


def mlp_channel_scores(
    mlp: nn.Module, criterion: Criterion, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One score per intermediate channel of a gated MLP (shape ``(intermediate_size,)``)."""
    width = mlp.gate_proj.out_features
    if criterion == "random":
        return torch.rand(width, generator=generator)
    scores = torch.zeros(width)
    for lin in (mlp.gate_proj, mlp.up_proj):
        for p in lin.parameters():
            s = _salience(p, criterion)
            scores += (s.sum(1) if s.dim() == 2 else s).cpu()
    scores += _salience(mlp.down_proj.weight, criterion).sum(0).cpu()
    return scores
