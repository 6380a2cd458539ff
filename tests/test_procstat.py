"""procstat: what `status` reports of a process (RSS, descriptors, asyncio tasks) follows what the
process really holds, and the model process's `stats` command carries the same figures."""

from __future__ import annotations

import asyncio
import mmap
import os

from helpers import run

from iosm_cuse.procstat import open_fds, process_usage, rss_kb
from iosm_cuse.sim.process import ModelProcess


def test_descriptors_are_counted_exactly() -> None:
    before = open_fds()
    assert before is not None
    r, w = os.pipe()
    try:
        assert open_fds() == before + 2
    finally:
        os.close(r)
        os.close(w)
    assert open_fds() == before


def test_rss_grows_with_memory_in_use() -> None:
    before = rss_kb()
    assert before is not None and before > 0
    # A fresh anonymous mapping, every page written: memory that cannot have been resident
    # before (a bytearray may be carved from pages the allocator kept from earlier tests).
    block = mmap.mmap(-1, 64 * 1024 * 1024)
    try:
        for i in range(0, len(block), mmap.PAGESIZE):
            block[i] = 1
        after = rss_kb()
        assert after is not None and after - before >= 60 * 1024
    finally:
        block.close()


def test_tasks_are_the_running_loops_and_none_without_a_loop() -> None:
    assert process_usage()["tasks"] is None

    async def main() -> None:
        base = process_usage()["tasks"]
        assert base == 1  # this coroutine's own task
        sleepers = [asyncio.ensure_future(asyncio.sleep(10)) for _ in range(3)]
        try:
            assert process_usage()["tasks"] == base + 3
        finally:
            for t in sleepers:
                t.cancel()
            await asyncio.gather(*sleepers, return_exceptions=True)
        assert process_usage()["tasks"] == base

    asyncio.run(main())


def test_the_model_process_reports_its_own_figures() -> None:
    async def main() -> None:
        mp = await ModelProcess.spawn()
        try:
            usage = (await mp.command("stats"))["process"]
            assert set(usage) == {"rss_kb", "fds", "tasks"}
            assert usage["rss_kb"] > 1024 and usage["fds"] >= 3 and usage["tasks"] >= 1
        finally:
            await mp.close()

    run(main())


def test_a_late_reply_is_not_taken_for_the_next_commands() -> None:
    """A command that timed out may still be answered: that line must be skipped."""
    from iosm_cuse.sim.process import _reply_to

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b'{"ok": true, "id": 1, "late": true}\n{"ok": true, "id": 2}\n')
        assert await _reply_to(reader, 2) == {"ok": True, "id": 2}

    asyncio.run(main())


def test_status_never_queues_behind_a_model_command() -> None:
    """While another command (a reset during a restart) holds the model's command socket,
    `status` reports no model figures instead of waiting its turn."""

    async def main() -> None:
        mp = await ModelProcess.spawn()
        try:
            assert (await mp.process_usage()) is not None
            async with mp._lock:
                assert (await mp.process_usage()) is None
        finally:
            await mp.close()
        assert (await mp.process_usage()) is None  # not running

    run(main())
