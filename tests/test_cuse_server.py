"""The CUSE server against a fake kernel on a SOCK_SEQPACKET socketpair (one request per
read, one reply per write, like /dev/cuse), with an in-memory MBIM device behind the port."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from helpers import until_async

from iosm_cuse.chardev import cuse
from iosm_cuse.chardev.cuse import Op
from iosm_cuse.chardev.loopback import LoopbackOpener, Responder, answer_open
from iosm_cuse.chardev.port import (
    FIONREAD,
    IOCTL_WDM_MAX_COMMAND,
    TCGETS,
    TCSETS,
    TERMIOS_SIZE,
    AtPort,
    MbimPort,
)
from iosm_cuse.chardev.server import CuseServer
from iosm_cuse.mbim.cids import BasicConnect
from iosm_cuse.mbim.message import Command, CommandDone, Open, decode_message, encode_message
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim import MbimFunction

POLL_OUT = select.POLLOUT | select.POLLWRNORM
POLL_IN = select.POLLIN | select.POLLRDNORM
MBIM_OPEN = encode_message(Open(1, 4096))


class FakeKernel:
    """The kernel's end of /dev/cuse: numbered requests out, replies in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.next_unique = 2  # ordinary ids are even and step by 2

    async def send(self, opcode: int, body: dict[str, int] | None = None, data: bytes = b"",
                   unique: int | None = None, pid: int = 0) -> int:
        if unique is None:
            unique, self.next_unique = self.next_unique, self.next_unique + 2
        await self.send_raw(cuse.encode_request(opcode, unique, body, data, pid=pid))
        return unique

    async def send_raw(self, raw: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, raw)

    async def recv(self, timeout: float = 2.0) -> cuse.Reply:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 18), timeout)
        return cuse.decode_reply(data)

    async def silent(self, wait: float = 0.05) -> None:
        try:
            got = await self.recv(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected reply {got}")

    async def call(self, opcode: int, body: dict[str, int] | None = None,
                   data: bytes = b"", pid: int = 0) -> cuse.Reply:
        unique = await self.send(opcode, body, data, pid=pid)
        r = await self.recv()
        assert r.unique == unique, (r, unique)
        return r

    async def open(self, flags: int = os.O_RDWR, pid: int = 0) -> int:
        r = await self.call(Op.OPEN, {"flags": flags}, pid=pid)
        assert r.error == 0, r
        out = cuse.LAYOUTS["open_out"].unpack(r.body)
        assert out["open_flags"] == cuse.FOPEN_DIRECT_IO | cuse.FOPEN_NONSEEKABLE
        return out["fh"]

    async def write(self, fh: int, data: bytes) -> cuse.Reply:
        return await self.call(Op.WRITE, {"fh": fh, "size": len(data)}, data)

    async def read(self, fh: int, size: int = 4096, flags: int = 0) -> int:
        return await self.send(Op.READ, {"fh": fh, "size": size, "flags": flags})


@dataclass
class Rig:
    kernel: FakeKernel
    server: CuseServer
    port: MbimPort
    opener: LoopbackOpener
    init: cuse.Reply


@asynccontextmanager
async def rig(responder: Responder = answer_open,
              make_port: Callable[[LoopbackOpener], MbimPort] = MbimPort) -> AsyncIterator[Rig]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    opener = LoopbackOpener(responder)
    port = make_port(opener)
    server = CuseServer(port, fd=ours.detach())
    kernel = FakeKernel(theirs)
    starting = asyncio.ensure_future(server.start(timeout=5))
    await kernel.send(Op.CUSE_INIT, {"major": 7, "minor": 38,
                                     "flags": cuse.CUSE_UNRESTRICTED_IOCTL})
    init = await kernel.recv()
    await starting
    try:
        yield Rig(kernel, server, port, opener, init)
    finally:
        await server.close()
        theirs.close()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 20))  # type: ignore[arg-type]


