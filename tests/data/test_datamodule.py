"""The Alpaca data path: records, tokens and labels, split, sampler, collator, cache, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_recover.data import IGNORE_INDEX, AlpacaDataModule, DataError
from lit_recover.data.collate import PadCollator, padding_fraction
from lit_recover.data.prompts import load_template
from lit_recover.data.records import load_records
from lit_recover.data.sampler import ShardedBatchSampler
from lit_recover.data.tokenize import TokenizedDataset, tokenization_fingerprint
from lit_recover.demos.tiny import build_tokenizer
from lit_recover.models.load import prepare_tokenizer
from tests.conftest import shared_data

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alpaca_small.json"
RECORDS = json.loads(FIXTURE.read_text(encoding="utf-8"))
GOOD = {"instruction": "a", "input": "", "output": "b"}

NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Response:\n"
)
INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tokenizer()
    prepare_tokenizer(tokenizer)
    return tokenizer


def make_dm(tok, tmp_path, **kwargs) -> AlpacaDataModule:
    options = {"data_path": str(FIXTURE), "val_set_size": 0, "cutoff_len": 512, "cache_dir": str(tmp_path / "cache")}
    dm = AlpacaDataModule(**{**options, **kwargs}, tokenizer=tok)
    dm.setup("fit")
    return dm


def item(dm: AlpacaDataModule, record: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a fixture record in the training set."""
    ds = dm.train_dataset
    row = int(np.flatnonzero(ds.record_ids == record)[0])
    x = ds[row]
    return x["input_ids"], x["labels"]


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


# --- records --------------------------------------------------------------------------------


def test_fixture_is_varied():
    assert len(RECORDS) == 40
    with_input = [r for r in RECORDS if r.get("input")]
    assert 10 <= len(with_input) <= 30 and any("input" not in r for r in RECORDS)


def test_load_records_normalises_and_indexes():
    records = load_records(str(FIXTURE))
    assert len(records) == 40
    assert records[8] == {"index": 8, "instruction": "Is 17 a prime number?", "input": "", "output": "Yes."}
    assert len(load_records(str(FIXTURE), max_records=5)) == 5


def test_jsonl_records(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:3]) + "\n\n", encoding="utf-8")
    assert [r["output"] for r in load_records(str(path))] == [r["output"] for r in RECORDS[:3]]


# --- tokens and labels ----------------------------------------------------------------------


def test_prompt_tokens_masked_exactly(tok, tmp_path):
    dm = make_dm(tok, tmp_path)
    prompt = NO_INPUT_PROMPT.format("Say hello.")
    input_ids, labels = item(dm, 1)
    assert input_ids == ids(tok, prompt + "Hello!") + [tok.eos_token_id]
    n_prompt = len(ids(tok, prompt))
    assert labels.count(IGNORE_INDEX) == n_prompt
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == input_ids[n_prompt:] and len(labels) > n_prompt

    # a record with input
    r = RECORDS[4]
    prompt = INPUT_PROMPT.format(r["instruction"], r["input"])
    input_ids, labels = item(dm, 4)
    assert input_ids == ids(tok, prompt + r["output"]) + [tok.eos_token_id]
    assert labels.count(IGNORE_INDEX) == len(ids(tok, prompt))


def test_train_on_inputs_keeps_every_label(tok, tmp_path):
    dm = make_dm(tok, tmp_path, train_on_inputs=True)
    for row in range(len(dm.train_dataset)):
        x = dm.train_dataset[row]
        assert x["labels"] == x["input_ids"]


@pytest.mark.parametrize("add_eos_token", [False, True])
def test_eos_ends_every_response_that_fits(tok, tmp_path, add_eos_token):
    # The recipe tokenizes prompt + response with tokenize(full_prompt), whose add_eos_token is
    # True: the flag does not decide the EOS.
    prompt = NO_INPUT_PROMPT.format("Say hello.")
    full = ids(tok, prompt + "Hello!")
    input_ids, labels = item(make_dm(tok, tmp_path, add_eos_token=add_eos_token), 1)
    assert input_ids == full + [tok.eos_token_id]
    assert labels[-1] == tok.eos_token_id  # the model learns to stop
    n_prompt = len(ids(tok, prompt))  # the prompt alone, with or without the flag's EOS and -1
    assert labels == [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]


