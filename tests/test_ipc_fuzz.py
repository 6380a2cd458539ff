"""Fuzzing the host's decoders of device-written structures (sans-IO, no processes).

More than 100,000 random or mutated TDs, ring completions and tail indices go through the same
code the engine runs on every interrupt. Nothing may escape as an exception, nothing outside
the posted buffers may be delivered, and the rings keep their invariants (count-1 buffers
posted on DL after every reap; indices inside the rings).
"""

from __future__ import annotations

import logging
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.bus.base import DmaPool
from iosm_cuse.hw.protocol import (
    DlPipe,
    Rejects,
    SharedArea,
    UlPipe,
    check_dl_td,
    check_tail,
)
from iosm_cuse.wire.ipc import (
    AP_SHARED,
    MSG_RING_ENTRIES,
    TD_SIZE,
    TD_STRUCT,
    MsgType,
    TdStatus,
)

COUNT = 8
BUF = 256


def _setup() -> tuple[DmaPool, SharedArea, DlPipe, UlPipe, Rejects]:
    pool = DmaPool(memoryview(bytearray(1 << 16)), base_addr=0x10000)
    rej = Rejects(logging.getLogger("fuzz"), every=3600)
    area = SharedArea(pool.alloc(AP_SHARED.size), rej)
    area.init_context_info()
    dl = DlPipe(1, COUNT, BUF, pool.alloc(COUNT * TD_SIZE), pool.alloc(COUNT * BUF), area)
    ul = UlPipe(0, COUNT, BUF, pool.alloc(COUNT * TD_SIZE), pool.alloc(COUNT * BUF), area)
    dl.post_all()
    return pool, area, dl, ul, rej


def _random_td(rng: random.Random, good_addr: int) -> bytes:
    """A valid completed TD, then maybe mutated in one or more ways."""
    size = rng.randrange(BUF + 1)
    addr, status = good_addr, int(TdStatus.END_TRANSFER)
    r = rng.random()
    if r < 0.2:
        size = rng.randrange(1 << 24)
    elif r < 0.35:
        addr = rng.choice([0, 2**64 - 1, good_addr + 1, good_addr - BUF, rng.getrandbits(64)])
    elif r < 0.5:
        status = rng.randrange(256)
    elif r < 0.6:
        return rng.randbytes(TD_SIZE)
    return TD_STRUCT.pack(addr, (status << 24) | size)


