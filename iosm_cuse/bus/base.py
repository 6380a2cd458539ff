"""The Bus: what the IPC engine (and the device model) needs from a device, and nothing more.

A Bus offers
- register access to BAR0 (doorbells) and BAR2 (scratchpad): 32/64-bit little-endian reads and
  writes at byte offsets (`read32`, `write32`, `read64`, `write64`);
- a DMA memory pool: one memoryview plus an allocator handing out regions with their DMA
  addresses (`bus.dma`, a `DmaPool`);
- the "other side" signal: on the host that is the device's interrupt (MSI), on the device side
  it is the host's doorbell. `event_fd` is a file descriptor for `loop.add_reader`, or None for
  buses without interrupts (then the user polls every `poll_interval` seconds); `ack_event()`
  drains/re-arms it;
- `notify()`: tell the other side to look (host: after a doorbell register write; device: raise
  the interrupt). `doorbell(n, value)` is the host's register write + notify.

Backends: `bus/shm.py` (memfds + eventfds shared with the model process), `bus/uio.py` (a UIO-bound
PCI device). The engine only sees this interface, so a VFIO backend can be added without
touching it.
"""

from __future__ import annotations

import abc
import bisect
import struct
from dataclasses import dataclass

BAR0 = 0  # doorbell ("IPC regs") region
BAR2 = 2  # scratchpad ("MMIO") region

DOORBELL_BASE = 0x10  # BAR0 offset of doorbell 0 (docs/iosm-protocol.md §1.4)
DOORBELL_STRIDE = 0x20

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class BusError(Exception):
    """The bus cannot do what was asked (out of range access, no DMA memory left...)."""


def doorbell_offset(n: int) -> int:
    """BAR0 offset of doorbell n."""
    return DOORBELL_BASE + n * DOORBELL_STRIDE


@dataclass(frozen=True)
class DmaRegion:
    """A piece of the DMA pool: `addr` is what the device is told, `view` what the host touches."""

    addr: int  # DMA (bus) address
    offset: int  # offset inside the pool's memoryview
    size: int
    view: memoryview
    epoch: int = 0  # the pool's reset count when handed out


class DmaPool:
    """A first-fit allocator over one memoryview. DMA address = `base_addr` + offset in the view.

    Regions are aligned to `align` bytes; freed regions are coalesced with their neighbours so a
    pool survives any number of channel open/close cycles.
    """

    def __init__(self, mem: memoryview, base_addr: int = 0, align: int = 64) -> None:
        self.mem = mem
        self.base_addr = base_addr
        self.size = len(mem)
        self.align = align
        self._free_starts: list[int] = [0]  # sorted
        self._free_sizes: dict[int, int] = {0: self.size}
        self._used: dict[int, int] = {}
        self.epoch = 0

    @property
    def in_use(self) -> int:
        """Bytes currently allocated (tests use it to show nothing leaked)."""
        return sum(self._used.values())

    def alloc(self, size: int, *, zero: bool = True) -> DmaRegion:
        want = max(self.align, -(-size // self.align) * self.align)
        for start in self._free_starts:
            have = self._free_sizes[start]
            if have >= want:
                self._take(start, have, want)
                view = self.mem[start:start + size]
                if zero:
                    view[:] = bytes(size)
                return DmaRegion(self.base_addr + start, start, size, view, self.epoch)
        raise BusError(f"DMA pool exhausted: {size} bytes wanted, {self.size - self.in_use} free")

    def _take(self, start: int, have: int, want: int) -> None:
        i = bisect.bisect_left(self._free_starts, start)
        del self._free_starts[i]
        del self._free_sizes[start]
        if have > want:
            bisect.insort(self._free_starts, start + want)
            self._free_sizes[start + want] = have - want
        self._used[start] = want

    def free(self, region: DmaRegion) -> None:
        if region.epoch != self.epoch:
            return  # handed out before a reset: already gone, and its range may be reused
        start = region.offset
        size = self._used.pop(start, None)
        if size is None:
            raise BusError(f"double free of DMA region at {region.addr:#x}")
        i = bisect.bisect_left(self._free_starts, start)
        # merge with the following free extent
        if i < len(self._free_starts) and self._free_starts[i] == start + size:
            nxt = self._free_starts.pop(i)
            size += self._free_sizes.pop(nxt)
        # merge with the preceding free extent
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free_sizes[prev] == start:
                self._free_sizes[prev] += size
                return
        self._free_starts.insert(i, start)
        self._free_sizes[start] = size

    def reset(self) -> None:
        """Forget every allocation (after the device went down: it owns nothing any more)."""
        self._free_starts = [0]
        self._free_sizes = {0: self.size}
        self._used.clear()
        self.epoch += 1

    def contains(self, addr: int, size: int) -> bool:
        """True if [addr, addr+size) lies inside the pool: every device-given address is checked."""
        off = addr - self.base_addr
        return off >= 0 and size >= 0 and off + size <= self.size

    def view_at(self, addr: int, size: int) -> memoryview:
        """The pool bytes at DMA address `addr`; BusError if outside the pool."""
        if not self.contains(addr, size):
            raise BusError(f"DMA range {addr:#x}+{size} outside the pool")
        off = addr - self.base_addr
        return self.mem[off:off + size]


class Bus(abc.ABC):
    """One side's view of a device: registers, DMA memory and the signal from the other side."""

    dma: DmaPool
    poll_interval: float = 0.002  # seconds between polls when event_fd is None
    _bars: dict[int, memoryview]  # set by each backend when it maps its BARs

    def bar(self, index: int) -> memoryview:
        """The mapped BAR `index` (BAR0 or BAR2)."""
        try:
            return self._bars[index]
        except KeyError:
            raise BusError(f"no BAR{index} on this bus") from None

    @property
    @abc.abstractmethod
    def event_fd(self) -> int | None:
        """Readable when the other side signalled (interrupt / doorbell); None: poll instead."""

    @abc.abstractmethod
    def ack_event(self) -> int:
        """Drain/re-arm the signal; returns how many arrived (0 if none, never blocks)."""

    @abc.abstractmethod
    def notify(self) -> None:
        """Signal the other side (host: doorbell interrupt; device: MSI)."""

    def close(self) -> None:
        """Release maps and fds (idempotent)."""
        return None

    # Register access: concrete on top of bar(); a backend with special MMIO rules overrides.

    def read32(self, bar: int, offset: int) -> int:
        return int(_U32.unpack_from(self.bar(bar), offset)[0])

    def write32(self, bar: int, offset: int, value: int) -> None:
        _U32.pack_into(self.bar(bar), offset, value & 0xFFFFFFFF)

    def read64(self, bar: int, offset: int) -> int:
        return int(_U64.unpack_from(self.bar(bar), offset)[0])

    def write64(self, bar: int, offset: int, value: int) -> None:
        # low half first, as some kernels do; a device accepts either order of the halves
        self.write32(bar, offset, value & 0xFFFFFFFF)
        self.write32(bar, offset + 4, (value >> 32) & 0xFFFFFFFF)

    def doorbell(self, n: int, value: int) -> None:
        """Host: write doorbell register n, then make the device look."""
        self.write32(BAR0, doorbell_offset(n), value)
        self.notify()