def test_eos_boundary_at_cutoff(tok, tmp_path):
    full = ids(tok, NO_INPUT_PROMPT.format("Say hello.") + "Hello!")
    n = len(full)
    at_cutoff, _ = item(make_dm(tok, tmp_path, cutoff_len=n), 1)
    assert at_cutoff == full  # len == cutoff_len: no room, no EOS
    below, _ = item(make_dm(tok, tmp_path, cutoff_len=n + 1), 1)
    assert below == full + [tok.eos_token_id]


@pytest.mark.parametrize("add_eos_token", [False, True])
def test_prompt_that_fills_the_cutoff(tok, tmp_path, add_eos_token):
    # add_eos_token only matters here: the prompt alone reaches cutoff_len, so the recipe appends
    # no EOS to it but still takes one token off its length; the last position stays a label.
    r = RECORDS[21]  # the long story
    prompt = ids(tok, NO_INPUT_PROMPT.format(r["instruction"]))
    cutoff = len(prompt) - 3
    dm = make_dm(tok, tmp_path, cutoff_len=cutoff, add_eos_token=add_eos_token)
    kept = 21 in dm.train_dataset.record_ids.tolist()
    assert kept == add_eos_token
    if add_eos_token:
        input_ids, labels = item(dm, 21)
        assert input_ids == prompt[:cutoff]
        assert labels == [IGNORE_INDEX] * (cutoff - 1) + [prompt[cutoff - 1]]


def test_cutoff_truncates_without_eos(tok, tmp_path):
    r = RECORDS[21]  # the long story
    full = ids(tok, NO_INPUT_PROMPT.format(r["instruction"]) + r["output"])
    assert len(full) > 300
    dm = make_dm(tok, tmp_path, cutoff_len=200)
    input_ids, labels = item(dm, 21)
    assert input_ids == full[:200]
    assert input_ids[-1] != tok.eos_token_id
    assert labels.count(IGNORE_INDEX) == len(ids(tok, NO_INPUT_PROMPT.format(r["instruction"])))
    assert int(dm.train_dataset.lengths.max()) == 200


