"""The PTY fallback transport: the same `MbimPort` behind a raw-mode pseudo-terminal.

For kernels without CUSE. libmbim accepts any special file as a device (docs/mbim-port.md §2), so
`mbimcli -d /run/iosm-cuse/wwan0mbim0` (a symlink to the PTY slave) works unchanged.

Differences from the CUSE port, all because a PTY carries a byte stream and the kernel, not
we, answers the client's system calls:
- no message boundaries towards us: UL messages are reassembled from the stream by the MBIM
  header's MessageLength (`MbimFramer`). So that one client's bytes cannot wedge the next
  client, a header claiming more than the negotiated MaxControlTransfer is garbage
  (resynchronise on the next plausible header), a message not whole within `STALL_TIMEOUT` of
  its first byte is dropped, and a new client's OPEN cuts short an unfinished message before it;
  each with one rate-limited log line (docs/mbim-port.md §6 says what still differs);
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
from collections.abc import Callable
from pathlib import Path

from iosm_cuse.chardev.port import MIN_CONTROL, MbimPort, PortHandle
from iosm_cuse.mbim.message import (
    OPEN_SIZE,
    TYPE_AND_LENGTH_SIZE,
    MessageError,
    open_max_control_transfer,
    stream_message_length,
)
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.chardev.pty")

DEFAULT_LINK = Path("/run/iosm-cuse/wwan0mbim0")
# The framer's bound when the port's limit is larger (an OPEN may claim up to 4 GiB): a longer
# "message" is garbage whatever was negotiated (libmbim never writes above 4096,
# docs/mbim-port.md §2).
MAX_MESSAGE = 64 * 1024
READ_CHUNK = 65536
# A message must be whole this long after its first byte arrived, or it is dropped
# (docs/mbim-port.md §6). libmbim writes each message in one write(), re-sends OPEN every 5 s
# and gives most commands 10 s (docs/mbim-port.md §2): a message's bytes reach us within
# milliseconds even under TCG, so one second is ~100x that, and a client held up by a stalled
# message keeps most of its own timeout.
STALL_TIMEOUT = 1.0

Limit = int | Callable[[], int]


def pty_rejects() -> Rejects:
    """What the PTY transport throws away: garbage in the stream, messages that never
    completed or that a new client's OPEN cut short, host messages the port refused."""
    return Rejects(log, what="MBIM over PTY",
                   kinds=("resyncs", "stalled", "cut_by_open", "dropped_writes"))


class MbimFramer:
    """Sans-IO: bytes of a stream in, each with the time it arrived; whole MBIM messages out.

    A byte stream has no write boundaries (docs/mbim-port.md §6), so the framer guesses from
    three rules, each counted and logged through `rejects`:
    - a header that cannot start a message (unknown type, a length below 12 or above
      `max_message`, which the transport ties to the port's negotiated MaxControlTransfer) is
      garbage: skip to the next plausible header ("resyncs");
    - a message still incomplete `stall_timeout` after its first byte arrived is dropped up to
      the next read boundary, where framing starts again ("stalled"); `deadline` says when to
      call `expire`, which the owner of the clock does;
    - a whole, well-formed OPEN at the start of a later read, inside the span of an incomplete
      message, starts a new client's stream: what came before it is dropped ("cut_by_open").

    `push` then `pop` until None (or `feed` for both): `max_message` is read at each `pop`, so
    an OPEN popped and handed to the port bounds the messages popped after it.
    """

    def __init__(self, max_message: Limit = MAX_MESSAGE, rejects: Rejects | None = None, *,
                 stall_timeout: float = STALL_TIMEOUT) -> None:
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive")
        self._max_message = max_message
        self.stall_timeout = stall_timeout
        self.rejects = rejects if rejects is not None else pty_rejects()
        self._buf = bytearray()
        self._base = 0  # stream position of _buf[0]
        self._started = 0.0  # when the read holding _buf[0] arrived
        # (stream position, time) of the first byte of each later read still in _buf
        self._later: collections.deque[tuple[int, float]] = collections.deque()
        self.discarded = 0  # bytes thrown away, by any of the three rules

    @property
    def max_message(self) -> int:
        m = self._max_message
        return m() if callable(m) else m

    @property
    def resyncs(self) -> int:
        return self.rejects["resyncs"]

    @property
    def pending(self) -> int:
        """Bytes held: the start of a message still waiting for the rest (after draining)."""
        return len(self._buf)

    @property
    def deadline(self) -> float | None:
        """When the held bytes count as stalled (`expire`); None when nothing is held. Only
        meaningful after `pop` returned None."""
        return self._started + self.stall_timeout if self._buf else None

    def push(self, data: bytes, now: float = 0.0) -> None:
        """One read's bytes, arrived at `now` (any monotonic clock, the one `expire` gets)."""
        if not data:
            return
        if self._buf:
            self._later.append((self._base + len(self._buf), now))
        else:
            self._started = now
        self._buf += data

    def pop(self) -> bytes | None:
        """The next whole message, or None until more bytes (or `expire`) move things on."""
        while self._buf:
            limit = self.max_message
            try:
                length = stream_message_length(self._buf, 0, limit)
            except MessageError as exc:
                self._resync(limit, exc)
                continue
            held = len(self._buf) if length is None else min(length, len(self._buf))
            cut = self._open_after_start(held)
            if cut:
                self._drop(cut)
                self.rejects("cut_by_open", "an incomplete message (%d bytes in) dropped: a "
                             "new client's OPEN followed it", cut)
                continue
            if length is None or len(self._buf) < length:
                return None
            msg = bytes(self._buf[:length])
            self._skip(length)
            return msg
        return None

    def feed(self, data: bytes, now: float = 0.0) -> list[bytes]:
        """push(data, now), then every message that is whole."""
        self.push(data, now)
        out: list[bytes] = []
        while (msg := self.pop()) is not None:
            out.append(msg)
        return out

    def expire(self, now: float) -> int:
        """If the held message did not complete within `stall_timeout` of its first byte, drop
        it up to the next read boundary, where framing starts afresh. Returns the bytes
        dropped. Then `pop` (the next read may hold whole messages), and again while
        `deadline` <= now."""
        if not self._buf or now < self._started + self.stall_timeout:
            return 0
        upto = self._later[0][0] - self._base if self._later else len(self._buf)
        self._drop(upto)
        self.rejects("stalled", "%d bytes of an incomplete message dropped: not whole %.3g s "
                     "after its first byte", upto, self.stall_timeout)
        return upto

    def _open_after_start(self, held: int) -> int:
        """Offset of a whole OPEN beginning a later read within the first `held` bytes; 0 if
        none. libmbim writes a message whole and a new client writes OPEN first, so an OPEN
        at a read boundary inside an unfinished message is where a new client began."""
        for pos, _ in self._later:
            at = pos - self._base
            if at >= held:
                break
            mct = open_max_control_transfer(bytes(self._buf[at:at + OPEN_SIZE]))
            if mct is not None and mct >= MIN_CONTROL:
                return at
        return 0

    def _skip(self, n: int) -> None:
        del self._buf[:n]
        self._base += n
        while self._later and self._later[0][0] <= self._base:
            _, self._started = self._later.popleft()

    def _drop(self, n: int) -> None:
        self._skip(n)
        self.discarded += n

    def _resync(self, limit: int, why: MessageError) -> None:
        at = 1
        while True:
            try:
                if stream_message_length(self._buf, at, limit) is None:
                    # No header in sight: keep only what could be the start of one.
                    at = max(1, len(self._buf) - (TYPE_AND_LENGTH_SIZE - 1))
                break
            except MessageError:
                at += 1
        self._drop(at)
        self.rejects("resyncs", "%d bytes of garbage skipped to resynchronise (%s)", at, why)


