"""The data path trains what LLM-Pruner's ``post_training.py`` (alpaca-lora's ``finetune.py``) trains.

Each rule is compared with the recipe, written out here on its own:

- tokens and labels: a plain ``generate_and_tokenize_prompt`` (below), token for token, on the first
  600 records of ../shared/data/alpaca/alpaca_data_cleaned.json, for every combination of
  ``add_eos_token`` × ``train_on_inputs``, at the default cutoff 256 and a smaller one, with two
  tokenizers that prepend BOS as LLaMA's does (the tiny byte-level BPE of the demos, and the
  sentencepiece LLaMA tokenizer of the LLM-Pruner pickle fixture). The one difference allowed:
  lit-recover drops a record that has no response token within the cutoff (see docs/data.md);
  the test checks that exactly those records are missing.
- the validation split: ``datasets``' own ``train_test_split(test_size, shuffle=True, seed=42)``;
- the epoch order: the Trainer's ``RandomSampler`` (through accelerate) and transformers'
  ``LengthGroupedSampler``, as the Trainer builds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_recover.data import IGNORE_INDEX, AlpacaDataModule
from lit_recover.data.sampler import ShardedBatchSampler, split_indices
from lit_recover.demos.tiny import build_tokenizer
from lit_recover.models.load import prepare_tokenizer
from tests.conftest import shared_data, write_alpaca_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
N_RECORDS = 600

# alpaca-lora's templates/alpaca.json, as its Prompter uses it.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# --- the recipe, written out ------------------------------------------------------------------


def generate_prompt(instruction: str, input: str | None = None, label: str | None = None) -> str:
    """alpaca-lora's ``Prompter.generate_prompt``."""
    if input:
        res = PROMPT_INPUT.format(instruction=instruction, input=input)
    else:
        res = PROMPT_NO_INPUT.format(instruction=instruction)
    if label:
        res = f"{res}{label}"
    return res


def recipe_tokenize(tokenizer, prompt: str, cutoff_len: int, add_eos_token: bool = True) -> dict[str, list[int]]:
    result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    if (
        result["input_ids"][-1] != tokenizer.eos_token_id
        and len(result["input_ids"]) < cutoff_len
        and add_eos_token
    ):
        result["input_ids"].append(tokenizer.eos_token_id)
        result["attention_mask"].append(1)
    result["labels"] = result["input_ids"].copy()
    return result


