"""The modem as a virt-pci function: a device-end Bus whose registers UML's kernel reads and
writes through vhost-user messages (docs/uml-virtpci.md).

`VirtPciBus` is what the model (`sim/device.py`) runs on, through the `bus/base.py` interface
alone: BAR0 and BAR2 live in this process; the host's doorbell (a BAR0 write) arrives as the
`event_fd` eventfd; `notify()` raises the MSI; `dma` is the front end's memory as the memory table
maps it (DMA address = UML physical address = guest address of the region).

`DeviceEnd` ties the pure parts together for one front-end connection: the vhost-user session,
the two split queues (0: commands from UML, 1: interrupt buffers UML posts) and the PCI function.
It does the little I/O those need (mmap of the memory table's fds, 8-byte writes to the call fds)
and nothing else; `server.py` moves bytes and fds between it and the socket.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections.abc import Callable

from iosm_cuse.bus.base import BAR0, BAR2, Bus, DmaPool
from iosm_cuse.bus.pci import PciId
from iosm_cuse.bus.virtpci.pcidev import BAR_SIZES, ConfigSpace, PciFunction, encode_msi
from iosm_cuse.bus.virtpci.vhost_user import (
    VRING_STATE,
    Effect,
    MemRegion,
    Message,
    VhostSession,
    encode_reply,
)
from iosm_cuse.bus.virtpci.virtqueue import GuestMemory, GuestMemoryError, GuestRegion, SplitQueue
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.bus.virtpci")

CMD_QUEUE = 0
IRQ_QUEUE = 1
XMM7560 = PciId(0x8086, 0x7560)
_ONE = (1).to_bytes(8, "little")


class VirtPciBus(Bus):
    """The device end's Bus. Thread-safe where it must be: `notify()` may be called from the
    model's thread while the server thread answers UML."""

    def __init__(self, pci_id: PciId = XMM7560) -> None:
        self.pci_id = pci_id
        self.rejects = Rejects(log, what="rejected virt-pci input")
        self._bar_mem = {BAR0: bytearray(BAR_SIZES[BAR0]), BAR2: bytearray(BAR_SIZES[BAR2])}
        self._bars = {i: memoryview(m) for i, m in self._bar_mem.items()}
        self.dma = DmaPool(memoryview(bytearray(0)))  # no memory until SET_MEM_TABLE
        self.config = ConfigSpace(pci_id.vendor, pci_id.device)
        self.function = PciFunction(self.config, self._bars, self.rejects, doorbell_bar=BAR0)
        self.doorbell_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # set by the server: schedules an MSI on its thread
        self.raise_msi: Callable[[], None] | None = None
        self.msi_requested = 0
        self._closed = False

    @property
    def event_fd(self) -> int | None:
        return self.doorbell_efd

    def ack_event(self) -> int:
        try:
            return os.eventfd_read(self.doorbell_efd)
        except BlockingIOError:
            return 0

    def ring_doorbell(self) -> None:
        """A BAR0 write arrived (server thread): wake the model."""
        os.eventfd_write(self.doorbell_efd, 1)

    def notify(self) -> None:
        self.msi_requested += 1
        raise_msi = self.raise_msi
        if raise_msi is not None:
            raise_msi()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self.doorbell_efd)


