"""What a running process holds, cheap enough to ask in every `status`: resident memory, open
file descriptors and asyncio tasks. The daemon reports its own and its model process's
(`iosm-cuse status --json`: "process" and "modem"."process"); bench/soak.py watches them stay
flat over a long run.

Cost: one read of /proc/self/statm, one listing of /proc/self/fd and one pass over the running
loop's task set (a few dozen entries): tens of microseconds.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def process_usage() -> dict[str, int | None]:
    """{"rss_kb", "fds", "tasks"} of this process; "tasks" is None outside a running loop,
    and a figure /proc will not give is None."""
    return {"rss_kb": rss_kb(), "fds": open_fds(), "tasks": loop_tasks()}


def rss_kb() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE_KB
    except (OSError, ValueError, IndexError):
        return None


def open_fds() -> int | None:
    try:
        # The listing itself holds one descriptor on /proc/self/fd while it runs: not ours.
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return None


def loop_tasks() -> int | None:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        return None
