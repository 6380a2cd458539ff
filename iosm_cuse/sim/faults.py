"""Device faults for trying a host driver's defences (`iosm-cuse modem --virtpci ... --fault`).

The model behaves until the `FAULT_AT`-th MUX data transfer it sends down (an echo reply, with
`ping`), and spoils that one, once:

    mux-offset  Aggregation: the first datagram's index points past the block;
                Lite: the ADGH length is 8, shorter than its own header (the packet "starts"
                past the end)
    mux-length  Aggregation: the first datagram's length is 0xFFFF;
                Lite: the ADGH length is 0xFFFF, far beyond the transfer
    td-size     the DL TD of that transfer reports 4096 bytes more than the buffer the host
                posted (the data itself stays inside the buffer)
    crash       the device crashes in band instead (exec stage CRASH, interrupt, silence)

Pure in what it computes (`spoil`); `make_faulty` wires it into an assembled model.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from iosm_cuse.sim.device import DeviceModel
from iosm_cuse.wire.ipc import TD_STRUCT as _TD
from iosm_cuse.wire.mux import ADBH_S, Sig

FAULTS = ("mux-offset", "mux-length", "td-size", "crash")
FAULT_AT = 3
TD_SIZE_EXCESS = 4096
_ADTH_ENTRIES = 16  # ADTH header size; the first entry follows



def is_mux_data(data: bytes) -> bool:
    return len(data) >= 16 and int.from_bytes(data[:4], "little") in (Sig.ADGH, Sig.ADBH)


def spoil(kind: str, data: bytes) -> bytes:
    """`data` (one MUX data transfer) with the fault `kind` written into it."""
    buf = bytearray(data)
    sig = int.from_bytes(buf[:4], "little")
    if sig == Sig.ADGH:
        struct.pack_into("<H", buf, 4, 8 if kind == "mux-offset" else 0xFFFF)
        return bytes(buf)
    _sig, _seq, block_length, first_table = ADBH_S.unpack_from(buf, 0)
    entry = first_table + _ADTH_ENTRIES
    if entry + 8 > len(buf):
        return bytes(buf)
    if kind == "mux-offset":
        struct.pack_into("<I", buf, entry, block_length + 64)
    else:
        struct.pack_into("<H", buf, entry + 4, 0xFFFF)
    return bytes(buf)


class FaultInjector:
    def __init__(self, model: DeviceModel, kind: str) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        self.model = model
        self.kind = kind
        self.seen = 0
        self.injected = False

    def due(self, data: bytes) -> bool:
        """Count MUX data transfers; True for the one to spoil."""
        if self.injected or not is_mux_data(data):
            return False
        self.seen += 1
        if self.seen < FAULT_AT:
            return False
        self.injected = True
        return True

    def report(self) -> dict[str, Any]:
        return {"fault": self.kind, "injected": self.injected, "mux_data_seen": self.seen}


def make_faulty(model: DeviceModel, functions: Any, kind: str) -> FaultInjector:
    """Wire the fault into the assembled model (its MUX function, or the DL TD writer)."""
    inj = FaultInjector(model, kind)
    mux = functions.mux
    if kind in ("mux-offset", "mux-length", "crash"):
        opened = mux.opened

        def faulty_opened(send: Any) -> None:
            def faulty_send(data: bytes) -> bool:
                if inj.due(data):
                    if kind == "crash":
                        asyncio.get_running_loop().call_soon(model.crash)
                        return True          # swallowed: the device is going down
                    data = spoil(kind, data)
                return bool(send(data))
            opened(faulty_send)

        mux.opened = faulty_opened
    else:
        fill = model._fill_td

        def faulty_fill(ring: memoryview, i: int, data: bytes) -> bool:
            _addr, word = _TD.unpack_from(ring, i * _TD.size)
            ok = fill(ring, i, data)
            if ok and inj.due(data):
                addr, done = _TD.unpack_from(ring, i * _TD.size)
                size = min((word & 0xFFFFFF) + TD_SIZE_EXCESS, 0xFFFFFF)
                _TD.pack_into(ring, i * _TD.size, addr, (done & ~0xFFFFFF) | size)
            return ok

        model._fill_td = faulty_fill  # type: ignore[method-assign]
    return inj
