"""Reproducible MUX traffic, checked in order per session, shared by the MUX tests in one
process (test_mux_pair.py) and over the real engine with the model in its own process
(test_mux_engine.py, whose model side imports this module by name too).
"""

from __future__ import annotations

import asyncio
import random
import struct

from iosm_cuse.hw.mux.host import MuxHost
from iosm_cuse.sim.mux import MuxDevice

UP, DOWN = 1, 2
SESSIONS = range(8)

# ---- traffic: reproducible packets of 20..1500 bytes, checked in order per session -----------

_BLOCK = random.Random(11).randbytes(4096)
HEAD = struct.Struct("<BBI")


def packet(direction: int, if_id: int, seq: int) -> bytes:
    """Packet `seq` of a session's stream; the first is 20 bytes, the second 1500."""
    if seq < 2:
        size = (20, 1500)[seq]
    else:
        size = 20 + (seq * 7919 + if_id * 104729 + direction * 15485863) % 1481
    off = (seq * 131 + if_id * 17) % 2048
    return HEAD.pack(direction, if_id, seq) + _BLOCK[off:off + size - HEAD.size]


class Checker:
    """Receives (if_id, packet): each must be the next of its own session's stream."""

    def __init__(self, direction: int) -> None:
        self.direction = direction
        self.next = [0] * 8
        self.bad: list[str] = []

    def __call__(self, if_id: int, pkt: bytes) -> None:
        seq = self.next[if_id]
        if pkt == packet(self.direction, if_id, seq):
            self.next[if_id] = seq + 1
        elif len(self.bad) < 20:
            got = HEAD.unpack_from(pkt) if len(pkt) >= HEAD.size else pkt
            self.bad.append(f"session {if_id}: expected #{seq}, got {got!r} ({len(pkt)} bytes)")

    def uplink(self, if_id: int, pkt: bytes) -> None:  # the device MUX's gateway interface
        self(if_id, pkt)

    @property
    def total(self) -> int:
        return sum(self.next)


class FlowWatch:
    """The host's on_flow: which sessions are stopped, and every change seen."""

    def __init__(self) -> None:
        self.stopped = [False] * 8
        self.log: list[tuple[int, bool]] = []
        self.changed = asyncio.Event()

    def __call__(self, if_id: int, stopped: bool) -> None:
        self.stopped[if_id] = stopped
        self.log.append((if_id, stopped))
        self.changed.set()


async def host_send(mux: MuxHost, flow: FlowWatch, n: int, sessions: range = SESSIONS,
                    batch: int = 32) -> None:
    """n packets per session, honouring on_flow (a refused transmit fails the test)."""
    seqs = dict.fromkeys(sessions, 0)
    while any(s < n for s in seqs.values()):
        sent = False
        for if_id in sessions:
            if flow.stopped[if_id]:
                continue
            for _ in range(min(batch, n - seqs[if_id])):
                assert mux.transmit(if_id, packet(UP, if_id, seqs[if_id])), \
                    f"session {if_id} refused packet {seqs[if_id]}: {mux.status()}"
                seqs[if_id] += 1
                sent = True
                if flow.stopped[if_id]:  # e.g. the queue just became full
                    break
        if sent:
            await asyncio.sleep(0)
        else:
            flow.changed.clear()
            await asyncio.wait_for(flow.changed.wait(), 5)


async def device_send(dev: MuxDevice, n: int, sessions: range = SESSIONS,
                      batch: int = 32) -> None:
    """n packets per session towards the host; a refused downlink is offered again later."""
    seqs = dict.fromkeys(sessions, 0)
    while any(s < n for s in seqs.values()):
        for if_id in sessions:
            for _ in range(min(batch, n - seqs[if_id])):
                if not dev.downlink(if_id, packet(DOWN, if_id, seqs[if_id])):
                    break
                seqs[if_id] += 1
        await asyncio.sleep(0)
