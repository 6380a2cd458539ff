"""Plumbing shared by the test modules: one way to wait, and the IPC engine beside the modem
model in one process. Not a test module: test modules import it, never each other.

The fixtures built on these (a network namespace, a running daemon, an engine and model pair)
are in conftest.py; the daemon driver they use is in daemon_up.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from iosm_cuse.bus.base import BAR2
from iosm_cuse.bus.shm import DEVICE, ShmBus
from iosm_cuse.hw.engine import IpcEngine
from iosm_cuse.sim.device import DeviceModel
from iosm_cuse.wire.ipc import CONTEXT_INFO, SCRATCHPAD

T = TypeVar("T")

# Polling intervals: a process or a namespace changes on the scale of a scheduler tick; a loop
# in this process moves on at its next iteration, so the async wait looks far more often.
SYNC_POLL_S = 0.05
ASYNC_POLL_S = 0.005

# `what` names the condition in the failure; a callable is asked at the moment of failure, so
# the message can show the state that was last seen (a status, a log).
What = str | Callable[[], object]


def _failure(what: What, timeout: float) -> AssertionError:
    said = what() if callable(what) else what
    return AssertionError(f"{said}: not within {timeout} s")


def until(predicate: Callable[[], object], timeout: float, what: What,
          poll: float = SYNC_POLL_S) -> float:
    """Wait (blocking) until predicate() is true; return the seconds it took. A predicate may
    assert on its own (e.g. that a process is still alive): that failure comes through."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise _failure(what, timeout)
        time.sleep(poll)
    return time.monotonic() - t0


async def until_async(predicate: Callable[[], object], timeout: float, what: What,
                      poll: float = ASYNC_POLL_S) -> float:
    """until() for code on an event loop: sleeps with asyncio so the loop keeps running. The
    predicate may be a coroutine function (e.g. one that asks the model for a report)."""
    t0 = time.monotonic()
    while not await _holds(predicate):
        if time.monotonic() - t0 > timeout:
            raise _failure(what, timeout)
        await asyncio.sleep(poll)
    return time.monotonic() - t0


async def _holds(predicate: Callable[[], object]) -> bool:
    result = predicate()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run a test's async body on a fresh loop; a hang fails the test instead of the session."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- the IPC engine and the modem model in one process, over the shared-memory bus -----------


@dataclass(frozen=True)
class ShmPair:
    """Both ends of one shared-memory bus (the conftest fixture `shm_pair`)."""

    host: ShmBus  # the engine's end
    dev: ShmBus  # the model's end


def device_view(host: ShmBus) -> ShmBus:
    """The device end of `host`'s shared memory and eventfds, on descriptors of its own."""
    assert host.irq_efd is not None and host.doorbell_efd is not None
    return ShmBus([os.dup(f) for f in host.files], host.layout, DEVICE, os.dup(host.irq_efd),
                  os.dup(host.doorbell_efd))


def shared_addr(dev: ShmBus, name: str) -> int:
    """Device side: the address of `name` as the host's context info announces it."""
    ci = dev.read64(BAR2, SCRATCHPAD["context_info_address"].offset)
    return int(CONTEXT_INFO.unpack(dev.dma.view_at(ci, CONTEXT_INFO.size))[name])


@contextlib.asynccontextmanager
async def model_running(model: DeviceModel) -> AsyncIterator[asyncio.Task[None]]:
    """The model's loop as a task for the duration of the block, cancelled and awaited after."""
    task = asyncio.ensure_future(model.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def engine_running(model: DeviceModel, host: ShmBus) -> AsyncIterator[IpcEngine]:
    """The model running and an IpcEngine started against it (boot handshake done); the engine
    is stopped (idempotent) and the model cancelled whatever the block did."""
    async with model_running(model):
        engine = IpcEngine(host)
        try:
            await engine.start()
            yield engine
        finally:
            await engine.stop()