def recipe_generate_and_tokenize_prompt(tokenizer, data_point, cutoff_len, train_on_inputs, add_eos_token):
    full_prompt = generate_prompt(data_point["instruction"], data_point["input"], data_point["output"])
    tokenized_full_prompt = recipe_tokenize(tokenizer, full_prompt, cutoff_len)
    if not train_on_inputs:
        user_prompt = generate_prompt(data_point["instruction"], data_point["input"])
        tokenized_user_prompt = recipe_tokenize(tokenizer, user_prompt, cutoff_len, add_eos_token=add_eos_token)
        user_prompt_len = len(tokenized_user_prompt["input_ids"])
        if add_eos_token:
            user_prompt_len -= 1
        tokenized_full_prompt["labels"] = [-100] * user_prompt_len + tokenized_full_prompt["labels"][user_prompt_len:]
    return tokenized_full_prompt


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alpaca_head(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The first ``N_RECORDS`` records of Alpaca-cleaned, written to a file of their own."""
    records = json.loads(shared_data("alpaca/alpaca_data_cleaned.json").read_text(encoding="utf-8"))[:N_RECORDS]
    path = tmp_path_factory.mktemp("alpaca") / "head.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path, records


def _tiny_bpe():
    tok = build_tokenizer()
    prepare_tokenizer(tok)
    return tok


def _llama_sentencepiece():
    from lit_recover.models import load_pruned

    _, tok = load_pruned(FIXTURES / "pickles" / "llmpruner_tf4_31.bin")
    return tok


@pytest.fixture(scope="module", params=["tiny_bpe", pytest.param("llama_sentencepiece", marks=pytest.mark.slow)])
def tokenizer(request):
    tok = {"tiny_bpe": _tiny_bpe, "llama_sentencepiece": _llama_sentencepiece}[request.param]()
    # Both prepend BOS as LLaMA's tokenizer does, and end nothing with EOS by themselves.
    assert tok("a")["input_ids"][0] == tok.bos_token_id and tok("a")["input_ids"][-1] != tok.eos_token_id
    assert tok.pad_token_id == 0  # LLM-Pruner's tokenizer.pad_token_id = 0
    return tok


def _items(dm: AlpacaDataModule) -> dict[int, dict[str, list[int]]]:
    ds = dm.train_dataset
    return {int(ds.record_ids[row]): ds[row] for row in range(len(ds))}


# --- tokens and labels ------------------------------------------------------------------------


@pytest.mark.parametrize("cutoff_len", [pytest.param(160, marks=pytest.mark.slow), 256])
@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("add_eos_token", [False, True])
def test_tokens_and_labels_are_the_recipes(alpaca_head, tokenizer, tmp_path, cutoff_len, train_on_inputs,
                                           add_eos_token):
    path, records = alpaca_head
    dm = AlpacaDataModule(str(path), val_set_size=0, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
                          add_eos_token=add_eos_token, cache_dir=str(tmp_path), tokenizer=tokenizer)
    dm.setup("fit")
    ours = _items(dm)
    expected = {i: recipe_generate_and_tokenize_prompt(tokenizer, r, cutoff_len, train_on_inputs, add_eos_token)
                for i, r in enumerate(records)}
    # The documented exception: a record with no response token within cutoff_len (every label
    # after position 0 ignored) trains nothing in the recipe either, and is dropped.
    no_target = {i for i, e in expected.items() if all(label == -100 for label in e["labels"][1:])}
    assert set(ours) == set(expected) - no_target
    assert dm.stats["dropped_no_target"] == len(no_target)
    for i, item in ours.items():
        assert item["input_ids"] == expected[i]["input_ids"], i
        assert item["labels"] == expected[i]["labels"], i

    # The cases the comparison went through.
    eos = tokenizer.eos_token_id
    text_len = {i: len(tokenizer(generate_prompt(r["instruction"], r["input"], r["output"]))["input_ids"])
                for i, r in enumerate(records)}
    fits = [i for i, n in text_len.items() if n < cutoff_len]
    truncated = [i for i, n in text_len.items() if n > cutoff_len]
    assert len(fits) >= 20 and len(truncated) >= 20
    assert all(ours[i]["input_ids"][-1] == ours[i]["labels"][-1] == eos for i in fits)  # a supervised EOS
    assert all(len(expected[i]["input_ids"]) == cutoff_len and expected[i]["input_ids"][-1] != eos
               for i in truncated)
    if not train_on_inputs:
        prompt_fills = [i for i, r in enumerate(records)
                        if len(tokenizer(generate_prompt(r["instruction"], r["input"]))["input_ids"]) >= cutoff_len]
        assert len(prompt_fills) >= 10
        # add_eos_token only changes these: the prompt fills cutoff_len, gets no EOS, loses a token
        # all the same, and its last position stays a label (so the record is kept).
        assert set(prompt_fills) <= no_target if not add_eos_token else not (set(prompt_fills) & no_target)
        if add_eos_token:
            assert all(ours[i]["labels"][:-1] == [IGNORE_INDEX] * (cutoff_len - 1) for i in prompt_fills)
    else:
        assert not no_target


def test_every_fitting_response_ends_in_a_supervised_eos_by_default(tmp_path):
    """The seed's defaults (recover.yaml): add_eos_token false, and still an EOS the model learns."""
    tok = _tiny_bpe()
    path = write_alpaca_records(tmp_path / "a.json", n=30)
    dm = AlpacaDataModule(str(path), val_set_size=0, cutoff_len=512, cache_dir=str(tmp_path / "c"), tokenizer=tok)
    dm.setup("fit")
    assert len(dm.train_dataset) == 30
    for item in _items(dm).values():
        assert len(item["input_ids"]) < 512
        assert item["input_ids"][-1] == item["labels"][-1] == tok.eos_token_id
        assert item["input_ids"].count(tok.eos_token_id) == 1


# --- the validation split ---------------------------------------------------------------------


def _recipe_split(n: int, val_set_size: int):
    """The positions of the recipe's train and test splits of ``n`` loaded records, in their order."""
    import datasets

    table = datasets.Dataset.from_dict({"position": list(range(n))})  # the split depends on len() only
    split = table.train_test_split(test_size=val_set_size, shuffle=True, seed=42)
    return split["train"]["position"], split["test"]["position"]


@pytest.mark.parametrize(("n", "val_set_size"), [(60, 12), pytest.param(51_760, 2000, marks=pytest.mark.slow)])
def test_split_is_datasets_train_test_split(n, val_set_size):
    train, val = _recipe_split(n, val_set_size)
    assert split_indices(n, val_set_size) == (train, val)  # the same records, in the same order


def test_datamodule_holds_out_the_recipes_records(tmp_path):
    tok = _tiny_bpe()
    path = write_alpaca_records(tmp_path / "a.json", n=60)
    dm = AlpacaDataModule(str(path), val_set_size=12, cutoff_len=256, cache_dir=str(tmp_path / "c"), tokenizer=tok,
                          seed=7)  # the epoch seed leaves the split alone
    dm.setup("fit")
    assert dm.stats["dropped_no_target"] == 0
    train, val = _recipe_split(60, 12)
    assert dm.val_dataset.record_ids.tolist() == val
    assert dm.train_dataset.record_ids.tolist() == train  # the order the epoch permutation indexes


def test_split_on_real_alpaca(alpaca_head, tmp_path):
    path, _ = alpaca_head
    tok = _tiny_bpe()
    dm = AlpacaDataModule(str(path), val_set_size=100, cutoff_len=256, cache_dir=str(tmp_path), tokenizer=tok)
    dm.setup("fit")
    train, val = _recipe_split(N_RECORDS, 100)
    kept = set(dm.train_dataset.record_ids.tolist()) | set(dm.val_dataset.record_ids.tolist())
    assert len(kept) == N_RECORDS - dm.stats["dropped_no_target"]
    assert dm.val_dataset.record_ids.tolist() == [i for i in val if i in kept]
    assert dm.train_dataset.record_ids.tolist() == [i for i in train if i in kept]


# --- the epoch order --------------------------------------------------------------------------


def _trainer(tmp_path, **args):
    """A Hugging Face Trainer on a tiny model, over a dataset whose items name their index."""
    import transformers

    from lit_recover.demos.tiny import build_tiny_llama

    model = build_tiny_llama(32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16)
    lengths = [1 + (7 * i) % 23 for i in range(203)]
    dataset = [{"input_ids": [1] * n, "index": i} for i, n in enumerate(lengths)]
    options = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "report_to": "none",
               "use_cpu": True, "remove_unused_columns": False, **args}
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**options),
                                   train_dataset=dataset, data_collator=lambda rows: [r["index"] for r in rows])
    return trainer, np.asarray(lengths)