def test_records_without_response_tokens_are_dropped(tok, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_recover.data"):
        dm = make_dm(tok, tmp_path, cutoff_len=128)
    # a prompt that fills cutoff_len leaves nothing to learn
    dropped = dm.stats["dropped_no_target"]
    assert dropped > 0 and dm.stats["train"] == 40 - dropped
    assert f"dropping {dropped} record(s) with no response token within cutoff_len=128" in caplog.text
    for row in range(len(dm.train_dataset)):
        assert any(label != IGNORE_INDEX for label in dm.train_dataset[row]["labels"][1:])


def test_prompt_not_a_prefix_masks_the_prompt_length_and_warns(tok, tmp_path, caplog):
    # The template ends mid-word, so the byte-level BPE merges prompt and response: "Gi" + "ve" -> "Give".
    (tmp_path / "glue.json").write_text(
        json.dumps({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}", "response_split": "~"}),
        encoding="utf-8",
    )
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Gi", "output": "ve three tips for staying healthy."},
                                {"instruction": "Say hi. ", "output": "Hi"}]), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lit_recover.data"):
        dm = make_dm(tok, tmp_path, data_path=str(data), prompt_template_name=str(tmp_path / "glue.json"))
    prompt, full = ids(tok, "Gi"), ids(tok, "Give three tips for staying healthy.") + [tok.eos_token_id]
    assert full[: len(prompt)] != prompt
    input_ids, labels = item(dm, 0)
    assert input_ids == full
    # As the recipe does: the prompt's token count is masked, though its last token is not the
    # full sequence's (the merged "Give" carries response text).
    assert labels == [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
    assert dm.stats["prompt_not_prefix"] == 1
    assert "1 record(s) whose prompt tokens are not a prefix" in caplog.text and "(records 0)" in caplog.text


# --- split ----------------------------------------------------------------------------------


def val_records(dm):
    return sorted(dm.val_dataset.record_ids.tolist())


def test_val_split_deterministic_by_split_seed(tok, tmp_path):
    a = make_dm(tok, tmp_path, val_set_size=6, split_seed=1)
    b = make_dm(tok, tmp_path, val_set_size=6, split_seed=1, seed=5)  # the epoch seed leaves the split alone
    c = make_dm(tok, tmp_path, val_set_size=6, split_seed=2)
    assert len(val_records(a)) == 6 and a.stats["train"] == 34
    assert val_records(a) == val_records(b)
    assert val_records(a) != val_records(c)
    assert set(val_records(a)).isdisjoint(a.train_dataset.record_ids.tolist())
    assert sorted(val_records(a) + a.train_dataset.record_ids.tolist()) == list(range(40))


def test_no_validation_when_val_set_size_is_zero(tok, tmp_path):
    dm = make_dm(tok, tmp_path, val_set_size=0)
    assert dm.val_dataset is None and dm.val_dataloader() == []


def test_max_records_truncates_before_split(tok, tmp_path):
    dm = make_dm(tok, tmp_path, max_records=10, val_set_size=2)
    assert dm.stats["records"] == 10 and dm.stats["train"] == 8
    assert max(val_records(dm) + dm.train_dataset.record_ids.tolist()) == 9


def test_val_set_too_large(tok, tmp_path):
    with pytest.raises(DataError, match=r"alpaca_small\.json: val_set_size=40 leaves no training records \(only 40"):
        make_dm(tok, tmp_path, val_set_size=40)


# --- sampler --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lengths(tok, tmp_path_factory):
    return make_dm(tok, tmp_path_factory.mktemp("len")).train_dataset.lengths


def rank_batches(lengths, world=2, epoch=0, **kwargs):
    out = []
    for rank in range(world):
        s = ShardedBatchSampler(lengths, 4, rank=rank, world_size=world, **kwargs)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("group", [False, True])
def test_two_ranks_disjoint_cover_equal(lengths, group):
    for epoch in range(3):
        r0, r1 = rank_batches(lengths, group_by_length=group, epoch=epoch)
        assert len(r0) == len(r1) == 5 == len(ShardedBatchSampler(lengths, 4, world_size=2))
        seen = [i for b in r0 + r1 for i in b]
        assert sorted(seen) == list(range(40))  # disjoint and covering
        assert all(len(b) == 4 for b in r0 + r1)


@pytest.mark.parametrize("group", [False, True])
def test_deterministic_per_epoch_and_different_across_epochs(lengths, group):
    assert rank_batches(lengths, group_by_length=group, epoch=3) == rank_batches(lengths, group_by_length=group, epoch=3)
    assert rank_batches(lengths, group_by_length=group, epoch=3) != rank_batches(lengths, group_by_length=group, epoch=4)
    assert rank_batches(lengths, group_by_length=group, seed=1) != rank_batches(lengths, group_by_length=group, seed=2)


def test_length_grouping_cuts_padding(lengths):
    def padded(lengths, group, **kwargs):
        pad = total = 0
        for epoch in range(5):
            for batches in rank_batches(lengths, group_by_length=group, epoch=epoch, **kwargs):
                for b in batches:
                    longest = lengths[b].max()
                    total += longest * len(b)
                    pad += longest * len(b) - lengths[b].sum()
        return pad / total

    # The 40-record fixture: the Trainer's rule keeps at least 4 megabatches, here of 8 records.
    grouped, random = padded(lengths, True), padded(lengths, False)
    assert grouped < 0.85 * random, (grouped, random)
    # A real-sized epoch: megabatches of 50 optimizer steps (4 x 4 records each) sort 800 records.
    many = np.random.default_rng(0).integers(20, 500, size=3200)
    grouped, random = padded(many, True, accumulation=4), padded(many, False, accumulation=4)
    assert grouped < 0.05 * random, (grouped, random)


def test_longest_step_comes_first(lengths):
    longest = int(np.argmax(lengths))
    for epoch in range(3):
        r0, r1 = rank_batches(lengths, group_by_length=True, epoch=epoch)
        assert longest in r0[0] + r1[0]


def test_uneven_sizes_keep_equal_batch_counts():
    r0, r1 = rank_batches(np.arange(45) % 7 + 1, world=2)
    assert len(r0) == len(r1) == 6
    assert sorted(i for b in r0 + r1 for i in b) == list(range(45))
    # only the last step is short: its 5 samples are split 3 + 2 over the ranks
    assert [len(b) for b in r0] == [4] * 5 + [3] and [len(b) for b in r1] == [4] * 5 + [2]


def test_fewer_samples_left_than_ranks_repeats_the_first():
    r0, r1 = rank_batches([3] * 41, world=2, shuffle=False)
    assert [len(b) for b in r0] == [len(b) for b in r1] == [4] * 5 + [1]
    assert r0[-1] == [40] and r1[-1] == [0]  # sample 0 is seen twice so that rank 1 has a batch
    s0, s1 = (list(ShardedBatchSampler([5, 6, 7], 1, rank=r, world_size=2, shuffle=False)) for r in (0, 1))
    assert s0 == [[0], [2]] and s1 == [[1], [0]]


def test_start_mid_epoch_is_the_tail(lengths):
    for group in (False, True):
        s = ShardedBatchSampler(lengths, 4, group_by_length=group, rank=1, world_size=2, seed=7)
        s.set_epoch(2)
        full = list(s)
        s.set_start_batch(3)
        assert list(s) == full[3:] and len(s) == len(full)  # len stays the whole epoch
        s.set_epoch(3)
        assert len(list(s)) == len(full)  # the next epoch is whole
        s.set_epoch(2)
        assert list(s) == full  # the skip belonged to the epoch being resumed only
    with pytest.raises(ValueError, match="cannot skip 6 batches of an epoch of 5"):
        s.set_start_batch(6)


def test_datamodule_resume_skips_without_loading(tok, tmp_path, monkeypatch):
    dm = make_dm(tok, tmp_path, micro_batch_size=4, group_by_length=True)
    full = list(dm.train_dataloader().batch_sampler.plan(1))
    loaded = []
    original = TokenizedDataset.__getitems__

    def counting(self, indices):
        loaded.append(list(indices))
        return original(self, indices)

    monkeypatch.setattr(TokenizedDataset, "__getitems__", counting)
    dm.resume_from(epoch=1, batches_consumed=7)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert loaded == full[7:]
    assert len(batches) == 3 and len(loader) == 10
    for batch, indices in zip(batches, full[7:]):
        assert batch["input_ids"].shape[0] == len(indices)
        longest = int(dm.train_dataset.lengths[indices].max())
        assert batch["input_ids"].shape[1] == longest


def test_rank_and_world_from_the_trainer(tok, tmp_path):
    dm = make_dm(tok, tmp_path, val_set_size=8)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    train = dm.train_dataloader().batch_sampler
    assert (train.rank, train.world_size, train.shuffle) == (1, 2, True)
    val = dm.val_dataloader().batch_sampler
    assert (val.rank, val.world_size, val.shuffle) == (1, 2, False)
    dm.trainer = None
    assert (dm.train_dataloader().batch_sampler.world_size) == 1


def test_lightning_set_epoch_reaches_the_batch_sampler(tok, tmp_path):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    loader = make_dm(tok, tmp_path).train_dataloader()
    _set_sampler_epoch(loader, 5)
    assert loader.batch_sampler.epoch == 5


# --- collator and batches -------------------------------------------------------------------


def test_collator_pads_right_with_pad_and_ignore():
    batch = PadCollator(pad_id=0)([
        {"input_ids": [1, 5, 6], "labels": [IGNORE_INDEX, 5, 6]},
        {"input_ids": [1, 7, 8, 9, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 2]},
    ])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, -100], [-100, -100, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert padding_fraction(batch) == pytest.approx(0.2)


def test_dataloader_batches(tok, tmp_path):
    dm = make_dm(tok, tmp_path, micro_batch_size=3, val_set_size=4)
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        n, width = batch["input_ids"].shape
        assert n <= 3 and width == int(batch["attention_mask"].sum(1).max())
        pad = batch["attention_mask"] == 0
        assert (batch["input_ids"][pad] == tok.pad_token_id).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
        seen.append(n)
    assert sum(seen) == 36 and len(seen) == 12
    assert sum(b["input_ids"].shape[0] for b in dm.val_dataloader()) == 4


def test_huge_field_is_truncated(tok, tmp_path):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps([{"instruction": "Repeat.", "input": "ab " * 30_000, "output": "ok"}, GOOD]),
                    encoding="utf-8")
    dm = make_dm(tok, tmp_path, data_path=str(path), cutoff_len=64, train_on_inputs=True)
    assert dm.train_dataset.lengths.tolist() == [64, len(ids(tok, NO_INPUT_PROMPT.format("a") + "b")) + 1]


