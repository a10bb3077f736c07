"""Offline demo data from standard-library docstrings: deterministic, well-formed, held-out eval text."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_recover.demos import demo_data
from lit_recover.demos.demo_data import (
    EVAL_MODULES,
    TRAIN_MODULES,
    build_demo_eval_text,
    build_demo_records,
    write_demo_dataset,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def records():
    return build_demo_records()


def _digest(records) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def test_several_thousand_well_formed_records(records):
    assert len(records) >= 3000
    for rec in records:
        assert set(rec) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in rec.values())
        assert rec["instruction"].strip() and len(rec["output"]) >= 20
        assert rec["output"] == rec["output"].strip()
    with_input = [r for r in records if r["input"]]
    assert 0.1 * len(records) < len(with_input) < 0.4 * len(records)
    assert all("(" in r["input"] for r in with_input)  # the input is a call signature
    assert len({r["instruction"].split("`")[0] for r in records}) >= 8  # varied phrasings


def test_outputs_are_real_docstrings(records):
    import json as json_module

    first = json_module.dumps.__doc__.strip().split("\n\n")[0]
    wanted = " ".join(line.strip() for line in first.splitlines())
    hits = [r for r in records if r["output"] == wanted]
    assert hits and any("json.dumps" in r["instruction"] + r["input"] for r in hits)


def test_deterministic_across_processes(records):
    """Same records in a fresh interpreter with another hash seed (no set/dict-order leaks)."""
    code = ("import hashlib, json; from lit_recover.demos.demo_data import build_demo_records; "
            "print(hashlib.sha256(json.dumps(build_demo_records(), sort_keys=True).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(records)


def test_n_takes_a_prefix_and_is_checked(records):
    assert build_demo_records(25) == records[:25]
    with pytest.raises(ValueError, match=r"asked for 999999 demo records, only \d+ can be built"):
        build_demo_records(999999)


def test_eval_text_is_held_out(records):
    assert not set(TRAIN_MODULES) & set(EVAL_MODULES)
    text = build_demo_eval_text()
    assert len(text.split()) > 10000
    paragraphs = {" ".join(p.split()) for p in text.split("\n\n")}
    outputs = {" ".join(r["output"].split()) for r in records}
    assert len(paragraphs & outputs) < 0.01 * len(paragraphs)  # only stray boilerplate may coincide


def test_write_and_refuse_to_overwrite(tmp_path):
    out = tmp_path / "demo" / "demo_alpaca.json"
    val = tmp_path / "demo" / "demo_eval.txt"
    write_demo_dataset(out, n=40, val_texts_path=val)
    assert json.loads(out.read_text()) == build_demo_records(40)
    assert val.read_text() == build_demo_eval_text()
    write_demo_dataset(out, n=40)  # same content again: fine, nothing changes
    with pytest.raises(FileExistsError, match=r"demo_alpaca\.json: exists with different content"):
        write_demo_dataset(out, n=41)
    write_demo_dataset(out, n=41, overwrite=True)
    assert len(json.loads(out.read_text())) == 41


def test_cli(tmp_path, capsys):
    out = tmp_path / "d.json"
    demo_data.main(["--output", str(out), "--n", "10"])
    assert capsys.readouterr().out.strip() == str(out)
    assert len(json.loads(out.read_text())) == 10
    assert (tmp_path / "demo_eval.txt").is_file()
