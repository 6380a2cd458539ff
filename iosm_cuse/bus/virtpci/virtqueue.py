"""Split virtqueues, device side, pure: guest memory in, descriptor chains out, used entries back
(docs/uml-virtpci.md §5).

A split ring is three tables in the front end's memory: descriptors (16 bytes each), the
available ring (the front end's offers: flags, idx, ring[num]) and the used ring (the device's
answers: flags, idx, ring[num] of {id, len}). Everything in them is untrusted: a descriptor
index beyond the ring, a chain that loops, an address outside the memory table or an available
index that runs further than the ring is rejected through `Rejects`, never followed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from iosm_cuse.wire.record import Record
from iosm_cuse.wire.rejects import Rejects

DESC = Record.sequential("vring_desc", ("addr", "Q"), ("len", "I"), ("flags", "H"),
                         ("next", "H"))
AVAIL_HEAD = Record.sequential("vring_avail", ("flags", "H"), ("idx", "H"))
USED_HEAD = Record.sequential("vring_used", ("flags", "H"), ("idx", "H"))
USED_ELEM = Record.sequential("vring_used_elem", ("id", "I"), ("len", "I"))
_DESC = DESC.record
_U16 = Record.sequential("u16", ("value", "H")).record
_USED_ELEM = USED_ELEM.record


class DescFlag(enum.IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


AVAIL_F_NO_INTERRUPT = 1


class GuestMemoryError(Exception):
    """An address range the memory table does not cover."""


@dataclass(frozen=True)
class GuestRegion:
    guest_addr: int
    user_addr: int
    view: memoryview


class GuestMemory:
    """The front end's memory as the memory table maps it. Descriptors carry guest addresses;
    SET_VRING_ADDR gives the rings' user (front-end virtual) addresses."""

    def __init__(self, regions: list[GuestRegion]) -> None:
        self.regions = regions

    def view(self, addr: int, size: int, *, user: bool = False) -> memoryview:
        for r in self.regions:
            start = r.user_addr if user else r.guest_addr
            off = addr - start
            if off >= 0 and size >= 0 and off + size <= len(r.view):
                return r.view[off:off + size]
        raise GuestMemoryError(f"{addr:#x}+{size} is outside the memory table")


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the available ring and the used ring (no EVENT_IDX)."""
    return DESC.size * num, AVAIL_HEAD.size + 2 * num, USED_HEAD.size + USED_ELEM.size * num


@dataclass
class Chain:
    """One available descriptor chain: what the device may read, then where it may write."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    def read_all(self) -> bytes:
        return b"".join(bytes(v) for v in self.readable)

    @property
    def writable_size(self) -> int:
        return sum(len(v) for v in self.writable)

    def write(self, data: bytes) -> int:
        """Scatter `data` over the writable buffers; returns the bytes written."""
        pos = 0
        for v in self.writable:
            n = min(len(v), len(data) - pos)
            v[:n] = data[pos:pos + n]
            pos += n
            if pos == len(data):
                break
        return pos


class SplitQueue:
    """The device's side of one split ring."""

    def __init__(self, mem: GuestMemory, num: int, desc: int, avail: int, used: int,
                 rejects: Rejects, name: str, base: int = 0) -> None:
        self.num = num
        self.rejects = rejects
        self.name = name
        desc_size, avail_size, used_size = ring_sizes(num)
        self._desc = mem.view(desc, desc_size, user=True)
        self._avail = mem.view(avail, avail_size, user=True)
        self._used = mem.view(used, used_size, user=True)
        self._mem = mem
        self.last_avail = base & 0xFFFF
        self.used_idx = base & 0xFFFF
        self.broken = False  # the front end's avail index cannot be trusted: stop using the ring

    def _avail_idx(self) -> int:
        return int(_U16.unpack_from(self._avail, 2)[0])

    def pending(self) -> int:
        """Chains offered and not yet taken; a count beyond the ring breaks the queue."""
        if self.broken:
            return 0
        n = (self._avail_idx() - self.last_avail) & 0xFFFF
        if n > self.num:
            self.rejects("vring_avail_idx", "%s: avail idx %d with %d taken of %d entries",
                         self.name, self._avail_idx(), self.last_avail, self.num)
            self.broken = True
            return 0
        return n

    def pop(self) -> Chain | None:
        """The next chain, or None when nothing is offered. A chain whose head is valid but
        whose descriptors are not is completed at once with length 0 and skipped."""
        while self.pending():
            slot = self.last_avail % self.num
            head = int(_U16.unpack_from(self._avail, AVAIL_HEAD.size + 2 * slot)[0])
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            if head >= self.num:
                self.rejects("vring_desc", "%s: head %d of %d", self.name, head, self.num)
                continue  # no valid id to give back
            chain = self._walk(head)
            if chain is not None:
                return chain
            self.push(head, 0)
        return None

    def _walk(self, head: int) -> Chain | None:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        i = head
        for _ in range(self.num):
            addr, length, flags, nxt = _DESC.unpack_from(self._desc, i * DESC.size)
            if flags & DescFlag.INDIRECT:
                self.rejects("vring_desc", "%s: indirect descriptor %d (not negotiated)",
                             self.name, i)
                return None
            try:
                view = self._mem.view(addr, length)
            except GuestMemoryError as exc:
                self.rejects("vring_desc_addr", "%s: descriptor %d: %s", self.name, i, exc)
                return None
            if flags & DescFlag.WRITE:
                writable.append(view)
            elif writable:
                self.rejects("vring_desc", "%s: readable descriptor %d after a writable one",
                             self.name, i)
                return None
            else:
                readable.append(view)
            if not flags & DescFlag.NEXT:
                return Chain(head, readable, writable)
            if nxt >= self.num:
                self.rejects("vring_desc", "%s: descriptor %d links to %d of %d", self.name, i,
                             nxt, self.num)
                return None
            i = nxt
        self.rejects("vring_desc", "%s: chain from %d loops", self.name, head)
        return None

    def push(self, head: int, written: int) -> None:
        """Give chain `head` back with `written` bytes in its writable buffers."""
        slot = self.used_idx % self.num
        _USED_ELEM.pack_into(self._used, USED_HEAD.size + USED_ELEM.size * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # the entry is complete before the index that publishes it (one process writes both;
        # Python's stores are not reordered past each other as seen by another process on x86)
        _U16.pack_into(self._used, 2, self.used_idx)

    def wants_interrupt(self) -> bool:
        return not int(_U16.unpack_from(self._avail, 0)[0]) & AVAIL_F_NO_INTERRUPT
