"""The CUSE server: /dev/wwan0mbim0 in front of an `MbimPort`.

`CuseSession` decides what to answer (no file descriptors: requests in, reply bytes out through
a `send` callable); `CuseServer` is the asyncio adapter that reads /dev/cuse (or any
SOCK_SEQPACKET socket standing in for it) one request per read, and writes one reply per write.

Every request gets an answer, error paths and shutdown included: a client whose request is in
the server's hands sleeps uninterruptibly until it is answered (docs/cuse.md §8).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iosm_cuse.chardev import cuse
from iosm_cuse.chardev.port import MbimPort, PortHandle
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.chardev.server")

CUSE_DEV = "/dev/cuse"
DEFAULT_DEVNAME = "wwan0mbim0"
READY_TIMEOUT = 10.0  # CUSE_INIT + the node appearing; generous for slow guests
# How long a stopping server keeps answering after hanging the port up, for openers to close
# (docs/cuse.md §9): long enough for mbim-proxy to see POLLHUP and release, short enough for a
# service manager's stop timeout.
HANGUP_GRACE = 3.0


class CuseUnavailable(OSError):
    """/dev/cuse cannot be opened; the message says why (no module, no permission...)."""


def open_cuse(path: str = CUSE_DEV) -> int:
    """Open /dev/cuse non-blocking, loading the module first if the node is missing."""
    if not os.path.exists(path):
        try:
            subprocess.run(["modprobe", "-q", "cuse"], check=False, timeout=10,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("modprobe cuse: %s", exc)
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        hint = " (no CUSE in this kernel: `modprobe cuse` failed?)" \
            if exc.errno == errno.ENOENT else ""
        raise CuseUnavailable(exc.errno, f"{path}: {exc.strerror}{hint}") from None


@dataclass
class OpenFile:
    handle: PortHandle
    pid: int = 0  # the OPEN request's header: the calling thread's id, the pid for most
    kh: int | None = None  # poll handle to notify on the next readiness change


@dataclass
class ParkedRead:
    fh: int
    size: int


def _request_rejects() -> Rejects:
    return Rejects(log, what="CUSE", kinds=("rejected", "unknown_fh"))


@dataclass
class SessionStats:
    requests: int = 0
    notifications: int = 0
    by_opcode: collections.Counter[int] = field(default_factory=collections.Counter)
    # Requests that cannot be served: malformed ("rejected"), or for a file never opened.
    rejects: Rejects = field(default_factory=_request_rejects)

    @property
    def rejected(self) -> int:
        return self.rejects["rejected"]


class CuseSession:
    """The request -> reply logic of one CUSE connection."""

    def __init__(self, port: MbimPort, send: Callable[[bytes], None], *,
                 devname: str = DEFAULT_DEVNAME,
                 init_flags: int = cuse.CUSE_UNRESTRICTED_IOCTL) -> None:
        self.port = port
        self.send = send
        self.devname = devname
        # Unrestricted: FIONREAD (0x541B) is not _IOR-encoded, so only the retry dance of
        # unrestricted mode can return its int; WDM_MAX_COMMAND works either way.
        self.init_flags = init_flags
        self.files: dict[int, OpenFile] = {}
        self.parked: collections.OrderedDict[int, ParkedRead] = collections.OrderedDict()
        self.opening: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_fh = 1
        self.opens_seen = 0  # OPEN requests: the kernel gives each opened file a poll handle
        self.initialized = False
        self.on_init: Callable[[], None] | None = None
        self.on_destroy: Callable[[], None] | None = None
        self.on_release: Callable[[], None] | None = None  # after every RELEASE
        self.closed = False
        self.stats = SessionStats()
        port.add_listener(self._port_event)

    # -- dispatch

    def handle(self, data: bytes) -> None:
        """One request from the kernel. Never raises: a bad request is answered or logged."""
        event = cuse.decode_request(data)
        self.stats.requests += 1
        if isinstance(event, cuse.Rejected):
            self.stats.rejects("rejected", "rejected request: %s", event.reason)
            if event.unique is not None:
                self._error(event.unique, event.errno)
            return
        self.stats.by_opcode[event.OPCODE] += 1
        if self.closed:
            self._error(event.unique, errno.ENODEV)
            return
        handler = self._HANDLERS[type(event)]
        try:
            handler(self, event)
        except Exception:  # a bug here must not leave a client in D state
            log.exception("CUSE: handling %s", type(event).__name__)
            self._error(event.unique, errno.EIO)

    def _error(self, unique: int, err: int) -> None:
        self.send(cuse.reply_error(unique, err))

    def _file(self, unique: int, fh: int) -> OpenFile | None:
        f = self.files.get(fh)
        if f is None:
            self.stats.rejects("unknown_fh", "request %d for unknown fh %d", unique, fh)
            self._error(unique, errno.EBADF)
        return f

    # -- the opcodes

    def _init(self, ev: cuse.Init) -> None:
        if ev.major != cuse.FUSE_KERNEL_VERSION or ev.minor < cuse.MIN_KERNEL_MINOR:
            log.error("CUSE: kernel speaks FUSE %d.%d, need 7.%d+", ev.major, ev.minor,
                      cuse.MIN_KERNEL_MINOR)
            self._error(ev.unique, errno.EPROTO)
            return
        self.send(cuse.reply_init(ev.unique, self.devname, flags=self.init_flags))
        self.initialized = True
        if self.on_init is not None:
            self.on_init()

    def _open(self, ev: cuse.Open) -> None:
        self.opens_seen += 1
        task = asyncio.ensure_future(self._open_async(ev.unique, ev.header.get("pid", 0)))
        self.opening[ev.unique] = task
        task.add_done_callback(lambda _t: self.opening.pop(ev.unique, None))

    async def _open_async(self, unique: int, pid: int) -> None:
        try:
            handle = await self.port.open()
        except asyncio.CancelledError:
            self._error(unique, errno.ENODEV)
            raise
        except OSError as exc:
            self._error(unique, exc.errno or errno.EIO)
            return
        if self.closed:
            self._error(unique, errno.ENODEV)
            await handle.close()
            return
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = OpenFile(handle, pid)
        self.send(cuse.reply_open(unique, fh))

    def opener_pids(self) -> list[int]:
        """The processes holding the device open (each once), for `iosm-cuse status`."""
        return sorted({f.pid for f in self.files.values() if f.pid})

    def _read(self, ev: cuse.Read) -> None:
        f = self._file(ev.unique, ev.fh)
        if f is None:
            return
        # read_in.flags is the file's current f_flags (fcntl/FIONBIO changes included).
        if not f.handle.readable and ev.flags & os.O_NONBLOCK:
            self._error(ev.unique, errno.EAGAIN)
        elif not f.handle.readable or self.parked:
            # Earlier parked reads are served first, as the kernel's wait queue would.
            self.parked[ev.unique] = ParkedRead(ev.fh, ev.size)
            self._serve_parked()
        else:
            self._answer_read(ev.unique, f.handle, ev.size)

    def _answer_read(self, unique: int, handle: PortHandle, size: int) -> None:
        try:
            data = handle.read(size)
        except OSError as exc:
            self._error(unique, exc.errno or errno.EIO)
            return
        self.send(cuse.reply(unique, data))

    def _write(self, ev: cuse.Write) -> None:
        f = self._file(ev.unique, ev.fh)
        if f is None:
            return
        try:
            n = f.handle.write(ev.data)
        except OSError as exc:
            self._error(ev.unique, exc.errno or errno.EIO)
            return
        self.send(cuse.reply_write(ev.unique, n))

    def _ok(self, ev: cuse.Flush | cuse.Fsync) -> None:
        # Nothing is buffered on our side: a write is sent to the channel before its reply.
        self.send(cuse.reply(ev.unique))

    def _release(self, ev: cuse.Release) -> None:
        f = self.files.pop(ev.fh, None)
        # RELEASE is synchronous for the client's close(): answer first, close the port after.
        self.send(cuse.reply(ev.unique))
        if f is None:
            return
        for unique in [u for u, p in self.parked.items() if p.fh == ev.fh]:
            del self.parked[unique]
            self._error(unique, errno.EBADF)
        self._spawn(f.handle.close())
        if self.on_release is not None:
            self.on_release()

    def _ioctl(self, ev: cuse.Ioctl) -> None:
        f = self._file(ev.unique, ev.fh)
        if f is None:
            return
        try:
            need_in, need_out = f.handle.ioctl_sizes(ev.cmd)
        except OSError as exc:
            self._error(ev.unique, exc.errno or errno.ENOTTY)
            return
        if len(ev.in_data) < need_in or ev.out_size < need_out:
            if ev.flags & cuse.FUSE_IOCTL_UNRESTRICTED:
                # First round of an unrestricted ioctl: name the client buffers to copy in
                # from and out to (both at its argument).
                self.send(cuse.reply_ioctl_retry(
                    ev.unique, [(ev.arg, need_out)] if need_out else [],
                    in_iovs=[(ev.arg, need_in)] if need_in else []))
            else:
                log.warning("CUSE: ioctl %#x wants %d/%d bytes, kernel gives %d/%d", ev.cmd,
                            need_in, need_out, len(ev.in_data), ev.out_size)
                self._error(ev.unique, errno.EINVAL)
            return
        try:
            out = f.handle.ioctl(ev.cmd, ev.in_data)
        except OSError as exc:
            self._error(ev.unique, exc.errno or errno.ENOTTY)
            return
        self.send(cuse.reply_ioctl(ev.unique, 0, out))

    def _poll(self, ev: cuse.Poll) -> None:
        f = self._file(ev.unique, ev.fh)
        if f is None:
            return
        if ev.flags & cuse.FUSE_POLL_SCHEDULE_NOTIFY:
            f.kh = ev.kh
        self.send(cuse.reply_poll(ev.unique, f.handle.poll()))

    def _interrupt(self, ev: cuse.Interrupt) -> None:
        if ev.target in self.parked:
            del self.parked[ev.target]
            self._error(ev.target, errno.EINTR)
        elif ev.target in self.opening:
            pass  # the open finishes soon by itself; no reply to an interrupt is required
        else:
            # Not seen (libfuse's rule; with one reader it was answered already, and then the
            # kernel just says ENOENT): EAGAIN asks the kernel to queue it again.
            self._error(ev.unique, errno.EAGAIN)

    def _destroy(self, ev: cuse.Destroy) -> None:
        self.send(cuse.reply(ev.unique))
        if self.on_destroy is not None:
            self.on_destroy()

    _HANDLERS: dict[type[cuse.Request], Callable[[CuseSession, Any], None]] = {
        cuse.Init: _init, cuse.Open: _open, cuse.Read: _read, cuse.Write: _write,
        cuse.Flush: _ok, cuse.Fsync: _ok, cuse.Release: _release, cuse.Ioctl: _ioctl,
        cuse.Poll: _poll, cuse.Interrupt: _interrupt, cuse.Destroy: _destroy,
    }

    # -- the port's events: data arrived, or the modem went away

    def _port_event(self) -> None:
        self._serve_parked()
        for f in self.files.values():
            if f.kh is not None:
                self.send(cuse.notify_poll(f.kh))
                self.stats.notifications += 1
                f.kh = None  # the kernel polls again, re-arming it

    def _serve_parked(self) -> None:
        while self.parked:
            unique, p = next(iter(self.parked.items()))
            f = self.files.get(p.fh)
            if f is not None and not f.handle.readable:
                return
            del self.parked[unique]
            if f is None:
                self._error(unique, errno.EBADF)
            else:
                self._answer_read(unique, f.handle, p.size)

    # -- shutdown

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shutdown(self, err: int = errno.EIO) -> None:
        """Answer everything still open (parked reads with `err`, opens with ENODEV); later
        requests get ENODEV."""
        if self.closed:
            return
        self.closed = True
        self.port.remove_listener(self._port_event)
        while self.parked:
            unique, _ = self.parked.popitem(last=False)
            self._error(unique, err)
        for task in list(self.opening.values()):
            task.cancel()  # its CancelledError path answers ENODEV
        for f in self.files.values():
            self._spawn(f.handle.close())
        self.files.clear()

    async def wait_closed(self) -> None:
        pending = list(self._tasks) + list(self.opening.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class CuseServer:
    """The asyncio adapter: /dev/cuse (or a SOCK_SEQPACKET stand-in) <-> a CuseSession."""

    transport = "cuse"
    fallback = False

    def __init__(self, port: MbimPort, devname: str = DEFAULT_DEVNAME, *,
                 fd: int | None = None, wait_for_node: bool | None = None) -> None:
        self.port = port
        self.devname = devname
        self._given_fd = fd
        self.fd = -1
        # With a real /dev/cuse, start() waits for /dev/<devname>; a test socket has no node.
        self.wait_for_node = fd is None if wait_for_node is None else wait_for_node
        self.session = CuseSession(port, self._write, devname=devname)
        self._released = asyncio.Event()
        self.session.on_release = self._released.set
        self.bufsize = cuse.request_buffer_size()
        self._out: collections.deque[bytes] = collections.deque()
        self._writing = False
        self._ready: asyncio.Future[None] | None = None
        self._dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        # Called once, with the reason, if the CUSE connection dies after start() (the module
        # removed, the connection aborted): the device node is gone for good.
        self.on_dead: Callable[[str], None] | None = None
        # The keeper that answers for the port if this process dies (start_keeper).
        self._keeper: subprocess.Popen[bytes] | None = None
        self._keeper_pipe = -1
        self._reported: tuple[int, int] = (0, 0)

    @property
    def path(self) -> str:
        return f"/dev/{self.devname}"

    @property
    def description(self) -> str:
        return f"{self.path} (cuse)"

    def opener_pids(self) -> list[int]:
        return self.session.opener_pids()

    async def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Open /dev/cuse (CuseUnavailable if impossible), answer CUSE_INIT, and return once
        the device node exists."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self.session.on_init = lambda: self._set_ready(None)
        self.session.on_destroy = self._destroyed
        try:
            if self.wait_for_node and os.path.exists(self.path):
                raise OSError(errno.EEXIST, f"{self.path} already exists (another server?)")
            self.fd = open_cuse() if self._given_fd is None else self._given_fd
            os.set_blocking(self.fd, False)
            self._loop.add_reader(self.fd, self._on_readable)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
            # The kernel checks our CUSE_INIT reply while we write it and aborts the connection
            # if it refuses it; the reader sees ENODEV on the next loop iteration or so.
            for _ in range(3):
                await asyncio.sleep(0)
            if self._dead is not None:
                raise OSError(errno.ENODEV, f"CUSE refused {self.devname} ({self._dead})")
            if self.wait_for_node:
                await self._wait_node(time.monotonic() + timeout)
        except BaseException:
            await self.close()
            raise
        self._started = True
        log.info("CUSE: %s ready", self.path)

    async def _wait_node(self, deadline: float) -> None:
        node = Path(self.path)
        sysfs = Path("/sys/class/cuse") / self.devname
        while not node.exists():
            if self._dead is not None:
                # The kernel checks the reply after accepting the write and aborts the
                # connection: a duplicate DEVNAME is the usual cause.
                raise OSError(errno.ENODEV, f"CUSE refused {self.devname} ({self._dead}); "
                              f"is {node} already taken?")
            if time.monotonic() > deadline:
                if sysfs.exists():  # registered, but nothing makes nodes here (no devtmpfs)
                    log.warning("CUSE: %s registered but %s did not appear", sysfs, node)
                    return
                raise OSError(errno.ETIMEDOUT, f"{node} did not appear")
            await asyncio.sleep(0.01)

    def _set_ready(self, exc: BaseException | None) -> None:
        if self._ready is not None and not self._ready.done():
            if exc is None:
                self._ready.set_result(None)
            else:
                self._ready.set_exception(exc)

    def _destroyed(self) -> None:
        # The connection is ending; keep reading so anything still sent gets ENODEV.
        log.info("CUSE: kernel sent DESTROY")
        self.session.shutdown(errno.EIO)
        self._report_dead("the kernel ended the connection (DESTROY)")

    def _report_dead(self, why: str) -> None:
        if self._started and self.fd >= 0 and self.on_dead is not None:
            cb, self.on_dead = self.on_dead, None  # once
            cb(why)

    def _fail(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
            told = self._started and self.on_dead is not None  # then its owner says it
            log.log(logging.DEBUG if told else logging.ERROR, "CUSE: connection ended: %s", why)
        self._set_ready(OSError(errno.ENODEV, f"CUSE: {why}"))
        self.session.shutdown(errno.EIO)
        if self._loop is not None and self.fd >= 0:
            self._loop.remove_reader(self.fd)
        self._report_dead(why)

    def _on_readable(self) -> None:
        # A few requests per wake-up, so one busy client cannot starve the loop.
        for _ in range(64):
            try:
                data = os.read(self.fd, self.bufsize)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # an interrupted request vanished; go on
                    continue
                # ENODEV: the kernel refused our CUSE_INIT reply or the connection was aborted.
                self._fail(f"read from /dev/cuse: {exc.strerror}")
                return
            if not data:
                self._fail("/dev/cuse closed")
                return
            self.session.handle(data)
            self._report_to_keeper()

    def _write(self, data: bytes) -> None:
        if self.fd < 0 or self._dead is not None:
            return
        if self._out:
            self._out.append(data)
            return
        self._write_one(data)

    def _write_one(self, data: bytes) -> bool:
        try:
            os.write(self.fd, data)
        except BlockingIOError:  # only a socket stand-in fills up; /dev/cuse never blocks
            self._out.appendleft(data)
            if not self._writing and self._loop is not None:
                self._writing = True
                self._loop.add_writer(self.fd, self._flush)
            return False
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                # The request is gone (interrupted and finished, or an interrupt control
                # reply for a request already answered): nothing to do.
                log.debug("CUSE: reply to a vanished request: %s", exc)
            elif exc.errno in (errno.ENODEV, errno.EBADF, errno.EPIPE, errno.ECONNRESET):
                self._fail(f"write to /dev/cuse: {exc.strerror}")
            else:
                log.warning("CUSE: reply refused by the kernel: %s", exc)
        return True

    def _flush(self) -> None:
        while self._out:
            if not self._write_one(self._out.popleft()):
                return
        if self._loop is not None:
            self._loop.remove_writer(self.fd)
        self._writing = False

    @property
    def openers(self) -> int:
        return len(self.session.files)

    # -- the keeper: answers for the port after a SIGKILL (docs/modemmanager.md §6)

    def start_keeper(self, withdraw: tuple[str, str, int, int] | None = None,
                     at_ports: tuple[str, ...] = ()) -> None:
        """Start the process that holds a duplicate of the connection and, if this process
        dies without `close`, hangs the port up for its openers. `withdraw` (instance, port
        name, major, minor): also send ModemManager the ports' remove events then, the AT
        ports' (`at_ports`, node names) with them."""
        if self.fd < 0 or self._keeper is not None:
            return
        r, w = os.pipe()
        dup = os.dup(self.fd)
        argv = [sys.executable, "-m", "iosm_cuse.system.orphan", "--cuse-fd", str(dup),
                "--pipe-fd", str(r)]
        if withdraw is not None:
            argv += ["--withdraw", *map(str, withdraw)]
            if at_ports:
                argv += ["--withdraw-at", *at_ports]
        try:
            # A session of its own: a terminal's ^C stops the daemon, which then says bye.
            self._keeper = subprocess.Popen(argv, pass_fds=(dup, r), stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        except OSError as exc:
            log.warning("CUSE: no keeper for %s after a crash: %s", self.path, exc)
            os.close(w)
            return
        finally:
            os.close(dup)
            os.close(r)
        os.set_blocking(w, False)
        self._keeper_pipe = w
        self._report_to_keeper()

    def _report_to_keeper(self) -> None:
        now = (self.session.opens_seen, len(self.session.files))
        if self._keeper_pipe < 0 or now == self._reported:
            return
        self._reported = now
        from iosm_cuse.system.orphan import report

        try:
            os.write(self._keeper_pipe, report(*now))
        except OSError as exc:  # a full pipe: the keeper is stuck; it will wake all handles
            log.debug("CUSE: keeper report: %s", exc)

    async def _stop_keeper(self) -> None:
        """A clean stop: the keeper must let go of its duplicate before this process closes
        /dev/cuse, or the node would outlive the daemon."""
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        from iosm_cuse.system.orphan import BYE

        try:
            os.write(self._keeper_pipe, BYE)
        except OSError as exc:
            log.debug("CUSE: keeper goodbye: %s", exc)
        os.close(self._keeper_pipe)
        self._keeper_pipe = -1
        try:
            # Within the daemon's 5 s for closing the port.
            await asyncio.wait_for(asyncio.to_thread(keeper.wait), 3)
        except TimeoutError:
            keeper.kill()
            await asyncio.to_thread(keeper.wait)

    async def hang_up(self, reason: str, grace: float = HANGUP_GRACE) -> int:
        """Before closing: hang the port up while this server still answers, so no client is
        left polling a dead node (docs/cuse.md §9). Pollers are woken (FUSE_NOTIFY_POLL),
        POLL answers POLLHUP|POLLERR and reads fail with EIO from now on (the port's hangup
        does all three through the session); then wait up to `grace` seconds for the openers
        to close. Returns how many were still open."""
        self.port.hangup(reason, quiet=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.session.files and self._dead is None and self.fd >= 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._released.clear()
            try:
                await asyncio.wait_for(self._released.wait(), remaining)
            except TimeoutError:
                break
        left = len(self.session.files)
        if left:
            log.info("CUSE: %d opener(s) of %s still open after %.0f s (pids %s); closing",
                     left, self.path, grace, self.opener_pids())
        return left

    async def close(self) -> None:
        """Answer every parked request, then close the fd (which removes the device)."""
        self.on_dead = None  # ending on purpose
        self.session.shutdown(errno.EIO)
        await self.session.wait_closed()
        await self._stop_keeper()
        if self.fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            if self._writing:
                self._loop.remove_writer(self.fd)
        while self._out and self._dead is None:  # best effort: last replies before closing
            if not self._write_one(self._out.popleft()):
                break
        os.close(self.fd)
        self.fd = -1
        log.info("CUSE: %s removed", self.path)