def test_init_signature_is_the_config_schema():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(AlpacaDataModule, "data")
    cfg = parser.parse_args(["--data.data_path=x.json", "--data.cutoff_len=128", "--data.group_by_length=true",
                             "--data.max_records=10"])
    assert (cfg.data.data_path, cfg.data.cutoff_len, cfg.data.group_by_length, cfg.data.max_records) == (
        "x.json", 128, True, 10)
    assert cfg.data.val_set_size == 2000 and cfg.data.prompt_template_name == "alpaca" and cfg.data.cache_dir is None
    assert "the maximum number of tokens of prompt + response" in " ".join(parser.format_help().split())


# --- bad input ------------------------------------------------------------------------------


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": }]', r"bad\.json: invalid JSON at line 2 column 18: Expecting value"),
        ("bad.json", "", r"bad\.json: empty file, no records"),
        ("bad.json", "  \n", r"bad\.json: empty file, no records"),
        ("bad.json", "[]", r"bad\.json: no records"),
        ("bad.json", json.dumps(GOOD), r"bad\.json: expected a JSON list of records, found a dict"),
        ("bad.json", json.dumps([GOOD, {"output": "b"}]), r"bad\.json: record 1: missing 'instruction'"),
        ("bad.json", json.dumps([{"instruction": "a", "output": None}]), r"bad\.json: record 0: missing 'output'"),
        ("bad.json", json.dumps([GOOD, GOOD, {**GOOD, "input": 5}]), r"bad\.json: record 2: 'input' is a int, expected a string"),
        ("bad.json", json.dumps([{**GOOD, "instruction": ["x"]}]), r"bad\.json: record 0: 'instruction' is a list, expected a string"),
        ("bad.json", json.dumps(["just text"]), r"bad\.json: record 0: expected an object with 'instruction' and 'output', found str"),
        ("bad.json", '[{"instruction": "a", "output": "b\\ud800"}]', r"bad\.json: record 0: 'output' is not valid Unicode \(lone surrogate at character 1\)"),
        ("bad.jsonl", json.dumps(GOOD) + "\n{oops\n", r"bad\.jsonl: record 1 \(line 2\): invalid JSON: Expecting property name"),
        ("bad.csv", "a,b\n", r"bad\.csv: unsupported file type '\.csv'"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message) as err:
        load_records(write(tmp_path, name, text))
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        load_records(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="is a directory"):
        load_records(str(tmp_path))