def test_cuse_init_reply() -> None:
    async def body() -> None:
        async with rig() as r:
            assert r.init.error == 0
            out = cuse.LAYOUTS["cuse_init_out"].unpack(r.init.body)
            assert (out["major"], out["minor"]) == (7, 31)
            assert out["flags"] == cuse.CUSE_UNRESTRICTED_IOCTL
            assert out["max_read"] == out["max_write"] == 131072
            assert r.init.body[72:] == b"DEVNAME=wwan0mbim0\0"
            assert r.server.bufsize >= max(8192, 80 + out["max_write"])
    run(body)


def test_open_write_read_flush_fsync_release() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open(os.O_RDWR | os.O_NONBLOCK)
            w = await k.write(fh, MBIM_OPEN)
            assert w.error == 0 and cuse.LAYOUTS["write_out"].unpack(w.body)["size"] == 16
            u = await k.read(fh)
            got = await k.recv()
            assert got.unique == u and decode_message(got.body).tid == 1  # OPEN_DONE
            assert (await k.call(Op.FLUSH, {"fh": fh})).error == 0
            assert (await k.call(Op.FSYNC, {"fh": fh})).error == 0
            assert (await k.call(Op.RELEASE, {"fh": fh})).error == 0
            await asyncio.sleep(0.01)
            assert r.opener.current.closed  # last close closes the channel
            # The released fh is gone.
            assert (await k.call(Op.FLUSH, {"fh": fh})).error == 0  # flush needs no file
            assert (await k.call(Op.WRITE, {"fh": fh, "size": 1}, b"x")).error == -errno.EBADF
    run(body)


def test_parked_reads_answered_out_of_order_and_interrupt() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh1, fh2 = await k.open(), await k.open()
            u1 = await k.read(fh1)
            u2 = await k.read(fh2)
            await k.silent()  # both parked
            w = await k.send(Op.WRITE, {"fh": fh1, "size": 16}, MBIM_OPEN)
            first, second = await k.recv(), await k.recv()
            # The later WRITE is answered before the earlier READ, which gets the OPEN_DONE.
            assert first.unique == w and first.error == 0
            assert second.unique == u1 and len(second.body) == 16
            await k.silent()  # u2 still parked
            await k.send(Op.INTERRUPT, {"unique": u2}, unique=u2 | 1)
            got = await k.recv()
            assert got.unique == u2 and got.error == -errno.EINTR
            # An interrupt for a request already answered: EAGAIN on the interrupt's own id.
            await k.send(Op.INTERRUPT, {"unique": w}, unique=w | 1)
            got = await k.recv()
            assert got.unique == w | 1 and got.error == -errno.EAGAIN
    run(body)


def test_nonblocking_read_gets_eagain() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open(os.O_RDWR | os.O_NONBLOCK)
            u = await k.read(fh, flags=os.O_RDWR | os.O_NONBLOCK)
            got = await k.recv()
            assert got.unique == u and got.error == -errno.EAGAIN
            # O_NONBLOCK cleared later (fcntl): read_in.flags is the current f_flags -> parks.
            await k.read(fh, flags=os.O_RDWR)
            await k.silent()
    run(body)


def test_short_reads_keep_the_remainder() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open()
            await k.write(fh, MBIM_OPEN)
            await asyncio.sleep(0.01)
            r.opener.current.deliver(bytes(range(100)))
            await asyncio.sleep(0.01)
            parts = []
            for size in (5, 20, 4096, 4096):
                await k.read(fh, size, flags=os.O_NONBLOCK)
                parts.append(await k.recv())
            assert [p.body for p in parts[:3]] == [
                encode_message_open_done()[:5], encode_message_open_done()[5:], bytes(range(100))]
            assert parts[3].error == -errno.EAGAIN
    run(body)


def encode_message_open_done() -> bytes:
    return answer_open(MBIM_OPEN)[0]