def test_fuzz_device_structures() -> None:
    rng = random.Random(0x10517)
    pool, area, dl, ul, rej = _setup()
    fed = 0
    delivered: list[bytes] = []

    # 1. single TDs through the decoder
    for _ in range(40_000):
        raw = _random_td(rng, 0x4000)
        res = check_dl_td(raw, 0x4000, BUF)
        addr, word = TD_STRUCT.unpack(raw)
        if isinstance(res, int):
            assert addr == 0x4000 and res == word & 0xFFFFFF <= BUF
            assert word >> 24 in (TdStatus.END_TRANSFER, TdStatus.PARTIAL_TRANSFER)
        fed += 1

    # 2. tails against random ring states
    for _ in range(20_000):
        count = rng.randrange(2, 2000)
        last, head = rng.randrange(count), rng.randrange(count)
        tail = rng.choice([rng.randrange(count), rng.getrandbits(32), count, head])
        bad = check_tail(tail, last, head, count)
        if bad is None:
            assert 0 <= tail < count
            assert (tail - last) % count <= (head - last) % count
        fed += 1

    # 3. the DL pipe: device fills TDs (sometimes wrongly) and moves its tail (sometimes wrongly)
    dl_ring = dl.ring.view
    tail_at = AP_SHARED.offset_of("tail_array", dl.number)
    for _ in range(25_000):
        n = rng.randrange(0, COUNT)
        i = dl.tail
        for _k in range(min(n, dl.in_flight)):
            dl_ring[i * TD_SIZE:(i + 1) * TD_SIZE] = _random_td(rng, dl.slot_addr(i))
            i = (i + 1) % COUNT
            fed += 1
        tail = i if rng.random() < 0.8 else rng.getrandbits(rng.choice([3, 8, 32]))
        struct.pack_into("<I", area.mem, tail_at, tail)
        before, old_head = dl.tail, dl.head
        got, _drained = dl.reap(delivered.append)
        fed += 1
        if got:
            assert dl.tail == tail and (tail - before) % COUNT == got
        assert dl.in_flight == COUNT - 1  # every consumed buffer was re-posted
        for k in range(got):  # and the re-posted TDs are pristine
            j = (old_head + k) % COUNT
            assert TD_STRUCT.unpack_from(dl_ring, j * TD_SIZE) == (dl.slot_addr(j), BUF)
    assert all(len(d) <= BUF for d in delivered)

    # 4. the UL pipe: host pushes, device returns random tails and scribbles over TDs
    ul_tail_at = AP_SHARED.offset_of("tail_array", ul.number)
    for _ in range(10_000):
        while ul.free and rng.random() < 0.7:
            ul.push(b"u" * rng.randrange(1, BUF))
        ul.publish()
        if rng.random() < 0.2 and ul.in_flight:
            k = (ul.tail + rng.randrange(ul.in_flight)) % COUNT
            ul.ring.view[k * TD_SIZE:(k + 1) * TD_SIZE] = rng.randbytes(TD_SIZE)
        tail = (ul.tail + rng.randrange(ul.in_flight + 1)) % COUNT
        if rng.random() < 0.2:
            tail = rng.choice([rng.getrandbits(32), rng.randrange(COUNT)])
        struct.pack_into("<I", area.mem, ul_tail_at, tail)
        ul.reap()
        fed += 1
        assert 0 <= ul.in_flight <= COUNT - 1

    # 5. message ring completions: random tails and entries
    for _ in range(10_000):
        if rng.random() < 0.5:
            area.post(rng.choice(list(MsgType)), status=0)
        if rng.random() < 0.3:
            k = rng.randrange(MSG_RING_ENTRIES)
            at = AP_SHARED.offset_of("msg_ring", k)
            area.mem[at:at + 24] = rng.randbytes(24)
        r = rng.random()
        if r < 0.6:
            span = (area.msg_head - area.msg_tail) % MSG_RING_ENTRIES
            tail = (area.msg_tail + rng.randrange(span + 1)) % MSG_RING_ENTRIES
        else:
            tail = rng.getrandbits(rng.choice([7, 8, 32]))
        before = area.msg_tail
        done = area.completions_for(tail)
        fed += 1
        if done:
            assert [c.index for c in done] == [(before + k) % MSG_RING_ENTRIES
                                               for k in range(len(done))]
        assert 0 <= area.msg_tail < MSG_RING_ENTRIES

    assert fed >= 100_000, fed
    # every kind of bad input was met and counted
    for kind in ("dl_td_size", "dl_td_address", "dl_td_abort", "dl_td_status", "tail_range",
                 "tail_beyond_head", "ul_td_address", "msg_tail_range", "msg_type"):
        assert rej.counters.get(kind, 0) > 0, (kind, rej.counters)
    assert pool.in_use > 0


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=COUNT * TD_SIZE, max_size=COUNT * TD_SIZE), st.integers(0, 2**32 - 1))
def test_arbitrary_dl_ring_bytes(ring: bytes, tail: int) -> None:
    _pool, area, dl, _ul, rej = _setup()
    dl.ring.view[:] = ring
    struct.pack_into("<I", area.mem, AP_SHARED.offset_of("tail_array", dl.number), tail)
    out: list[bytes] = []
    n, _ = dl.reap(out.append)
    assert len(out) + sum(rej.counters.get(k, 0) for k in
                          ("dl_td_size", "dl_td_address", "dl_td_abort", "dl_td_status")) == n
    assert dl.in_flight == COUNT - 1
