"""``LitRecoverError``: the base of every error that a user can fix (a bad file, record, flag or config).

Each subclass keeps a builtin second base (``ValueError``, ``RuntimeError``, ``FileExistsError``) so
that code catching those still works. Every command (``lit-recover …``, ``python main.py``, the
``python -m lit_recover.<x>`` aliases) runs through :func:`exit_on_user_error`, the one place that
turns such an error, or a usage error of the argument parser, into one line ``error: <message>`` on
stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

USAGE_EXIT_CODE = 2
"""Exit status of every command for usage and user errors (as argparse and jsonargparse use)."""


class LitRecoverError(Exception):
    """A user-facing error whose message is one line naming the file, the record or the flag at fault."""


class ConfigError(LitRecoverError, ValueError):
    """A configuration that cannot run, with a one-line reason."""


class OutputExistsError(LitRecoverError, FileExistsError):
    """A result that is already there and would be replaced; the message names it and the flag that allows it."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (parser messages span several; an empty one gives the class name)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def report_and_exit(exc: BaseException) -> NoReturn:
    """Print ``error: <message>`` on stderr and end with :data:`USAGE_EXIT_CODE`."""
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT_CODE)


def exit_on_user_error(entry: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a command's entry point; a user or usage error ends the process with one line and status 2.

    User errors are :class:`LitRecoverError`; usage errors are the ``ArgumentError`` that
    jsonargparse raises for a bad flag or value when its parser is built with ``exit_on_error=False``
    (every parser of the project is). ``--help`` and normal exits pass through untouched.
    """
    try:
        return entry(*args, **kwargs)
    except (LitRecoverError, argparse.ArgumentError) as exc:
        report_and_exit(exc)
