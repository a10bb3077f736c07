"""Memory-mapped loading: a pickle's weights as copy-on-write views of the file, the same values."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lit_recover.models.load import load_pruned, read_model
from lit_recover.models.safe_pickle import safe_load

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def file_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps ``path`` at (``/proc/self/maps``)."""
    target = str(Path(path).resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def in_file(t: torch.Tensor, path: Path) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(lo <= ptr < hi for lo, hi in file_ranges(path))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@linux_only
def test_safe_load_maps_the_weights_and_keeps_the_values(tiny_pruned_path):
    read, _ = safe_load(tiny_pruned_path)
    mapped, _ = safe_load(tiny_pruned_path, mmap=True)
    from lit_recover.models.rebuild import module_tensors

    plain, views = module_tensors(read["model"]), module_tensors(mapped["model"])
    assert plain.keys() == views.keys() and len(plain) > 10
    for key in plain:
        assert torch.equal(plain[key], views[key]) and plain[key].dtype == views[key].dtype, key
        assert in_file(views[key], tiny_pruned_path) and not in_file(plain[key], tiny_pruned_path), key


@linux_only
def test_mapped_weights_are_private_copies_on_write(tiny_pruned_path, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(Path(tiny_pruned_path).read_bytes())
    before = path.read_bytes()
    model, _ = read_model(path, mmap=True)
    weight = model.model.layers[1].mlp.up_proj.weight
    assert in_file(weight, path)
    with torch.no_grad():
        weight.add_(1.0)  # e.g. an in-place update of a frozen weight
    assert path.read_bytes() == before  # the file never changes
    again, _ = read_model(path, mmap=True)
    assert torch.equal(again.model.layers[1].mlp.up_proj.weight + 1.0, weight)


def test_a_compressed_archive_is_read_into_memory(tiny_pruned_path, tmp_path):
    """Members stored compressed cannot be mapped: they are read, with the same result."""
    squeezed = tmp_path / "deflated.bin"
    with zipfile.ZipFile(tiny_pruned_path) as zin, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with zipfile.ZipFile(squeezed) as zf:
        assert {i.compress_type for i in zf.infolist() if "/data/" in i.filename} == {zipfile.ZIP_DEFLATED}
    want = state(read_model(tiny_pruned_path)[0])
    got = state(read_model(squeezed, mmap=True)[0])
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@linux_only
def test_trusted_pickle_maps_too(tiny_pruned_path):
    want = state(read_model(tiny_pruned_path)[0])
    model, _ = read_model(tiny_pruned_path, trust_pickle=True, mmap=True)
    got = state(model)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert in_file(model.model.layers[2].self_attn.q_proj.weight, tiny_pruned_path)


@linux_only
def test_a_cast_base_is_a_copy_and_loads_the_same(tiny_pruned_path):
    model, _ = load_pruned(tiny_pruned_path, dtype="float64", mmap=True, check=False)
    plain, _ = load_pruned(tiny_pruned_path, dtype="float64", check=False)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.dtype == torch.float64 and not in_file(weight, tiny_pruned_path)
    assert torch.equal(weight, plain.model.layers[1].mlp.down_proj.weight)


@linux_only
def test_recovery_module_maps_the_frozen_base_unless_told_not_to(tiny_pruned_path):
    from lit_recover.module import LoRARecoveryModule

    mapped = LoRARecoveryModule(str(tiny_pruned_path), torch_dtype="float32")
    read = LoRARecoveryModule(str(tiny_pruned_path), torch_dtype="float32", mmap_weights=False)
    frozen = {n: p for n, p in mapped.model.named_parameters() if not p.requires_grad}
    other = dict(read.model.named_parameters())
    assert len(frozen) > 10
    for name, p in frozen.items():
        assert torch.equal(p, other[name]), name
        assert in_file(p, tiny_pruned_path) and not in_file(other[name], tiny_pruned_path), name
    assert not any(in_file(p, tiny_pruned_path) for p in mapped.model.parameters() if p.requires_grad)
