"""Property tests: random records give correct batches and masks, or a one-line DataError — never a crash."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lit_recover.data import IGNORE_INDEX, AlpacaDataModule, DataError
from lit_recover.data.prompts import load_template
from lit_recover.data.records import load_records
from lit_recover.demos.tiny import build_tokenizer
from lit_recover.models.load import prepare_tokenizer

TOKENIZER = build_tokenizer()
prepare_tokenizer(TOKENIZER)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
good_strings = st.one_of(
    st.text(max_size=40),  # any unicode, including the empty string
    st.text(alphabet="ab \n#:{}</s>", max_size=20),  # template-looking characters and special-token text
    st.builds(lambda c, n: c * n, st.characters(), st.integers(500, 5_000)),  # fields far over cutoff_len
)
bad_values = st.one_of(
    st.builds(lambda a, b: a + b, st.text(max_size=5), surrogates),  # not encodable as UTF-8
    st.integers(), st.floats(allow_nan=False), st.booleans(),
    st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=1),
)
valid_records = st.fixed_dictionaries(
    {"instruction": good_strings, "output": good_strings}, optional={"input": st.one_of(good_strings, st.none())}
)
any_value = st.one_of(good_strings, bad_values, st.none())
bad_records = st.one_of(
    st.fixed_dictionaries({"instruction": any_value, "output": any_value}, optional={"input": any_value, "extra": any_value}),
    bad_values,  # not an object at all
)


def is_valid(record) -> bool:
    """The record contract, written out independently of the implementation."""
    if not isinstance(record, dict):
        return False
    fields = [record.get("instruction"), record.get("output")]
    if record.get("input") is not None:
        fields.append(record["input"])
    if not all(isinstance(f, str) for f in fields):
        return False
    try:
        for f in fields:
            f.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write(directory: Path, recs: list, jsonl: bool) -> str:
    path = directory / ("data.jsonl" if jsonl else "data.json")
    text = "\n".join(json.dumps(r) for r in recs) if jsonl else json.dumps(recs)
    path.write_text(text, encoding="utf-8")
    return str(path)


def recipe_tokenize(tok, text: str, cutoff_len: int, add_eos: bool) -> list[int]:
    """alpaca-lora's ``tokenize``: truncate, then EOS when there is room and it is not there yet."""
    ids = tok(text, truncation=True, max_length=cutoff_len)["input_ids"]
    if add_eos and len(ids) < cutoff_len and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    return ids


def check_batches(dm: AlpacaDataModule, recs: list, loader) -> int:
    """Check every batch against the source records it came from; returns the number of rows seen."""
    tok, template = dm.tokenizer, load_template(dm.prompt_template_name)
    dataset = loader.dataset
    rows = 0
    for indices, batch in zip(list(loader.batch_sampler), loader):
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(t.dtype == torch.long and t.shape == batch["input_ids"].shape for t in batch.values())
        assert batch["input_ids"].shape[0] == len(indices) <= dm.micro_batch_size
        lengths = batch["attention_mask"].sum(1)
        assert int(lengths.max()) == batch["input_ids"].shape[1]  # padded to the longest, no further
        for row, (index, n) in enumerate(zip(indices, lengths.tolist())):
            mask, ids, labels = (batch[k][row] for k in ("attention_mask", "input_ids", "labels"))
            assert 1 <= n <= dm.cutoff_len
            assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
            assert ids[n:].eq(tok.pad_token_id).all() and labels[n:].eq(IGNORE_INDEX).all()
            record = recs[int(dataset.record_ids[index])]
            instruction, inp, output = record["instruction"], record.get("input") or "", record["output"]
            expected = recipe_tokenize(tok, template.render(instruction, inp, output), dm.cutoff_len, add_eos=True)
            assert ids[:n].tolist() == expected
            real = labels[:n].tolist()
            if dm.train_on_inputs:
                assert real == expected
            else:
                # The recipe's user_prompt_len: the prompt's length, with the flag's EOS and minus one.
                prompt = recipe_tokenize(tok, template.render(instruction, inp), dm.cutoff_len, add_eos=dm.add_eos_token)
                k = min(len(prompt) - (1 if dm.add_eos_token else 0), n)
                assert real == [IGNORE_INDEX] * k + expected[k:]  # -100 exactly on the prompt positions
            assert any(label != IGNORE_INDEX for label in real[1:])  # every kept record trains something
            rows += 1
    return rows


