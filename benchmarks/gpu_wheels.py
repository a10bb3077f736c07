"""The wheels the GPU check carries (``benchmarks/gpu_wheels.txt``): which to install, and installing them.

Standard library and ``packaging`` only, so that it runs before anything it installs::

    python3 -m benchmarks.gpu_wheels plan                       # what would be installed, and why
    python3 -m benchmarks.gpu_wheels install --target /tmp/site # pip --no-index --no-deps into /tmp/site

A wheel is installed when the machine lacks its package, or when the machine's copy does not meet
the requirement its line names (``pyarrow>=24.0.0``): the machine's own packages are kept otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIST = HERE / "gpu_wheels.txt"
WHEELS = HERE / ".gpu_wheels"


@dataclass(frozen=True)
class Wheel:
    """One line of the list: the pinned wheel and the requirement that keeps the machine's own copy."""

    name: str
    version: str
    keep_if: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def read_list(path: Path = LIST) -> list[Wheel]:
    """The wheels of ``gpu_wheels.txt``; a line that is not ``name==version [requirement]`` is an error."""
    from packaging.requirements import Requirement

    wheels = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) > 2 or "==" not in fields[0]:
            raise ValueError(f"{path}:{number}: expected '<name>==<version> [<requirement>]', got {raw.strip()!r}")
        name, version = fields[0].split("==", 1)
        keep_if = fields[1] if len(fields) == 2 else name
        if Requirement(keep_if).name.lower().replace("_", "-") != name.lower().replace("_", "-"):
            raise ValueError(f"{path}:{number}: the requirement {keep_if!r} is not about {name}")
        wheels.append(Wheel(name, version, keep_if))
    return wheels


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def needed(wheels: list[Wheel], versions=installed_version) -> list[tuple[Wheel, str]]:
    """``(wheel, reason)`` for each wheel to install: its package missing, or too old for its requirement."""
    from packaging.requirements import Requirement

    out = []
    for wheel in wheels:
        have = versions(wheel.name)
        if have is None:
            out.append((wheel, "missing"))
        elif not Requirement(wheel.keep_if).specifier.contains(have, prereleases=True):
            out.append((wheel, f"{wheel.name} {have} does not meet {wheel.keep_if}"))
    return out


def wheel_file(wheel: Wheel, folder: Path = WHEELS) -> Path:
    """The downloaded file of ``wheel`` in ``folder`` (names normalised as pip writes them)."""
    stem = wheel.name.replace("-", "_").lower() + "-" + wheel.version + "-"
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(stem)]
    if not found:
        raise FileNotFoundError(f"{folder}: no wheel for {wheel.pin} (run `make gpu-wheels` where pip reaches PyPI)")
    return found[0]


def install(target: Path, folder: Path = WHEELS, path: Path = LIST) -> list[str]:
    """Install the needed wheels into ``target``; the lines it prints say what and why."""
    todo = needed(read_list(path))
    for wheel, reason in todo:
        print(f"gpu_wheels: installing {wheel.pin} ({reason})", flush=True)
    if not todo:
        print("gpu_wheels: every carried package is already there", flush=True)
        return []
    files = []
    for wheel, _ in todo:
        try:
            files.append(str(wheel_file(wheel, folder)))
        except FileNotFoundError as exc:  # the check goes on and reports what it then cannot run
            print(f"gpu_wheels: warning: {exc}", flush=True)
    if not files:
        return []
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *files], check=True)
    return [Path(f).name for f in files]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["plan", "install", "pins"])
    p.add_argument("--target", type=Path, default=Path("/tmp/lit-recover-gpu-site"))
    p.add_argument("--wheels", type=Path, default=WHEELS)
    args = p.parse_args(argv)
    if args.action == "pins":  # for pip download
        print(" ".join(w.pin for w in read_list()))
    elif args.action == "plan":
        for wheel, reason in needed(read_list()):
            print(f"{wheel.pin}: {reason}")
    else:
        install(args.target, args.wheels)


if __name__ == "__main__":
    main()
