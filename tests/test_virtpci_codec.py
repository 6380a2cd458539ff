"""Property tests of the virt-pci codecs: vhost-user framing and session, split rings, virt-pci
messages and the config space. Whatever the bytes, nothing raises; bad input is counted."""

from __future__ import annotations

import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.bus.virtpci.pcidev import (
    BAR_SIZES,
    PCIDEV_MSG,
    ConfigSpace,
    Op,
    PciFunction,
    decode_msg,
    encode_msg,
)
from iosm_cuse.bus.virtpci.vhost_user import (
    HEADER,
    Message,
    MessageSplitter,
    Request,
    VhostSession,
    encode,
)
from iosm_cuse.bus.virtpci.virtqueue import GuestMemory, GuestRegion, SplitQueue, ring_sizes
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("test")
messages = st.lists(st.tuples(st.integers(0, 40), st.binary(max_size=300)), max_size=8)


def rejects() -> Rejects:
    return Rejects(log, every=1e9)


@given(messages, st.lists(st.integers(1, 64), max_size=20))
def test_splitter_finds_the_messages_however_the_stream_is_cut(
        msgs: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode(r, p) for r, p in msgs)
    splitter = MessageSplitter(rejects())
    got: list[Message] = []
    pos = 0
    for n in [*cuts, len(stream)]:
        got += splitter.feed(stream[pos:pos + n])
        pos += n
    got += splitter.feed(stream[pos:])
    assert [(m.request, m.payload) for m in got] == msgs
    assert splitter.pending == 0 and not splitter.broken


@given(st.binary(max_size=2000))
def test_splitter_and_session_never_raise(data: bytes) -> None:
    r = rejects()
    splitter = MessageSplitter(r)
    session = VhostSession(r)
    for msg in splitter.feed(data):
        reply, effects = session.handle(msg, ())
        assert reply is None or HEADER.unpack(reply)["flags"] == 0x5
        assert all(e.kind != "memory" for e in effects)  # never without its fds


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 7), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 2**64 - 1), st.binary(max_size=16))
def test_pcidev_message_roundtrip(op: int, bar: int, size: int, addr: int, data: bytes) -> None:
    raw = encode_msg(op & 0xFF, bar, size, addr, data)
    msg = decode_msg(raw, rejects())
    assert msg is not None
    assert (msg.op, msg.bar, msg.size, msg.addr, msg.data) == (op & 0xFF, bar, size, addr, data)
    assert len(raw) == PCIDEV_MSG.size + len(data)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_function_answers_any_message_without_raising(raw: bytes) -> None:
    config = ConfigSpace(0x8086, 0x7560)
    bars = {i: memoryview(bytearray(n)) for i, n in BAR_SIZES.items()}
    fn = PciFunction(config, bars, rejects())
    out = fn.handle(raw)
    if len(raw) >= PCIDEV_MSG.size and raw[0] in (Op.CFG_READ, Op.MMIO_READ):
        assert out.reply is not None
    assert config.read(0, 4) == bytes.fromhex("86806075")  # identity is read-only


@given(st.lists(st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=8)), max_size=30))
def test_config_writes_touch_only_writable_bits(writes: list[tuple[int, bytes]]) -> None:
    config = ConfigSpace(0x8086, 0x7560)
    before = bytes(config.bytes)
    for off, data in writes:
        config.write(off, data)
    for i, (old, new) in enumerate(zip(before, config.bytes, strict=True)):
        assert (old ^ new) & ~config.mask[i] == 0


NUM = 8
BASE = 0x1000


@settings(max_examples=300)
@given(st.binary(min_size=ring_sizes(NUM)[0] + ring_sizes(NUM)[1], max_size=512))
def test_split_queue_never_follows_a_bad_ring(ring_bytes: bytes) -> None:
    mem = bytearray(4096)
    desc_size, avail_size, _used_size = ring_sizes(NUM)
    mem[:desc_size + avail_size] = ring_bytes[:desc_size + avail_size]
    view = memoryview(mem)
    memory = GuestMemory([GuestRegion(BASE, BASE, view)])
    r = rejects()
    q = SplitQueue(memory, NUM, BASE, BASE + desc_size, BASE + 2048, r, "q")
    taken = 0
    while (chain := q.pop()) is not None and taken < 100:
        taken += 1
        for v in (*chain.readable, *chain.writable):
            assert v.obj is mem  # inside the memory table
        q.push(chain.head, 0)
    assert taken <= NUM


def test_requests_table_is_complete() -> None:
    from iosm_cuse.bus.virtpci.vhost_user import PAYLOADS

    assert set(PAYLOADS) == set(Request)
