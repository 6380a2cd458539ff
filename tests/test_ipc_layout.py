"""The wire layouts: offsets as in docs/iosm-protocol.md §1-§2, and pack/unpack round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iosm_cuse.bus.base import BusError, DmaPool, DmaRegion, doorbell_offset
from iosm_cuse.wire.channels import MuxMode, channel_config, channel_of_pipe, mux_mode_from_caps
from iosm_cuse.wire.ipc import (
    AP_SHARED,
    CONTEXT_INFO,
    MESSAGES,
    SCRATCHPAD,
    TD,
    TD_STRUCT,
    Doorbell,
    MsgType,
    Record,
    decode_ring_message,
    encode_ring_message,
)


def test_offsets_match_the_fact_sheet() -> None:
    assert AP_SHARED.size == 0xD10 == 3344
    assert [AP_SHARED.offset_of(n) for n in ("device_info", "msg_head", "head_array",
                                              "msg_tail", "tail_array", "msg_ring")] == \
        [0x38, 0x44, 0x48, 0xA8, 0xAC, 0x110]
    assert AP_SHARED.offset_of("head_array", 23) == 0x48 + 92
    assert AP_SHARED.offset_of("msg_ring", 127) == 0x110 + 127 * 24
    assert CONTEXT_INFO.size == 56 and CONTEXT_INFO["msg_ring_entries"].offset == 0x30
    assert SCRATCHPAD["ipc_status"].offset == 0x60
    assert SCRATCHPAD["context_info_address"].offset == 0x64
    assert SCRATCHPAD["cp_capabilities"].offset == 0xF4
    assert [doorbell_offset(d) for d in Doorbell] == [0x10, 0x30, 0x50]
    for kind, lay in MESSAGES.items():
        assert lay.size == 24 and lay["type"].offset == 11 and lay["status"].offset == 20, kind


def test_open_pipe_bytes_exactly() -> None:
    raw = encode_ring_message(MsgType.OPEN_PIPE, td_ring_address=0x1122334455667788, td_count=4,
                         pipe=12, irq_vector=0, backoff_us=1000)
    assert raw == (struct.pack("<QHBB", 0x1122334455667788, 4, 12, 1)
                   + struct.pack("<III", 0, 1000, 0))


def test_td_bitfields() -> None:
    raw = TD.pack(address=0xABC, size=0x123456, status=2)
    assert raw == struct.pack("<QII", 0xABC, 0x02123456, 0)
    assert TD_STRUCT.unpack(raw) == (0xABC, 0x02123456)
    buf = bytearray(raw)
    TD.set(buf, 0, "status", 4)
    assert TD.get(buf, 0, "size") == 0x123456 and TD.get(buf, 0, "status") == 4


def test_overlapping_fields_are_refused() -> None:
    from iosm_cuse.wire.ipc import Field

    with pytest.raises(ValueError):
        Record("bad", 8, [Field("a", 0, "I"), Field("b", 2, "I")])
    with pytest.raises(ValueError):
        Record("bad", 4, [Field("a", 2, "I")])


def test_unknown_message_type_is_rejected() -> None:
    raw = bytearray(24)
    raw[11] = 0x77
    with pytest.raises(ValueError, match="unknown"):
        decode_ring_message(raw)
    with pytest.raises(ValueError):
        decode_ring_message(b"\x01" * 12)


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)


@given(u64, u16, u8, u32, u32, u32)
def test_open_pipe_round_trip(addr: int, count: int, pipe: int, vec: int, bo: int,
                              status: int) -> None:
    raw = encode_ring_message(MsgType.OPEN_PIPE, td_ring_address=addr, td_count=count, pipe=pipe,
                         irq_vector=vec, backoff_us=bo, status=status)
    kind, f = decode_ring_message(raw)
    assert kind is MsgType.OPEN_PIPE
    assert (f["td_ring_address"], f["td_count"], f["pipe"], f["irq_vector"], f["backoff_us"],
            f["status"]) == (addr, count, pipe, vec, bo, status)


@given(st.sampled_from([MsgType.CLOSE_PIPE, MsgType.ABORT_PIPE]), u8, u32)
def test_close_abort_round_trip(kind: MsgType, pipe: int, status: int) -> None:
    raw = encode_ring_message(kind, pipe=pipe, status=status)
    assert decode_ring_message(raw) == (kind, {"pipe": pipe, "type": int(kind), "status": status})
    assert raw[:10] == bytes(10) and raw[12:20] == bytes(8)  # reserved bytes stay zero


@given(u8, u8, u8, u32)
def test_sleep_and_feature_round_trip(target: int, state: int, feat: int, status: int) -> None:
    k, f = decode_ring_message(encode_ring_message(MsgType.SLEEP, target=target, state=state,
                                         status=status))
    assert k is MsgType.SLEEP and (f["target"], f["state"], f["status"]) == (target, state, status)
    k, f = decode_ring_message(encode_ring_message(MsgType.FEATURE_SET, features=feat))
    assert k is MsgType.FEATURE_SET and f["features"] == feat


@given(u64, st.integers(0, 2**24 - 1), u8, u8)
def test_td_round_trip(addr: int, size: int, status: int, nxt: int) -> None:
    raw = TD.pack(address=addr, size=size, status=status, next_count=nxt)
    assert len(raw) == 16
    assert TD.unpack(raw) == {"address": addr, "size": size, "status": status,
                              "next_count": nxt}


@given(st.lists(u64, min_size=6, max_size=6), u16, u8, u8)
def test_context_info_round_trip(addrs: list[int], entries: int, v1: int, v2: int) -> None:
    names = ["device_info_address", "head_array_address", "tail_array_address",
             "msg_head_address", "msg_tail_address", "msg_ring_address"]
    vals = dict(zip(names, addrs, strict=True), msg_ring_entries=entries, msg_irq_vector=v1,
                device_info_irq_vector=v2)
    raw = CONTEXT_INFO.pack(**vals)
    assert len(raw) == 56 and raw[0x34:] == bytes(4)
    assert CONTEXT_INFO.unpack(raw) == vals


@given(st.binary(min_size=60, max_size=60), u32, u32, u64)
def test_scratchpad_round_trip(chip: bytes, ver: int, caps: int, ci: int) -> None:
    raw = SCRATCHPAD.pack(chip_info=chip, cp_version=ver, cp_capabilities=caps,
                          context_info_address=ci)
    f = SCRATCHPAD.unpack(raw)
    assert (f["chip_info"], f["cp_version"], f["cp_capabilities"],
            f["context_info_address"]) == (chip, ver, caps, ci)


def test_channel_table() -> None:
    assert channel_config(6).dl_buf_size == 32 * 1024 and channel_config(6).dl_tds == 4
    lite = channel_config(0, MuxMode.LITE)
    aggr = channel_config(0, MuxMode.AGGREGATION)
    assert (lite.ul_tds, lite.dl_tds, lite.dl_buf_size) == (800, 1200, 2048)
    assert (aggr.ul_tds, aggr.dl_tds, aggr.dl_buf_size) == (60, 60, 16384)
    assert channel_of_pipe(13) == 6 and channel_of_pipe(1) == 0 and channel_of_pipe(20) is None
    assert mux_mode_from_caps(0x100, 0x300) is MuxMode.AGGREGATION
    assert mux_mode_from_caps(0x100, 1 << 21) is MuxMode.LITE
    assert mux_mode_from_caps(0xFF, 0x300) is MuxMode.LITE  # caps ignored below 0x0100


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_dma_pool_never_overlaps_and_coalesces(ops: list[tuple[bool, int]]) -> None:
    pool = DmaPool(memoryview(bytearray(64 * 1024)), base_addr=0x1000)
    live: list[DmaRegion] = []
    for do_free, size in ops:
        if do_free and live:
            pool.free(live.pop(size % len(live)))
            continue
        try:
            r = pool.alloc(size)
        except BusError:
            continue
        assert pool.contains(r.addr, r.size) and r.addr % 64 == 0
        for o in live:
            assert r.offset + r.size <= o.offset or o.offset + o.size <= r.offset
        live.append(r)
    for r in live:
        pool.free(r)
    assert pool.in_use == 0
    assert pool.alloc(64 * 1024).size == 64 * 1024  # fully coalesced again
    with pytest.raises(BusError):
        pool.view_at(0x1000 + 64 * 1024 - 4, 8)


def test_dma_regions_from_before_a_reset_are_not_freed_again() -> None:
    pool = DmaPool(memoryview(bytearray(4096)))
    old = pool.alloc(1024)
    pool.reset()
    new = pool.alloc(1024)
    assert new.offset == old.offset
    pool.free(old)  # stale: must not release `new`
    assert pool.in_use == 1024
    pool.free(new)
    assert pool.in_use == 0
    with pytest.raises(BusError, match="double free"):
        pool.free(new)
