"""What the bench reads beyond the shared process harness (devtools/procs.py): how busy the
whole machine was."""

from __future__ import annotations

from pathlib import Path

from devtools.procs import CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, not idle/iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def user_sys_s(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of the live ``pids`` (/proc/<pid>/stat utime, stime)."""
    user = system = 0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / CLK_TCK, system / CLK_TCK