def test_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"^no-such-org/no-such-set: cannot load the hub dataset's train split") as err:
        load_records("no-such-org/no-such-set")
    assert "\n" not in str(err.value)


def test_skip_bad_records_counts_them(tok, tmp_path, caplog):
    records = [GOOD, {"instruction": "x"}, {**GOOD, "output": "c"}, 7, {**GOOD, "output": "d"}]
    path = write(tmp_path, "mixed.json", json.dumps(records))
    with pytest.raises(DataError, match=r"mixed\.json: record 1: missing 'output'"):
        make_dm(tok, tmp_path, data_path=path)
    with caplog.at_level(logging.WARNING, logger="lit_recover.data"):
        dm = make_dm(tok, tmp_path, data_path=path, skip_bad_records=True)
    assert sorted(dm.train_dataset.record_ids.tolist()) == [0, 2, 4]
    assert "skipped 2 bad record(s) of 5; first: " in caplog.text and "record 1: missing 'output'" in caplog.text
    jsonl = write(tmp_path, "mixed.jsonl", "\n".join([json.dumps(GOOD), "{", json.dumps(GOOD)]))
    assert [r["index"] for r in load_records(jsonl, skip_bad_records=True)] == [0, 2]
    with pytest.raises(DataError, match="no usable records"):
        load_records(write(tmp_path, "allbad.json", json.dumps([1, 2])), skip_bad_records=True)


def test_setup_errors(tok, tmp_path):
    with pytest.raises(DataError, match="unknown prompt template 'nosuch'"):
        make_dm(tok, tmp_path, prompt_template_name="nosuch")
    with pytest.raises(DataError, match="no tokenizer"):
        AlpacaDataModule(str(FIXTURE)).setup()
    bare = build_tokenizer()  # no pad token yet
    with pytest.raises(DataError, match="the tokenizer has no pad token"):
        AlpacaDataModule(str(FIXTURE), tokenizer=bare).setup()
    with pytest.raises(DataError, match="cutoff_len must be at least 2"):
        AlpacaDataModule(str(FIXTURE), cutoff_len=1)


# --- cache ----------------------------------------------------------------------------------


def test_second_run_hits_the_tokenization_cache(tok, tmp_path, monkeypatch):
    import lit_recover.data.tokenize as data

    calls = []
    original = data.tokenize_batch

    def counting(batch, **kwargs):
        calls.append(len(batch["instruction"]))
        return original(batch, **kwargs)

    monkeypatch.setattr(data, "tokenize_batch", counting)
    first = make_dm(tok, tmp_path)
    assert sum(calls) == 40
    cache_files = sorted((tmp_path / "cache").glob("alpaca-tokenized-*.arrow"))
    assert len(cache_files) == 1
    second = make_dm(tok, tmp_path)
    assert sum(calls) == 40  # nothing tokenized again
    assert second.train_dataset[5] == first.train_dataset[5]
    assert second.train_dataset.table.cache_files[0]["filename"] == str(cache_files[0])

    for change in ({"cutoff_len": 300}, {"prompt_template_name": "alpaca_short"}, {"train_on_inputs": True},
                   {"add_eos_token": True}):
        before = sum(calls)
        make_dm(tok, tmp_path, **change)
        assert sum(calls) == before + 40, change
    other_tok = build_tokenizer(vocab_size=300)
    prepare_tokenizer(other_tok)
    make_dm(other_tok, tmp_path)
    assert sum(calls) == 40 * 6
    assert len(list((tmp_path / "cache").glob("alpaca-tokenized-*.arrow"))) == 6


