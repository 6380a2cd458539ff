"""The MBIM port's semantics (what the kernel's /dev/wwan0mbim0 does), transport-agnostic.

Modelled on wwan_core.c + the IOSM port glue (docs/mbim-port.md §1): every opener shares one RX
queue of whole DL transfers; a read returns at most one transfer and a short read leaves the
rest at the head; the first open opens the IPC channel and the last close closes it and purges
unread data. Beyond the kernel, a write larger than the negotiated control message size (the
MaxControlTransfer of the host's MBIM OPEN, or the configured maximum before it) fails with
EMSGSIZE, and IOCTL_WDM_MAX_COMMAND is answered (never above 4096: libmbim reads into a
4097-byte stack buffer, docs/mbim-port.md §3).

`AtPort` is the same port for the AT channels (wwan0at0, wwan0at1): a byte stream instead of
messages, with the termios ioctls of the kernel's AT ports (docs/at-ports.md §2).

Blocking is the transport's business: `PortHandle.read` never waits; it raises BlockingIOError
when nothing is queued, and listeners registered with `MbimPort.add_listener` are called when
something arrives or the modem goes away. The CUSE server parks reads on that; the PTY
transport pushes messages on that.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import select
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

from iosm_cuse.mbim.message import open_max_control_transfer
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.chardev.port")

FIONREAD = 0x541B
IOCTL_WDM_MAX_COMMAND = 0x800248A0  # _IOR('H', 0xA0, __u16), <linux/usb/cdc-wdm.h>
LIBMBIM_MAX = 4096  # larger WDM answers overflow libmbim's read buffer
MIN_CONTROL = 64  # MBIM's minimum MaxControlTransfer; smaller OPENs don't change the limit
RX_LIMIT = 1 << 20  # bytes queued for nobody reading before the oldest transfers are dropped

POLLIN_MASK = select.POLLIN | select.POLLRDNORM
POLLOUT_MASK = select.POLLOUT | select.POLLWRNORM
POLLHUP_MASK = select.POLLHUP | select.POLLERR
# Channel errors that mean the modem is gone (the engine's EIO / ESHUTDOWN / ENODEV).
GONE_ERRNOS = frozenset({errno.EIO, errno.ESHUTDOWN, errno.ENODEV})


class Channel(Protocol):
    def send(self, data: bytes) -> None: ...
    def close(self) -> Awaitable[None]: ...


OpenChannel = Callable[[Callable[[bytes], None]], Awaitable[Channel]]
Listener = Callable[[], None]


def _oserror(err: int, what: str) -> OSError:
    return OSError(err, f"{what}: {errno.errorcode.get(err, err)}")


class MbimPort:
    """One MBIM control port over one channel, shared by any number of openers."""

    label = "MBIM port"  # what log lines call it
    framed = True  # writes are whole messages (a byte-stream transport must reassemble them)

    def __init__(self, open_channel: OpenChannel, *, max_control: int = LIBMBIM_MAX) -> None:
        if not MIN_CONTROL <= max_control <= LIBMBIM_MAX:
            raise ValueError(f"max_control must be {MIN_CONTROL}..{LIBMBIM_MAX}")
        self._open_channel = open_channel
        self.max_control = max_control
        self.negotiated = max_control  # until the host's OPEN says otherwise
        self._channel: Channel | None = None
        self._opening: asyncio.Future[Channel] | None = None
        self._handles: set[PortHandle] = set()
        self._rx: collections.deque[bytes] = collections.deque()
        self._head = 0  # bytes of _rx[0] already read
        self._queued = 0  # unread bytes in _rx
        self._listeners: list[Listener] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.generation = 0  # bumped by hangup(): handles of older generations get EIO
        self.gone: str | None = None  # why the modem went away
        # DL transfers dropped because nobody read them (RX_LIMIT)
        self.rejects = Rejects(log, what=self.label, kinds=("dropped",))
        self.stats = {"rx": 0, "tx": 0, "emsgsize": 0}

    # -- listeners (the transports)

    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        if cb in self._listeners:
            self._listeners.remove(cb)

    def _wake(self) -> None:
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:  # one broken transport must not starve the others
                log.exception("port listener failed")

    # -- open / close

    @property
    def openers(self) -> int:
        return sum(1 for h in self._handles if h.generation == self.generation)

    async def open(self) -> PortHandle:
        """A new opener. The first opens the channel; raises OSError(EIO) if the modem is gone
        or the channel cannot be opened."""
        if self.gone is not None:
            raise _oserror(errno.EIO, f"modem gone ({self.gone})")
        handle = PortHandle(self, self.generation)
        self._handles.add(handle)
        try:
            if self._channel is None:
                await self._ensure_channel()
        except BaseException:
            self._handles.discard(handle)
            raise
        if handle.generation != self.generation:
            self._handles.discard(handle)
            raise _oserror(errno.EIO, f"modem gone ({self.gone})")
        return handle

    async def _ensure_channel(self) -> None:
        while self._closing:
            # A close still under way (the last opener just left, or a hangup): the engine
            # would refuse a second open of the same channel with EBUSY.
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._channel is not None:
            return
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._do_open(self.generation))
            # Retrieved here even when every opener left while it was opening.
            self._opening.add_done_callback(lambda f: f.cancelled() or f.exception())
        opening = self._opening
        try:
            await asyncio.shield(opening)
        except (OSError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise _oserror(errno.EIO, f"opening the channel: {exc}") from exc

    async def _do_open(self, generation: int) -> Channel:
        def on_receive(data: bytes) -> None:
            self._on_receive(generation, data)

        try:
            channel = await self._open_channel(on_receive)
        finally:
            self._opening = None
        if generation != self.generation or self.openers == 0:
            # Hung up, or every opener left, while the channel was opening.
            self._spawn_close(channel)
            raise _oserror(errno.EIO, "port closed while opening")
        self._channel = channel
        return channel

    async def _release(self, handle: PortHandle) -> None:
        self._handles.discard(handle)
        if handle.generation != self.generation or self.openers > 0:
            return
        channel, self._channel = self._channel, None
        self._purge()
        if channel is not None:
            await self._spawn_close(channel)

    def _spawn_close(self, channel: Channel) -> asyncio.Task[None]:
        task = asyncio.ensure_future(_close_quietly(channel))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    # -- the modem going away and coming back (the daemon's engine listener calls these)

    def hangup(self, reason: str, *, quiet: bool = False) -> None:
        """The modem is gone: parked readers get EIO, poll reports POLLHUP|POLLERR, every
        current handle gets EIO from now on, and the channel is dropped."""
        if self.gone is not None:
            return
        log.log(logging.DEBUG if quiet else logging.WARNING, "%s: modem gone (%s)", self.label,
                reason)
        self.gone = reason
        self.generation += 1
        self._purge()
        channel, self._channel = self._channel, None
        if channel is not None:
            self._spawn_close(channel)
        self._wake()

    def revive(self) -> None:
        """The modem is back: new opens work again; handles from before the hangup stay dead,
        as on the kernel's port after a device removal."""
        self.gone = None
        self._handles = {h for h in self._handles if h.generation == self.generation}

    async def close(self) -> None:
        """Stop: hang up and wait for the channel to close."""
        self.hangup("port closed", quiet=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- RX queue

    def _on_receive(self, generation: int, data: bytes) -> None:
        if generation != self.generation or self.gone is not None or not data:
            return
        self._rx.append(bytes(data))
        self._queued += len(data)
        self.stats["rx"] += 1
        while self._queued > RX_LIMIT and len(self._rx) > 1:
            self._drop_head()
        self._wake()

    def _drop_head(self) -> None:
        oldest = self._rx.popleft()
        self._queued -= len(oldest) - self._head
        self._head = 0
        self.rejects("dropped", "nobody reads: the oldest DL transfer (%d bytes) dropped",
                     len(oldest))

    @property
    def dropped(self) -> int:
        """DL transfers dropped because nobody read them (`status` shows it)."""
        return self.rejects["dropped"]

    def _purge(self) -> None:
        self._rx.clear()
        self._head = 0
        self._queued = 0

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def _take(self, size: int) -> bytes:
        head = self._rx[0]
        chunk = head[self._head:self._head + size]
        self._head += len(chunk)
        self._queued -= len(chunk)
        if self._head >= len(head):
            self._rx.popleft()
            self._head = 0
        return chunk

    # -- TX

    def _send(self, data: bytes) -> int:
        limit = self.negotiated
        if len(data) > limit:
            self.stats["emsgsize"] += 1
            raise _oserror(errno.EMSGSIZE, f"{len(data)} bytes > control message size {limit}")
        self._transmit(data)
        self._note_open(data)
        return len(data)

    def _transmit(self, data: bytes | memoryview) -> None:
        """One UL transfer to the channel; a channel error that means the modem is gone hangs
        the port up."""
        channel = self._channel
        if channel is None:
            raise _oserror(errno.EIO, "channel not open")
        try:
            channel.send(bytes(data))
        except OSError as exc:
            err = exc.errno or errno.EIO
            if err in GONE_ERRNOS:
                self.hangup(str(exc))
            raise _oserror(err, f"send: {exc}") from exc
        self.stats["tx"] += 1

    def _note_open(self, data: bytes) -> None:
        """The host's MBIM OPEN sets the negotiated control message size for later writes."""
        mct = open_max_control_transfer(data)
        if mct is None:
            return
        if mct < MIN_CONTROL:
            log.info("MBIM port: OPEN with MaxControlTransfer %d ignored", mct)
            return
        self.negotiated = mct

    @property
    def max_command(self) -> int:
        """IOCTL_WDM_MAX_COMMAND's answer."""
        return min(self.max_control, LIBMBIM_MAX)

    # -- ioctls: (input bytes, output bytes) each takes, and the answer

    def ioctl_sizes(self, cmd: int) -> tuple[int, int]:
        """How many bytes `cmd` reads from and writes to the client's argument (CUSE copies
        them in unrestricted mode); OSError(ENOTTY) for an ioctl the port does not have."""
        if cmd == FIONREAD:
            return 0, 4
        if cmd == IOCTL_WDM_MAX_COMMAND:
            return 0, 2
        raise _oserror(errno.ENOTTY, f"ioctl {cmd:#x}")

    def _ioctl(self, cmd: int, arg: bytes) -> bytes:
        if cmd == FIONREAD:
            return self.queued_bytes.to_bytes(4, "little", signed=True)  # an int
        if cmd == IOCTL_WDM_MAX_COMMAND:
            return self.max_command.to_bytes(2, "little")  # a __u16
        raise _oserror(errno.ENOTTY, f"ioctl {cmd:#x}")


# The termios ioctls the kernel's WWAN core answers on AT ports only, for tools that insist on
# treating a port as a serial line (docs/at-ports.md §2): the settings are kept and given back,
# nothing acts on them. Numbers from <asm-generic/ioctls.h>.
TCGETS, TCSETS, TCSETSW, TCSETSF, TCFLSH = 0x5401, 0x5402, 0x5403, 0x5404, 0x540B
TIOCMGET, TIOCMBIS, TIOCMBIC, TIOCMSET = 0x5415, 0x5416, 0x5417, 0x5418
TCGETS2, TCSETS2, TCSETSW2, TCSETSF2 = 0x802C542A, 0x402C542B, 0x402C542C, 0x402C542D
TERMIOS_SIZE, TERMIOS2_SIZE = 36, 44  # struct termios / termios2 (two speeds more)
_B115200, _CS8, _CREAD, _CLOCAL = 0o010002, 0o000060, 0o000200, 0o004000
# Raw, 8 bits, 115200 baud, VMIN 1 (c_cc[6]): what a freshly opened AT port reports.
DEFAULT_TERMIOS = (struct.pack("<4IB19B", 0, 0, _B115200 | _CS8 | _CREAD | _CLOCAL, 0, 0,
                               *([0] * 6 + [1] + [0] * 12))
                   + struct.pack("<2I", 115200, 115200))
_TERMIOS_IN = {TCSETS: TERMIOS_SIZE, TCSETSW: TERMIOS_SIZE, TCSETSF: TERMIOS_SIZE,
               TCSETS2: TERMIOS2_SIZE, TCSETSW2: TERMIOS2_SIZE, TCSETSF2: TERMIOS2_SIZE}
_TERMIOS_OUT = {TCGETS: TERMIOS_SIZE, TCGETS2: TERMIOS2_SIZE}
_MODEM_BITS_IN = (TIOCMBIS, TIOCMBIC, TIOCMSET)


class AtPort(MbimPort):
    """A WWAN AT port (wwan<N>at<M>): the same sharing, opening, hangup and blocking as the
    MBIM port, but a byte stream (docs/at-ports.md §2): a read returns whatever is queued, up
    to its count, across DL transfers; a write of any size is sent as it is, in pieces of at
    most the channel's UL buffer (`td_size`); the termios ioctls are answered; there is no
    message size to negotiate and no WDM ioctl."""

    label = "AT port"
    framed = False

    def __init__(self, open_channel: OpenChannel, *, td_size: int) -> None:
        super().__init__(open_channel)
        if td_size <= 0:
            raise ValueError("td_size must be positive")
        self.td_size = td_size
        self.termios = DEFAULT_TERMIOS
        self.modem_bits = 0

    def _take(self, size: int) -> bytes:
        parts: list[bytes] = []
        while size > 0 and self._rx:
            chunk = super()._take(size)
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def _send(self, data: bytes) -> int:
        if self._channel is None:
            raise _oserror(errno.EIO, "channel not open")
        view = memoryview(bytes(data))
        for off in range(0, len(view), self.td_size):
            self._transmit(view[off:off + self.td_size])
        return len(data)

    def ioctl_sizes(self, cmd: int) -> tuple[int, int]:
        if cmd in _TERMIOS_OUT:
            return 0, _TERMIOS_OUT[cmd]
        if cmd in _TERMIOS_IN:
            return _TERMIOS_IN[cmd], 0
        if cmd in _MODEM_BITS_IN:
            return 4, 0
        if cmd == TIOCMGET:
            return 0, 4
        if cmd == TCFLSH:
            return 0, 0  # its argument is a value, not a pointer
        if cmd == FIONREAD:
            return 0, 4
        raise _oserror(errno.ENOTTY, f"ioctl {cmd:#x}")

    def _ioctl(self, cmd: int, arg: bytes) -> bytes:
        if cmd in _TERMIOS_OUT:
            return self.termios[:_TERMIOS_OUT[cmd]]
        if cmd in _TERMIOS_IN:
            self.termios = arg + self.termios[len(arg):]
            return b""
        if cmd in _MODEM_BITS_IN:
            bits = int.from_bytes(arg, "little")
            if cmd == TIOCMBIS:
                bits |= self.modem_bits
            elif cmd == TIOCMBIC:
                bits = self.modem_bits & ~bits
            self.modem_bits = bits
            return b""
        if cmd == TIOCMGET:
            return self.modem_bits.to_bytes(4, "little", signed=True)
        if cmd == TCFLSH:
            return b""
        return super()._ioctl(cmd, arg)


class PortHandle:
    """One opener of the port (one open file on /dev/wwan0mbim0)."""

    def __init__(self, port: MbimPort, generation: int) -> None:
        self.port = port
        self.generation = generation
        self.closed = False

    @property
    def stale(self) -> bool:
        return self.closed or self.generation != self.port.generation

    def _check(self, what: str) -> None:
        if self.stale:
            raise _oserror(errno.EIO, f"{what} after the modem went away"
                           if not self.closed else f"{what} on a closed handle")

    @property
    def readable(self) -> bool:
        """True when a read would not block (data queued, or an error to report)."""
        return self.stale or self.port.queued_bytes > 0

    def read(self, size: int) -> bytes:
        """At most one DL transfer (or the rest of one). BlockingIOError when nothing is
        queued; OSError(EIO) once the modem is gone."""
        self._check("read")
        if size <= 0:
            return b""
        if not self.port.queued_bytes:
            raise BlockingIOError(errno.EAGAIN, "no MBIM message queued")
        return self.port._take(size)

    def write(self, data: bytes) -> int:
        """One UL transfer; the whole buffer or an OSError (EMSGSIZE, EIO, ...)."""
        self._check("write")
        return self.port._send(data)

    def poll(self) -> int:
        if self.stale:
            return POLLHUP_MASK
        mask = POLLOUT_MASK
        if self.port.queued_bytes:
            mask |= POLLIN_MASK
        return mask

    def ioctl_sizes(self, cmd: int) -> tuple[int, int]:
        """The bytes `cmd` reads from and writes to the client's argument."""
        self._check("ioctl")
        return self.port.ioctl_sizes(cmd)

    def ioctl(self, cmd: int, arg: bytes = b"") -> bytes:
        """The ioctl's output bytes, given the `arg` bytes it reads (`port.ioctl_sizes`);
        OSError(ENOTTY) for an ioctl the port does not have."""
        self._check("ioctl")
        need = self.port.ioctl_sizes(cmd)[0]
        if len(arg) < need:
            raise _oserror(errno.EFAULT, f"ioctl {cmd:#x}: {len(arg)} of {need} input bytes")
        return self.port._ioctl(cmd, bytes(arg[:need]))

    async def close(self) -> None:
        """The last close of the port closes the channel and purges unread data."""
        if self.closed:
            return
        self.closed = True
        await self.port._release(self)


async def _close_quietly(channel: Channel) -> None:
    try:
        await channel.close()
    except Exception as exc:  # closing a dead channel may fail; the port is closed anyway
        log.debug("closing the MBIM channel: %s", exc)
