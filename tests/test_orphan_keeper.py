"""The keeper that answers for the port after the daemon is SIGKILLed
(iosm_cuse/system/orphan.py, docs/modemmanager.md §6): the process against a fake kernel on a
SOCK_SEQPACKET socketpair, and the CUSE server's clean goodbye to it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import run

from iosm_cuse.chardev import cuse
from iosm_cuse.chardev.cuse import Op
from iosm_cuse.chardev.loopback import LoopbackOpener, answer_open
from iosm_cuse.chardev.port import MbimPort
from iosm_cuse.chardev.server import CuseServer
from iosm_cuse.system.orphan import OrphanPort, parse_reports, report

HUNG_UP = select.POLLHUP | select.POLLERR


def recv(sock: socket.socket, timeout: float = 20) -> cuse.Reply:
    sock.settimeout(timeout)
    return cuse.decode_reply(sock.recv(1 << 18))


def test_reports_and_goodbye_on_the_pipe() -> None:
    assert parse_reports(report(3, 1) + report(4, 2) + b"5 ") == (False, (4, 2), b"5 ")
    assert parse_reports(b"7 1\nbye\n") == (True, (7, 1), b"")
    assert parse_reports(b"junk\n1 x\n") == (False, None, b"")


def test_orphan_port_answers_as_hung_up() -> None:
    sent: list[bytes] = []
    port = OrphanPort(sent.append, opens_seen=2, open_files=1)
    port.wake_pollers()
    khs = [cuse.LAYOUTS["notify_poll_wakeup_out"].unpack(cuse.decode_reply(m).body)["kh"]
           for m in sent]
    assert khs[:2] == [1, 2] and khs == sorted(set(khs))
    sent.clear()
    port.handle(cuse.encode_request(Op.POLL, 10, {"fh": 1, "kh": 2}))
    port.handle(cuse.encode_request(Op.READ, 12, {"fh": 1, "size": 100}))
    port.handle(cuse.encode_request(Op.OPEN, 14, {"flags": os.O_RDWR}))
    port.handle(cuse.encode_request(Op.INTERRUPT, 17, {"unique": 8}))
    assert not port.done
    port.handle(cuse.encode_request(Op.RELEASE, 16, {"fh": 1}))
    got = [cuse.decode_reply(m) for m in sent]
    assert cuse.LAYOUTS["poll_out"].unpack(got[0].body)["revents"] == HUNG_UP
    assert [(g.unique, g.error) for g in got[1:]] == [
        (12, -errno.EIO), (14, -errno.ENODEV), (8, -errno.EIO), (16, 0)]
    assert port.done


Keeper = tuple[subprocess.Popen[bytes], socket.socket, int, socket.socket]


@pytest.fixture
def keeper() -> Iterator[Keeper]:
    """The keeper process on a fake connection; (process, the kernel's end, the daemon's end
    of the pipe, the daemon's own copy of the connection). Always reaped."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "iosm_cuse.system.orphan", "--cuse-fd",
                             str(ours.fileno()), "--pipe-fd", str(r)],
                            pass_fds=(ours.fileno(), r))
    os.close(r)
    try:
        yield proc, theirs, w, ours
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        theirs.close()
        ours.close()
        with contextlib.suppress(OSError):
            os.close(w)


def test_after_the_daemon_dies_the_keeper_hangs_up_and_lets_go(keeper: Keeper) -> None:
    proc, kernel, pipe, daemon_copy = keeper
    os.write(pipe, report(1, 1))
    daemon_copy.close()  # the daemon dies: its descriptors close, no goodbye
    os.close(pipe)
    note = recv(kernel)
    assert note.unique == 0 and note.error == cuse.FUSE_NOTIFY_POLL
    kernel.send(cuse.encode_request(Op.POLL, 20, {"fh": 1, "kh": 1}))
    while (r := recv(kernel)).unique == 0:  # the remaining wake-ups
        pass
    assert r.unique == 20 and cuse.LAYOUTS["poll_out"].unpack(r.body)["revents"] == HUNG_UP
    kernel.send(cuse.encode_request(Op.READ, 22, {"fh": 1, "size": 64}))
    assert recv(kernel) == cuse.Reply(22, -errno.EIO, b"")
    kernel.send(cuse.encode_request(Op.RELEASE, 24, {"fh": 1}))
    assert recv(kernel) == cuse.Reply(24, 0, b"")
    kernel.settimeout(20)
    assert kernel.recv(100) == b""  # the last opener gone: the connection (node) goes
    assert proc.wait(20) == 0


def test_goodbye_leaves_the_connection_alone(keeper: Keeper) -> None:
    proc, kernel, pipe, _daemon_copy = keeper
    os.write(pipe, report(1, 1) + b"bye\n")
    assert proc.wait(20) == 0
    kernel.setblocking(False)
    with pytest.raises(BlockingIOError):
        kernel.recv(100)  # nothing answered, nothing closed by the keeper


def test_server_says_goodbye_before_closing() -> None:
    async def body() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server = CuseServer(MbimPort(LoopbackOpener(answer_open)), fd=ours.detach())
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        starting = asyncio.ensure_future(server.start(timeout=5))
        await loop.sock_sendall(theirs, cuse.encode_request(
            Op.CUSE_INIT, 2, {"major": 7, "minor": 38, "flags": 1}))
        await loop.sock_recv(theirs, 1 << 16)
        await starting
        server.start_keeper()
        keeper = server._keeper
        assert keeper is not None
        await loop.sock_sendall(theirs, cuse.encode_request(Op.OPEN, 4, {"flags": 2}))
        assert cuse.decode_reply(await loop.sock_recv(theirs, 1 << 16)).error == 0
        await server.close()
        assert keeper.returncode == 0  # waited for: it let go first
        assert await loop.sock_recv(theirs, 100) == b""
        theirs.close()
    run(body())
