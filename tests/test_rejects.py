"""The one mechanism for dropped and rejected input (wire.rejects) and its users' counters.

Per-kind counting, one log line per kind and then at most one per interval (with the running
count), driven by an injectable clock; and the counter names and order that `status` shows for
links and the gateway, which the move onto the mechanism must not change.
"""

from __future__ import annotations

import logging

import pytest

from iosm_cuse.chardev.pty import MbimFramer
from iosm_cuse.link.bridge import SessionBridge
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.gateway import Gateway
from iosm_cuse.wire.rejects import Rejects, merged

LOGGER = logging.getLogger("test.rejects")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_counts_per_kind_with_preset_kinds_at_zero(clock: Clock) -> None:
    rej = Rejects(LOGGER, kinds=("a", "b"), clock=clock)
    assert rej.counters == {"a": 0, "b": 0} and rej["c"] == 0
    for _ in range(3):
        rej("a", "bad a")
    rej("c", "bad c")
    rej.count("b")
    assert rej.counters == {"a": 3, "b": 1, "c": 1}
    assert (rej["a"], rej.total) == (3, 5)
    snapshot = rej.as_dict()
    rej("a", "again")
    assert snapshot["a"] == 3 and rej["a"] == 4  # a copy, not a view


def test_one_line_per_kind_then_one_per_interval_with_the_count(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    rej = Rejects(LOGGER, every=10.0, what="wwan0-1", clock=clock)
    for _ in range(50):
        rej("tx_dropped_not_ip", "dropped a non-IP uplink packet")
    rej("rx_dropped_write", "TUN write failed: %s", "EIO")
    assert lines(caplog) == [
        "wwan0-1: dropped a non-IP uplink packet [tx_dropped_not_ip: 1 so far]",
        "wwan0-1: TUN write failed: EIO [rx_dropped_write: 1 so far]"]
    clock.now += 9.9
    rej("tx_dropped_not_ip", "dropped a non-IP uplink packet")
    assert len(lines(caplog)) == 2
    clock.now += 0.1
    rej("tx_dropped_not_ip", "dropped a non-IP uplink packet")
    rej("tx_dropped_not_ip", "dropped a non-IP uplink packet")
    assert lines(caplog)[2:] == ["wwan0-1: dropped a non-IP uplink packet "
                                 "[tx_dropped_not_ip: 52 so far]"]
    assert rej["tx_dropped_not_ip"] == 53


def test_per_gives_each_subject_its_own_line_but_one_count(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    rej = Rejects(LOGGER, what="gateway", clock=clock)
    for sid in (3, 5, 3, 5, 3):
        rej("drop_not_connected", "session %d: not connected", sid, per=sid)
    assert lines(caplog) == ["gateway: session 3: not connected [drop_not_connected: 1 so far]",
                             "gateway: session 5: not connected [drop_not_connected: 2 so far]"]
    assert rej.counters == {"drop_not_connected": 5}


def test_count_alone_logs_nothing(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER.name)
    rej = Rejects(LOGGER, clock=clock)
    rej.count("tx_dropped_mux")
    rej.count("tx_dropped_mux")
    assert rej["tx_dropped_mux"] == 2 and lines(caplog) == []


def test_the_detail_is_formatted_only_when_logged(clock: Clock) -> None:
    formatted: list[int] = []

    class Costly:
        def __str__(self) -> str:
            formatted.append(1)
            return "costly"

    rej = Rejects(LOGGER, clock=clock)
    for _ in range(100):
        rej("kind", "detail %s", Costly())
    assert len(formatted) == 1 and rej["kind"] == 100


def test_merged_keeps_a_given_order() -> None:
    rej = Rejects(LOGGER, kinds=("drop_b",))
    rej.count("drop_a")
    assert list(merged({"pkts": 4}, rej, ("pkts", "drop_a", "drop_b", "absent")).items()) == \
        [("pkts", 4), ("drop_a", 1), ("drop_b", 0), ("absent", 0)]
    assert merged({"pkts": 4}, rej) == {"pkts": 4, "drop_a": 1, "drop_b": 0}


# ---- the users: names and order as `status` showed them before the mechanism was shared


LINK_COUNTERS = ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_dropped_too_big",
                 "tx_dropped_not_ip", "tx_dropped_mux", "rx_dropped_not_ip", "rx_dropped_write",
                 "flow_stops"]
GATEWAY_COUNTERS = ["ul_packets", "ul_bytes", "dl_packets", "dl_bytes", "ul_gso_frames",
                    "dl_gso_frames", "echo_replies", "ul_fragments", "drop_not_connected",
                    "drop_source", "drop_link_local", "drop_malformed", "drop_not_echo",
                    "drop_fragment", "drop_no_session", "drop_downlink", "drop_tun_write",
                    "drop_shaped_loss", "drop_shaped_queue"]


def test_a_links_counters_keep_their_names_and_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    bridge = SessionBridge(1, -1, "wwan0-1", lambda _i, _p: True, 2032)
    assert list(bridge.snapshot()) == LINK_COUNTERS
    assert set(bridge.snapshot().values()) == {0}
    for _ in range(3):
        bridge.deliver(b"\x00" * 20)          # not IP
        bridge.deliver(b"\x45" + bytes(19))   # IP, but the fd is closed: the write fails
    snap = bridge.snapshot()
    assert (snap["rx_dropped_not_ip"], snap["rx_dropped_write"], snap["rx_packets"]) == (3, 3, 0)
    said = [r.getMessage() for r in caplog.records]
    assert sum("non-IP downlink" in t for t in said) == 1, said
    assert sum("TUN write failed" in t for t in said) == 1, said


def test_the_gateways_counters_keep_their_names_and_order() -> None:
    gw = Gateway(ModemConfig())
    assert list(gw.counters) == GATEWAY_COUNTERS
    gw.uplink(2, b"\x45" + bytes(19))
    gw.uplink(2, b"\x45" + bytes(19))
    assert gw.counters["drop_not_connected"] == 2 and gw.drops["drop_not_connected"] == 2


def test_the_pty_framer_counts_resyncs_through_its_rejects(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    rej = Rejects(LOGGER, what="MBIM over PTY", clock=Clock())
    framer = MbimFramer(rejects=rej)
    open_msg = bytes.fromhex("01000000 10000000 07000000 00100000")
    for _ in range(4):
        assert framer.feed(b"\xee" * 5 + open_msg) == [open_msg]
    assert (framer.resyncs, framer.discarded, rej["resyncs"]) == (4, 20, 4)
    assert len(lines(caplog)) == 1 and "garbage" in lines(caplog)[0]
