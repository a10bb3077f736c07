"""Every entry point: ``lit-recover`` and its subcommands, ``python main.py``, the ``python -m`` aliases.

Each answers ``--help`` with status 0; a bad flag, a boolean without its value and a user error end
with status 2 and one line ``error: …`` on stderr. The entry functions run in this process; two
subprocesses check the console script and the ``-m`` wiring.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import lit_recover.convert
import lit_recover.demo
import lit_recover.evaluate
import lit_recover.evaluation.__main__
import lit_recover.prune
import lit_recover.pruning.__main__
from lit_recover.__main__ import COMMANDS
from lit_recover.__main__ import main as lit_recover_main
from lit_recover.demos import demo_data
from lit_recover.errors import USAGE_EXIT_CODE, LitRecoverError
from main import cli_main

REPO = Path(__file__).resolve().parents[1]


def _sub(name: str) -> Callable[[list[str]], object]:
    return lambda argv: lit_recover_main([name, *argv])


# entry point -> (call with argv, an option its --help must show)
ENTRIES: dict[str, tuple[Callable[[list[str]], object], str]] = {
    "lit-recover fit": (_sub("fit"), "--model.pruned_model"),
    "lit-recover validate": (_sub("validate"), "--model.pruned_model"),
    "lit-recover prune": (_sub("prune"), "--pruning_ratio"),
    "lit-recover convert": (_sub("convert"), "--trust_pickle"),
    "lit-recover evaluate": (_sub("evaluate"), "--ppl_seq_len"),  # an EvalConfig field
    "lit-recover compare": (_sub("compare"), "--chart"),
    "lit-recover demo": (_sub("demo"), "--zero_shot_data_dir"),
    "python main.py fit": (lambda argv: cli_main(["fit", *argv]), "--model.pruned_model"),
    "python -m lit_recover.evaluate": (lit_recover.evaluate.main, "--model_path"),
    "python -m lit_recover.evaluation": (lit_recover.evaluation.__main__.main, "--model_path"),
    "python -m lit_recover.prune": (lit_recover.prune.main, "--base_model"),
    "python -m lit_recover.pruning": (lit_recover.pruning.__main__.main, "--base_model"),
    "python -m lit_recover.convert": (lit_recover.convert.main, "--overwrite"),
    "python -m lit_recover.demo": (lit_recover.demo.main, "--pruning_ratio"),
    "python -m lit_recover.demos.demo_data": (demo_data.main, "--eval_text"),
}


def exit_of(entry: Callable[[list[str]], object], argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``entry(argv)``, which must end with SystemExit; its code, stdout and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_the_subcommands_are_the_documented_ones():
    assert list(COMMANDS) == ["fit", "validate", "prune", "convert", "evaluate", "compare", "demo"]


@pytest.mark.parametrize("name", ENTRIES)
def test_help_exits_0(name, capsys):
    entry, option = ENTRIES[name]
    code, out, _ = exit_of(entry, ["--help"], capsys)
    assert code == 0
    assert option in out


def test_lit_recover_alone(capsys):
    code, out, _ = exit_of(lit_recover_main, ["--help"], capsys)
    assert code == 0 and all(name in out for name in COMMANDS)
    code, out, _ = exit_of(lit_recover_main, ["--version"], capsys)
    assert code == 0 and out.strip() == "lit-recover 0.1.0"
    code, _, err = exit_of(lit_recover_main, ["nosuch"], capsys)
    assert code == USAGE_EXIT_CODE and "invalid choice: 'nosuch'" in one_error_line(err)
    code, _, err = exit_of(lit_recover_main, [], capsys)
    assert code == USAGE_EXIT_CODE and "subcommand" in one_error_line(err)


@pytest.mark.parametrize("name", ENTRIES)
def test_bad_flag_exits_2_with_one_line(name, capsys):
    entry, _ = ENTRIES[name]
    code, _, err = exit_of(entry, ["--no_such_flag", "1"], capsys)
    assert code == USAGE_EXIT_CODE
    assert "--no_such_flag" in one_error_line(err)


@pytest.mark.parametrize(("name", "argv", "flag"), [
    ("lit-recover evaluate", ["--model_path", "m.bin"], "--overwrite"),
    ("lit-recover evaluate", ["--model_path", "m.bin"], "--progress"),  # an EvalConfig field
    ("lit-recover prune", ["--base_model", "m", "--output", "o.bin"], "--overwrite"),
    ("lit-recover convert", ["m.bin", "out"], "--check"),
    ("python -m lit_recover.demos.demo_data", [], "--overwrite"),
    ("python main.py fit", ["--model.pruned_model", "m.bin"], "--overwrite"),
])
def test_booleans_take_true_or_false(name, argv, flag, capsys):
    """One spelling everywhere: ``--flag true|false``; a bare flag or another word is a usage error."""
    entry, _ = ENTRIES[name]
    code, _, err = exit_of(entry, [*argv, flag], capsys)
    assert code == USAGE_EXIT_CODE and flag in one_error_line(err)
    code, _, err = exit_of(entry, [*argv, flag, "maybe"], capsys)
    assert code == USAGE_EXIT_CODE and "maybe" in one_error_line(err)


def test_the_old_boolean_spelling_is_refused(capsys):
    code, _, err = exit_of(lit_recover.evaluate.main, ["--model_path", "m.bin", "--no-progress"], capsys)
    assert code == USAGE_EXIT_CODE and "--no-progress" in one_error_line(err)


@pytest.mark.parametrize("name", ["lit-recover evaluate", "lit-recover prune", "lit-recover convert",
                                  "python -m lit_recover.pruning"])
def test_missing_model_file_exits_2_with_one_line(name, tmp_path, capsys):
    entry, _ = ENTRIES[name]
    missing = tmp_path / "absent" / "pruned_model.bin"
    argv = {
        "lit-recover evaluate": ["--model_path", str(missing), "--quiet", "true"],
        "lit-recover convert": [str(missing), str(tmp_path / "out")],
    }.get(name, ["--base_model", str(missing), "--output", str(tmp_path / "out.bin")])
    code, _, err = exit_of(entry, argv, capsys)
    assert code == USAGE_EXIT_CODE
    assert one_error_line(err) == f"error: {missing}: no such file"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.bin").exists()


def test_compare_of_a_missing_file_exits_2(tmp_path, capsys):
    code, _, err = exit_of(_sub("compare"), [str(tmp_path / "a.json")], capsys)
    assert code == USAGE_EXIT_CODE and one_error_line(err) == f"error: {tmp_path / 'a.json'}: no such file"


def test_compare_subcommand_and_alias_agree(tmp_path, capsys):
    from lit_recover.evaluation import write_results
    from tests.evaluation.test_report import make_results

    a = write_results(make_results("pruned", 20.0, 0.5), tmp_path / "a.json")
    b = write_results(make_results("recovered", 15.0, 0.6), tmp_path / "b.json")
    assert lit_recover_main(["compare", str(a), str(b), "--labels", "before,after"]) == 0
    table = capsys.readouterr().out
    assert "| ppl wikitext2 | perplexity | 20.000 | 15.000 | -5 |" in table
    assert lit_recover.evaluate.main(["--compare", str(a), str(b), "--labels", "[before, after]"]) == 0
    assert capsys.readouterr().out == table


def test_demo_checks_its_options_first(tmp_path, capsys):
    """A wrong option ends the demo at once, before the model conversion (minutes) starts."""
    code, _, err = exit_of(_sub("demo"), ["--config", str(tmp_path / "nope.yaml"),
                                          "--output_dir", str(tmp_path / "demo")], capsys)
    assert code == USAGE_EXIT_CODE and one_error_line(err) == f"error: {tmp_path / 'nope.yaml'}: no such file " \
                                                             "(--config, the recovery config)"
    code, _, err = exit_of(_sub("demo"), ["--ppl_data_dir", str(tmp_path / "ppl"),
                                          "--output_dir", str(tmp_path / "demo")], capsys)
    assert code == USAGE_EXIT_CODE and "--ppl_data_dir" in one_error_line(err)
    assert not (tmp_path / "demo").exists()


def test_every_user_facing_error_is_a_lit_recover_error():
    from lit_recover.cli import ConfigError
    from lit_recover.data.prompts import TemplateError
    from lit_recover.data.records import DataError
    from lit_recover.evaluation.ppl import PPLDataError
    from lit_recover.evaluation.report import ResultsFileError
    from lit_recover.evaluation.zero_shot import ZeroShotDataError
    from lit_recover.models.checks import PrunedModelError
    from lit_recover.models.gguf import ConversionError
    from lit_recover.models.rebuild import RebuildError
    from lit_recover.models.safe_pickle import UnsafePickleError
    from lit_recover.module import NonFiniteLossError
    from lit_recover.pruning.importance import CalibrationDataError

    builtin = {ConfigError: ValueError, TemplateError: ValueError, DataError: ValueError, PPLDataError: ValueError,
               ResultsFileError: ValueError, ZeroShotDataError: ValueError, PrunedModelError: ValueError,
               ConversionError: RuntimeError, RebuildError: ValueError, UnsafePickleError: ValueError,
               NonFiniteLossError: RuntimeError, CalibrationDataError: ValueError}
    for cls, base in builtin.items():
        assert issubclass(cls, LitRecoverError) and issubclass(cls, base), cls


def test_a_refused_overwrite_is_a_user_error(tmp_path):
    from lit_recover.outputs import write_text

    path = write_text(tmp_path / "x.txt", "first")
    with pytest.raises(LitRecoverError, match="x.txt: already exists") as exc:
        write_text(path, "second", overwrite=False)
    assert isinstance(exc.value, FileExistsError) and path.read_text() == "first"


# --- fit: the cheap checks come before any model load ----------------------------------------------
@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading the pruned model fails the test: whatever is reported must come before it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("lit_recover.module.load_pruned", refuse)
    return calls


def _fit(model, data, out, *extra):
    return ["fit", "--model.pruned_model", str(model), "--data.data_path", str(data), "--output_dir", str(out),
            "--data.batch_size", "4", "--data.micro_batch_size", "2", *extra]


def test_fit_reports_missing_or_broken_inputs_before_loading_the_model(tiny_pruned_path, alpaca_json, tmp_path,
                                                                       capsys, no_model_load):
    out = tmp_path / "run"
    code, _, err = exit_of(cli_main, _fit(tiny_pruned_path, tmp_path / "absent.json", out), capsys)
    assert code == USAGE_EXIT_CODE and one_error_line(err) == f"error: {tmp_path / 'absent.json'}: no such file"

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    code, _, err = exit_of(cli_main, _fit(tiny_pruned_path, broken, out), capsys)
    assert code == USAGE_EXIT_CODE
    assert one_error_line(err).startswith(f"error: {broken}: record 1 (line 2): invalid JSON")

    bad_record = tmp_path / "bad.json"
    bad_record.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    code, _, err = exit_of(lit_recover_main, _fit(tiny_pruned_path, bad_record, out), capsys)
    assert code == USAGE_EXIT_CODE and one_error_line(err) == f"error: {bad_record}: record 1: missing 'output'"

    missing_model = tmp_path / "prune_log" / "x" / "pruned_model.bin"
    code, _, err = exit_of(cli_main, _fit(missing_model, alpaca_json, out), capsys)
    assert code == USAGE_EXIT_CODE
    assert one_error_line(err) == f"error: {missing_model}: no such file or folder (--model.pruned_model)"
    assert no_model_load == [] and not out.exists()

    # With good inputs the (patched) loader is reached: the checks above ran before it, not instead of it.
    with pytest.raises(AssertionError, match="the model was loaded"):
        cli_main(_fit(tiny_pruned_path, alpaca_json, out))
    assert len(no_model_load) == 1


def test_fit_takes_a_hub_id_without_checking_it(monkeypatch, alpaca_json, tmp_path):
    """``org/name`` is not a local path: it goes to the loader as it is."""
    seen = []

    def loader(path, *args, **kwargs):
        seen.append(path)
        raise AssertionError("loaded")

    monkeypatch.setattr("lit_recover.module.load_pruned", loader)
    with pytest.raises(AssertionError, match="loaded"):
        cli_main(_fit("some-org/llama-pruned", alpaca_json, tmp_path / "run"))
    assert seen == ["some-org/llama-pruned"]


# --- the wiring, in fresh interpreters ---------------------------------------------------------------
def test_console_script_is_declared_and_installed():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lit-recover": "lit_recover.__main__:main"}
    script = shutil.which("lit-recover", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the package is not installed here (pip install -e .)")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "lit-recover 0.1.0", proc.stderr
    proc = subprocess.run([script, "nosuch"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == USAGE_EXIT_CODE and proc.stdout == ""
    assert proc.stderr.startswith("error: argument subcommand: invalid choice: 'nosuch'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_module_alias_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "absent.bin"
    proc = subprocess.run([sys.executable, "-m", "lit_recover.convert", str(missing), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == USAGE_EXIT_CODE, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {missing}: no such file"
    assert "Traceback" not in proc.stderr
