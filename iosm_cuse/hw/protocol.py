"""Sans-IO core of the host side of the IOSM IPC protocol (docs/iosm-protocol.md §2).

Everything here works on memoryviews of the AP shared area and of DMA regions: no fds, no
asyncio, no time. `hw/engine.py` drives it from interrupts and timers.

Every value read back from shared memory is device-controlled: ring tails, TD sizes, TD
addresses, completion types. Each is checked; a bad one is rejected through `Rejects` (counted,
logged once per kind) and never touches another transfer.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from iosm_cuse.bus.base import DmaRegion
from iosm_cuse.wire.ipc import (
    AP_SHARED,
    CONTEXT_INFO,
    DEVICE_INFO,
    MESSAGES,
    MSG_RING_ENTRIES,
    MSG_SIZE,
    MSG_STATUS_OFFSET,
    MSG_TYPE_OFFSET,
    TD_SIZE,
    TD_STRUCT,
    MsgStatus,
    MsgType,
    TdStatus,
)
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.hw.protocol")

_TD_SIZE_MASK = 0xFFFFFF
_ABORT = int(TdStatus.ABORT)
_DEVICE_INFO_AT = AP_SHARED.offset_of("device_info")


# ---- ring index arithmetic -----------------------------------------------------------------------


def ring_distance(frm: int, to: int, count: int) -> int:
    return (to - frm) % count


def check_tail(tail: int, last_tail: int, head: int, count: int) -> str | None:
    """None if `tail` (device-written) is a valid completion index, else the reject kind.
    Valid: inside the ring and not past what the host queued (last_tail..head)."""
    if not 0 <= tail < count:
        return "tail_range"
    if ring_distance(last_tail, tail, count) > ring_distance(last_tail, head, count):
        return "tail_beyond_head"
    return None


def check_dl_td(raw: bytes | memoryview, expected_addr: int, buf_size: int,
                offset: int = 0) -> int | str:
    """A completed DL TD (at `offset` in `raw`): its payload size, or the reject kind (the
    buffer is then dropped)."""
    addr, word = TD_STRUCT.unpack_from(raw, offset)
    if addr != expected_addr:
        return "dl_td_address"
    status = word >> 24
    if status == _ABORT:
        return "dl_td_abort"
    size: int = word & _TD_SIZE_MASK
    if size > buf_size:
        return "dl_td_size"
    if status not in (TdStatus.END_TRANSFER, TdStatus.PARTIAL_TRANSFER):
        return "dl_td_status"
    return size


# ---- the AP shared area and its message ring -----------------------------------------------------


@dataclass
class Completion:
    index: int
    kind: int  # type byte found in the entry
    status: int


class SharedArea:
    """The AP shared area (context info, device info, indices, message ring) in one region."""

    def __init__(self, region: DmaRegion, rejects: Rejects) -> None:
        self.region = region
        self.mem = region.view
        self.rejects = rejects
        self.msg_head = 0
        self.msg_tail = 0
        self.sent: dict[int, int] = {}  # ring index -> type sent there

    def init_context_info(self) -> None:
        """Zero everything and point the context info at our own structures."""
        base = self.region.addr
        self.mem[:] = bytes(len(self.mem))
        CONTEXT_INFO.pack_into(
            self.mem, 0,
            device_info_address=base + AP_SHARED.offset_of("device_info"),
            head_array_address=base + AP_SHARED.offset_of("head_array"),
            tail_array_address=base + AP_SHARED.offset_of("tail_array"),
            msg_head_address=base + AP_SHARED.offset_of("msg_head"),
            msg_tail_address=base + AP_SHARED.offset_of("msg_tail"),
            msg_ring_address=base + AP_SHARED.offset_of("msg_ring"),
            msg_ring_entries=MSG_RING_ENTRIES, msg_irq_vector=0, device_info_irq_vector=0)

    # device info (device-written)
    def device_exec_stage(self) -> int:
        return int(DEVICE_INFO.get(self.mem, _DEVICE_INFO_AT, "exec_stage"))

    def device_ipc_status(self) -> int:
        return int(DEVICE_INFO.get(self.mem, _DEVICE_INFO_AT, "ipc_status"))

    # pipe indices
    def set_head(self, pipe: int, value: int) -> None:
        AP_SHARED.set(self.mem, 0, "head_array", value, pipe)

    def set_tail(self, pipe: int, value: int) -> None:
        AP_SHARED.set(self.mem, 0, "tail_array", value, pipe)

    def tail(self, pipe: int) -> int:
        return int(AP_SHARED.get(self.mem, 0, "tail_array", pipe))

    # message ring
    def post(self, kind: MsgType, **fields: int) -> int | None:
        """Write one message at msg_head and publish it; None if the ring is full."""
        nxt = (self.msg_head + 1) % MSG_RING_ENTRIES
        if nxt == self.msg_tail:
            return None
        idx = self.msg_head
        at = AP_SHARED.offset_of("msg_ring", idx)
        MESSAGES[kind].pack_into(self.mem, at, type=int(kind), **fields)
        self.sent[idx] = int(kind)
        self.msg_head = nxt
        AP_SHARED.set(self.mem, 0, "msg_head", nxt)
        return idx

    def completions(self) -> list[Completion]:
        """Entries the device completed since the last call (msg_tail checked)."""
        tail = int(AP_SHARED.get(self.mem, 0, "msg_tail"))
        return self.completions_for(tail)

    def completions_for(self, tail: int) -> list[Completion]:
        bad = check_tail(tail, self.msg_tail, self.msg_head, MSG_RING_ENTRIES)
        if bad is not None:
            self.rejects("msg_" + bad, f"msg_tail {tail} (host tail {self.msg_tail}, "
                         f"head {self.msg_head})")
            return []
        out = []
        i = self.msg_tail
        while i != tail:
            at = AP_SHARED.offset_of("msg_ring", i)
            kind = self.mem[at + MSG_TYPE_OFFSET]
            status = int.from_bytes(self.mem[at + MSG_STATUS_OFFSET:at + MSG_SIZE], "little")
            sent = self.sent.pop(i, None)
            if sent is not None and kind != sent:
                self.rejects("msg_type", f"entry {i} came back as type {kind:#x}, sent {sent:#x}")
                status = int(MsgStatus.ERROR)
            out.append(Completion(i, kind, status))
            i = (i + 1) % MSG_RING_ENTRIES
        self.msg_tail = tail
        return out


# ---- pipes ---------------------------------------------------------------------------------------


class Pipe:
    """One direction of a channel: a TD ring of `count` entries and `count` buffer slots
    (TD position i always uses slot i, so no per-transfer allocation and every completed TD's
    address can be checked against the only value it may hold)."""

    def __init__(self, number: int, count: int, buf_size: int, ring: DmaRegion,
                 slab: DmaRegion, area: SharedArea) -> None:
        self.number = number
        self.count = count
        self.buf_size = buf_size
        self.ring = ring
        self.slab = slab
        self.area = area
        self.head = 0
        self.tail = 0
        self.published = 0  # the head the device was last shown
        self.last_progress = time.monotonic()

    @property
    def in_flight(self) -> int:
        return (self.head - self.tail) % self.count

    @property
    def free(self) -> int:
        return self.count - 1 - self.in_flight  # the count-1 rule: full when next head == tail

    def slot_addr(self, i: int) -> int:
        return self.slab.addr + i * self.buf_size

    def publish(self) -> None:
        self.area.set_head(self.number, self.head)
        self.published = self.head

    @property
    def unpublished(self) -> bool:
        """TDs queued since the last publish (a doorbell for them is still due)."""
        return self.head != self.published

    def new_tail(self) -> int | None:
        """The device's tail if it moved and is valid (invalid ones are rejected, counted)."""
        tail = self.area.tail(self.number)
        if tail == self.tail:
            return None
        bad = check_tail(tail, self.tail, self.head, self.count)
        if bad is not None:
            self.area.rejects(bad, f"pipe {self.number}: tail {tail} (host tail {self.tail}, "
                              f"head {self.head}, count {self.count})")
            return None
        return tail


