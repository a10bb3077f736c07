"""The process's peak memory is its own, not that of the process that started it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lit_recover.evaluation.memory import MIB, _process_peak_rss_bytes, _rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited peak is a Linux trait")
def test_a_child_process_is_not_charged_the_parents_peak():
    """The demo measures each model in a process it starts after its own fits (GBs): the child's
    peak must be the child's. The kernel's ru_maxrss keeps the parent's peak across fork and exec."""
    big = 1024 * MIB
    block = bytearray(big)
    block[::4096] = b"\x01" * len(block[::4096])  # touched: resident
    assert _process_peak_rss_bytes() >= big
    del block
    code = ("import resource; from lit_recover.evaluation.memory import _process_peak_rss_bytes as peak, _rss_bytes;"
            "rss = _rss_bytes(); print(peak(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss)")
    peak, maxrss, rss = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                check=True).stdout.split())
    assert maxrss >= big  # what the kernel's counter says: the parent's gigabyte
    # the child's own peak: an interpreter that imported torch (~250 MB), far below the parent's block
    assert rss <= peak < big / 2
    assert _rss_bytes() > 0