def test_fingerprint_depends_on_everything(tok):
    records = load_records(str(FIXTURE), max_records=3)
    alpaca = load_template("alpaca")
    base = tokenization_fingerprint(records, tok, alpaca, 256, False, False)
    assert base == tokenization_fingerprint(load_records(str(FIXTURE), max_records=3), tok, alpaca, 256, False, False)
    other_tok = build_tokenizer(vocab_size=300)
    prepare_tokenizer(other_tok)
    variants = [
        tokenization_fingerprint(records[:2], tok, alpaca, 256, False, False),
        tokenization_fingerprint(records, other_tok, alpaca, 256, False, False),
        tokenization_fingerprint(records, tok, load_template("vigogne"), 256, False, False),
        tokenization_fingerprint(records, tok, alpaca, 255, False, False),
        tokenization_fingerprint(records, tok, alpaca, 256, True, False),
        tokenization_fingerprint(records, tok, alpaca, 256, False, True),
    ]
    assert len({base, *variants}) == 7


def test_prepare_data_fills_the_cache(tok, tmp_path, monkeypatch):
    import lit_recover.data.tokenize as data

    dm = AlpacaDataModule(str(FIXTURE), val_set_size=0, cutoff_len=512, cache_dir=str(tmp_path), tokenizer=tok)
    dm.prepare_data()
    assert dm.train_dataset is None  # prepare_data keeps no state
    assert len(list(tmp_path.glob("alpaca-tokenized-*.arrow"))) == 1
    def fail(batch, **kwargs):
        raise AssertionError("setup tokenized again")

    monkeypatch.setattr(data, "tokenize_batch", fail)
    dm.setup("fit")
    assert len(dm.train_dataset) == 40


# --- real data ------------------------------------------------------------------------------


def test_real_alpaca_cleaned_head(tok, tmp_path):
    path = shared_data("alpaca/alpaca_data_cleaned.json")
    dm = AlpacaDataModule(str(path), val_set_size=20, cutoff_len=256, max_records=300, micro_batch_size=8,
                          group_by_length=True, cache_dir=str(tmp_path), tokenizer=tok)
    dm.setup("fit")
    assert dm.stats["records"] == 300 and dm.stats["prompt_not_prefix"] == 0
    assert dm.stats["train"] + dm.stats["val"] + dm.stats["dropped_no_target"] == 300
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and padding_fraction(batch) < 0.5


# --- with a Lightning trainer ---------------------------------------------------------------


class _TinyLM:
    """Built lazily so that importing this test file stays cheap."""

    @staticmethod
    def make(vocab_size: int):
        import lightning as L

        from lit_recover.demos.tiny import build_tiny_llama

        class TinyLM(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = build_tiny_llama(vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                                              num_kv_heads=1, intermediate_size=32)
                self.epochs, self.losses, self.val_steps = [], [], 0

            def training_step(self, batch, batch_idx):
                self.epochs.append(self.trainer.datamodule.train_sampler.epoch)
                loss = self.model(**batch).loss
                self.losses.append(float(loss.detach()))
                return loss

            def validation_step(self, batch, batch_idx):
                self.val_steps += 1
                self.log("val_loss", self.model(**batch).loss)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return TinyLM()


@pytest.mark.slow
@pytest.mark.parametrize("val_set_size", [0, 4])
def test_fit_with_lightning(tok, tmp_path, val_set_size):
    import lightning as L

    dm = AlpacaDataModule(str(FIXTURE), val_set_size=val_set_size, cutoff_len=256, micro_batch_size=4,
                          group_by_length=True, cache_dir=str(tmp_path), tokenizer=tok)
    module = _TinyLM.make(len(tok))
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert module.epochs == [0, 0, 1, 1]  # Lightning's set_epoch reached the batch sampler
    assert all(np.isfinite(module.losses))
    assert module.val_steps == (0 if val_set_size == 0 else 2)


@pytest.mark.parametrize("collator", ["pad", "pack"])
def test_collators_refuse_empty_and_ragged_batches(collator):
    from lit_recover.data.collate import PackCollator

    collate = PadCollator(0) if collator == "pad" else PackCollator(0)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="batch row 1: 3 input ids but 2 labels"):
        collate([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [1, 2, 3], "labels": [2, 3]}])
