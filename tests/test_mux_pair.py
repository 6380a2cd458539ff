"""Host MUX <-> device MUX over an in-memory channel 0 (tier 1), both modes.

`MemLink.open_channel` stands in for `engine.open_channel(0, ...)`: UL transfers go to the
device MUX, DL transfers to the host, each a loop iteration later, never larger than the pipe's
buffers (Lite 2 KiB, Aggregation 16 KiB). The traffic helpers (mux_traffic.py) are shared
with the two-process test over the real engine (test_mux_engine.py).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from helpers import until_async
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mux_traffic import (
    DOWN,
    HEAD,
    SESSIONS,
    UP,
    Checker,
    FlowWatch,
    device_send,
    host_send,
    packet,
)

from iosm_cuse.hw.mux.host import QUEUE_LIMIT, QUEUE_LIMIT_FC, UL_HIGH, MuxError, MuxHost
from iosm_cuse.sim.mux import MuxDevice
from iosm_cuse.wire.channels import MuxMode
from iosm_cuse.wire.mux import (
    COMMANDS,
    FLOW_MASK_STOP,
    Command,
    Sig,
    decode_acb,
    decode_lite_cmd,
    encode_acb,
    encode_adgh,
    encode_lite_cmd,
    encode_table,
)

T = TypeVar("T")
MODES = [MuxMode.LITE, MuxMode.AGGREGATION]
BUF = {MuxMode.LITE: 2048, MuxMode.AGGREGATION: 16 * 1024}

def run(coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- the in-memory channel ---------------------------------------------------------------------


class MemChannel:
    def __init__(self, device: MuxDevice, on_receive: Callable[[bytes], None], limit: int,
                 dl_backlog: int = 4096) -> None:
        self.device = device
        self.on_receive = on_receive
        self.limit = limit
        self.dl_backlog = dl_backlog
        self.ul: collections.deque[bytes] = collections.deque()
        self.dl: collections.deque[bytes] = collections.deque()
        self.hold = False  # True: the device consumes nothing (UL piles up as pending)
        self.closed = False
        self.dl_oversize = 0
        self.ul_sizes: list[int] = []
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        device.opened(self.dl_send)

    @property
    def pending(self) -> int:
        return len(self.ul)

    def send(self, data: bytes) -> None:
        self.send_many([data])

    def send_many(self, transfers: list[bytes]) -> None:
        if self.closed:
            raise OSError(errno.ENOTCONN, "closed")
        for data in transfers:
            if len(data) > self.limit:
                raise OSError(errno.EMSGSIZE, f"{len(data)} > {self.limit}")
        for data in transfers:
            self.ul.append(bytes(data))
            self.ul_sizes.append(len(data))
        self._kick()

    def dl_send(self, data: bytes) -> bool:
        if self.closed:
            return False
        if len(data) > self.limit:
            self.dl_oversize += 1  # what the model does: the transfer is lost
            return True
        if len(self.dl) >= self.dl_backlog:
            return False
        self.dl.append(bytes(data))
        self._kick()
        return True

    def release(self) -> None:
        self.hold = False
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if not self.hold:
            while self.ul:
                self.device.receive(self.ul.popleft())
        while self.dl and not self.closed:
            self.on_receive(self.dl.popleft())

    async def close(self) -> None:
        self._run()
        self.closed = True
        self.device.closed()


class MemLink:
    def __init__(self, device: MuxDevice, mode: MuxMode) -> None:
        self.device = device
        self.limit = BUF[mode]
        self.channels: list[MemChannel] = []

    async def open_channel(self, ch_id: int, on_receive: Callable[[bytes], None]) -> MemChannel:
        assert ch_id == 0
        ch = MemChannel(self.device, on_receive, self.limit)
        self.channels.append(ch)
        return ch

    @property
    def ch(self) -> MemChannel:
        return self.channels[-1]


class Pair:
    def __init__(self, mode: MuxMode, gateway: Any = None, **kw: Any) -> None:
        self.up = Checker(UP)
        self.down = Checker(DOWN)
        self.flow = FlowWatch()
        self.dev = MuxDevice(gateway if gateway is not None else self.up, mode)
        self.link = MemLink(self.dev, mode)
        self.mux = MuxHost(self.link.open_channel, mode, **kw)
        self.mux.on_receive = self.down
        self.mux.on_flow = self.flow

    async def open_all(self) -> None:
        await asyncio.gather(*(self.mux.open_session(i) for i in SESSIONS))
        assert self.mux.sessions == list(SESSIONS)
        assert self.dev.sessions == set(SESSIONS)


# ---- tests -------------------------------------------------------------------------------------

N = 10_000


@pytest.mark.parametrize("mode", MODES)
def test_ten_thousand_each_way_on_all_8_sessions_at_once(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.open_all()
        assert len(p.link.channels) == 1  # one channel for all sessions
        await asyncio.gather(host_send(p.mux, p.flow, N), device_send(p.dev, N))
        await until_async(lambda: p.up.total == 8 * N and p.down.total == 8 * N, 30,
                          f"all packets ({p.up.total} up, {p.down.total} down)")
        assert not p.up.bad and not p.down.bad, (p.up.bad, p.down.bad)
        assert p.up.next == [N] * 8 and p.down.next == [N] * 8
        st = p.mux.status()
        for i in SESSIONS:
            c = st["sessions"][i]
            assert c["tx_packets"] == N and c["rx_packets"] == N
            assert c["tx_dropped_queue_full"] == 0 and c["tx_dropped_too_big"] == 0
        assert not st["rejects"] and not p.dev.rejects.counters
        assert p.link.ch.dl_oversize == 0
        assert max(p.link.ch.ul_sizes) <= BUF[mode]
        if mode is MuxMode.AGGREGATION:  # packets were really aggregated
            assert p.dev.counters["ul_blocks"] < 8 * N / 4
            assert p.dev.counters["dl_blocks"] < 8 * N / 4
        for i in SESSIONS:
            await p.mux.close_session(i)
        assert p.link.ch.closed and p.dev.sessions == set()

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_device_flow_control_stops_the_uplink_and_releases_it(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.open_all()
        assert p.dev.assert_flow_control(3, True)
        await until_async(lambda: p.mux.status()["sessions"][3]["device_flow_ctl"] == 1, 2,
                          "FLOW_CTL taken")
        assert p.dev.counters["flow_ctl_acks"] == 1
        # as the kernel's netdev queue: the link goes on queueing up to the flow-controlled
        # limit, and is stopped when that is full; beyond it packets are dropped (counted)
        assert not any(p.flow.stopped)
        accepted = sum(p.mux.transmit(3, packet(UP, 3, i)) for i in range(QUEUE_LIMIT_FC + 10))
        assert accepted == QUEUE_LIMIT_FC
        assert p.flow.stopped[3]
        assert not any(p.flow.stopped[i] for i in SESSIONS if i != 3)
        # the other sessions are not blocked
        for i in range(50):
            assert p.mux.transmit(4, packet(UP, 4, i))
        await until_async(lambda: p.up.next[4] == 50, 2, "session 4 traffic")
        await asyncio.sleep(0.05)
        assert p.up.next[3] == 0  # nothing of session 3 crossed while stopped
        c3 = p.mux.status()["sessions"][3]
        assert c3["tx_dropped_queue_full"] == 10 and c3["queued"] == QUEUE_LIMIT_FC
        assert c3["flow_ctl_on"] == 1
        assert p.dev.assert_flow_control(3, False)
        await until_async(lambda: p.up.next[3] == QUEUE_LIMIT_FC, 2,
                                "the queued packets after release")
        assert not p.flow.stopped[3] and p.dev.counters["flow_ctl_acks"] == 2
        assert (3, True) in p.flow.log and p.flow.log[-1] == (3, False)
        assert p.mux.transmit(3, packet(UP, 3, QUEUE_LIMIT_FC))
        await until_async(lambda: p.up.next[3] == QUEUE_LIMIT_FC + 1, 2, "traffic after release")
        assert not p.up.bad

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_pending_bytes_stop_every_session_and_restart_below_10k(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.open_all()
        ch = p.link.ch
        ch.hold = True  # the device stops consuming: UL transfers stay pending
        seq = [0] * 8
        while not p.mux.global_stop:
            for i in (1, 2):
                assert p.mux.transmit(i, packet(UP, i, seq[i]))
                seq[i] += 1
            await asyncio.sleep(0)
        assert p.mux.pending_bytes >= UL_HIGH
        # while stopped, every session (not only 1 and 2) has the queue limit 64: its link is
        # stopped when that is full, and packets beyond it are dropped and counted
        assert not p.flow.stopped[5]
        n_ok = 0
        while p.mux.transmit(5, packet(UP, 5, seq[5])):
            seq[5] += 1
            n_ok += 1
        assert n_ok == QUEUE_LIMIT_FC and p.flow.stopped[5]
        assert p.mux.status()["sessions"][5]["tx_dropped_queue_full"] == 1
        await asyncio.sleep(0.02)
        assert p.mux.global_stop and p.up.total == 0
        ch.release()
        await until_async(lambda: not p.mux.global_stop, 2, "restart")
        await until_async(lambda: p.up.next[1] == seq[1] and p.up.next[2] == seq[2] and
                          p.up.next[5] == seq[5], 2, "everything queued")
        assert not any(p.flow.stopped) and not p.up.bad
        assert p.mux.status()["ul_stops"] >= 1

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_queue_limit_without_flow_control_is_256(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.open_all()
        ok = sum(p.mux.transmit(0, packet(UP, 0, i)) for i in range(QUEUE_LIMIT + 5))
        assert ok == QUEUE_LIMIT  # all in one batch: the drain has not run yet
        assert p.flow.stopped[0]
        await until_async(lambda: p.up.next[0] == QUEUE_LIMIT, 2, "the queue")
        await until_async(lambda: not p.flow.stopped[0], 2, "flow back on")
        assert p.mux.status()["sessions"][0]["tx_dropped_queue_full"] == 5

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_credit_mode_sends_only_what_fcth_grants_cover(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode, ul_credit=True)
        await p.mux.open_session(2)
        assert not p.flow.stopped[2]  # no credit is no flow control: the queue takes packets
        pkts = [packet(UP, 2, i) for i in range(10)]
        for pkt in pkts:
            assert p.mux.transmit(2, pkt)
        await asyncio.sleep(0.02)
        assert p.up.next[2] == 0
        assert p.dev.grant_credits(2, len(pkts[0]) - 1)  # not enough for the first packet
        await asyncio.sleep(0.02)
        assert p.up.next[2] == 0
        assert p.dev.grant_credits(2, 1 + len(pkts[1]) + len(pkts[2]))  # exactly three
        await until_async(lambda: p.up.next[2] == 3, 2, "three packets on credit")
        await asyncio.sleep(0.02)
        assert p.up.next[2] == 3 and p.mux.status()["sessions"][2]["credits"] == 0
        assert p.dev.grant_credits(2, 100_000)
        await until_async(lambda: p.up.next[2] == 10, 2, "the rest")
        assert not p.up.bad and p.mux.status()["ul_stops"] == 0
        if mode is MuxMode.LITE:  # credit mode: queue levels reported after data
            assert p.dev.counters["qlth"] >= 1 and 2 in p.dev.queue_levels
        else:
            assert 2 in p.dev.queue_levels
        # a session without credit fills its queue to 256, then reports stopped
        await p.mux.open_session(3)
        ok = 0
        while p.mux.transmit(3, packet(UP, 3, ok)):
            ok += 1
        assert ok == QUEUE_LIMIT and p.flow.stopped[3] and not p.flow.stopped[2]
        await asyncio.sleep(0.02)
        assert p.up.next[3] == 0

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_channel_opens_with_the_first_session_and_closes_after_the_last(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.mux.open_session(1)
        await p.mux.open_session(6)
        assert len(p.link.channels) == 1 and not p.link.ch.closed
        await p.mux.close_session(1)
        assert not p.link.ch.closed and p.dev.sessions == {6}
        assert not p.mux.transmit(1, packet(UP, 1, 0))  # closed session: refused, counted
        assert not p.dev.downlink(1, packet(DOWN, 1, 0))
        await p.mux.close_session(6)
        assert p.link.ch.closed and p.mux.status()["channel_open"] is False
        await p.mux.open_session(0)  # a new channel for a new first session
        assert len(p.link.channels) == 2
        assert p.mux.transmit(0, packet(UP, 0, 0))
        await until_async(lambda: p.up.next[0] == 1, 2, "traffic on the new channel")
        with pytest.raises(MuxError) as ei:
            await p.mux.open_session(8)
        assert ei.value.errno == errno.EINVAL

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_sizes_at_the_limit(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.mux.open_session(0)
        big = p.mux.max_ip_packet
        if mode is MuxMode.LITE:
            assert big == 2032
        pkt = bytes([0x45]) + bytes(big - 1)
        assert p.mux.transmit(0, pkt)
        assert not p.mux.transmit(0, pkt + b"x")
        got: list[bytes] = []
        p.dev._uplink = lambda i, b: got.append(b)
        await until_async(lambda: len(got) == 1, 2, "the largest packet")
        assert got == [pkt]
        assert p.dev.downlink(0, pkt) and not p.dev.downlink(0, pkt + b"x")
        rx: list[bytes] = []
        p.mux.on_receive = lambda i, b: rx.append(b)
        await until_async(lambda: len(rx) == 1, 2, "the largest DL packet")
        assert rx == [pkt] and p.link.ch.dl_oversize == 0
        assert p.mux.status()["sessions"][0]["tx_dropped_too_big"] == 1

    run(main())


class Silent:
    """A device that never answers."""

    def opened(self, send: Callable[[bytes], bool]) -> None:
        self.send = send

    def receive(self, data: bytes) -> None:
        pass

    def closed(self) -> None:
        pass


@pytest.mark.parametrize("mode", MODES)
def test_open_session_times_out_and_closes_the_channel(mode: MuxMode) -> None:
    async def main() -> None:
        link = MemLink(Silent(), mode)  # type: ignore[arg-type]
        mux = MuxHost(link.open_channel, mode, cmd_timeout=0.1)
        t0 = time.monotonic()
        with pytest.raises(MuxError) as ei:
            await mux.open_session(0)
        assert ei.value.errno == errno.ETIMEDOUT and 0.1 <= time.monotonic() - t0 < 1
        assert link.ch.closed and mux.sessions == []

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_open_session_refused_by_the_modem(mode: MuxMode) -> None:
    class Refuses(Silent):
        def receive(self, data: bytes) -> None:
            c = COMMANDS[mode]
            resp = Command(c.open_session_resp, 0, 0, {"response": 1})
            self.send(encode_lite_cmd(resp) if mode is MuxMode.LITE else encode_acb([resp]))

    async def main() -> None:
        link = MemLink(Refuses(), mode)  # type: ignore[arg-type]
        mux = MuxHost(link.open_channel, mode)
        with pytest.raises(MuxError) as ei:
            await mux.open_session(0)
        assert ei.value.errno == errno.EIO and "response 1" in str(ei.value)
        assert link.ch.closed

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_link_status_report_is_answered(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.mux.open_session(0)
        assert p.dev.link_status_report(0)
        await until_async(lambda: p.dev.counters["link_status_resps"] == 1, 2, "the response")
        assert not p.dev.rejects.counters and not p.mux.rejects.counters

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_device_rejects_bad_host_structures_and_keeps_serving(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.mux.open_session(0)
        dev = p.dev
        good = encode_adgh(0, b"E" * 40)
        bad = [b"", b"\x00" * 3, b"JUNK" + bytes(40), good[:-1],  # ADGH length > transfer
               encode_adgh(9, b"E" * 40),  # if_id 9
               encode_table(Sig.FCTH, 0, 5)]  # a DL-only structure on the uplink
        if mode is MuxMode.AGGREGATION:
            bad[3] = b"ADBH" + bytes(12)  # an empty ADB
        for raw in bad:
            dev.receive(raw)
        assert sum(dev.rejects.counters.values()) == len(bad)
        assert p.mux.transmit(0, packet(UP, 0, 0))  # still serving
        await until_async(lambda: p.up.next[0] == 1, 2, "traffic after rejects")

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_host_counts_dl_for_sessions_not_open_and_bad_dl(mode: MuxMode) -> None:
    async def main() -> None:
        p = Pair(mode)
        await p.mux.open_session(0)
        ch = p.link.ch
        ch.dl_send(encode_adgh(5, b"E" * 30))  # session 5 is not open on the host
        ch.dl_send(b"ADGH" + bytes(12))  # length 0
        ch.dl_send(b"WHAT" + bytes(30))
        await until_async(lambda: p.mux.dl_transfers >= 3, 2, "DL transfers")
        assert p.mux.status()["dl_no_session"] == 1
        assert sum(p.mux.rejects.counters.values()) == 2
        assert p.dev.downlink(0, packet(DOWN, 0, 0))
        await until_async(lambda: p.down.next[0] == 1, 2, "good DL after bad")

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_flow_ctl_mask_decides_as_in_the_kernel(mode: MuxMode) -> None:
    """All ones stops, 0 allows, other masks change nothing; each command is acknowledged with
    its transaction id; a command too short for the mask implies it from its type."""
    c = COMMANDS[mode]

    def cmd_bytes(code: int, tid: int, mask: int | None) -> bytes:
        params = {} if mask is None else {"mask": mask}
        cmd = Command(code, 3, tid, params)
        if mode is MuxMode.LITE:
            raw = bytearray(encode_lite_cmd(cmd) if mask is not None else
                            encode_lite_cmd(Command(code, 3, tid, {"mask": 0})))
            if mask is None:  # cmd_len without the mask
                raw[4:6] = (16).to_bytes(2, "little")
                raw = raw[:16]
            return bytes(raw)
        if mask is None:
            raw = bytearray(encode_acb([Command(code, 3, tid, {"mask": 0})]))
            raw[20:22] = (20).to_bytes(2, "little")  # cmd_len: header only
            raw[8:12] = (36).to_bytes(4, "little")  # block_length
            return bytes(raw[:36])
        return encode_acb([cmd])

    async def main() -> None:
        p = Pair(mode)
        await p.mux.open_session(3)
        acks: list[bytes] = []
        real_receive = p.dev.receive

        def spy(data: bytes) -> None:
            acks.append(data)
            real_receive(data)

        p.dev.receive = spy  # type: ignore[method-assign]
        ch = p.link.ch
        disable = c.flow_ctl_disable if c.flow_ctl_disable is not None else c.flow_ctl_enable
        steps = [(c.flow_ctl_enable, 0x1234, False),  # odd mask: nothing changes
                 (disable, FLOW_MASK_STOP, True),  # the mask, not the type, decides
                 (c.flow_ctl_enable, 0, False),
                 (c.flow_ctl_enable, None, True)]  # short: ENABLE / FLOW_CTL implies stop
        if c.flow_ctl_disable is not None:
            steps.append((c.flow_ctl_disable, None, False))
        for n, (code, mask, stopped) in enumerate(steps):
            acks.clear()
            ch.dl_send(cmd_bytes(code, 100 + n, mask))
            await until_async(lambda: len(acks) == 1, 2, f"the ACK of step {n}")
            ack = decode_lite_cmd(acks[0]) if mode is MuxMode.LITE else decode_acb(acks[0])[0]
            assert (ack.code, ack.transaction_id, ack.if_id) == (c.flow_ctl_ack, 100 + n, 3)
            assert p.mux.status()["sessions"][3]["device_flow_ctl"] == stopped, f"step {n}"
        assert p.mux.rejects.counters == {"flow_ctl_mask": 1}

    run(main())


# ---- property: whatever happens, accepted packets arrive once, in order, on their session ----

_ops = st.lists(st.one_of(
    st.tuples(st.just("tx"), st.integers(0, 7), st.integers(1, 80)),
    st.tuples(st.just("fc"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("hold"), st.booleans(), st.just(0)),
    st.tuples(st.just("credit"), st.integers(0, 7), st.integers(0, 20_000)),
    st.tuples(st.just("run"), st.integers(0, 3), st.just(0)),
), min_size=1, max_size=40)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("credit", [False, True])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_property_accepted_packets_arrive_once_in_order(mode: MuxMode, credit: bool,
                                                        ops: list[tuple[str, Any, Any]]) -> None:
    async def main() -> None:
        got: dict[int, list[int]] = {i: [] for i in SESSIONS}
        p = Pair(mode, gateway=lambda i, b: got[i].append(HEAD.unpack_from(b)[2]),
                 ul_credit=credit)
        await p.open_all()
        accepted: dict[int, list[int]] = {i: [] for i in SESSIONS}
        refused = [0] * 8
        seq = 0
        for op, a, b in ops:
            if op == "tx":
                for _ in range(b):
                    seq += 1
                    q = p.mux._sessions[a].queue  # type: ignore[union-attr]
                    before = len(q)
                    if p.mux.transmit(a, packet(UP, a, seq)):
                        accepted[a].append(seq)
                    else:
                        refused[a] += 1
                        assert before >= QUEUE_LIMIT_FC  # never refused below the limits
                    assert len(q) <= QUEUE_LIMIT
            elif op == "fc":
                p.dev.assert_flow_control(a, b)
            elif op == "hold":
                p.link.ch.hold = a
                if not a:
                    p.link.ch.release()
            elif op == "credit":
                p.dev.grant_credits(a, b)
            else:
                for _ in range(a + 1):
                    await asyncio.sleep(0)
        # release everything: flow control off, the device consumes, unlimited credit
        for i in SESSIONS:
            p.dev.assert_flow_control(i, False)
            if credit:
                p.dev.grant_credits(i, 10_000_000)
        p.link.ch.release()
        await until_async(lambda: all(len(got[i]) == len(accepted[i]) for i in SESSIONS), 5,
                          "every accepted packet")
        assert got == accepted
        st_ = p.mux.status()["sessions"]
        assert [st_[i]["tx_dropped_queue_full"] for i in SESSIONS] == refused
        assert [st_[i]["tx_packets"] for i in SESSIONS] == [len(accepted[i]) for i in SESSIONS]
        assert not p.dev.rejects.counters and not p.mux.rejects.counters
        await until_async(lambda: not any(p.flow.stopped), 5, "every session allowed again")

    run(main(), timeout=30)


@pytest.mark.parametrize("mode", MODES)
def test_model_credit_window_carries_a_stream_in_credit_mode(mode: MuxMode) -> None:
    """A model that grants a credit window (and gives back what was used) lets a host in
    credit mode stream without the pending-byte stop, never beyond the window."""

    async def main() -> None:
        p = Pair(mode, ul_credit=True)
        p.dev.credit_window = 16 * 1024
        await p.open_all()
        await until_async(lambda: all(p.mux.status()["sessions"][i]["credits"] == 16 * 1024
                                      for i in SESSIONS), 2, "the initial grants")
        await host_send(p.mux, p.flow, 1000)
        await until_async(lambda: p.up.total == 8000, 10, f"all packets ({p.up.total})")
        assert not p.up.bad and p.mux.status()["ul_stops"] == 0
        assert p.dev.counters["credit_grants"] > 8
        for i in SESSIONS:
            assert -1 < p.mux.status()["sessions"][i]["credits"] <= 16 * 1024

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_backlogged_sessions_share_the_uplink_within_10_percent(mode: MuxMode) -> None:
    """8 sessions with full queues: the 110 KiB stop cuts every drain short, and each drain must
    not start over at session 0 (which gave the lowest ids nearly all of the uplink)."""
    async def main() -> None:
        p = Pair(mode)
        await p.open_all()
        seq = [0] * 8

        def tx_bytes() -> list[int]:
            st = p.mux.status()["sessions"]
            return [st[i]["tx_bytes"] for i in SESSIONS]

        async def backlog(until_total: int) -> None:
            while p.up.total < until_total:
                for i in SESSIONS:  # keep every queue full, as 8 greedy TCP streams do (a
                    # refused packet is simply not sent: the TUN queue would hold it)
                    while p.mux.transmit(i, packet(UP, i, seq[i])):
                        seq[i] += 1
                await asyncio.sleep(0)

        await backlog(2000)  # warm up
        before = tx_bytes()
        await backlog(p.up.total + 16_000)
        got = [a - b for a, b in zip(tx_bytes(), before, strict=True)]
        assert p.mux.status()["ul_stops"] > 20  # the 110 KiB stop was really hit, often
        assert (max(got) - min(got)) / max(got) <= 0.10, got
        assert not p.up.bad

    run(main())
