"""MbimPort (Contract 4) against in-memory channels: the kernel wwan port's rules plus the
negotiated-size check, without any transport."""

from __future__ import annotations

import asyncio
import errno
import select
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.chardev.loopback import LoopbackOpener, answer_open
from iosm_cuse.chardev.port import FIONREAD, IOCTL_WDM_MAX_COMMAND, MbimPort
from iosm_cuse.mbim.cids import BasicConnect
from iosm_cuse.mbim.message import Command, CommandDone, Open, decode_message, encode_message
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim import MbimFunction

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(fn(), 10))  # type: ignore[arg-type]


def silent(_: bytes) -> list[bytes]:
    return []


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_first_open_opens_channel_last_close_closes_and_purges() -> None:
    async def body() -> None:
        opener = LoopbackOpener(silent)
        port = MbimPort(opener)
        a, b = await asyncio.gather(port.open(), port.open())
        assert len(opener.channels) == 1 and port.openers == 2  # concurrent first opens share
        opener.current.deliver(b"x" * 20)
        await settle()
        await a.close()
        assert not opener.current.closed and port.queued_bytes == 20
        assert b.read(100) == b"x" * 20  # one shared queue: b sees what arrived
        opener.current.deliver(b"unread")
        await settle()
        await b.close()
        assert opener.current.closed and port.queued_bytes == 0
        c = await port.open()
        assert len(opener.channels) == 2
        with pytest.raises(BlockingIOError):
            c.read(10)  # nothing of the old channel's data survived
        await c.close()
    run(body)


def test_one_transfer_per_read_and_short_reads_keep_the_rest() -> None:
    async def body() -> None:
        opener = LoopbackOpener(silent)
        port = MbimPort(opener)
        h = await port.open()
        with pytest.raises(BlockingIOError):
            h.read(4096)
        woken: list[int] = []
        port.add_listener(lambda: woken.append(port.queued_bytes))
        opener.current.deliver(b"A" * 10)
        opener.current.deliver(b"B" * 5)
        await settle()
        assert woken == [10, 15]
        assert h.ioctl(FIONREAD) == struct.pack("<i", 15)
        assert h.read(4) == b"AAAA"
        assert h.read(4096) == b"A" * 6  # the remainder, never merged with the next transfer
        assert h.read(4096) == b"BBBBB"
        assert h.read(0) == b""
        with pytest.raises(BlockingIOError):
            h.read(1)
    run(body)


def test_poll_and_ioctls() -> None:
    async def body() -> None:
        opener = LoopbackOpener(silent)
        port = MbimPort(opener, max_control=2048)
        h = await port.open()
        assert h.poll() == select.POLLOUT | select.POLLWRNORM
        opener.current.deliver(b"m")
        await settle()
        assert h.poll() == select.POLLOUT | select.POLLWRNORM | select.POLLIN | select.POLLRDNORM
        assert h.ioctl(IOCTL_WDM_MAX_COMMAND) == struct.pack("<H", 2048)
        with pytest.raises(OSError) as e:
            h.ioctl(0x5401)  # TCGETS: not an MBIM port's business
        assert e.value.errno == errno.ENOTTY
        assert MbimPort(opener).max_command == 4096
        with pytest.raises(ValueError):
            MbimPort(opener, max_control=8192)  # libmbim's 4097-byte buffer
    run(body)


def test_emsgsize_before_and_after_open() -> None:
    async def body() -> None:
        opener = LoopbackOpener(answer_open)
        port = MbimPort(opener)
        h = await port.open()
        with pytest.raises(OSError) as e:
            h.write(b"\0" * 4097)
        assert e.value.errno == errno.EMSGSIZE and opener.current.sent == []
        assert h.write(encode_message(Open(1, 1024))) == 16
        assert port.negotiated == 1024
        with pytest.raises(OSError) as e:
            h.write(b"\0" * 1025)
        assert e.value.errno == errno.EMSGSIZE and len(opener.current.sent) == 1
        assert h.write(b"\0" * 1024) == 1024
        # An OPEN with an impossible size does not lower the limit.
        h.write(encode_message(Open(2, 8)))
        assert port.negotiated == 1024
        await settle()
        assert h.read(4096)[:4] == struct.pack("<I", 0x80000001)  # OPEN_DONE
    run(body)


