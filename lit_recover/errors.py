"""``LitRecoverError``: the base of every error that a user can fix (a bad file, record, flag or config).

Each subclass keeps a builtin second base (``ValueError``, ``RuntimeError``) so that code catching
those still works. The command line prints such an error as one line, ``error: <message>``, and exits
with 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LitRecoverError(Exception):
    """A user-facing error whose message is one line naming the file, the record or the flag at fault."""


class ConfigError(LitRecoverError, ValueError):
    """A configuration that cannot run, with a one-line reason."""


USAGE_EXIT_CODE = 2
"""Exit status of every command for usage and user errors (as argparse and jsonargparse use)."""
