"""Plumbing shared by the test modules: one way to wait, and the IPC engine beside the modem
model in one process. Not a test module: test modules import it, never each other.

The fixtures built on these (a network namespace, a running daemon, an engine and model pair)
are in conftest.py; the daemon driver they use is in daemon_up.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import os
import select
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from iosm_cuse.bus.base import BAR2
from iosm_cuse.bus.shm import DEVICE, ShmBus
from iosm_cuse.hw.engine import IpcEngine
from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import ActivationState, BasicConnect, IpType
from iosm_cuse.mbim.constants import CommandType
from iosm_cuse.mbim.message import (
    HEADER_SIZE,
    Command,
    CommandDone,
    IndicateStatus,
    Message,
    MessageError,
    Open,
    decode_message,
    decode_transfer,
    encode_message,
    peek_header,
)
from iosm_cuse.mbim.uuids import ContextType, Service
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


def stop_process(proc: subprocess.Popen[str] | subprocess.Popen[bytes],
                 timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `timeout`; nothing is left running."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# ---- an MBIM host on a port's file descriptor (the CUSE node or the PTY) ---------------------


class MbimClient:
    """A minimal MBIM host on an open port fd, built on the project's codec, for tests that need
    many transactions quickly (one Python call each, not one mbimcli process). Answers are
    matched to requests by transaction id; indications (id 0) are counted and skipped. Reads
    cope with a byte stream (the PTY: several messages or part of one per read) as well as with
    the CUSE port's one message per read."""

    def __init__(self, fd: int, timeout: float = 10.0) -> None:
        self.fd = fd
        self.timeout = timeout
        self.tid = 0
        self.indications = 0
        self.received: list[IndicateStatus] = []  # every indication, in arrival order
        self._buf = bytearray()

    def send(self, msg: Message) -> None:
        data = encode_message(msg)
        assert os.write(self.fd, data) == len(data)

    def next_tid(self) -> int:
        self.tid = self.tid % 0xFFFFFFFF + 1
        return self.tid

    def receive(self, tid: int) -> Message:
        """The next message answering `tid`; AssertionError if none comes within the timeout."""
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            while len(self._buf) >= HEADER_SIZE:
                _, length, got = peek_header(bytes(self._buf[:HEADER_SIZE]))
                assert length >= HEADER_SIZE, f"garbage from the port: {bytes(self._buf[:32])!r}"
                if len(self._buf) < length:
                    break
                data = bytes(self._buf[:length])
                del self._buf[:length]
                if got == tid:
                    return decode_message(data)
                if got == 0:
                    self._indicated(data)
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to transaction {tid} within {self.timeout} s"
            if poller.poll(left * 1000):
                self._buf += os.read(self.fd, 65536)

    def collect(self, quiet: float = 0.5) -> list[IndicateStatus]:
        """Read until the port is silent for `quiet` s; the indications received since the last
        call, in order (taken out of `received`)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while poller.poll(quiet * 1000):
            self._buf += os.read(self.fd, 65536)
            with contextlib.suppress(AssertionError):
                self._parse_buffered()
        self._parse_buffered()
        out, self.received = self.received, []
        return out

    def _parse_buffered(self) -> None:
        while len(self._buf) >= HEADER_SIZE:
            _, length, got = peek_header(bytes(self._buf[:HEADER_SIZE]))
            assert length >= HEADER_SIZE, f"garbage from the port: {bytes(self._buf[:32])!r}"
            if len(self._buf) < length:
                return
            data = bytes(self._buf[:length])
            del self._buf[:length]
            assert got == 0, f"an answer to transaction {got} nobody waits for"
            self._indicated(data)

    def _indicated(self, data: bytes) -> None:
        """Count an indication; keep it (whole ones: a fragment is only counted)."""
        self.indications += 1
        with contextlib.suppress(MessageError):
            ind = decode_transfer(data)
            if isinstance(ind, IndicateStatus):
                self.received.append(ind)

    def transact(self, msg: Message) -> Message:
        self.send(msg)
        return self.receive(msg.tid)

    def open(self, max_transfer: int = 4096) -> int:
        """MBIM OPEN; returns the OPEN_DONE's status."""
        done = self.transact(Open(self.next_tid(), max_transfer))
        status: int = getattr(done, "status", -1)
        return status

    def command(self, cid: BasicConnect, command_type: CommandType,
                values: dict[str, Any] | None = None) -> tuple[int, dict[str, Any] | None]:
        """A Basic Connect COMMAND built from the CID tables: (status, decoded answer)."""
        spec = cids.lookup(Service.BASIC_CONNECT, cid)
        assert spec is not None
        layout = spec.request(command_type)
        info = infobuf.encode(layout, values or {}) if layout is not None else b""
        tid = self.next_tid()
        done = self.transact(Command(tid, Service.BASIC_CONNECT.value, cid, command_type, info))
        assert isinstance(done, CommandDone) and done.cid == cid, done
        if not done.info or spec.response is None:
            return done.status, None
        return done.status, infobuf.decode(spec.response, done.info)

    def attach(self) -> int:
        return self.command(BasicConnect.PACKET_SERVICE, CommandType.SET,
                            {"PacketServiceAction": 0})[0]

    def connect(self, session: int, activate: bool = True, apn: str = "internet"
                ) -> tuple[int, ActivationState | None]:
        """CONNECT set (activate or deactivate `session`): (status, the new activation state)."""
        status, info = self.command(BasicConnect.CONNECT, CommandType.SET, {
            "SessionId": session, "ActivationCommand": 1 if activate else 0,
            "AccessString": apn, "UserName": "", "Password": "", "Compression": 0,
            "AuthProtocol": 0, "IpType": IpType.IPV4, "ContextType": ContextType.INTERNET.value})
        return status, None if info is None else ActivationState(info["ActivationState"])

    def activation(self, session: int) -> ActivationState:
        """CONNECT query: the session's activation state as the modem reports it."""
        _, info = self.command(BasicConnect.CONNECT, CommandType.QUERY, {
            "SessionId": session, "ActivationState": 0, "VoiceCallState": 0, "IpType": 0,
            "ContextType": ContextType.NONE.value, "NwError": 0})
        assert info is not None
        return ActivationState(info["ActivationState"])


