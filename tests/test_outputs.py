"""The run folder's names, resolving --ckpt_path, and the one atomic writer every file goes through."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest

from lit_recover import outputs
from lit_recover.outputs import (
    RunFolder,
    atomic_dir,
    atomic_write,
    finite,
    read_schema,
    replace_dir,
    resolve_checkpoint,
    schema_header,
    staging_dir,
    torch_save,
    write_json,
    write_text,
)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask():
    """Run a test under a chosen umask, restoring the caller's afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


# --- files --------------------------------------------------------------------------------------
def test_write_text_creates_parents_and_leaves_no_temporary_file(tmp_path):
    path = write_text(tmp_path / "a" / "b" / "r.txt", "hello\n")
    assert path.read_text() == "hello\n"
    assert _names(path.parent) == ["r.txt"]


def test_exception_mid_write_keeps_the_old_content(tmp_path):
    path = write_text(tmp_path / "r.json", "old\n")

    def half_then_fail(fh):
        fh.write(b"new, but only ha")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert _names(tmp_path) == ["r.json"]  # the temporary file is gone too


def test_exception_mid_write_of_a_new_file_leaves_nothing(tmp_path):
    def fail(fh):
        fh.write(b"x" * 1000)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new.bin", fail)
    assert _names(tmp_path) == []


def test_torch_save_failing_mid_pickle_keeps_the_old_file(tmp_path):
    import torch

    path = torch_save({"w": torch.arange(3)}, tmp_path / "m.bin")
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        torch_save({"w": torch.zeros(1000), "f": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert _names(tmp_path) == ["m.bin"]


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    path = write_text(tmp_path / "r.txt", "first")
    with pytest.raises(FileExistsError, match=r"r\.txt: already exists; pass overwrite=True"):
        write_text(path, "second", overwrite=False)
    assert path.read_text() == "first"
    write_text(path, "second")  # overwrite=True by default
    assert path.read_text() == "second"


def _racing_writer(path: Path):
    """A ``write`` during which another process creates ``path``."""
    def write(fh):
        fh.write(b"ours")
        path.write_text("theirs")
    return write


def test_overwrite_false_refuses_a_file_created_during_the_write(tmp_path):
    path = tmp_path / "r.txt"
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_write(path, _racing_writer(path), overwrite=False)
    assert path.read_text() == "theirs"
    assert _names(tmp_path) == ["r.txt"]


def test_overwrite_false_refuses_a_racing_file_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # e.g. a FAT or some network file systems

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "r.txt"
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_write(path, _racing_writer(path), overwrite=False)
    assert path.read_text() == "theirs"
    fresh = write_text(tmp_path / "fresh.txt", "ok", overwrite=False)  # a free name is still written
    assert fresh.read_text() == "ok"
    assert _names(tmp_path) == ["fresh.txt", "r.txt"]


def test_overwrite_true_replaces_a_file_created_during_the_write(tmp_path):
    path = tmp_path / "r.txt"
    atomic_write(path, _racing_writer(path))
    assert path.read_text() == "ours"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_file_modes_equal_a_plain_open_under_the_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as fh:
        fh.write("x")
    written = write_text(tmp_path / "atomic.txt", "x")
    replaced = write_text(write_text(tmp_path / "again.txt", "1"), "2")
    saved = torch_save([1, 2], tmp_path / "t.bin")
    assert _mode(written) == _mode(replaced) == _mode(saved) == _mode(plain) == 0o666 & ~mask


def test_write_json_has_a_newline_and_refuses_nan(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": [1, 2.5]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2.5\n  ]\n}\n'
    with pytest.raises(ValueError):
        write_json(path, {"a": math.nan})
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}


def test_finite_replaces_non_finite_numbers_by_null():
    assert finite({"a": [1.0, math.nan, (math.inf, -math.inf)], 2: {"b": 3}}) == {"a": [1.0, None, [None, None]],
                                                                                 "2": {"b": 3}}


# --- folders ------------------------------------------------------------------------------------
def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_atomic_dir_builds_and_replaces_a_folder(tmp_path):
    target = _folder(tmp_path / "adapter", old="1", stale="2")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".adapter.")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new").write_text("3")
        assert (target / "old").read_text() == "1"  # the old folder is untouched until the end
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/new"]
    assert _names(tmp_path) == ["adapter"]  # neither the staging nor the previous copy is left


def test_atomic_dir_keeps_the_previous_folder_on_an_exception(tmp_path):
    target = _folder(tmp_path / "adapter", weights="old")
    with pytest.raises(RuntimeError, match="save failed"):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half of the new")
            raise RuntimeError("save failed")
    assert _names(target) == ["weights"] and (target / "weights").read_text() == "old"
    assert _names(tmp_path) == ["adapter"]


def test_atomic_dir_leaves_nothing_when_a_new_folder_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "new") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError
    assert _names(tmp_path) == []