class DeviceEnd:
    """One front-end connection: session, queues, memory, the PCI function's messages."""

    def __init__(self, bus: VirtPciBus) -> None:
        self.bus = bus
        self.rejects = bus.rejects
        self.session = VhostSession(self.rejects)
        self.memory: GuestMemory | None = None
        self._maps: list[mmap.mmap] = []
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.slave_fd: int | None = None
        self.queues: dict[int, SplitQueue] = {}
        self.msi_pending = False
        self.msi_sent = 0
        self.msi_masked = 0  # requested while the kernel had MSI disabled
        self.lock = threading.RLock()  # the queues and memory belong to whoever holds it
        # the adapter's hooks: a kick fd to watch / to stop watching
        self.on_kick_fd: Callable[[int, int], None] = lambda queue, fd: None
        self.on_kick_fd_gone: Callable[[int], None] = lambda fd: None

    # ---- control messages

    def handle(self, msg: Message, fds: tuple[int, ...]) -> bytes | None:
        reply, effects = self.session.handle(msg, fds)
        for effect in effects:
            extra = self._apply(effect)
            if extra is not None:
                reply = extra
        return reply

    def _apply(self, e: Effect) -> bytes | None:
        if e.kind == "close":
            _close_all(e.fds)
        elif e.kind == "memory":
            self._map_memory(e.regions, e.fds)
        elif e.kind == "kick":
            self._replace(self.kick_fds, e.queue, e.fds)
            if e.fds:
                self.on_kick_fd(e.queue, e.fds[0])
            self._start(e.queue)
        elif e.kind == "call":
            self._replace(self.call_fds, e.queue, e.fds)
            if e.fds:
                os.set_blocking(e.fds[0], False)
        elif e.kind == "slave":
            if self.slave_fd is not None:
                os.close(self.slave_fd)
            self.slave_fd = e.fds[0]  # kept open: UML expects the channel to exist
        elif e.kind == "start":
            self._start(e.queue)
        elif e.kind == "stop":
            self.queues.pop(e.queue, None)
        elif e.kind == "get_base":
            q = self.queues.pop(e.queue, None)
            base = q.last_avail if q is not None else self.session.vrings[e.queue].base
            return encode_reply(11, VRING_STATE.pack(index=e.queue, num=base))
        elif e.kind == "reset":
            self.close()
        return None

    def _replace(self, table: dict[int, int], queue: int, fds: tuple[int, ...]) -> None:
        old = table.pop(queue, None)
        if old is not None:
            if table is self.kick_fds:
                self.on_kick_fd_gone(old)
            os.close(old)
        if fds:
            table[queue] = fds[0]

    def _map_memory(self, regions: tuple[MemRegion, ...], fds: tuple[int, ...]) -> None:
        with self.lock:
            self.queues.clear()
            maps: list[mmap.mmap] = []
            views: list[GuestRegion] = []
            try:
                for r, fd in zip(regions, fds, strict=True):
                    # mmap offsets must be page aligned; map from the page the region starts in
                    start = r.mmap_offset - r.mmap_offset % mmap.PAGESIZE
                    m = mmap.mmap(fd, r.size + (r.mmap_offset - start), offset=start)
                    maps.append(m)
                    skip = r.mmap_offset - start
                    views.append(GuestRegion(r.guest_addr, r.user_addr,
                                             memoryview(m)[skip:skip + r.size]))
            except (OSError, ValueError) as exc:
                self.rejects("vhost_mem_table", "cannot map the memory table: %s", exc)
                for m in maps:
                    with contextlib.suppress(BufferError):
                        m.close()
                return
            finally:
                _close_all(fds)
            self._unmap()
            self._maps = maps
            self.memory = GuestMemory(views)
            # the model's DMA pool: the first (for UML the only) region; DMA address = guest
            # physical address (docs/uml-virtpci.md §7)
            first = views[0]
            self.bus.dma = DmaPool(first.view, first.guest_addr)
            for index in range(len(self.session.vrings)):
                self._start(index)

    def _start(self, index: int) -> None:
        vr = self.session.vrings[index]
        if not vr.ready or self.memory is None or index in self.queues:
            return
        try:
            q = SplitQueue(self.memory, vr.num, vr.desc, vr.avail, vr.used, self.rejects,
                           f"queue {index}", vr.base)
        except GuestMemoryError as exc:
            self.rejects("vring_addr", "queue %d: %s", index, exc)
            return
        self.queues[index] = q
        self.kicked(index)

    # ---- the queues

    def kicked(self, index: int) -> None:
        """The front end offered buffers on queue `index`."""
        with self.lock:
            if index == CMD_QUEUE:
                self._commands()
            elif index == IRQ_QUEUE:
                self._deliver_msi()

    def _commands(self) -> None:
        q = self.queues.get(CMD_QUEUE)
        if q is None:
            return
        done = 0
        doorbell = False
        function = self.bus.function
        while (chain := q.pop()) is not None:
            outcome = function.handle(chain.read_all())
            written = 0
            if outcome.reply is not None:
                if chain.writable_size < len(outcome.reply):
                    self.rejects("pcidev_reply", "a %d-byte answer for a %d-byte buffer",
                                 len(outcome.reply), chain.writable_size)
                written = chain.write(outcome.reply)
            q.push(chain.head, written)
            done += 1
            doorbell |= outcome.doorbell
        if done:
            self._call(CMD_QUEUE, q)
        if doorbell:
            self.bus.ring_doorbell()

    def request_msi(self) -> None:
        """The model raised its interrupt (on the server's thread, via the bus)."""
        with self.lock:
            if not self.bus.config.msi_enabled:
                self.msi_masked += 1
                return
            self.msi_pending = True
            self._deliver_msi()

    def _deliver_msi(self) -> None:
        q = self.queues.get(IRQ_QUEUE)
        if not self.msi_pending or q is None:
            return
        chain = q.pop()
        if chain is None:
            return  # delivered when the front end posts a buffer (its kick)
        written = chain.write(encode_msi(self.bus.config.msi_data))
        q.push(chain.head, written)
        self.msi_pending = False
        self.msi_sent += 1
        self._call(IRQ_QUEUE, q)

    def _call(self, index: int, q: SplitQueue) -> None:
        fd = self.call_fds.get(index)
        if fd is None or not q.wants_interrupt():
            return
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # the front end has wake-ups pending already
        except OSError as exc:
            self.rejects("vring_call", "queue %d: call fd: %s", index, exc)

    # ---- teardown

    def _unmap(self) -> None:
        self.bus.dma = DmaPool(memoryview(bytearray(0)))
        self.memory = None
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()  # a view still alive somewhere: unmapped at exit instead
        self._maps = []

    def close(self) -> None:
        with self.lock:
            self.queues.clear()
            self._unmap()
            for fd in self.kick_fds.values():
                self.on_kick_fd_gone(fd)
            _close_all((*self.kick_fds.values(), *self.call_fds.values()))
            self.kick_fds.clear()
            self.call_fds.clear()
            if self.slave_fd is not None:
                os.close(self.slave_fd)
                self.slave_fd = None


def _close_all(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
