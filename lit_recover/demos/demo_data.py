"""Offline demo data: Alpaca-style records made from the docstrings of Python's standard library.

This is **demo data**, for running the recovery pipeline end to end on a machine without the
Alpaca files or a network: real English text that ships with every Python installation, turned
into instruction/response pairs such as

    {"instruction": "Explain what `json.dumps` does.", "input": "",
     "output": "Serialize ``obj`` to a JSON formatted ``str``."}

Some records put the call signature into ``input``. The output is always the first paragraph of
the docstring. It is not a benchmark: use the Alpaca set for real recovery runs.

The records come from a curated list of standard-library modules that are safe to import (no
GUI, no side effects), in sorted order, with instruction phrasings drawn from a fixed seed, so the
data set is identical on every run of the same Python version (docstrings change between Python
releases). A second, disjoint list of modules gives held-out text for perplexity
(``build_demo_eval_text``): docstrings the model never sees in training, in the same domain.

Command line: ``python -m lit_recover.demos.demo_data --output results/demo/demo_alpaca.json``
(also writes ``demo_eval.txt`` beside it).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SEED = 1234

# Modules whose docstrings become training records: pure-library modules that import without side
# effects (no GUI, no network or terminal set-up at import time), on every platform.
TRAIN_MODULES: tuple[str, ...] = (
    "argparse", "array", "base64", "bdb", "bisect", "builtins", "calendar", "cmd", "code", "collections",
    "collections.abc", "colorsys", "contextvars", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "http.cookies", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "linecache", "locale",
    "logging", "mailbox", "math", "operator", "optparse", "pathlib", "pickle", "pkgutil", "platform",
    "poplib", "posixpath", "pprint", "pstats", "random", "re", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "sqlite3", "stat", "statistics", "string", "struct", "subprocess", "symtable", "sysconfig",
    "tarfile", "tempfile", "textwrap", "time", "typing", "unicodedata", "urllib.parse", "urllib.request",
    "uuid", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipfile", "zoneinfo",
)

# Held out: their docstrings are the in-domain perplexity text and never appear in training.
EVAL_MODULES: tuple[str, ...] = (
    "abc", "ast", "binascii", "bz2", "cmath", "codecs", "configparser", "contextlib", "graphlib",
    "keyword", "lzma", "mimetypes", "numbers", "plistlib", "queue", "quopri", "sched", "threading",
    "timeit", "tokenize", "traceback", "types", "warnings", "weakref", "zlib",
)

_PLAIN = (
    "Explain what `{name}` does.",
    "What does `{name}` do?",
    "Describe the purpose of `{name}` from Python's `{module}` module.",
    "Summarize the documentation of `{name}` in a few sentences.",
    "In plain words, what is `{name}` for?",
    "I am reading Python code that calls `{name}`. What does it do?",
    "Give a short description of `{name}`.",
    "What is the role of `{short}` in the `{module}` module?",
)
_WITH_INPUT = (
    "Explain what this Python callable does.",
    "Describe the behaviour of the function with the following signature.",
    "Given this signature from the `{module}` module, explain what it is for.",
    "Write a one-paragraph docstring for the following Python API.",
)
_DETAIL = (
    "Explain `{name}` in detail.",
    "Give a thorough explanation of `{name}`, including how it behaves.",
    "Write the documentation for `{name}`.",
    "Describe `{name}` fully, as its documentation would.",
)
_MODULE = (
    "What is the Python `{module}` module for?",
    "Describe the standard-library module `{module}`.",
    "Which problems does Python's `{module}` module solve?",
)
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def _paragraphs(doc: str | None) -> list[str]:
    """The docstring's prose paragraphs, each on one line; signature lines and code examples dropped."""
    if not doc:
        return []
    paragraphs = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = para.strip().splitlines()
        if not lines or ">>>" in para or any(line.startswith((" ", "\t")) for line in lines):
            continue  # doctest or indented block: code, not prose
        text = " ".join(line.strip() for line in lines)
        if _SIGNATURE_LINE.match(text) or "->" in text.split(" ")[0]:
            continue
        paragraphs.append(text)
    return paragraphs


