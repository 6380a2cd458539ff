"""The shared test plumbing keeps its promises: the wait helpers fail with what they waited
for, and the engine/model pair is torn down even when the test body fails."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from helpers import ShmPair, engine_running, run, until, until_async

from iosm_cuse.hw.engine import EngineState, IpcEngine
from iosm_cuse.sim.device import DeviceModel


def test_until_returns_once_the_predicate_holds() -> None:
    calls = itertools.count()
    assert until(lambda: next(calls) >= 3, 5, "three calls", poll=0.001) < 5


def test_until_fails_with_what_it_waited_for_as_last_seen() -> None:
    seen = [0]

    def never() -> bool:
        seen[0] += 1
        return False

    with pytest.raises(AssertionError, match=r"^polled \d+ times: not within 0\.05 s$"):
        until(never, 0.05, lambda: f"polled {seen[0]} times", poll=0.01)
    assert seen[0] >= 2


def test_a_predicate_that_asserts_fails_at_once() -> None:
    def dead() -> bool:
        raise AssertionError("the process exited")

    with pytest.raises(AssertionError, match="the process exited"):
        until(dead, 5, "never reached")


def test_until_async_takes_plain_and_coroutine_predicates() -> None:
    async def body() -> None:
        calls = itertools.count()
        await until_async(lambda: next(calls) >= 3, 5, "three calls")

        async def asked() -> bool:
            await asyncio.sleep(0)
            return next(calls) >= 6

        await until_async(asked, 5, "three more calls")
        with pytest.raises(AssertionError, match=r"^a report: not within 0\.02 s$"):
            await until_async(lambda: False, 0.02, "a report")

    run(body())


def test_engine_running_stops_the_engine_and_the_model_when_the_block_fails(
        shm_pair: ShmPair) -> None:
    seen: list[tuple[IpcEngine, asyncio.Task[None]]] = []

    async def body() -> None:
        model = DeviceModel(shm_pair.dev)
        async with engine_running(model, shm_pair.host) as eng:
            assert eng.state is EngineState.RUNNING
            model_task = next(t for t in asyncio.all_tasks()
                              if getattr(t.get_coro(), "__qualname__", "") == "DeviceModel.run")
            seen.append((eng, model_task))
            raise RuntimeError("an assert of the test failed")

    with pytest.raises(RuntimeError, match="an assert of the test failed"):
        run(body())
    [(eng, model_task)] = seen
    assert eng.state is EngineState.STOPPED
    assert model_task.cancelled()