class UlPipe(Pipe):
    def push_many(self, queue: collections.deque[bytes]) -> int:
        """Move transfers from `queue` into free TDs; returns how many (not yet published)."""
        n = min(len(queue), (self.tail - self.head - 1) % self.count)
        push, pop = self.push, queue.popleft
        for _ in range(n):
            push(pop())
        return n

    def push(self, data: bytes | memoryview) -> None:
        """Queue one transfer at head (caller checked `free` and the size); not yet published."""
        i = self.head
        off = i * self.buf_size
        n = len(data)
        self.slab.view[off:off + n] = data
        TD_STRUCT.pack_into(self.ring.view, i * TD_SIZE, self.slab.addr + off, n)
        self.head = (i + 1) % self.count

    def reap(self) -> int:
        """Free the TDs the device consumed; returns how many."""
        tail = self.new_tail()
        if tail is None:
            return 0
        view, unpack, count = self.ring.view, TD_STRUCT.unpack_from, self.count
        base, bs = self.slab.addr, self.buf_size
        n = (tail - self.tail) % count
        i = self.tail
        for _ in range(n):
            if unpack(view, i * TD_SIZE)[0] != base + i * bs:
                self.area.rejects("ul_td_address", f"pipe {self.number} TD {i}: "
                                  f"address came back changed")
            i = (i + 1) % count
        self.tail = tail
        self.last_progress = time.monotonic()
        return n


class DlPipe(Pipe):
    def post(self, i: int) -> None:
        TD_STRUCT.pack_into(self.ring.view, i * TD_SIZE, self.slot_addr(i), self.buf_size)

    def post_all(self) -> None:
        """At open: count-1 empty buffers."""
        for i in range(self.count - 1):
            self.post(i)
        self.head = self.count - 1
        self.publish()

    def reap(self, deliver: Callable[[bytes], None]) -> tuple[int, bool]:
        """Deliver every completed DL TD and re-post its buffer at head.
        Returns (TDs consumed, whether the device had used up every posted buffer)."""
        tail = self.new_tail()
        if tail is None:
            return 0, False
        drained = tail == self.head
        view, slab, bs, count = self.ring.view, self.slab.view, self.buf_size, self.count
        base = self.slab.addr
        i, n = self.tail, 0
        while i != tail:
            at = i * TD_SIZE
            res = check_dl_td(view, base + i * bs, bs, at)
            if isinstance(res, str):
                self.area.rejects(res, f"pipe {self.number} TD {i}: "
                                  f"{TD_STRUCT.unpack_from(view, at)}")
            else:
                off = i * bs
                deliver(bytes(slab[off:off + res]))
            i = (i + 1) % count
            n += 1
        self.tail = tail
        # re-post as many buffers as came back (at head: the slot there is free by construction)
        for _ in range(n):
            self.post(self.head)
            self.head = (self.head + 1) % count
        self.publish()
        self.last_progress = time.monotonic()
        return n, drained