def test_modem_gone_then_back() -> None:
    async def body() -> None:
        opener = LoopbackOpener(silent)
        port = MbimPort(opener)
        h = await port.open()
        opener.current.deliver(b"lost")
        await settle()
        woken: list[bool] = []
        port.add_listener(lambda: woken.append(h.readable))
        port.hangup("engine down")
        assert woken == [True] and opener.channels[0].closed is False  # close is spawned
        await settle()
        assert opener.channels[0].closed
        assert h.poll() == select.POLLHUP | select.POLLERR
        for op in (lambda: h.read(10), lambda: h.write(b"x" * 12), lambda: h.ioctl(FIONREAD)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            await port.open()
        assert e.value.errno == errno.EIO
        port.revive()
        h2 = await port.open()
        assert len(opener.channels) == 2 and h2.poll() & select.POLLOUT
        with pytest.raises(OSError):
            h.read(10)  # the old opener stays dead, as after a device removal
        await h.close()
        assert not opener.current.closed  # the stale close does not close the new channel
        await h2.close()
        assert opener.current.closed
    run(body)


def test_channel_errors() -> None:
    async def body() -> None:
        opener = LoopbackOpener(silent)
        opener.fail = OSError(errno.EIO, "modem not running")
        port = MbimPort(opener)
        with pytest.raises(OSError) as e:
            await port.open()
        assert e.value.errno == errno.EIO and port.openers == 0
        opener.fail = None
        h = await port.open()
        opener.current.error = OSError(errno.ENOBUFS, "full")
        with pytest.raises(OSError) as e:
            h.write(b"x" * 12)
        assert e.value.errno == errno.ENOBUFS and port.gone is None  # transient
        opener.current.error = OSError(errno.EIO, "modem down")
        with pytest.raises(OSError) as e:
            h.write(b"x" * 12)
        assert e.value.errno == errno.EIO and port.gone is not None
        assert h.poll() & select.POLLHUP
    run(body)


def test_device_caps_through_the_real_mbim_function() -> None:
    async def body() -> None:
        fn = MbimFunction()
        opener = LoopbackOpener(fn.receive)
        port = MbimPort(opener)
        h = await port.open()
        h.write(encode_message(Open(1, 4096)))
        h.write(encode_message(Command(2, Service.BASIC_CONNECT.value,
                                       BasicConnect.DEVICE_CAPS, 0)))
        await settle()
        assert port.stats["rx"] == 2
        first = decode_message(h.read(4096))
        done = decode_message(h.read(4096))
        assert first.tid == 1
        assert isinstance(done, CommandDone) and done.tid == 2 and done.status == 0
        assert len(done.info) > 40
    run(body)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=50), st.integers(1, 60)), max_size=30))
def test_reads_never_merge_transfers(ops: list[bytes | int]) -> None:
    """Any interleaving of arrivals and reads of any size: each read is a slice of exactly one
    transfer, and the slices put back together give the transfers in order."""
    async def body() -> tuple[list[bytes], list[bytes]]:
        opener = LoopbackOpener(silent)
        port = MbimPort(opener)
        h = await port.open()
        sent: list[bytes] = []
        got: list[bytes] = []
        for op in ops:
            if isinstance(op, bytes):
                sent.append(op)
                opener.current.deliver(op)
                await settle()
            elif port.queued_bytes:
                got.append(h.read(op))
        return sent, got
    sent, got = run(body)
    joined = b"".join(got)
    assert b"".join(sent).startswith(joined)
    # Re-split the reads at transfer boundaries: no read may straddle two transfers.
    bounds = set()
    pos = 0
    for s in sent:
        pos += len(s)
        bounds.add(pos)
    pos = 0
    for chunk in got:
        start, pos = pos, pos + len(chunk)
        assert not any(start < b < pos for b in bounds), (start, pos, bounds)


def test_reopen_waits_for_the_previous_close() -> None:
    """A client closing and the next one opening at once (mbim-network chaining mbimcli runs):
    the new channel is opened only after the old one is closed, as the engine refuses a second
    open of channel 6 with EBUSY."""
    events: list[str] = []

    class SlowClose:
        def __init__(self) -> None:
            self.open = True

        def send(self, data: bytes) -> None:
            pass

        async def close(self) -> None:
            events.append("close start")
            await asyncio.sleep(0.05)
            self.open = False
            events.append("close end")

    channels: list[SlowClose] = []

    async def opener(on_receive: Callable[[bytes], None]) -> SlowClose:
        if any(c.open for c in channels):
            raise OSError(errno.EBUSY, "channel 6 already open")
        events.append("open")
        channels.append(SlowClose())
        return channels[-1]

    async def body() -> None:
        port = MbimPort(opener)
        h = await port.open()
        closing = asyncio.ensure_future(h.close())
        await asyncio.sleep(0)
        h2 = await port.open()
        await closing
        assert events == ["open", "close start", "close end", "open"]
        assert h2.poll() & select.POLLOUT
    run(body)
