"""Run ``main.py`` with a SIGKILL injected at a chosen point of a checkpoint save.

``python -m tests.kill_driver <point> <step> fit …`` (from the repository root): ``point`` is
``mid-swap`` (between the two renames that replace ``checkpoint-last``) or ``before-rename`` (the new
folder written but not yet renamed); the kill happens during the save at optimizer step ``step``.
"""

import os
import signal
import sys
from pathlib import Path

import lit_recover.callbacks as callbacks
from lit_recover.outputs import OLD_SUFFIX, RunFolder
from main import cli_main

point, step = sys.argv[1], int(sys.argv[2])
original_replace = os.replace
state = {"armed": False}


def replace_dir(tmp, final):
    final, tmp = Path(final), Path(tmp)
    if final == RunFolder(final.parent).checkpoint(step):
        state["armed"] = True
    if state["armed"] and final == RunFolder(final.parent).last_checkpoint:
        if point == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        old = final.with_name(final.name + OLD_SUFFIX)
        original_replace(final, old)
        os.kill(os.getpid(), signal.SIGKILL)  # mid-swap: checkpoint-last is gone, .old holds it
    return original_replace_dir(tmp, final)


original_replace_dir = callbacks.replace_dir
callbacks.replace_dir = replace_dir
cli_main(sys.argv[3:])