def test_poll_and_notify_on_arrival() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open()
            events = select.POLLIN | select.POLLOUT
            p = await k.call(Op.POLL, {"fh": fh, "kh": 0xABC, "events": events,
                                       "flags": cuse.FUSE_POLL_SCHEDULE_NOTIFY})
            assert cuse.LAYOUTS["poll_out"].unpack(p.body)["revents"] == POLL_OUT
            await k.silent()
            await k.write(fh, MBIM_OPEN)
            note = await k.recv()
            assert note.unique == 0 and note.error == cuse.FUSE_NOTIFY_POLL
            assert cuse.LAYOUTS["notify_poll_wakeup_out"].unpack(note.body)["kh"] == 0xABC
            p = await k.call(Op.POLL, {"fh": fh, "kh": 0xABC, "events": events})
            assert cuse.LAYOUTS["poll_out"].unpack(p.body)["revents"] == POLL_OUT | POLL_IN
            r.opener.current.deliver(b"more" * 4)  # not re-armed: no notification
            await k.silent()
    run(body)


def test_ioctls() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open()
            r.opener.current.deliver(b"z" * 33)
            await asyncio.sleep(0.01)
            un = cuse.FUSE_IOCTL_UNRESTRICTED
            # Unrestricted FIONREAD: first round asks for the client's buffer, second answers.
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": FIONREAD, "arg": 0x7000, "flags": un})
            out = cuse.LAYOUTS["ioctl_out"].unpack(rep.body)
            assert out["flags"] == cuse.FUSE_IOCTL_RETRY and out["out_iovs"] == 1
            assert cuse.LAYOUTS["ioctl_iovec"].unpack(rep.body, 16) == {"base": 0x7000, "len": 4}
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": FIONREAD, "arg": 0x7000, "flags": un,
                                          "out_size": 4})
            assert rep.error == 0 and rep.body[16:] == struct.pack("<i", 33)
            # WDM the way the kernel sizes it in restricted mode (_IOR: 2 bytes out).
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": IOCTL_WDM_MAX_COMMAND, "out_size": 2})
            assert cuse.LAYOUTS["ioctl_out"].unpack(rep.body)["result"] == 0
            assert rep.body[16:] == struct.pack("<H", 4096)
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": 0x5401, "flags": un})
            assert rep.error == -errno.ENOTTY
    run(body)


def test_at_port_termios_ioctls_copy_in_and_out_and_bytes_stream() -> None:
    """An AT port (docs/at-ports.md §2) behind the same server: TCSETS asks the kernel to copy
    the client's termios in (an in iovec), TCGETS to copy it out; reads and writes are a byte
    stream."""
    async def body() -> None:
        async with rig(silent, lambda o: AtPort(o, td_size=2048)) as r:
            k, un = r.kernel, cuse.FUSE_IOCTL_UNRESTRICTED
            fh = await k.open()
            iov = cuse.LAYOUTS["ioctl_iovec"]
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": TCSETS, "arg": 0x7100, "flags": un})
            out = cuse.LAYOUTS["ioctl_out"].unpack(rep.body)
            assert out["flags"] == cuse.FUSE_IOCTL_RETRY
            assert (out["in_iovs"], out["out_iovs"]) == (1, 0)
            assert iov.unpack(rep.body, 16) == {"base": 0x7100, "len": TERMIOS_SIZE}
            tio = bytes(range(TERMIOS_SIZE))
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": TCSETS, "arg": 0x7100, "flags": un,
                                          "in_size": TERMIOS_SIZE}, tio)
            assert rep.error == 0 and rep.body[16:] == b""
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": TCGETS, "arg": 0x7200, "flags": un})
            out = cuse.LAYOUTS["ioctl_out"].unpack(rep.body)
            assert (out["in_iovs"], out["out_iovs"]) == (0, 1)
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": TCGETS, "arg": 0x7200, "flags": un,
                                          "out_size": TERMIOS_SIZE})
            assert rep.error == 0 and rep.body[16:] == tio
            rep = await k.call(Op.IOCTL, {"fh": fh, "cmd": IOCTL_WDM_MAX_COMMAND, "out_size": 2})
            assert rep.error == -errno.ENOTTY
            # 5000 bytes in one write: accepted whole, sent in TD-sized pieces
            assert cuse.LAYOUTS["write_out"].unpack((await k.write(fh, b"x" * 5000)).body)[
                "size"] == 5000
            assert [len(t) for t in r.opener.current.sent] == [2048, 2048, 904]
            r.opener.current.deliver(b"\r\nOK")
            r.opener.current.deliver(b"\r\n")
            await asyncio.sleep(0.01)
            unique = await k.read(fh, 100)
            rep = await k.recv()
            assert rep.unique == unique and rep.body == b"\r\nOK\r\n"  # both transfers
    run(body)


