"""The AT port (chardev.port.AtPort): the kernel WWAN AT port's byte-stream semantics on the
MBIM port's machinery, alone against in-memory channels and behind the PTY transport on real
file descriptors, answered by the model's AT interpreter (docs/at-ports.md)."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import struct
import termios
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from iosm_cuse.chardev import PtyTransport, start_transport
from iosm_cuse.chardev.loopback import LoopbackOpener
from iosm_cuse.chardev.port import (
    FIONREAD,
    IOCTL_WDM_MAX_COMMAND,
    TCGETS,
    TCSETS,
    TERMIOS_SIZE,
    TIOCMBIS,
    TIOCMGET,
    AtPort,
)
from iosm_cuse.sim.at import AtInterpreter
from iosm_cuse.sim.mbim import ModemState
from iosm_cuse.wire.channels import AT_CHANNELS, channel_config

T = TypeVar("T")
TD = channel_config(AT_CHANNELS[0]).ul_buf_size  # 2 KiB, as the kernel's channel table


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(fn(), 20))


def silent(_: bytes) -> list[bytes]:
    return []


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def modem_responder() -> Callable[[bytes], list[bytes]]:
    """The model's AT interpreter as the device behind the channel."""
    at = AtInterpreter(ModemState())

    def respond(data: bytes) -> list[bytes]:
        out = at.feed(data)
        return [out] if out else []

    return respond


def test_reads_return_what_is_queued_across_transfers() -> None:
    async def body() -> None:
        opener = LoopbackOpener(silent)
        port = AtPort(opener, td_size=TD)
        h = await port.open()
        with pytest.raises(BlockingIOError):
            h.read(10)
        assert h.poll() == select.POLLOUT | select.POLLWRNORM
        for piece in (b"\r\nOK", b"\r\n", b"\r\n+CSQ: 20,0\r\n"):
            opener.current.deliver(piece)
        await settle()
        assert h.ioctl(FIONREAD) == struct.pack("<i", 20)
        assert h.poll() & select.POLLIN
        assert h.read(5) == b"\r\nOK\r"  # across the first two transfers
        assert h.read(4096) == b"\n\r\n+CSQ: 20,0\r\n"  # the rest, all of it at once
        await h.close()
    run(body)


def test_writes_go_as_they_are_in_pieces_of_the_td_size() -> None:
    async def body() -> None:
        opener = LoopbackOpener(silent)
        port = AtPort(opener, td_size=TD)
        h = await port.open()
        assert h.write(b"A") == 1  # no framing: one byte is a write like any other
        big = bytes(range(256)) * 20  # 5120 bytes: 2048 + 2048 + 1024
        assert h.write(big) == len(big)
        sent = opener.current.sent
        assert sent[0] == b"A" and [len(s) for s in sent[1:]] == [TD, TD, len(big) - 2 * TD]
        assert b"".join(sent[1:]) == big
        assert port.stats["emsgsize"] == 0
        with pytest.raises(OSError) as exc:
            h.ioctl(IOCTL_WDM_MAX_COMMAND)  # a WDM ioctl is the MBIM port's, not AT's
        assert exc.value.errno == errno.ENOTTY
        await h.close()
    run(body)


def test_termios_and_modem_bits_are_kept_and_given_back() -> None:
    async def body() -> None:
        port = AtPort(LoopbackOpener(silent), td_size=TD)
        h = await port.open()
        assert port.ioctl_sizes(TCGETS) == (0, TERMIOS_SIZE)
        tio = h.ioctl(TCGETS)
        iflag, oflag, cflag, lflag = struct.unpack_from("<4I", tio)
        assert (iflag, oflag) == (0, 0)  # raw
        assert len(tio) == TERMIOS_SIZE and lflag == 0 and cflag & termios.CS8
        changed = struct.pack("<4I", 1, 2, cflag, 8) + tio[16:]
        assert h.ioctl(TCSETS, changed) == b""
        assert h.ioctl(TCGETS) == changed
        with pytest.raises(OSError) as exc:
            h.ioctl(TCSETS, b"short")
        assert exc.value.errno == errno.EFAULT
        h.ioctl(TIOCMBIS, struct.pack("<i", termios.TIOCM_DTR))
        assert h.ioctl(TIOCMGET) == struct.pack("<i", termios.TIOCM_DTR)
        await h.close()
    run(body)


def test_hangup_fails_handles_and_a_new_open_after_revive_works() -> None:
    async def body() -> None:
        opener = LoopbackOpener(modem_responder())
        port = AtPort(opener, td_size=TD)
        h = await port.open()
        port.hangup("modem crashed", quiet=True)
        assert h.poll() == select.POLLHUP | select.POLLERR
        for op in (lambda: h.read(10), lambda: h.write(b"AT\r")):
            with pytest.raises(OSError) as exc:
                op()
            assert exc.value.errno == errno.EIO
        with pytest.raises(OSError):
            await port.open()
        port.revive()
        h2 = await port.open()
        h2.write(b"AT\r")
        await settle()
        assert h2.read(100) == b"AT\r\r\nOK\r\n"
        await h.close()
        await h2.close()
    run(body)


def read_until(fd: int, end: bytes, timeout: float = 5.0) -> bytes:
    got = b""
    while not got.endswith(end):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no more after {got!r}"
        got += os.read(fd, 4096)
    return got


def test_ati_through_the_pty_fallback_on_real_fds(tmp_path: Path) -> None:
    """A client opens the symlink, writes ATI in two pieces and reads the answer: the PTY
    carries the bytes unframed both ways."""
    async def body() -> None:
        opener = LoopbackOpener(modem_responder())
        port = AtPort(opener, td_size=TD)
        link = tmp_path / "wwan0at0"
        transport = await start_transport(port, transport="pty", link=link)
        assert isinstance(transport, PtyTransport) and transport.fallback
        try:
            fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                os.write(fd, b"AT")
                await asyncio.sleep(0.05)
                os.write(fd, b"I\r")
                answer = await asyncio.to_thread(read_until, fd, b"OK\r\n")
                assert answer == (b"ATI\r\r\nIntel\r\n\r\nXMM7560 (simulated)\r\n\r\n"
                                  b"Revision: iosm-sim 0.1.0\r\n\r\nOK\r\n")
                # The transfers of the channel are not message boundaries here either.
                assert b"".join(opener.current.sent) == b"ATI\r"
                os.write(fd, b"ATE0\rAT+CGSN;+CSQ\r")
                answer = await asyncio.to_thread(read_until, fd, b"+CSQ: 20,0\r\n\r\nOK\r\n")
                assert b"356938035643809" in answer
                assert transport.stream_status()["held"] == 0
            finally:
                os.close(fd)
        finally:
            await transport.close()
        assert not link.exists()
    run(body)
