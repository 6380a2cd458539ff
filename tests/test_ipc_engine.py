"""Engine <-> modem model in two processes over the shared-memory bus.

The channel functions the model runs for these tests are defined here; the model process imports
this module by name (sim/process.py hands it our sys.path).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from helpers import until_async

from iosm_cuse.hw.engine import ChannelError, EngineState, IpcChannel, IpcEngine
from iosm_cuse.sim.device import DeviceModel, Send
from iosm_cuse.sim.process import ModelProcess
from iosm_cuse.wire.ipc import CAP_DL_AGGR, CAP_UL_AGGR

T = TypeVar("T")
N = 10_000
LIMITS = {0: 2048, 6: 32 * 1024}  # the pipes' buffer sizes (Lite, MBIM)
_BLOCK = random.Random(7).randbytes(1 << 16)


class Stream:
    """A reproducible sequence of transfers of random sizes 1..limit (the ends included)."""

    def __init__(self, seed: int, limit: int) -> None:
        self.rng = random.Random(seed)
        self.limit = limit
        self.seq = 0

    def next(self) -> bytes:
        seq = self.seq
        self.seq += 1
        size = (1, self.limit)[seq] if seq < 2 else self.rng.randint(1, self.limit)
        head = struct.pack("<II", seq, size)
        if size <= len(head):
            return head[:size]
        off = (seq * 7919) % (len(_BLOCK) - self.limit)
        return head + _BLOCK[off:off + size - len(head)]


def _seeds(ch: int) -> tuple[int, int]:
    return 1000 + ch, 2000 + ch  # (uplink, downlink)


class SinkSource:
    """Model side: checks every UL transfer against the expected stream (sink), sends its own
    stream of `n` DL transfers (source), then one report line."""

    def __init__(self, ch: int, n: int) -> None:
        self.ch, self.n = ch, n
        self.send: Send | None = None

    def opened(self, send: Send) -> None:
        ul, dl = _seeds(self.ch)
        self.send = send
        self.expect = Stream(ul, LIMITS[self.ch])
        self.source = Stream(dl, LIMITS[self.ch])
        self.sent = self.ok = self.bad = 0
        self.pending: bytes | None = None
        self.reported = False
        self.loop = asyncio.get_running_loop()
        self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        if self.send is None:
            return
        while self.sent < self.n:
            if self.pending is None:
                self.pending = self.source.next()
            if not self.send(self.pending):
                self.loop.call_later(0.001, self._pump)  # backlog full: try again soon
                return
            self.pending = None
            self.sent += 1
        self._report()

    def receive(self, data: bytes) -> None:
        if data == self.expect.next():
            self.ok += 1
        else:
            self.bad += 1
        self._report()

    def _report(self) -> None:
        if self.reported or self.send is None or self.sent < self.n or \
                self.ok + self.bad < self.n:
            return
        if self.send(f"REPORT {self.ok} {self.bad}".encode()):
            self.reported = True
        else:
            self.loop.call_later(0.001, self._report)

    def closed(self) -> None:
        self.send = None


class Echo:
    def __init__(self) -> None:
        self.send: Send | None = None

    def opened(self, send: Send) -> None:
        self.send = send

    def receive(self, data: bytes) -> None:
        if self.send is not None:
            self.send(data)

    def closed(self) -> None:
        self.send = None


def attach_sink_source(model: DeviceModel, options: dict[str, Any]) -> None:
    for ch in (0, 6):
        model.attach(ch, SinkSource(ch, int(options["n"])))


def attach_echo(model: DeviceModel, options: dict[str, Any]) -> None:
    for ch in (0, 6):
        model.attach(ch, Echo())


FACTORY = f"{__name__}:attach_sink_source"
ECHO = f"{__name__}:attach_echo"


def run(coro: Coroutine[Any, Any, T], timeout: float = 90) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def with_model(body: Callable[[ModelProcess, IpcEngine], Awaitable[None]],
                     functions: str, engine_options: dict[str, Any] | None = None,
                     **kw: Any) -> None:
    """The model process and an engine on its bus (not started: the body does that); the
    engine is stopped and the model closed whatever the body did."""
    mp = await ModelProcess.spawn(functions=functions, **kw)
    try:
        eng = IpcEngine(mp.bus, **(engine_options or {}))
        try:
            await body(mp, eng)
        finally:
            await eng.stop()
    finally:
        await mp.close()
        assert not mp.alive


# ---- 10,000 transfers each way on channels 0 and 6 ---------------------------------------------


def test_ten_thousand_each_way_on_channels_0_and_6() -> None:
    async def body(mp: ModelProcess, eng: IpcEngine) -> None:
        await eng.start()
        assert eng.state is EngineState.RUNNING and str(eng.mux_mode) == "lite"
        baseline = mp.bus.dma.in_use
        got: dict[int, list[bytes]] = {0: [], 6: []}
        chans = {c: await eng.open_channel(c, got[c].append) for c in (0, 6)}

        async def upload(ch: IpcChannel) -> None:
            stream = Stream(_seeds(ch.id)[0], LIMITS[ch.id])
            for _ in range(N):
                ch.send(stream.next())
                if ch.pending >= 256:
                    await ch.drain(timeout=10)
            await ch.drain(timeout=10)

        await asyncio.gather(*(upload(ch) for ch in chans.values()))
        for c in chans:
            await until_async(lambda c=c: len(got[c]) > N, 30, f"channel {c} DL stream + report")

        for c, ch in chans.items():
            expect = Stream(_seeds(c)[1], LIMITS[c])
            data = got[c]
            assert len(data) == N + 1
            for i in range(N):
                assert data[i] == expect.next(), f"channel {c}: DL transfer {i} differs"
            assert data[N] == f"REPORT {N} 0".encode(), f"channel {c}: model saw {data[N]!r}"
            # every TD came back: UL fully consumed, DL ring holds count-1 posted buffers
            assert ch.ul.head == ch.ul.tail and ch.pending == 0
            assert ch.dl.in_flight == ch.dl.count - 1
        sizes = [len(d) for d in got[6][:N]]
        assert min(sizes) == 1 and max(sizes) == LIMITS[6]
        for ch in chans.values():
            await ch.close()
        assert mp.bus.dma.in_use == baseline  # no buffer or ring outstanding
        assert eng.counters == {}
        stats = await mp.stats()
        assert stats["ul_transfers"] == 2 * N and stats["dl_transfers"] == 2 * (N + 1)
        assert stats["rejects"] == {} and stats["dropped_dl"] == 0
        await eng.stop()
        assert eng.state is EngineState.STOPPED and stats["ipc_state"] == 2

    run(with_model(body, FACTORY, options={"n": N}))


def test_ul_completion_callback_reports_each_consumed_batch() -> None:
    """on_ul_done() runs after the device consumed UL transfers, with `pending` already lower:
    what lets the host MUX restart a stopped uplink without a timer."""
    async def body(mp: ModelProcess, eng: IpcEngine) -> None:
        await eng.start()
        seen: list[int] = []
        got: list[bytes] = []
        ch: IpcChannel | None = None

        def done() -> None:
            assert ch is not None
            seen.append(ch.pending)

        ch = await eng.open_channel(6, got.append, on_ul_done=done)
        quiet = await eng.open_channel(0, lambda _b: None)  # no callback: must not break
        for i in range(300):
            ch.send(b"x%d" % i)
            quiet.send(b"y")
        await ch.drain(timeout=10)
        await quiet.drain(timeout=10)
        await until_async(lambda: len(got) >= 300, 10, "the echoes")
        assert seen and seen[-1] == 0 and all(p < 300 for p in seen)
        assert got == [b"x%d" % i for i in range(300)]
        await eng.stop()

    run(with_model(body, ECHO))


# ---- crash, hang, death -----------------------------------------------------------------------


async def _open_echo(eng: IpcEngine, errors: list[ChannelError] | None = None
                     ) -> tuple[dict[int, IpcChannel], dict[int, list[bytes]]]:
    got: dict[int, list[bytes]] = {0: [], 6: []}
    chans = {}
    for c in (0, 6):
        chans[c] = await eng.open_channel(c, got[c].append,
                                          errors.append if errors is not None else None)
    return chans, got


async def _echo_round_trip(chans: dict[int, IpcChannel], got: dict[int, list[bytes]]) -> None:
    for c, ch in chans.items():
        before = len(got[c])
        ch.send(b"ping %d" % c)
        await until_async(lambda c=c, before=before: len(got[c]) > before, 2, f"echo on {c}")
        assert got[c][-1] == b"ping %d" % c


def _down_times(eng: IpcEngine) -> list[float]:
    times: list[float] = []
    eng.add_state_listener(
        lambda s: times.append(time.monotonic()) if s is EngineState.DOWN else None)
    return times


def test_crash_mid_transfer_is_reported_and_a_new_handshake_recovers() -> None:
    async def body(mp: ModelProcess, eng: IpcEngine) -> None:
        await eng.start()
        down = _down_times(eng)
        errors: list[ChannelError] = []
        chans, got = await _open_echo(eng, errors)

        async def traffic() -> None:
            while True:
                for ch in chans.values():
                    ch.send(os.urandom(200))
                    if ch.pending > 100:
                        await asyncio.sleep(0.001)
                await asyncio.sleep(0)

        task = asyncio.ensure_future(traffic())
        await until_async(lambda: len(got[0]) > 200 and len(got[6]) > 200, 5, "traffic flowing")
        t0 = time.monotonic()
        await mp.crash()
        await until_async(lambda: bool(down), 2, "DOWN after the crash")
        assert down[0] - t0 < 2.0
        assert eng.state is EngineState.DOWN and "crash" in (eng.last_error or "")
        with pytest.raises(ChannelError) as exc:
            await asyncio.wait_for(task, 1)
        assert exc.value.errno == errno.EIO
        assert [e.errno for e in errors] == [errno.EIO, errno.EIO]
        for ch in chans.values():
            with pytest.raises(ChannelError) as exc:
                ch.send(b"x")
            assert exc.value.errno == errno.EIO
            await ch.close()  # harmless after DOWN
        with pytest.raises(ChannelError):
            await eng.open_channel(6, lambda b: None)

        await mp.recover()
        await eng.start()
        assert eng.state is EngineState.RUNNING
        chans, got = await _open_echo(eng)
        await _echo_round_trip(chans, got)
        await eng.stop()

    run(with_model(body, ECHO))


def test_hang_is_detected_by_the_ul_watchdog_and_by_ring_timeouts() -> None:
    async def body(mp: ModelProcess, eng: IpcEngine) -> None:
        await eng.start()
        down = _down_times(eng)
        chans, got = await _open_echo(eng)
        await _echo_round_trip(chans, got)
        await mp.hang()
        t0 = time.monotonic()
        chans[6].send(b"anyone there?")
        await until_async(lambda: bool(down), 3, "DOWN after the hang")
        assert down[0] - t0 < 1.5
        assert "timeout" in (eng.last_error or "")

        # the model answers again after a reset; this time hang while opening a channel
        await mp.recover()
        await eng.start()
        await mp.hang()
        t0 = time.monotonic()
        with pytest.raises(ChannelError) as exc:
            await eng.open_channel(6, lambda b: None)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - t0 < 1.0 and eng.state is EngineState.DOWN
        assert len(down) == 2

        await mp.recover()
        await eng.start()
        chans, got = await _open_echo(eng)
        await _echo_round_trip(chans, got)
        await eng.stop()

    run(with_model(body, ECHO, engine_options={"ul_stall_timeout": 1.0}))


def test_model_process_death_is_link_down_and_recover_respawns() -> None:
    async def body(mp: ModelProcess, eng: IpcEngine) -> None:
        await eng.start()
        down = _down_times(eng)
        chans, got = await _open_echo(eng)
        old = mp.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await until_async(lambda: bool(down), 2, "DOWN after the model died")
        assert "link down" in (eng.last_error or "")
        await mp.recover()
        assert mp.pid != old and mp.alive
        await eng.start()
        chans, got = await _open_echo(eng)
        await _echo_round_trip(chans, got)
        await eng.stop()

    run(with_model(body, ECHO))


def test_aggregation_capability_selects_aggregation_buffers() -> None:
    async def body(mp: ModelProcess, eng: IpcEngine) -> None:
        await eng.start()
        assert str(eng.mux_mode) == "aggregation"
        assert eng.capabilities & CAP_DL_AGGR and not eng.ul_flow_credit
        got: list[bytes] = []
        ch = await eng.open_channel(0, got.append)
        assert (ch.ul.count, ch.dl.count, ch.dl.buf_size) == (60, 60, 16384)
        big = os.urandom(16384)
        ch.send(big)
        await until_async(lambda: bool(got), 2, "16 KiB echo")
        assert got == [big]
        with pytest.raises(ChannelError) as exc:
            ch.send(bytes(16385))
        assert exc.value.errno == errno.EMSGSIZE
        await eng.stop()

    run(with_model(body, ECHO, config={"capabilities": CAP_UL_AGGR | CAP_DL_AGGR}))


def test_idle_hang_is_found_by_the_optional_heartbeat() -> None:
    async def body(mp: ModelProcess, eng: IpcEngine) -> None:
        await eng.start()
        down = _down_times(eng)
        await asyncio.sleep(1.0)  # idle but answering: the probes are completed
        assert not down and eng.state is EngineState.RUNNING
        await mp.hang()
        t0 = time.monotonic()
        await until_async(lambda: bool(down), 3, "DOWN of an idle hung model")
        assert down[0] - t0 < 1.5 and "timeout" in (eng.last_error or "")
        await mp.recover()
        await eng.start()
        await eng.stop()

    run(with_model(body, ECHO, engine_options={"heartbeat": 0.3}))