def silent(_: bytes) -> list[bytes]:
    return []


def test_emsgsize_before_and_after_open() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open()
            assert (await k.write(fh, b"\0" * 4097)).error == -errno.EMSGSIZE
            assert (await k.write(fh, encode_message(Open(1, 512)))).error == 0
            assert (await k.write(fh, b"\0" * 513)).error == -errno.EMSGSIZE
            assert (await k.write(fh, b"\0" * 512)).error == 0
            assert [len(m) for m in r.opener.current.sent] == [16, 512]  # refused: not sent
    run(body)


def test_malformed_requests_do_not_stop_the_server() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            await k.send_raw(b"\x07" * 10)  # shorter than a header: no unique to answer
            await k.silent()
            raw = bytearray(cuse.encode_request(Op.FLUSH, 100, {"fh": 1}))
            raw[0] += 4  # header length disagrees with the read
            await k.send_raw(bytes(raw))
            assert await k.recv() == cuse.Reply(100, -errno.EINVAL, b"")
            await k.send_raw(cuse.IN_HEADER.pack(len=40, opcode=999, unique=102))
            assert await k.recv() == cuse.Reply(102, -errno.ENOSYS, b"")
            bad_write = cuse.encode_request(Op.WRITE, 104, {"fh": 1, "size": 50}, b"short")
            await k.send_raw(bad_write)
            assert await k.recv() == cuse.Reply(104, -errno.EINVAL, b"")
            truncated = cuse.encode_request(Op.POLL, 106, {"fh": 1})[:50]
            await k.send_raw(cuse.IN_HEADER.pack(len=50, opcode=Op.POLL, unique=106)
                             + truncated[40:])
            assert await k.recv() == cuse.Reply(106, -errno.EINVAL, b"")
            assert (await k.call(Op.READ, {"fh": 77, "size": 10})).error == -errno.EBADF
            fh = await k.open()  # still serving
            assert (await k.write(fh, MBIM_OPEN)).error == 0
            assert r.server.session.stats.rejected == 5
    run(body)


def test_shutdown_answers_parked_reads_and_closes() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open()
            u = await k.read(fh)
            await k.silent()
            await r.server.close()
            got = await k.recv()
            assert got.unique == u and got.error == -errno.EIO
            data = await asyncio.get_running_loop().sock_recv(k.sock, 100)
            assert data == b""  # fd closed: the device goes away with it
            assert r.opener.current.closed
    run(body)


def test_destroy_and_modem_gone() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open()
            await k.call(Op.POLL, {"fh": fh, "kh": 7, "flags": cuse.FUSE_POLL_SCHEDULE_NOTIFY})
            u = await k.read(fh)
            r.port.hangup("engine down")
            got = [await k.recv(), await k.recv()]
            assert cuse.Reply(u, -errno.EIO, b"") in got
            assert any(g.unique == 0 and g.error == cuse.FUSE_NOTIFY_POLL for g in got)
            p = await k.call(Op.POLL, {"fh": fh, "kh": 7})
            assert cuse.LAYOUTS["poll_out"].unpack(p.body)["revents"] == (
                select.POLLHUP | select.POLLERR)
            assert (await k.call(Op.OPEN, {"flags": os.O_RDWR})).error == -errno.EIO
            assert (await k.call(Op.DESTROY)).error == 0
            assert (await k.call(Op.FLUSH, {"fh": fh})).error == -errno.ENODEV
    run(body)


def test_device_caps_with_the_real_mbim_function() -> None:
    async def body() -> None:
        async with rig(MbimFunction().receive) as r:
            k = r.kernel
            fh = await k.open()
            await k.write(fh, MBIM_OPEN)
            await k.read(fh)
            assert decode_message((await k.recv()).body).tid == 1
            query = encode_message(Command(2, Service.BASIC_CONNECT.value,
                                           BasicConnect.DEVICE_CAPS, 0))
            await k.write(fh, query)
            await k.read(fh)
            done = decode_message((await k.recv()).body)
            assert isinstance(done, CommandDone) and done.tid == 2 and done.status == 0
    run(body)


