"""Traffic shaping: the sans-IO decisions (sim/shaper.py) on made-up clocks, and the packet
gateway holding and releasing real echo replies on a running loop (sim/gateway.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.net.gso import checksum
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.gateway import Gateway
from iosm_cuse.sim.shaper import MIN_BURST_BYTES, QUEUE_LIMIT, Shaper, ShapeSpec

# ---- the decisions -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"delay_ms": -1}, {"delay_ms": 60_001}, {"loss_percent": 100.5}, {"loss_percent": -0.1},
    {"rate_mbit": 0}, {"rate_mbit": 1e9}, {"delay_ms": float("nan")},
    {"loss_percent": float("inf")}, {"delay_ms": True}, {"rate_mbit": "10"},
])
def test_out_of_range_or_mistyped_values_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ShapeSpec(**kwargs)  # type: ignore[arg-type]


def test_fixed_delay_alone() -> None:
    s = Shaper(ShapeSpec(delay_ms=80), random.Random(1))
    assert [s.admit(t, 1500) for t in (0.0, 0.001, 5.0)] == pytest.approx([0.08, 0.081, 5.08])


def test_loss_is_bernoulli_at_the_set_rate_and_the_same_for_a_seed() -> None:
    def drops(seed: int) -> list[int]:
        s = Shaper(ShapeSpec(loss_percent=10), random.Random(seed))
        return [i for i in range(20_000) if s.admit(i * 1e-3, 100) is None]

    first = drops(7)
    assert abs(len(first) / 20_000 - 0.10) < 0.01
    assert drops(7) == first and drops(8) != first
    assert Shaper(ShapeSpec(loss_percent=100), random.Random(0)).admit(0, 1) is None
    assert Shaper(ShapeSpec(loss_percent=0), random.Random(0)).admit(0, 1) == 0


def test_rate_caps_an_overload_and_the_queue_drops_at_its_limit() -> None:
    """2 Mbit/s offered for 2 s to a 1 Mbit/s cap: what leaves, leaves at 1 Mbit/s and in
    order; the rest waits, and beyond QUEUE_LIMIT waiting packets is dropped."""
    s = Shaper(ShapeSpec(rate_mbit=1), random.Random(0))
    size, offered = 1000, 2e6 / 8
    leaves = []
    for i in range(int(2 * offered / size)):
        t = s.admit(i * size / offered, size)
        if t is not None:
            leaves.append(t)
    assert leaves == sorted(leaves)
    rate = (len(leaves) - 1) * size * 8 / (leaves[-1] - leaves[0])
    assert rate == pytest.approx(1e6, rel=0.01)
    assert s.overflowed == 0  # 250 packets of backlog at most: under the limit
    t = 10.0
    s2 = Shaper(ShapeSpec(rate_mbit=0.01), random.Random(0))
    dropped = sum(s2.admit(t, 1500) is None for _ in range(QUEUE_LIMIT + 10))
    # Two fit the full bucket (2 x 1500 <= MIN_BURST_BYTES) and leave at once, QUEUE_LIMIT
    # wait, the last 8 find the queue full.
    assert s2.overflowed == dropped == 8


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.01), st.integers(1, 2032)), min_size=1, max_size=300),
       st.floats(0.1, 100), st.floats(0, 200))
def test_hypothesis_rate_never_exceeds_the_bucket(arrivals: list[tuple[float, int]],
                                                  rate_mbit: float, delay_ms: float) -> None:
    """Whatever arrives: packets leave in order, never before arrival + delay, and what has
    left by any time is at most the burst plus the rate times the time since the first."""
    s = Shaper(ShapeSpec(delay_ms=delay_ms, rate_mbit=rate_mbit), random.Random(0))
    now, out = 0.0, []
    for gap, size in arrivals:
        now += gap
        leave = s.admit(now, size)
        assert leave is not None and leave >= now + delay_ms / 1000 - 1e-9
        out.append((leave, size))
    assert [t for t, _ in out] == sorted(t for t, _ in out)
    bps = rate_mbit * 1e6 / 8
    burst = max(MIN_BURST_BYTES, bps * 0.002)
    first = out[0][0]
    sent = 0
    for leave, size in out:
        sent += size
        assert sent <= burst + (leave - first) * bps + size + 1e-6


# ---- the gateway holding real echo replies -------------------------------------------------


def echo_request(src: str, dst: str, seq: int) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, seq) + b"x" * 56)
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                                ipaddress.ip_address(src).packed,
                                ipaddress.ip_address(dst).packed))
    hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    return bytes(hdr + icmp)


async def shaped_gateway() -> tuple[Gateway, list[tuple[float, int, int]]]:
    cfg = ModemConfig()
    gw = Gateway(cfg, "echo")
    got: list[tuple[float, int, int]] = []
    loop = asyncio.get_running_loop()

    def down(sid: int, pkt: bytes) -> bool:
        got.append((loop.time(), sid, struct.unpack_from("!H", pkt, 26)[0]))  # ICMP seq
        return True

    gw.downlink = down
    for n in (0, 1):
        gw.session_changed(n, cfg.session_ip(n))
    return gw, got


def ping(gw: Gateway, session: int, seq: int) -> None:
    ip = gw.config.session_ip(session)
    gw.uplink(session, echo_request(str(ip.ipv4.ip), str(ip.ipv4_gateway), seq))


def test_delay_holds_one_sessions_replies_and_clear_releases_them() -> None:
    async def body() -> None:
        gw, got = await shaped_gateway()
        loop = asyncio.get_running_loop()
        gw.set_shape(0, delay_ms=60)
        assert gw.shapes() == {0: {"delay_ms": 60.0, "loss_percent": 0.0, "rate_mbit": None}}
        t0 = loop.time()
        for seq in range(3):
            ping(gw, 0, seq)
        ping(gw, 1, 99)  # not shaped: answered at once
        assert [(sid, seq) for _, sid, seq in got] == [(1, 99)]
        await asyncio.sleep(0.1)
        assert [(sid, seq) for _, sid, seq in got] == [(1, 99), (0, 0), (0, 1), (0, 2)]
        assert all(0.06 <= t - t0 < 0.09 for t, sid, _ in got if sid == 0)
        # Held packets leave at once, in order, when the shaping is cleared.
        for seq in range(3, 6):
            ping(gw, 0, seq)
        gw.clear_shape(0)
        assert [seq for _, sid, seq in got if sid == 0] == [0, 1, 2, 3, 4, 5]
        assert gw.shapes() == {}
        ping(gw, 0, 6)
        assert got[-1][1:] == (0, 6)
        assert gw.counters["dl_packets"] == 8
        await gw.close()

    asyncio.run(body())


def test_loss_drops_are_counted_as_shaped_and_reach_mbim_statistics() -> None:
    from iosm_cuse.sim.assembly import gateway_statistics

    async def body() -> None:
        gw, got = await shaped_gateway()
        gw.set_shape(1, loss_percent=50)
        for seq in range(400):
            ping(gw, 1, seq)
        lost = gw.counters["drop_shaped_loss"]
        assert lost + len(got) == 400 and 150 < lost < 250
        assert gw.shape_counters()[1] == {"passed": len(got), "lost": lost, "overflowed": 0}
        assert gateway_statistics(gw.counters).in_discards == lost
        await gw.close()

    asyncio.run(body())


def test_bad_sessions_and_values_change_nothing() -> None:
    async def body() -> None:
        gw, _ = await shaped_gateway()
        gw.set_shape(2, rate_mbit=5)
        for bad in (8, -1, True, "0"):
            with pytest.raises(ValueError):
                gw.set_shape(bad, delay_ms=1)  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                gw.clear_shape(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            gw.set_shape(2, loss_percent=101)
        assert gw.shapes() == {2: {"delay_ms": 0.0, "loss_percent": 0.0, "rate_mbit": 5.0}}
        await gw.close()

    asyncio.run(body())