def _first_paragraph(doc: str | None) -> str | None:
    """The docstring's first prose paragraph on one line (``None`` when there is none worth teaching)."""
    paragraphs = _paragraphs(doc)
    if not paragraphs or len(paragraphs[0]) < 20:
        return None
    return paragraphs[0]


_ADDRESS = re.compile(r"<(?:[^<>]|<[^<>]*>)* at 0x[0-9a-fA-F]+>")  # also <function <lambda> at 0x…>


def _signature(obj) -> str | None:
    """``(a, b=1)``, with defaults whose repr holds a memory address written as ``...`` (stable text)."""
    try:
        return _ADDRESS.sub("...", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return None


def _public_members(module):
    """``(qualified name, object)`` for the module's own public functions and classes, and those classes' methods."""
    name = module.__name__
    prefix = "" if name == "builtins" else f"{name}."  # `str.lower`, not `builtins.str.lower`
    for attr in sorted(dir(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr)
        if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        # Only what the module defines (or its C accelerator, e.g. _json for json), not re-exports.
        owner = getattr(obj, "__module__", None) or ""
        if owner != name and owner.lstrip("_") != name.split(".")[-1]:
            continue
        yield f"{prefix}{attr}", obj
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                member = vars(obj)[meth]
                if meth.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                origin = getattr(member, "__module__", None)
                if isinstance(origin, str) and origin != obj.__module__:
                    continue  # patched in by another library (transformers adds Logger.warning_once)
                if inspect.isfunction(member) or inspect.ismethoddescriptor(member) or isinstance(member, property):
                    yield f"{prefix}{attr}.{meth}", member


def _entries(modules: tuple[str, ...]):
    """``(module name, qualified name, object, prose paragraphs)``; the module itself comes first."""
    for module_name in sorted(modules):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a Python built without e.g. sqlite3
            log.info("skipping %s: not importable here", module_name)
            continue
        if _first_paragraph(module.__doc__):
            yield module_name, module_name, module, _paragraphs(module.__doc__)
        seen: set[str] = set()
        for qualname, obj in _public_members(module):
            text = _first_paragraph(getattr(obj, "__doc__", None))
            if text is None or text in seen:
                continue
            seen.add(text)  # the same docstring on several aliases would teach one answer twice
            yield module_name, qualname, obj, _paragraphs(obj.__doc__)


def _detail(paragraphs: list[str], limit: int = 1500) -> str | None:
    """Up to three paragraphs within ``limit`` characters, when there is more than the first."""
    text = paragraphs[0]
    for para in paragraphs[1:3]:
        if len(text) + 2 + len(para) > limit or para.endswith(":"):
            break  # too long, or it introduces a list or example that was dropped
        text += "\n\n" + para
    return text if text != paragraphs[0] else None


def build_demo_records(n: int | None = None) -> list[dict[str, str]]:
    """Alpaca records ``{"instruction", "input", "output"}`` from standard-library docstrings.

    Every documented public function, class, method and module gives a record whose output is its
    docstring's first paragraph (about 30% of callables put the signature in ``input``); those with
    a longer docstring give a second, "in detail" record of up to three paragraphs.

    Args:
        n: how many records; ``None`` for all (a few thousand). The records are shuffled with a
            fixed seed, so any ``n`` is a deterministic mix of modules.

    Returns:
        The records, identical on every call with the same Python version.
    """
    records = [dict(r) for r in _all_records()]
    if n is not None:
        if n > len(records):
            from lit_recover.errors import ConfigError

            raise ConfigError(f"asked for {n} demo records, only {len(records)} can be built")
        records = records[:n]
    return records


@functools.lru_cache(maxsize=1)
def _all_records() -> tuple[dict[str, str], ...]:
    """The records, built in a fresh interpreter.

    Libraries patch standard-library functions in place when they are imported (``torch.package``
    replaces ``inspect.getfile``), so a process that imported them would build other records.
    """
    code = ("import json, sys; from lit_recover.demos.demo_data import _build_records; "
            "json.dump(_build_records(), sys.stdout)")
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": path},
                         capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout))