class PassThrough:
    """The framer of a port without messages (an AT port, `port.framed` False): every byte
    goes on as it came, nothing is held or dropped."""

    pending = 0
    deadline: float | None = None

    def __init__(self) -> None:
        self._buf = bytearray()

    def push(self, data: bytes, now: float = 0.0) -> None:
        self._buf += data

    def pop(self) -> bytes | None:
        if not self._buf:
            return None
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def expire(self, now: float) -> int:
        return 0


class PtyTransport:
    """`MbimPort` (or `AtPort`) on the master side of a raw PTY, with a stable symlink to the
    slave. An AT port is a byte stream already: its bytes pass through unframed."""

    transport = "pty"
    fallback = True

    def __init__(self, port: MbimPort, link: Path | str = DEFAULT_LINK, *,
                 reason: str | None = None, stall_timeout: float = STALL_TIMEOUT) -> None:
        self.port = port
        self.link = Path(link)
        self.reason = reason  # why CUSE was not used, for the log and `status`
        self.master = -1
        self.slave = -1
        self.slave_path = ""
        self.rejects = pty_rejects()
        # The port's limit, read per message: an OPEN changes it for the messages after it.
        self.framer: MbimFramer | PassThrough = MbimFramer(
            lambda: min(self.port.negotiated, MAX_MESSAGE), rejects=self.rejects,
            stall_timeout=stall_timeout) if port.framed else PassThrough()
        self._stall_timer: asyncio.TimerHandle | None = None
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
            log.warning("no CUSE (%s): %s on a PTY instead, %s", self.reason,
                        self.port.label, self.description)
        else:
            log.info("%s on a PTY: %s", self.port.label, self.description)
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
        if not data:
            return
        assert self._loop is not None
        self.framer.push(data, self._loop.time())
        self._frame()

    def _frame(self) -> None:
        """Send every whole message, then wake up when the held rest would count as stalled."""
        while (msg := self.framer.pop()) is not None:
            self._send(msg)
        deadline = self.framer.deadline
        timer = self._stall_timer
        if timer is not None and (deadline is None or timer.when() != deadline):
            timer.cancel()
            self._stall_timer = timer = None
        if deadline is not None and timer is None and self._loop is not None:
            self._stall_timer = self._loop.call_at(deadline, self._on_stall)

    def _on_stall(self) -> None:
        self._stall_timer = None
        assert self._loop is not None
        now = self._loop.time()
        while (deadline := self.framer.deadline) is not None and deadline <= now:
            self.framer.expire(now)
            while (msg := self.framer.pop()) is not None:
                self._send(msg)
        self._frame()

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

    def stream_status(self) -> dict[str, int]:
        """For `status`: bytes the framer holds (an unfinished message) and what it and the
        transport threw away, by kind."""
        return {"held": self.framer.pending, **self.rejects.as_dict()}

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
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
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