def test_atomic_dir_overwrite_false(tmp_path):
    full = _folder(tmp_path / "full", f="keep")
    with pytest.raises(FileExistsError, match="full: already exists"):
        with atomic_dir(full, overwrite=False):
            pytest.fail("the block must not run")
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(FileExistsError, match="a_file: already exists"):
        with atomic_dir(tmp_path / "a_file", overwrite=False):
            pass
    empty = _folder(tmp_path / "empty")
    with atomic_dir(empty, overwrite=False) as tmp:  # an empty folder holds nothing to lose
        (tmp / "f").write_text("new")
    assert (empty / "f").read_text() == "new"
    racing = tmp_path / "racing"
    with pytest.raises(FileExistsError, match="racing: already exists"):
        with atomic_dir(racing, overwrite=False) as tmp:
            (tmp / "f").write_text("ours")
            _folder(racing, f="theirs")  # appeared while we wrote
    assert (racing / "f").read_text() == "theirs"
    assert (full / "f").read_text() == "keep"
    assert _names(tmp_path) == ["a_file", "empty", "full", "racing"]


def test_atomic_dir_never_removes_a_sibling_named_like_its_old_copy(tmp_path):
    target = _folder(tmp_path / "pruned_model", f="1")
    sibling = _folder(tmp_path / "pruned_model.old", mine="precious")
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("2")
    assert (target / "f").read_text() == "2"
    assert (sibling / "mine").read_text() == "precious"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_dir_modes_equal_a_plain_mkdir_and_open(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain"
    plain.mkdir()
    with open(plain / "f", "w") as fh:
        fh.write("x")
    with atomic_dir(tmp_path / "atomic") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
        (tmp / "g").write_text("x")
    atomic = tmp_path / "atomic"
    assert _mode(atomic) == _mode(atomic / "sub") == _mode(plain) == 0o777 & ~mask
    assert _mode(atomic / "g") == _mode(atomic / "sub" / "f") == _mode(plain / "f") == 0o666 & ~mask


def test_replace_dir_swaps_through_dot_old(tmp_path):
    final = _folder(tmp_path / "checkpoint-last", state="old")
    leftover = _folder(tmp_path / "checkpoint-last.old", state="older")  # from a kill mid-swap
    tmp = _folder(staging_dir(final), state="new")
    assert tmp.name == "checkpoint-last.tmp"
    replace_dir(tmp, final)
    assert (final / "state").read_text() == "new"
    assert not leftover.exists() and not tmp.exists()
    assert _names(tmp_path) == ["checkpoint-last"]


def test_fresh_dir_empties_a_leftover(tmp_path):
    leftover = _folder(tmp_path / "checkpoint-2.tmp", half="x")
    assert outputs.fresh_dir(leftover) == leftover and _names(leftover) == []


# --- names --------------------------------------------------------------------------------------
def test_run_folder_names(tmp_path):
    run = RunFolder(str(tmp_path))
    assert run.root == tmp_path
    assert run.checkpoint(12) == tmp_path / "checkpoint-12"
    assert run.last_checkpoint == tmp_path / "checkpoint-last"
    assert run.adapter == tmp_path / "lora_adapter"
    assert run.merged_pickle == tmp_path / "pruned_model.bin"
    assert run.merged_folder == tmp_path / "pruned_model"
    assert run.evaluation == tmp_path / "evaluation" / "evaluation_results.json"
    assert run.before_training == tmp_path / "evaluation" / "before_training.json"
    assert run.config == tmp_path / "config.yaml"
    assert run.logs == tmp_path / "logs"
    assert not tmp_path.exists() or _names(tmp_path) == []  # naming creates nothing


def test_existing_results_are_what_an_earlier_run_left(tmp_path):
    run = RunFolder(tmp_path)
    assert run.existing_results() == []
    run.config.write_text("x")  # a config alone (a run that stopped at once) is no result
    run.logs.mkdir()
    run.checkpoint(2).mkdir()
    assert run.existing_results() == []
    run.evaluation.parent.mkdir()
    run.merged_pickle.write_bytes(b"x")
    run.last_checkpoint.mkdir()
    assert run.existing_results() == ["pruned_model.bin", "evaluation", "checkpoint-last"]


def test_resolve_checkpoint_forms(tmp_path):
    import os

    for i, step in enumerate((2, 10, 4)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "lightning.ckpt").write_bytes(b"x")
        os.utime(tmp_path / f"checkpoint-{step}" / "lightning.ckpt", ns=(10**9 * i, 10**9 * i))
    # no checkpoint-last (a kill mid-swap): the newest complete folder
    assert resolve_checkpoint("last", tmp_path).endswith("checkpoint-4/lightning.ckpt")
    (tmp_path / "checkpoint-last").mkdir()
    (tmp_path / "checkpoint-last" / "lightning.ckpt").write_bytes(b"x")
    os.utime(tmp_path / "checkpoint-last" / "lightning.ckpt", ns=(0, 0))
    assert resolve_checkpoint("last", tmp_path).endswith("checkpoint-last/lightning.ckpt")
    assert resolve_checkpoint(tmp_path / "checkpoint-2").endswith("checkpoint-2/lightning.ckpt")
    assert resolve_checkpoint(tmp_path / "checkpoint-2" / "lightning.ckpt").endswith("checkpoint-2/lightning.ckpt")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoint-99")


def test_resolve_last_after_a_kill_mid_swap_skips_the_staging_folder(tmp_path):
    run = RunFolder(tmp_path)
    folders = (run.checkpoint(2), tmp_path / "checkpoint-last.old", staging_dir(run.checkpoint(4)))
    for when, folder in enumerate(folders, 1):
        folder.mkdir()
        (folder / "lightning.ckpt").write_bytes(b"x")
        os.utime(folder / "lightning.ckpt", ns=(10**9 * when, 10**9 * when))
    # checkpoint-last was renamed away, the new one not yet renamed in: the previous copy wins, and the
    # newer but unpublished staging folder is never picked
    assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-last.old" / "lightning.ckpt")
    with pytest.raises(FileNotFoundError, match="needs an output_dir"):
        resolve_checkpoint("last")


# --- the JSON header ----------------------------------------------------------------------------
def test_schema_header_and_both_spellings():
    header = schema_header("lit-recover/x", 3)
    assert list(header) == ["schema", "schema_version"]
    assert read_schema({**header, "data": 1}) == ("lit-recover/x", 3)
    assert read_schema({"format": "lit-recover-pruned", "version": 1}) == ("lit-recover-pruned", 1)
    assert read_schema({"schema": "a", "version": 9}) == ("a", None)  # one spelling, not a mix
    assert read_schema({"params": 1}) == (None, None)
    assert read_schema([1, 2]) == (None, None)
