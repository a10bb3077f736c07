"""python -m lit_recover.evaluate (= lit-recover evaluate, compare): end to end on the tiny pickle, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_recover.evaluate import main
from lit_recover.evaluation import read_results, validate_results, write_results
from tests.conftest import shared_data
from tests.evaluation.test_report import make_results

REPO = Path(__file__).resolve().parents[2]
FAST = ["--latency_prompt_tokens", "8", "--latency_new_tokens", "4", "--latency_runs", "2",
        "--throughput_seq_len", "16", "--progress", "false", "--quiet", "true"]


def status(argv: list[str]) -> int:
    """The exit status of the command: its return value, or the code of the SystemExit it raised."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_cli_all_metrics_offline_on_the_tiny_pickle(tiny_pruned_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval" / "results.json"
    rc = main(["--model_path", str(tiny_pruned_path), "--metrics", "all", "--limit", "2", "--output", str(out),
               *FAST])
    assert rc == 0
    res = json.loads(out.read_text())
    validate_results(res)
    assert res["label"] == tiny_pruned_path.stem and res["model"]["source"] == str(tiny_pruned_path)
    assert res["settings"]["limit"] == 2 and res["settings"]["metrics"] == ["ppl", "zero_shot", "latency", "memory"]
    m = res["metrics"]
    assert m["ppl"]["status"] == "skipped" and set(m["ppl"]["datasets"]) == {"wikitext2", "ptb"}
    assert m["zero_shot"]["status"] == "skipped" and len(m["zero_shot"]["tasks"]) == 7
    assert m["latency"]["status"] == "ok" and m["latency"]["ms_per_token"]["value"] > 0
    assert m["memory"]["status"] == "ok" and m["memory"]["parameters"]["value"] > 0
    printed = capsys.readouterr().out
    assert f"results: {out}" in printed and "| latency ms_per_token | ms |" in printed

    # A second run must not replace the file; it stops before loading the model.
    before = out.read_bytes()
    assert status(["--model_path", "does/not/matter.bin", "--output", str(out), "--quiet", "true"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.slow
def test_cli_all_metrics_on_the_shared_data(tiny_pruned_path, tmp_path, capsys):
    ppl_dir, zs_dir = shared_data("ppl"), shared_data("zeroshot")
    out = tmp_path / "results.json"
    rc = main(["--model_path", str(tiny_pruned_path), "--metrics", "all", "--ppl_data_dir", str(ppl_dir),
               "--zero_shot_data_dir", str(zs_dir), "--limit", "2", "--output", str(out), *FAST])
    assert rc == 0
    m = json.loads(out.read_text())["metrics"]
    assert all(m[s]["status"] == "ok" for s in ("ppl", "zero_shot", "latency", "memory"))
    assert {k: v["n_chunks"] for k, v in m["ppl"]["datasets"].items()} == {"wikitext2": 2, "ptb": 2}
    tasks = m["zero_shot"]["tasks"]
    assert list(tasks) == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert all(t["status"] == "ok" and t["n_examples"] == 2 for t in tasks.values())
    assert m["zero_shot"]["average"]["complete"] is True


def test_cli_on_a_hugging_face_folder(tiny_pruned_path, tmp_path, capsys):
    """An unpruned baseline saved as an HF folder; the pruned pickle's parameter ratio against it."""
    from lit_recover.demos.tiny import build_tiny_llama, build_tokenizer

    tok = build_tokenizer()
    dense = build_tiny_llama(len(tok))
    dense.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "base.json"
    assert main(["--model_path", str(tmp_path / "base"), "--metrics", "memory", "--output", str(out),
                 "--quiet", "true"]) == 0
    res = json.loads(out.read_text())
    assert res["label"] == "base" and list(res["metrics"]) == ["memory"]
    assert res["metrics"]["memory"]["parameters"]["value"] == sum(p.numel() for p in dense.parameters())
    out = tmp_path / "pruned.json"
    assert main(["--model_path", str(tiny_pruned_path), "--metrics", "memory", "--base_model", str(tmp_path / "base"),
                 "--output", str(out), "--quiet", "true"]) == 0
    ratio = json.loads(out.read_text())["metrics"]["memory"]["parameter_ratio"]
    assert 0.5 < ratio["value"] < 1 and ratio["unit"] == "ratio"
    # A folder whose weights don't fit its config: one line, not a traceback.
    (tmp_path / "base" / "config.json").write_text((tmp_path / "base" / "config.json").read_text().replace(
        '"intermediate_size": 128', '"intermediate_size": 96'))
    capsys.readouterr()
    assert status(["--model_path", str(tmp_path / "base"), "--metrics", "memory", "--quiet", "true"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # transformers' own progress bar comes first
    assert last.startswith(f"error: {tmp_path / 'base'}: could not load the model (RuntimeError")


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert status(["--model_path", str(tmp_path / "absent.bin"), "--quiet", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'absent.bin'}: no such file"
    assert status(["--model_path", "x.bin", "--ppl_data_dir", str(tmp_path / "nope"), "--quiet", "true"]) == 2
    assert "--ppl_data_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model_path", "x.bin", "--metrics", "ppl,bleu"])
    assert "unknown metrics ['bleu']" in capsys.readouterr().err


def test_cli_compare_prints_a_table_and_saves_a_chart(tmp_path, capsys):
    a = write_results(make_results("pruned", 20.0, 0.5), tmp_path / "a.json")
    b = write_results(make_results("recovered", 15.0, 0.6), tmp_path / "b.json")
    chart = tmp_path / "cmp.png"
    assert main(["--compare", str(a), str(b), "--labels", "before,after", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "| metric | unit | before | after | Δ after − before |" in out
    assert "| ppl wikitext2 | perplexity | 20.000 | 15.000 | -5 |" in out
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert status(["--compare", str(a), str(b), "--chart", str(chart)]) == 2  # no silent overwrite
    assert "cmp.png: already exists" in capsys.readouterr().err
    assert status(["--compare", str(a), "--labels", "x,y"]) == 2
    assert "2 names for 1 results" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_compares_files(tmp_path):
    a = write_results(make_results("pruned", 20.0, 0.5), tmp_path / "a.json")
    deltas = tmp_path / "d.json"
    from lit_recover.evaluation import with_deltas

    write_results(with_deltas(make_results("pruned", 20.0, 0.5), make_results("recovered", 15.0, 0.6)), deltas)
    assert [label for label, _ in read_results(deltas)] == ["pruned", "recovered"]
    proc = subprocess.run([sys.executable, "-m", "lit_recover.evaluate", "--compare", str(a), str(deltas)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| metric | unit | pruned | pruned | recovered | Δ recovered − pruned |" in proc.stdout
