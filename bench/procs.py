"""What the bench reads beyond the shared process harness (devtools/procs.py): how busy the
whole machine was."""

from __future__ import annotations

from pathlib import Path

from devtools.procs import CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, not idle/iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK
