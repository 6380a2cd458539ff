"""One PTY client must not wedge the next (issue 14, point 1).

A byte stream has no write boundaries, so a client that writes a plausible header claiming a
long message and then stays silent used to hold the framer forever: every later client's bytes
became the "rest" of that message. The framer now bounds a message by the negotiated
MaxControlTransfer, drops one not whole within its stall timeout, and lets an OPEN at a read
boundary cut an unfinished message short (docs/mbim-port.md §6).

Tier 1: the sans-IO framer with injected times, and the transport on a real PTY. Tier 2: the
real daemon (`iosm-cuse up --transport pty`) and the real mbimcli after a hostile client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from pathlib import Path

import pytest
from daemon_up import Up
from helpers import until, until_async
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.chardev.loopback import LoopbackOpener, answer_open
from iosm_cuse.chardev.port import MbimPort
from iosm_cuse.chardev.pty import STALL_TIMEOUT, MbimFramer, PtyTransport, pty_rejects
from iosm_cuse.mbim.cids import BasicConnect
from iosm_cuse.mbim.constants import CommandType, MessageType
from iosm_cuse.mbim.message import Close, Command, Open, decode_message, encode_message
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.wire.rejects import Rejects

OPEN = encode_message(Open(1, 4096))
CAPS = encode_message(Command(2, Service.BASIC_CONNECT.value, BasicConnect.DEVICE_CAPS,
                              CommandType.QUERY))
CLOSE = encode_message(Close(3))
# What the hostile client writes: a COMMAND header and fragment header claiming 4000 bytes (under
# any negotiated limit libmbim uses, so not garbage by size), then nothing more.
LONG_HEADER = struct.pack("<IIIII", MessageType.COMMAND, 4000, 7, 1, 0)


class FakeClock:
    """Rejects' clock, so rate limiting is tested without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def framer(limit: int = 4096, timeout: float = 1.0) -> MbimFramer:
    return MbimFramer(limit, stall_timeout=timeout)


def drain(f: MbimFramer) -> list[bytes]:
    out: list[bytes] = []
    while (msg := f.pop()) is not None:
        out.append(msg)
    return out


# ------------------------------------------------------------------------ tier 1: the framer


def test_a_header_claiming_more_than_the_limit_is_garbage() -> None:
    f = framer(limit=1024)
    too_long = struct.pack("<III", MessageType.COMMAND, 1025, 5)
    assert f.feed(too_long + OPEN) == [OPEN]
    assert f.resyncs == 1 and f.discarded == len(too_long) and f.pending == 0


def test_the_limit_is_read_per_message_so_an_open_changes_what_follows() -> None:
    """The transport ties the limit to the port, whose negotiated size an OPEN sets: messages
    popped after that OPEN is handed on are bounded by it."""
    limit = [4096]
    f = MbimFramer(lambda: limit[0])
    small_open = encode_message(Open(1, 64))
    f.push(small_open + CLOSE + struct.pack("<III", MessageType.CLOSE, 100, 4) + bytes(88), 0.0)
    assert f.pop() == small_open
    limit[0] = 64  # what MbimPort.negotiated now says
    assert f.pop() == CLOSE
    assert f.pop() is None  # 100 > 64: garbage
    assert f.resyncs >= 1


def test_an_unfinished_message_is_dropped_at_its_deadline_with_one_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rej = Rejects(logging.getLogger("test.pty"), what="MBIM over PTY", clock=clock)
    f = MbimFramer(4096, rej, stall_timeout=1.0)
    caplog.set_level(logging.WARNING, logger="test.pty")
    for round_ in range(5):
        t0 = 10.0 * round_
        assert f.feed(LONG_HEADER, t0) == [] and f.pending == len(LONG_HEADER)
        assert f.deadline == t0 + 1.0
        assert f.expire(t0 + 0.999) == 0 and f.pending == len(LONG_HEADER)
        assert f.expire(t0 + 1.0) == len(LONG_HEADER)
        assert f.pending == 0 and f.deadline is None
        assert f.feed(OPEN, t0 + 2) == [OPEN]  # the next client is served
    assert rej["stalled"] == 5 and f.discarded == 5 * len(LONG_HEADER)
    said = [r.getMessage() for r in caplog.records if "incomplete" in r.getMessage()]
    assert len(said) == 1  # rate-limited: one line, the count says the rest


def test_the_deadline_runs_from_the_first_byte_not_the_last() -> None:
    """A client dripping a byte at a time cannot hold the port past one timeout."""
    f = framer()
    f.push(LONG_HEADER, 0.0)
    for i in range(1, 10):
        f.push(b"\0", i * 0.1)
        assert drain(f) == [] and f.deadline == 1.0
    assert f.expire(1.0) > 0


def test_a_stall_keeps_what_a_later_read_brought() -> None:
    """A client continuing a session without OPEN (`mbimcli --no-open`) writes its COMMAND
    after the silent one: that read is framed afresh once the stale bytes are dropped."""
    f = framer()
    f.push(LONG_HEADER, 0.0)
    f.push(CAPS, 0.4)
    assert drain(f) == []  # inside the long message's span, and not an OPEN
    assert f.expire(1.0) == len(LONG_HEADER)
    assert drain(f) == [CAPS]
    assert f.rejects["stalled"] == 1 and f.deadline is None


def test_an_open_at_a_read_boundary_cuts_an_unfinished_message_short() -> None:
    f = framer()
    assert f.feed(LONG_HEADER + b"junk", 0.0) == []
    assert f.feed(OPEN, 0.1) == [OPEN]
    assert f.feed(CAPS, 0.2) == [CAPS]
    assert f.rejects["cut_by_open"] == 1 and f.discarded == len(LONG_HEADER) + 4
    assert f.rejects["stalled"] == 0


def test_open_bytes_inside_one_read_are_payload_not_a_new_client() -> None:
    """Only a read boundary can be a client's first write: an OPEN-shaped run of bytes in the
    information buffer of a message that arrived whole is its payload."""
    payload = encode_message(Open(9, 4096)) * 3
    cmd = encode_message(Command(4, Service.BASIC_CONNECT.value, BasicConnect.PIN,
                                 CommandType.SET, payload))
    f = framer()
    assert f.feed(cmd, 0.0) == [cmd]
    # Split at a boundary that is not an OPEN: still whole.
    assert f.feed(cmd[:30], 0.0) == [] and f.feed(cmd[30:], 0.0) == [cmd]
    assert f.rejects.total == 0


def test_an_open_with_a_max_transfer_below_64_does_not_cut() -> None:
    f = framer()
    f.push(LONG_HEADER, 0.0)
    f.push(encode_message(Open(1, 63)), 0.1)
    assert drain(f) == [] and f.rejects["cut_by_open"] == 0


def test_the_default_stall_timeout_sits_between_a_write_and_libmbims_retries() -> None:
    # docs/mbim-port.md §2, §6: libmbim re-sends OPEN every 5 s and waits 10 s for a command.
    assert 0.1 <= STALL_TIMEOUT <= 2.5
    with pytest.raises(ValueError):
        MbimFramer(stall_timeout=0)


def run_like_the_transport(f: MbimFramer, reads: list[tuple[float, bytes]]) -> list[bytes]:
    """What PtyTransport does: at each read's time, expire what stalled first, then frame."""
    out: list[bytes] = []
    for now, data in reads:
        while (deadline := f.deadline) is not None and deadline <= now:
            f.expire(now)
            out += drain(f)
        out += f.feed(data, now)
    return out


PLAUSIBLE_HEADER = st.tuples(st.sampled_from(list(MessageType)), st.integers(0, 70000),
                             st.binary(max_size=12))


@settings(max_examples=400, deadline=None)
@given(garbage=st.lists(st.tuples(st.floats(0, 3), st.binary(max_size=300),
                                  st.none() | PLAUSIBLE_HEADER), max_size=6),
       gap=st.floats(0, 3), tid=st.integers(1, 2**32 - 2), mct=st.integers(64, 2**32 - 1),
       info=st.binary(max_size=512))
def test_after_any_garbage_an_open_and_a_command_come_out_intact(
        garbage: list[tuple[float, bytes, tuple[MessageType, int, bytes] | None]], gap: float,
        tid: int, mct: int, info: bytes) -> None:
    """Whatever a previous client left (random bytes, plausible headers claiming any length,
    over any time), a new client's OPEN and then a COMMAND, each written whole, come out
    whole and in order."""
    reads: list[tuple[float, bytes]] = []
    now = 0.0
    for dt, data, header in garbage:
        now += dt
        if header is not None:
            mtype, length, rest = header
            data += struct.pack("<II", mtype, length) + rest
        if data:
            reads.append((now, data))
    opened = encode_message(Open(tid, mct))
    command = encode_message(Command(tid + 1, Service.BASIC_CONNECT.value,
                                     BasicConnect.PIN, CommandType.SET, info))
    reads += [(now + gap, opened), (now + gap, command)]
    out = run_like_the_transport(framer(), reads)
    assert out[-2:] == [opened, command]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 200), max_size=20))
def test_whatever_the_stream_the_framer_holds_at_most_one_message(data: bytes,
                                                                 cuts: list[int]) -> None:
    """Bounded memory whatever arrives: never more than the limit is held."""
    f = framer(limit=256)
    pos, now = 0, 0.0
    for cut in [*cuts, len(data)]:
        for msg in f.feed(data[pos:pos + cut], now):
            assert len(msg) <= 256
        assert f.pending <= 256 + 200
        pos += cut
        now += 0.3
    assert f.expire(now + 10) >= 0 and f.pending <= 200


# ---------------------------------------------------------- tier 1: the transport on a PTY


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        buf += os.read(fd, n - len(buf))
    return buf


@pytest.mark.parametrize("stall_timeout", [0.2, 60.0])
def test_the_transport_serves_a_client_after_a_silent_one(tmp_path: Path,
                                                          stall_timeout: float) -> None:
    """A long stall timeout: the new client's OPEN cuts the silent one's message short. A short
    one: the transport's timer drops it even before a new client comes."""
    link = tmp_path / "wwan0mbim0"

    async def body() -> None:
        port = MbimPort(LoopbackOpener(answer_open))
        t = PtyTransport(port, link, stall_timeout=stall_timeout)
        await t.start()
        hostile = os.open(link, os.O_RDWR | os.O_NOCTTY)
        loop = asyncio.get_running_loop()
        try:
            os.write(hostile, LONG_HEADER)
            await until_async(lambda: t.framer.pending == len(LONG_HEADER) or t.rejects.total,
                              5, lambda: t.stream_status())
            if stall_timeout < 1:
                await until_async(lambda: t.stream_status()["stalled"] == 1, 5,
                                  lambda: t.stream_status())
                assert t.framer.pending == 0 and t._stall_timer is None
            client = os.open(link, os.O_RDWR | os.O_NOCTTY)
            try:
                os.write(client, OPEN)
                reply = await loop.run_in_executor(None, _read_exact, client, 16)
                assert decode_message(reply).tid == 1
            finally:
                os.close(client)
            st = t.stream_status()
            assert st["held"] == 0
            assert (st["stalled"], st["cut_by_open"]) == ((1, 0) if stall_timeout < 1
                                                          else (0, 1))
        finally:
            os.close(hostile)
            await t.close()
            await port.close()
    asyncio.run(asyncio.wait_for(body(), 20))


def test_pty_rejects_kinds_exist_before_the_first_event() -> None:
    assert pty_rejects().as_dict() == {"resyncs": 0, "stalled": 0, "cut_by_open": 0,
                                       "dropped_writes": 0}


# ------------------------------------------------------ tier 2: the daemon and real mbimcli


def _stream(up: Up) -> dict[str, int]:
    st: dict[str, int] = up.status()["port"]["stream"]
    return st


def _silent_client(up: Up) -> int:
    """Open the port, write the long header, keep the fd open (the caller closes it), and wait
    until the daemon's framer holds those bytes: the next client meets a stuck message."""
    fd = os.open(up.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    os.write(fd, LONG_HEADER)
    until(lambda: _stream(up)["held"] == len(LONG_HEADER) or _stream(up)["stalled"], 10,
          lambda: f"the daemon never held the header: {_stream(up)}")
    return fd


@pytest.mark.host
def test_mbimcli_is_served_after_a_client_that_wrote_a_long_header_and_went_quiet(
        up: Up) -> None:
    """Fails before issue 14: the header held the framer, mbimcli's OPENs became its body, and
    mbimcli timed out (as would every client after it until a restart)."""
    fd = _silent_client(up)
    try:
        res = up.mbimcli("--query-device-caps")
        assert res.returncode == 0, res.stderr
        assert "Max sessions: '8'" in res.stdout
        st = _stream(up)
        assert st["cut_by_open"] + st["stalled"] >= 1 and st["held"] == 0, st
    finally:
        os.close(fd)


@pytest.mark.host
def test_a_session_continued_without_open_is_served_after_a_silent_client(up: Up) -> None:
    """`mbimcli --no-open` (as mbim-network continues a session) writes no OPEN: the stall
    timeout alone frees the port."""
    res = up.mbimcli("--query-subscriber-ready-status", "--no-close")
    assert res.returncode == 0, res.stderr
    tid = res.stdout.split("TRID: '")[1].split("'")[0]
    fd = _silent_client(up)
    try:
        res = up.mbimcli(f"--no-open={tid}", "--query-radio-state", "--no-close")
        assert res.returncode == 0 and "Software radio state: 'on'" in res.stdout, res.stderr
        st = _stream(up)
        assert st["stalled"] >= 1 and st["cut_by_open"] == 0 and st["held"] == 0, st
    finally:
        os.close(fd)