@pytest.mark.parametrize("seed", [42, 3])
def test_plain_order_is_the_trainers_random_sampler(tmp_path, seed):
    trainer, lengths = _trainer(tmp_path, seed=seed)
    loader = trainer.get_train_dataloader()
    ours = ShardedBatchSampler(lengths, 4, seed=seed)
    for epoch in range(3):
        loader.set_epoch(epoch)  # as the Trainer's loop does before every epoch
        ours.set_epoch(epoch)
        assert list(loader) == list(ours), epoch


@pytest.mark.parametrize(("micro", "accumulation"), [(4, 1), (2, 3), (1, 1)])
def test_grouped_order_is_transformers_length_grouped_sampler(tmp_path, micro, accumulation):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer, lengths = _trainer(tmp_path, per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                                train_sampling_strategy="group_by_length")
    theirs = trainer._get_train_sampler()
    assert isinstance(theirs, LengthGroupedSampler) and theirs.batch_size == micro * accumulation
    ours = ShardedBatchSampler(lengths, micro, group_by_length=True, seed=11, accumulation=accumulation)
    for epoch in range(3):
        # The Trainer draws this permutation from the global torch RNG; the sampler given the
        # generator lit-recover seeds for the epoch must give lit-recover's order.
        theirs.generator = torch.Generator().manual_seed(11 + epoch)
        ours.set_epoch(epoch)
        expected = list(theirs)
        assert [i for batch in ours for i in batch] == expected, epoch
        assert lengths[expected[0]] == lengths.max()


def test_grouped_megabatches_span_fifty_optimizer_steps():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = np.random.default_rng(0).integers(1, 500, size=4000)
    sampler = ShardedBatchSampler(lengths, 4, group_by_length=True, accumulation=4, seed=5)
    order = sampler.order(0)
    assert order.tolist() == get_length_grouped_indices(lengths.tolist(), 16, generator=torch.Generator().manual_seed(5))
    # 50 × 16 = 800 records per megabatch, each sorted longest first (bar the swapped-in first sample)
    for start in range(800, 4000, 800):
        chunk = lengths[order[start : start + 800]]
        assert (np.diff(chunk) <= 0).all()


def test_two_ranks_deal_out_the_single_process_order():
    lengths = np.random.default_rng(1).integers(1, 300, size=96)
    one = ShardedBatchSampler(lengths, 4, group_by_length=True, accumulation=2, seed=3)
    global_order = [i for batch in one for i in batch]
    ranks = [ShardedBatchSampler(lengths, 4, group_by_length=True, accumulation=2, seed=3, rank=r, world_size=2)
             for r in (0, 1)]
    r0, r1 = (list(s) for s in ranks)
    dealt = [i for b0, b1 in zip(r0, r1) for i in b0 + b1]
    assert dealt == global_order  # step s: rank 0 gets micro-batch 2s of the global order, rank 1 micro-batch 2s+1