def run_case(recs, jsonl, skip_bad, cutoff_len, template, train_on_inputs, add_eos_token, group_by_length,
             micro_batch_size, val_set_size):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), recs, jsonl)
        dm = AlpacaDataModule(path, val_set_size=val_set_size, cutoff_len=cutoff_len, prompt_template_name=template,
                              train_on_inputs=train_on_inputs, add_eos_token=add_eos_token,
                              group_by_length=group_by_length, micro_batch_size=micro_batch_size,
                              skip_bad_records=skip_bad, cache_dir=str(Path(tmp) / "cache"), tokenizer=TOKENIZER)
        valid = [r for r in recs if is_valid(r)]
        try:
            dm.setup("fit")
        except DataError as exc:
            message = str(exc)
            event(f"DataError: {message.split(': ', 1)[1][:30]}")
            assert "\n" not in message and message.startswith(path)
            if not recs or (not skip_bad and len(valid) < len(recs)):
                return  # empty or bad input must end here
            n = len(valid) if skip_bad else len(recs)
            assert n == 0 or n <= val_set_size or "no training record has a response token" in message, message
            return
        event("batches")
        assert recs and (skip_bad or len(valid) == len(recs)), "bad records were accepted"
        assert dm.stats["records"] == len(valid) > val_set_size
        assert dm.stats["train"] + dm.stats["val"] + dm.stats["dropped_no_target"] == len(valid)
        assert check_batches(dm, recs, dm.train_dataloader()) == dm.stats["train"]
        val = dm.val_dataloader()
        assert (val == []) == (dm.stats["val"] == 0)
        if dm.stats["val"]:
            assert check_batches(dm, recs, val) == dm.stats["val"]


OPTIONS = {
    "jsonl": st.booleans(),
    "template": st.sampled_from(["alpaca", "alpaca_short", "vigogne"]),
    "train_on_inputs": st.booleans(),
    "add_eos_token": st.booleans(),
    "group_by_length": st.booleans(),
    "micro_batch_size": st.integers(1, 4),
    "val_set_size": st.integers(0, 2),
}


@SETTINGS
@given(recs=st.lists(valid_records, min_size=3, max_size=6),
       cutoff_len=st.one_of(st.integers(2, 40), st.integers(100, 400), st.integers(100, 400)), **OPTIONS)
def test_valid_records_give_correct_batches(recs, cutoff_len, **options):
    run_case(recs, skip_bad=False, cutoff_len=cutoff_len, **options)


@SETTINGS
@given(recs=st.lists(st.one_of(valid_records, valid_records, bad_records), max_size=6), skip_bad=st.booleans(),
       cutoff_len=st.integers(2, 400), **OPTIONS)
def test_bad_records_give_a_data_error_or_are_skipped(recs, skip_bad, cutoff_len, **options):
    run_case(recs, skip_bad=skip_bad, cutoff_len=cutoff_len, **options)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.sampled_from(["", " ", "[", "{}", "null", "[[]]", '[{"a": 1}]', "1e999"])),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_arbitrary_file_text_reads_or_fails_cleanly(text, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            out = load_records(str(path))
        except DataError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path))
            return
        assert out and all(set(r) == {"index", "instruction", "input", "output"} for r in out)


@pytest.mark.parametrize("bad", [float("nan"), 10**30])
def test_odd_json_numbers_are_type_errors(tmp_path, bad):
    path = tmp_path / "n.json"
    path.write_text(json.dumps([{"instruction": "a", "output": bad}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"record 0: 'output' is a (float|int), expected a string"):
        load_records(str(path))
