"""The device faults of iosm_cuse/sim/faults.py (run against the kernel's driver by
tests/uml/faults.py): each spoils exactly what it says, and only the FAULT_AT-th MUX data
transfer. Our own decoders are the check that the spoiled bytes are wrong."""

from __future__ import annotations

import pytest

from iosm_cuse.sim.faults import FAULT_AT, FaultInjector, is_mux_data, spoil
from iosm_cuse.wire.mux import AdbBuilder, MuxDecodeError, decode_adb, decode_adgh, encode_adgh

PKT = bytes(range(60))


def adb() -> bytes:
    b = AdbBuilder()
    assert b.add(0, PKT)
    return b.finish(1)


@pytest.mark.parametrize("kind", ["mux-offset", "mux-length"])
def test_a_spoiled_lite_datagram_fails_to_decode(kind: str) -> None:
    good = encode_adgh(0, PKT)
    assert decode_adgh(good)[1] == PKT
    with pytest.raises(MuxDecodeError):
        decode_adgh(spoil(kind, good))


@pytest.mark.parametrize("kind", ["mux-offset", "mux-length"])
def test_a_spoiled_adb_fails_to_decode(kind: str) -> None:
    good = adb()
    assert [good[s:e] for _i, s, e, _c in decode_adb(good, 0).datagrams] == [PKT]
    bad = spoil(kind, good)
    assert len(bad) == len(good) and bad != good
    try:
        content = decode_adb(bad, 0)
    except MuxDecodeError:
        return
    assert content.stopped is not None or not content.datagrams


def test_only_the_chosen_data_transfer_is_due_and_only_once() -> None:
    inj = FaultInjector(None, "mux-length")  # type: ignore[arg-type]
    cmd = b"CMDH" + bytes(12)
    assert not is_mux_data(cmd) and is_mux_data(encode_adgh(0, PKT))
    due = [inj.due(d) for d in [cmd, *[encode_adgh(0, PKT)] * (FAULT_AT + 2)]]
    assert due.index(True) == FAULT_AT and due.count(True) == 1
    assert inj.report() == {"fault": "mux-length", "injected": True,
                            "mux_data_seen": FAULT_AT}
    with pytest.raises(ValueError):
        FaultInjector(None, "bitflip")  # type: ignore[arg-type]
