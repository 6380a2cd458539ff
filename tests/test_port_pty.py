"""The PTY fallback transport: stream framing (tier 1), the transport on a real PTY (tier 1),
and the real mbimcli against MbimFunction behind the port (tier 2)."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import until_async
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.chardev import start_transport
from iosm_cuse.chardev.loopback import LoopbackOpener, answer_open
from iosm_cuse.chardev.port import MbimPort
from iosm_cuse.chardev.pty import MbimFramer, PtyTransport
from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import BasicConnect
from iosm_cuse.mbim.constants import CommandType
from iosm_cuse.mbim.message import (
    Close,
    Command,
    CommandDone,
    IndicateStatus,
    Open,
    decode_message,
    encode_message,
)
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim import MbimFunction

MESSAGES = [encode_message(Open(1, 4096)), encode_message(Close(2)),
            answer_open(encode_message(Open(3, 4096)))[0]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(MESSAGES), max_size=8), st.lists(st.integers(1, 40)))
def test_framer_reassembles_any_chunking(msgs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(msgs)
    framer = MbimFramer()
    out: list[bytes] = []
    pos = 0
    for cut in cuts:
        out += framer.feed(stream[pos:pos + cut])
        pos += cut
    out += framer.feed(stream[pos:])
    assert out == msgs and framer.resyncs == 0


def test_framer_resynchronises_after_garbage(caplog: pytest.LogCaptureFixture) -> None:
    framer = MbimFramer()
    with caplog.at_level(logging.WARNING):
        out = framer.feed(b"\xff" * 13 + MESSAGES[0] + b"\x01\x00\x00\x00\xff\xff\xff\xff"
                          + MESSAGES[1])
    assert out == [MESSAGES[0], MESSAGES[1]]
    assert framer.resyncs == 2 and framer.discarded == 13 + 8
    assert "garbage" in caplog.text
    # Bounded: a header claiming more than the maximum is garbage, not a wait for 4 GiB.
    assert MbimFramer(max_message=100).feed(b"\x03\0\0\0" + (101).to_bytes(4, "little")) == []


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        buf += os.read(fd, n - len(buf))
    return buf


def test_pty_transport_round_trip(tmp_path: Path) -> None:
    link = tmp_path / "wwan0mbim0"

    async def body() -> None:
        opener = LoopbackOpener(answer_open)
        port = MbimPort(opener)
        t = await start_transport(port, transport="pty", link=link)
        assert isinstance(t, PtyTransport) and t.fallback and t.path == str(link)
        assert os.readlink(link).startswith("/dev/pts/")
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        loop = asyncio.get_running_loop()
        try:
            op = encode_message(Open(1, 1024))
            os.write(fd, op[:5])  # the stream splits a message; the framer rejoins it
            await asyncio.sleep(0.02)
            os.write(fd, op[5:])
            reply = await loop.run_in_executor(None, _read_exact, fd, 16)
            assert decode_message(reply).tid == 1 and port.negotiated == 1024
            # Claiming more than the negotiated size: garbage, skipped (a PTY cannot fail the
            # client's write), never a 2000-byte wait.
            big = encode_message(Close(9))[:4] + (2000).to_bytes(4, "little") + bytes(1992)
            os.write(fd, big)
            await until_async(lambda: t.framer.resyncs == 1, 5, "the oversized header skipped")
            assert t.dropped_writes == 0 and len(opener.current.sent) == 1
            # Indications arrive unasked, one write per message.
            opener.current.deliver(MESSAGES[2])
            got = await loop.run_in_executor(None, _read_exact, fd, len(MESSAGES[2]))
            assert got == MESSAGES[2]
        finally:
            os.close(fd)
            await t.close()
        assert not link.exists() and opener.current.closed
    asyncio.run(asyncio.wait_for(body(), 10))


def test_pty_transport_reopens_after_a_modem_restart(tmp_path: Path) -> None:
    """hangup() kills the transport's port handle; after revive() the client that kept the
    PTY open writes again and is answered, on the same PTY behind the same symlink."""
    link = tmp_path / "wwan0mbim0"

    async def body() -> None:
        opener = LoopbackOpener(answer_open)
        port = MbimPort(opener)
        t = PtyTransport(port, link)
        await t.start()
        slave = os.readlink(link)
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        loop = asyncio.get_running_loop()
        try:
            os.write(fd, encode_message(Open(1, 4096)))
            reply = await loop.run_in_executor(None, _read_exact, fd, 16)
            assert decode_message(reply).tid == 1
            port.hangup("modem crashed")
            os.write(fd, encode_message(Open(2, 4096)))  # modem gone: dropped
            await asyncio.sleep(0.05)
            assert t.dropped_writes == 1
            port.revive()
            os.write(fd, encode_message(Open(3, 4096)))
            reply = await loop.run_in_executor(None, _read_exact, fd, 16)
            assert decode_message(reply).tid == 3
            assert len(opener.channels) == 2 and not opener.current.closed
            assert os.readlink(link) == slave and port.openers == 1
        finally:
            os.close(fd)
            await t.close()
        assert not link.exists() and opener.current.closed and port.openers == 0
    asyncio.run(asyncio.wait_for(body(), 10))


# ------------------------------------------------------------------------------ tier 2


class PortThread:
    """An asyncio loop in a thread running MbimFunction -> MbimPort -> PtyTransport."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.loop = asyncio.new_event_loop()
        self.fn = MbimFunction()
        self.port = MbimPort(LoopbackOpener(self.fn.receive))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.transport = self._call(start_transport(self.port, transport="pty", link=link))

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self._call(self.transport.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def pty_port(tmp_path: Path) -> Iterator[PortThread]:
    if shutil.which("mbimcli") is None:
        pytest.skip("mbimcli (libmbim-utils) missing")
    pt = PortThread(tmp_path / "wwan0mbim0")
    try:
        yield pt
    finally:
        pt.close()


def mbimcli(link: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mbimcli", "-d", str(link), *args], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.host
def test_mbimcli_through_the_pty_transport(pty_port: PortThread) -> None:
    res = mbimcli(pty_port.link, "--query-device-caps")
    assert res.returncode == 0, res.stderr
    assert "Max sessions: '8'" in res.stdout
    res = mbimcli(pty_port.link, "--query-subscriber-ready-status", "--no-close")
    assert res.returncode == 0 and "Ready state: 'initialized'" in res.stdout, res.stderr
    tid = res.stdout.split("TRID: '")[1].split("'")[0]
    # A second process continues the same MBIM session, as mbim-network does.
    res = mbimcli(pty_port.link, f"--no-open={tid}", "--query-radio-state")
    assert res.returncode == 0 and "Software radio state: 'on'" in res.stdout, res.stderr
    assert pty_port.transport.framer.resyncs == 0


def test_pty_transport_backpressure_keeps_messages_whole(tmp_path: Path) -> None:
    """More DL data than the PTY buffers while nobody reads: the transport waits for room and
    every message arrives intact and in order."""
    link = tmp_path / "wwan0mbim0"
    msgs = [encode_message(Close(i))[:4] + (4000).to_bytes(4, "little")
            + i.to_bytes(4, "little") + bytes([i]) * 3988 for i in range(1, 61)]

    async def body() -> None:
        opener = LoopbackOpener(answer_open)
        port = MbimPort(opener)
        t = PtyTransport(port, link)
        await t.start()
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        loop = asyncio.get_running_loop()
        try:
            for m in msgs:
                opener.current.deliver(m)
            await asyncio.sleep(0.05)
            assert t._writing  # the PTY is full: the rest waits for POLLOUT
            got = await loop.run_in_executor(None, _read_exact, fd, 4000 * len(msgs))
            assert got == b"".join(msgs)
        finally:
            os.close(fd)
            await t.close()
    asyncio.run(asyncio.wait_for(body(), 20))


@pytest.mark.skipif(os.path.exists("/dev/cuse"), reason="this kernel has CUSE: no fallback")
def test_auto_falls_back_to_the_pty_and_says_so_once(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        port = MbimPort(LoopbackOpener(answer_open))
        with caplog.at_level(logging.INFO, logger="iosm_cuse"):
            t = await start_transport(port, transport="auto", link=tmp_path / "wwan0mbim0")
        try:
            assert isinstance(t, PtyTransport) and t.fallback and t.transport == "pty"
            assert t.reason is not None and "/dev/cuse" in t.reason
            said = [r for r in caplog.records if "no CUSE" in r.getMessage()]
            assert len(said) == 1 and said[0].levelno == logging.WARNING
            assert "pty fallback" in t.description
        finally:
            await t.close()
            await port.close()
        with pytest.raises(OSError):
            await start_transport(MbimPort(LoopbackOpener(answer_open)), transport="cuse")
    asyncio.run(asyncio.wait_for(body(), 20))


def test_chardev_main_delivers_indications(tmp_path: Path) -> None:
    """`python -m iosm_cuse.port_alone` (kernel tests, bench): an MBIM detach (the modem
    attached by itself when it registered) is answered and followed by the PACKET_SERVICE
    indication, which the function queues apart from answers."""
    link = tmp_path / "wwan0mbim0"
    proc = subprocess.Popen([sys.executable, "-m", "iosm_cuse.port_alone", "--transport", "pty",
                             "--link", str(link)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"ready {link} (pty)"), line + proc.stderr.read()  # type: ignore[union-attr]
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            framer = MbimFramer()
            got: list[object] = []

            def expect(n: int) -> None:
                while len(got) < n:
                    ready, _, _ = select.select([fd], [], [], 10)
                    assert ready, f"only {got} arrived"
                    got.extend(decode_message(m) for m in framer.feed(os.read(fd, 4096)))

            os.write(fd, encode_message(Open(1, 4096)))
            expect(1)
            info = infobuf.encode(cids.lookup(Service.BASIC_CONNECT, BasicConnect.PACKET_SERVICE)
                                  .request(CommandType.SET),
                                  {"PacketServiceAction": cids.PacketServiceAction.DETACH})
            os.write(fd, encode_message(Command(2, Service.BASIC_CONNECT.value,
                                                BasicConnect.PACKET_SERVICE, CommandType.SET,
                                                info)))
            expect(3)
            done, ind = got[1], got[2]
            assert isinstance(done, CommandDone) and done.tid == 2 and done.status == 0
            assert isinstance(ind, IndicateStatus) and ind.tid == 0
            assert ind.cid == BasicConnect.PACKET_SERVICE
        finally:
            os.close(fd)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