def _build_records() -> list[dict[str, str]]:
    """Every record, shuffled; see ``build_demo_records``. Call it in an interpreter with no third-party imports."""
    records = []
    for module_name, qualname, obj, paragraphs in _entries(TRAIN_MODULES):
        # One generator per entry, seeded by its name: an entry that exists only on some Python
        # builds does not reshuffle the phrasings of all the others.
        rng = random.Random(f"{SEED}:{qualname}")
        short = qualname.rsplit(".", 1)[-1]
        if inspect.ismodule(obj):
            instruction = rng.choice(_MODULE).format(module=module_name)
            records.append({"instruction": instruction, "input": "", "output": paragraphs[0]})
        else:
            sig = None if isinstance(obj, property) else _signature(obj)
            if sig is not None and rng.random() < 0.3:
                instruction = rng.choice(_WITH_INPUT).format(module=module_name)
                records.append({"instruction": instruction, "input": f"{qualname}{sig}", "output": paragraphs[0]})
            else:
                instruction = rng.choice(_PLAIN).format(name=qualname, short=short, module=module_name)
                records.append({"instruction": instruction, "input": "", "output": paragraphs[0]})
        detail = _detail(paragraphs)
        if detail is not None:
            instruction = rng.choice(_DETAIL).format(name=qualname)
            records.append({"instruction": instruction, "input": "", "output": detail})
    random.Random(SEED).shuffle(records)
    return records


@functools.lru_cache(maxsize=1)
def build_demo_eval_text() -> str:
    """Held-out in-domain text for perplexity: full docstrings of ``EVAL_MODULES``, blank-line separated."""
    parts = []
    for module_name in sorted(EVAL_MODULES):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if module.__doc__:
            parts.append(inspect.cleandoc(module.__doc__))
        seen: set[str] = set()
        for _, obj in _public_members(module):
            doc = inspect.getdoc(obj) if not isinstance(obj, property) else obj.__doc__
            if doc and len(doc) >= 40 and doc not in seen:
                seen.add(doc)
                parts.append(inspect.cleandoc(doc))
    return "\n\n".join(parts) + "\n"


def _write_text(text: str, path: Path, overwrite: bool) -> None:
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            return  # the same deterministic content: nothing to do
        if not overwrite:
            from lit_recover.errors import OutputExistsError

            raise OutputExistsError(
                f"{path}: exists with different content; pass overwrite=True (--overwrite true) to replace it"
            )
    from lit_recover.outputs import write_text  # here, so the interpreter building the records imports no more

    write_text(path, text, overwrite=overwrite)


def write_demo_dataset(
    path: str | Path,
    n: int | None = None,
    val_texts_path: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the demo records as an Alpaca JSON list, and optionally the held-out text for perplexity.

    Args:
        path: the JSON file to write.
        n: how many records (``None``: all).
        val_texts_path: where to write ``build_demo_eval_text()``; ``None`` skips it.
        overwrite: replace files whose content differs; identical files are left as they are.

    Returns:
        ``path``.
    """
    path = Path(path)
    records = build_demo_records(n)
    _write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", path, overwrite)
    log.info("wrote %d demo records to %s", len(records), path)
    if val_texts_path is not None:
        _write_text(build_demo_eval_text(), Path(val_texts_path), overwrite)
        log.info("wrote held-out demo text to %s", val_texts_path)
    return path


def demo_data(
    output: str = "results/demo/demo_alpaca.json",
    n: int | None = None,
    eval_text: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the offline demo instruction data set (standard-library docstrings as Alpaca records).

    Args:
        output: Alpaca JSON file to write.
        n: number of records (default: all).
        eval_text: held-out text for perplexity (default: demo_eval.txt beside --output; 'none' to skip).
        overwrite: replace files with different content.

    Returns:
        The JSON file written.
    """
    text_path: str | Path | None = eval_text or Path(output).with_name("demo_eval.txt")
    if str(text_path).lower() == "none":
        text_path = None
    return write_demo_dataset(output, n=n, val_texts_path=text_path, overwrite=overwrite)


def main(argv: list[str] | None = None, prog: str = "python -m lit_recover.demos.demo_data") -> Path:
    """``python -m lit_recover.demos.demo_data --output FILE [--n N] [--eval_text FILE] [--overwrite true]``."""
    from jsonargparse import CLI

    from lit_recover.errors import exit_on_user_error

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = exit_on_user_error(CLI, demo_data, args=argv, as_positional=False, prog=prog, exit_on_error=False)
    print(path)
    return path


if __name__ == "__main__":
    main()