def test_start_fails_cleanly_when_the_kernel_goes_away() -> None:
    async def body() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        port = MbimPort(LoopbackOpener(answer_open))
        server = CuseServer(port, fd=ours.detach())
        theirs.close()  # like the kernel aborting the connection before CUSE_INIT
        try:
            await server.start(timeout=5)
        except OSError as exc:
            assert exc.errno == errno.ENODEV
        else:
            raise AssertionError("start() succeeded without CUSE_INIT")
        assert server.fd == -1 and port._listeners == []
    run(body)


def test_opener_pids_from_the_open_requests() -> None:
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh1 = await k.open(pid=4321)
            fh2 = await k.open(pid=1234)
            await k.open(pid=4321)  # a second open by the same process
            assert r.server.opener_pids() == [1234, 4321]
            assert (await k.call(Op.RELEASE, {"fh": fh2})).error == 0
            assert r.server.opener_pids() == [4321]
            assert (await k.call(Op.RELEASE, {"fh": fh1})).error == 0
            assert r.server.opener_pids() == [4321]
    run(body)


def test_a_dead_connection_is_reported_once() -> None:
    async def body() -> None:
        async with rig() as r:
            told: list[str] = []
            r.server.on_dead = told.append
            fh = await r.kernel.open()
            u = await r.kernel.read(fh)
            await r.kernel.silent()
            r.kernel.sock.close()  # the connection goes away under the server
            await until_async(lambda: bool(told), 2, "death not reported", poll=0.01)
            assert len(told) == 1 and "/dev/cuse" in told[0], told
            assert r.server.session.closed and u not in r.server.session.parked
        assert len(told) == 1  # close() after death: no second report
        # A server closed on purpose reports nothing.
        async with rig() as r2:
            quiet: list[str] = []
            r2.server.on_dead = quiet.append
        assert quiet == []
    run(body)


def test_hang_up_before_close_wakes_pollers_and_waits_for_openers() -> None:
    """Stopping: the port hangs up while the server still answers (POLLHUP|POLLERR, EIO), and
    the server waits for the opener to close before the node would go (docs/cuse.md §9)."""
    async def body() -> None:
        async with rig() as r:
            k = r.kernel
            fh = await k.open()
            await k.call(Op.POLL, {"fh": fh, "kh": 9, "flags": cuse.FUSE_POLL_SCHEDULE_NOTIFY})
            u = await k.read(fh)
            hanging = asyncio.ensure_future(r.server.hang_up("stopping", grace=30))
            got = [await k.recv(), await k.recv()]
            assert cuse.Reply(u, -errno.EIO, b"") in got
            assert any(g.unique == 0 and g.error == cuse.FUSE_NOTIFY_POLL
                       and cuse.LAYOUTS["notify_poll_wakeup_out"].unpack(g.body)["kh"] == 9
                       for g in got)
            p = await k.call(Op.POLL, {"fh": fh, "kh": 9})
            assert cuse.LAYOUTS["poll_out"].unpack(p.body)["revents"] == (
                select.POLLHUP | select.POLLERR)
            later = await k.read(fh)
            assert await k.recv() == cuse.Reply(later, -errno.EIO, b"")
            assert (await k.call(Op.OPEN, {"flags": os.O_RDWR})).error == -errno.EIO
            await asyncio.sleep(0.1)
            assert not hanging.done()  # still waiting for the opener
            assert (await k.call(Op.RELEASE, {"fh": fh})).error == 0
            assert await asyncio.wait_for(hanging, 5) == 0  # at the release, not the grace
            assert r.server.fd >= 0  # closing the connection is close()'s job
    run(body)


def test_hang_up_gives_up_after_the_grace_time() -> None:
    async def body() -> None:
        async with rig() as r:
            await r.kernel.open()
            assert await r.server.hang_up("stopping", grace=0.1) == 1
            assert r.server.openers == 1  # close() answers for it
    run(body)
