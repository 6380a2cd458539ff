"""The PTY fallback transport: the same `MbimPort` behind a raw-mode pseudo-terminal.

For kernels without CUSE. libmbim accepts any special file as a device (docs/mbim-port.md §2), so
`mbimcli -d /run/iosm-cuse/wwan0mbim0` (a symlink to the PTY slave) works unchanged.

Differences from the CUSE port, all because a PTY carries a byte stream and the kernel, not
we, answers the client's system calls:
- no message boundaries towards us: UL messages are reassembled from the stream by the MBIM
  header's MessageLength (`MbimFramer`; garbage -> resynchronise on the next plausible header,
  with one log line);
- a write the port refuses (EMSGSIZE above the negotiated size, EIO with the modem gone) cannot
  fail in the client's write(): the message is dropped and logged instead;
- ioctls are the tty's: IOCTL_WDM_MAX_COMMAND gives ENOTTY (libmbim falls back to 4096, as on
  the real wwan port), FIONREAD counts bytes in the tty buffer, not whole messages;
- a read may return more than one message, or part of one (libmbim reassembles both);
- there are no per-client opens: the transport holds one port handle, so DL messages nobody
  reads wait in the tty buffer for the next client, and the modem going away shows no POLLHUP
  (host messages meanwhile are dropped). After `port.revive()` the next host message reopens
  the handle, on the same PTY and symlink, so a client that kept the path open carries on;
- O_NONBLOCK / poll / blocking reads are the tty's own, and behave as expected.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import tty
from pathlib import Path

from iosm_cuse.chardev.port import MbimPort, PortHandle
from iosm_cuse.mbim.message import TYPE_AND_LENGTH_SIZE, MessageError, stream_message_length
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.chardev.pty")

DEFAULT_LINK = Path("/run/iosm-cuse/wwan0mbim0")
MAX_MESSAGE = 64 * 1024  # a longer "message" is garbage (libmbim never writes above 4096)
READ_CHUNK = 65536


def pty_rejects() -> Rejects:
    """What the PTY transport throws away: garbage in the stream, host messages the port
    refused."""
    return Rejects(log, what="MBIM over PTY", kinds=("resyncs", "dropped_writes"))


class MbimFramer:
    """Sans-IO: bytes from a stream in, whole MBIM messages out."""

    def __init__(self, max_message: int = MAX_MESSAGE, rejects: Rejects | None = None) -> None:
        self.max_message = max_message
        self.rejects = rejects if rejects is not None else pty_rejects()
        self._buf = bytearray()
        self.discarded = 0

    @property
    def resyncs(self) -> int:
        return self.rejects["resyncs"]

    def _length_at(self, at: int) -> int | None:
        """The length of a message that could start at `at`: None if too few bytes to tell;
        MessageError if none can."""
        return stream_message_length(self._buf, at, self.max_message)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            try:
                length = self._length_at(0)
            except MessageError:
                self._resync()
                continue
            if length is None or len(self._buf) < length:
                return out
            out.append(bytes(self._buf[:length]))
            del self._buf[:length]

    def _resync(self) -> None:
        at = 1
        while True:
            try:
                if self._length_at(at) is None:
                    # No header in sight: keep only what could be the start of one.
                    at = max(1, len(self._buf) - (TYPE_AND_LENGTH_SIZE - 1))
                break
            except MessageError:
                at += 1
        self.discarded += at
        self.rejects("resyncs", "%d bytes of garbage skipped to resynchronise", at)
        del self._buf[:at]


class PtyTransport:
    """`MbimPort` on the master side of a raw PTY, with a stable symlink to the slave."""

    transport = "pty"
    fallback = True

    def __init__(self, port: MbimPort, link: Path | str = DEFAULT_LINK, *,
                 reason: str | None = None) -> None:
        self.port = port
        self.link = Path(link)
        self.reason = reason  # why CUSE was not used, for the log and `status`
        self.master = -1
        self.slave = -1
        self.slave_path = ""
        self.rejects = pty_rejects()
        self.framer = MbimFramer(rejects=self.rejects)
        self._handle: PortHandle | None = None
        self._reopening: asyncio.Task[None] | None = None
        self._held: list[bytes] = []  # host messages waiting for the reopened handle
        self._out: collections.deque[memoryview] = collections.deque()
        self._writing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def path(self) -> str:
        return str(self.link)

    @property
    def description(self) -> str:
        return f"{self.link} -> {self.slave_path} (pty fallback, no CUSE)"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.master, self.slave = os.openpty()
        try:
            # Raw: no echo, no line discipline, bytes pass untouched. Keeping our slave fd
            # open keeps the settings and stops the master from seeing EIO between clients.
            tty.setraw(self.slave)
            os.set_blocking(self.master, False)
            os.set_inheritable(self.master, False)
            os.set_inheritable(self.slave, False)
            self.slave_path = os.ttyname(self.slave)
            self._make_link()
            self._handle = await self.port.open()
        except BaseException:
            await self.close()
            raise
        self.port.add_listener(self._pump)
        self._loop.add_reader(self.master, self._on_readable)
        if self.reason:
            log.warning("no CUSE (%s): MBIM port on a PTY instead, %s", self.reason,
                        self.description)
        else:
            log.info("MBIM port on a PTY: %s", self.description)
        self._pump()

    def _make_link(self) -> None:
        self.link.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.slave_path)
        tmp.replace(self.link)  # atomic: a client never sees the link missing

    # -- UL: stream -> whole messages -> port

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("MBIM over PTY: read: %s", exc)
            return
        for msg in self.framer.feed(data):
            self._send(msg)

    def _send(self, msg: bytes) -> None:
        h = self._handle
        if h is None:
            return
        if h.stale and self.port.gone is None:  # the modem is back: a new handle first
            self._held.append(msg)
            self._reopen()
            return
        try:
            h.write(msg)
        except OSError as exc:
            self._dropped(msg, exc)

    @property
    def dropped_writes(self) -> int:
        """Host messages the port refused (a PTY write cannot fail in the client)."""
        return self.rejects["dropped_writes"]

    def _dropped(self, msg: bytes, exc: OSError) -> None:
        self.rejects("dropped_writes", "host message of %d bytes dropped: %s", len(msg),
                     os.strerror(exc.errno) if exc.errno else exc)

    def _reopen(self) -> None:
        if self._reopening is None and self._loop is not None:
            self._reopening = self._loop.create_task(self._do_reopen())

    async def _do_reopen(self) -> None:
        """Replace the handle a hangup killed; the PTY, its settings and the symlink stay."""
        old = self._handle
        try:
            handle = await self.port.open()
        except OSError as exc:
            held, self._held = self._held, []
            for msg in held:
                self._dropped(msg, exc)
            return
        finally:
            self._reopening = None
        if self._handle is not old or old is None:  # closed meanwhile
            await handle.close()
            return
        self._handle = handle
        await old.close()
        log.debug("MBIM over PTY: port reopened after the modem came back")
        held, self._held = self._held, []
        for msg in held:
            self._send(msg)
        self._pump()

    # -- DL: port -> one write per message

    def _pump(self) -> None:
        h = self._handle
        if h is None or self.master < 0:
            return
        if h.stale:
            if self.port.gone is None:
                self._reopen()
            # Nothing to log: the daemon's one line per crash says the modem went away.
            return
        while h.readable:
            try:
                self._out.append(memoryview(h.read(READ_CHUNK)))
            except OSError:
                break
        self._flush()

    def _flush(self) -> None:
        while self._out:
            chunk = self._out[0]
            try:
                n = os.write(self.master, chunk)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                log.warning("MBIM over PTY: write: %s", exc)
                self._out.clear()
                break
            if n < len(chunk):
                self._out[0] = chunk[n:]
                if not self._writing and self._loop is not None:
                    self._writing = True
                    self._loop.add_writer(self.master, self._flush)
                return
            self._out.popleft()
        if self._writing and self._loop is not None:
            self._loop.remove_writer(self.master)
            self._writing = False

    # -- stop

    async def close(self) -> None:
        self.port.remove_listener(self._pump)
        if self._reopening is not None:
            self._reopening.cancel()
            self._reopening = None
        if self._loop is not None and self.master >= 0:
            self._loop.remove_reader(self.master)
            if self._writing:
                self._loop.remove_writer(self.master)
                self._writing = False
        handle, self._handle = self._handle, None
        if handle is not None:
            await handle.close()
        try:
            if self.slave_path and os.readlink(self.link) == self.slave_path:
                self.link.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("removing %s: %s", self.link, exc)
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1