# ---- clients of the port that block, poll or wait for an answer until the port goes away ------

ClientBody = Callable[[int, threading.Event], str]


@dataclass
class PortClient:
    """A thread on the port doing one thing until the port goes away; `ended` says how: an
    errno name (a read failed), POLL* names (poll reported a hangup or an error), or "eof"."""

    name: str
    path: str
    ended: str = ""
    ready: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, body: ClientBody) -> PortClient:
        def run() -> None:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY)
            try:
                self.ended = body(fd, self.ready)
            except OSError as exc:
                self.ended = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            finally:
                os.close(fd)

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), f"{self.name} never got going"
        return self

    def returned(self) -> bool:
        assert self.thread is not None
        return not self.thread.is_alive()


def blocked_reader(fd: int, ready: threading.Event) -> str:
    """Blocking reads (messages for others are read and dropped) until one fails or ends."""
    ready.set()
    while True:
        if not os.read(fd, 4096):
            return "eof"


POLL_END = {select.POLLERR: "POLLERR", select.POLLHUP: "POLLHUP", select.POLLNVAL: "POLLNVAL"}


def poller(fd: int, ready: threading.Event) -> str:
    """poll() without a timeout, reading what is readable (messages for others), until poll
    reports an end: the POLL* names it reported."""
    watch = select.poll()
    watch.register(fd, select.POLLIN)
    ready.set()
    while True:
        for _, mask in watch.poll():
            ends = [name for bit, name in POLL_END.items() if mask & bit]
            if ends:
                return "|".join(sorted(ends))
            os.read(fd, 4096)


def mid_transaction(fd: int, ready: threading.Event) -> str:
    """OPEN, then the first of two fragments of a COMMAND: the modem waits for the second, the
    client for the answer (a FUNCTION_ERROR after the fragment timeout, then nothing more)."""
    client = MbimClient(fd, timeout=60)
    assert client.open() == 0
    whole = encode_message(Command(client.next_tid(), Service.BASIC_CONNECT.value,
                                   BasicConnect.DEVICE_CAPS, CommandType.QUERY, b"\0" * 64))
    first = bytearray(whole[:48])
    first[4:8] = len(first).to_bytes(4, "little")
    first[12:16] = (2).to_bytes(4, "little")  # TotalFragments 2, CurrentFragment 0
    os.write(fd, bytes(first))
    return blocked_reader(fd, ready)
