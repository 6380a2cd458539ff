"""Shared-memory Bus backend: the host and the modem model (another process) map the same memory.

Two arrangements, both described by a `ShmLayout` (where BAR0, BAR2 and the DMA pool sit):
- `two_file`: registers (BAR0 then BAR2) in one memfd, the DMA pool in a second memfd; DMA
  address = offset in the pool. Signals are two eventfds (device->host interrupt, host->device
  doorbell). This is what `sim/process.py` uses.
- `single_file`: everything in one region, like the BAR2 of QEMU's ivshmem; DMA address = offset
  in that region. Without eventfds both sides poll (`event_fd` is None).

`ShmBus(role=HOST)` and `ShmBus(role=DEVICE)` are the two views of the same memory: they differ
only in which eventfd they wait on and which they signal. fds cross the process boundary with
`send_bus_fds` / `recv_bus_fds` (SCM_RIGHTS over a Unix socket).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from iosm_cuse.bus.base import BAR0, BAR2, Bus, BusError, DmaPool

HOST = "host"
DEVICE = "device"
PAGE = mmap.PAGESIZE
BAR0_SIZE = 4096
BAR2_SIZE = 4096  # 256 bytes used; a page so the DMA pool stays page aligned
DEFAULT_DMA_SIZE = 64 * 1024 * 1024  # memfds are sparse: only touched pages cost memory
_MAX_FDS = 4


@dataclass(frozen=True)
class Place:
    file: int  # index into the list of files
    offset: int
    size: int


@dataclass(frozen=True)
class ShmLayout:
    """Where BAR0, BAR2 and the DMA pool sit in the shared file(s)."""

    bar0: Place
    bar2: Place
    dma: Place
    dma_base_addr: int  # DMA address of the pool's first byte

    @classmethod
    def two_file(cls, dma_size: int = DEFAULT_DMA_SIZE) -> ShmLayout:
        return cls(Place(0, 0, BAR0_SIZE), Place(0, BAR0_SIZE, BAR2_SIZE),
                   Place(1, 0, dma_size), 0)

    @classmethod
    def single_file(cls, total: int) -> ShmLayout:
        """ivshmem style: BAR0 page, BAR2 page, then DMA; addresses are offsets in the file."""
        dma_off = BAR0_SIZE + BAR2_SIZE
        if total <= dma_off:
            raise BusError(f"shared region of {total} bytes leaves no room for DMA")
        return cls(Place(0, 0, BAR0_SIZE), Place(0, BAR0_SIZE, BAR2_SIZE),
                   Place(0, dma_off, total - dma_off), dma_off)

    @property
    def file_sizes(self) -> list[int]:
        sizes: dict[int, int] = {}
        for p in (self.bar0, self.bar2, self.dma):
            sizes[p.file] = max(sizes.get(p.file, 0), p.offset + p.size)
        return [sizes[i] for i in range(len(sizes))]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShmLayout:
        d = json.loads(text)
        return cls(Place(**d["bar0"]), Place(**d["bar2"]), Place(**d["dma"]),
                   int(d["dma_base_addr"]))


class ShmBus(Bus):
    """One side's view of shared memory + eventfds. Owns (and closes) the fds it was given."""

    def __init__(self, files: list[int], layout: ShmLayout, role: str,
                 irq_fd: int | None = None, doorbell_fd: int | None = None) -> None:
        if role not in (HOST, DEVICE):
            raise ValueError(role)
        self.layout = layout
        self.role = role
        self.files = list(files)
        self.irq_efd = irq_fd  # device -> host
        self.doorbell_efd = doorbell_fd  # host -> device
        self._maps = [mmap.mmap(fd, size) for fd, size in zip(files, layout.file_sizes,
                                                                strict=True)]
        self._bars = {BAR0: self._view(layout.bar0), BAR2: self._view(layout.bar2)}
        self.dma = DmaPool(self._view(layout.dma), layout.dma_base_addr)
        self._closed = False

    def _view(self, p: Place) -> memoryview:
        return memoryview(self._maps[p.file])[p.offset:p.offset + p.size]

    # -- creation

    @classmethod
    def create(cls, layout: ShmLayout | None = None) -> ShmBus:
        """The host side: new memfds and eventfds. `peer_fds()` are what the device needs."""
        layout = layout or ShmLayout.two_file()
        files = []
        for i, size in enumerate(layout.file_sizes):
            fd = os.memfd_create(f"iosm-shm-{i}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            files.append(fd)
        irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return cls(files, layout, HOST, irq, bell)

    @classmethod
    def open_file(cls, path: Path, role: str, size: int | None = None) -> ShmBus:
        """A single shared file (e.g. the ivshmem backing file); both sides poll."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        total = size if size is not None else os.fstat(fd).st_size
        return cls([fd], ShmLayout.single_file(total), role)

    def peer_fds(self) -> list[int]:
        """files..., irq eventfd, doorbell eventfd (what the other side's ShmBus is built from)."""
        extra = [fd for fd in (self.irq_efd, self.doorbell_efd) if fd is not None]
        return [*self.files, *extra]

    # -- Bus interface

    @property
    def event_fd(self) -> int | None:
        return self.irq_efd if self.role == HOST else self.doorbell_efd

    def ack_event(self) -> int:
        fd = self.event_fd
        if fd is None:
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def notify(self) -> None:
        fd = self.doorbell_efd if self.role == HOST else self.irq_efd
        if fd is not None:
            os.eventfd_write(fd, 1)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bars.clear()
        self.dma.mem.release()
        for m in self._maps:
            # a view may still be alive somewhere; the unmap then happens at exit
            with contextlib.suppress(BufferError):
                m.close()
        for fd in [*self.files, self.irq_efd, self.doorbell_efd]:
            if fd is not None:
                os.close(fd)


# ---- handing a bus to another process ----------------------------------------------------------


def send_bus_fds(sock: socket.socket, bus: ShmBus, extra: dict[str, Any] | None = None) -> None:
    """Send the layout and `extra` (JSON) and the fds (SCM_RIGHTS) so the peer can build its
    view. One message: the header must fit in 64 KiB."""
    header = json.dumps({"layout": bus.layout.to_json(), "nfiles": len(bus.files),
                         "eventfds": bus.irq_efd is not None, "extra": extra or {}}).encode()
    socket.send_fds(sock, [header], bus.peer_fds())


def recv_bus_fds(sock: socket.socket, role: str = DEVICE) -> tuple[ShmBus, dict[str, Any]]:
    """Counterpart of send_bus_fds: this side's ShmBus and the sender's `extra`."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, _MAX_FDS)
    try:
        head = json.loads(msg)
        layout = ShmLayout.from_json(head["layout"])
        n = int(head["nfiles"])
        if len(fds) != n + (2 if head["eventfds"] else 0):
            raise BusError(f"expected bus fds, got {len(fds)}")
        extra = dict(head["extra"])
    except (ValueError, KeyError, TypeError) as exc:
        for fd in fds:
            os.close(fd)
        raise BusError(f"bad bus hand-over: {exc}") from None
    irq, bell = (fds[n], fds[n + 1]) if head["eventfds"] else (None, None)
    return ShmBus(fds[:n], layout, role, irq, bell), extra
