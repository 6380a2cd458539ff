"""The host MUX's sans-IO scheduler (tier 1): no event loop, no channel, no clock.

Every UL transfer the scheduler hands out is decoded here with the codecs of `iosm_cuse.wire.mux`
(the same ones the modem model uses), so what is checked is what the device would see.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iosm_cuse.hw.mux.scheduler import (
    AGGR_DG_PER_SESSION,
    LITE_ROUND,
    QUEUE_LIMIT,
    QUEUE_LIMIT_FC,
    UL_HIGH,
    UL_LOW,
    MuxScheduler,
    Session,
)
from iosm_cuse.wire.channels import MuxMode
from iosm_cuse.wire.mux import (
    COMMANDS,
    DL_HEAD_PAD,
    FLOW_MASK_STOP,
    MUX_HEADER_SIZE,
    RESP_SUCCESS,
    AdbBuilder,
    Command,
    Sig,
    decode_acb,
    decode_adb,
    decode_adgh,
    decode_lite_cmd,
    decode_table,
    encode_acb,
    encode_adgh,
    encode_lite_cmd,
    encode_table,
    max_ip_packet,
    signature_of,
    ul_pad,
)

MODES = [MuxMode.LITE, MuxMode.AGGREGATION]
_HEAD = struct.Struct("<BI")  # if_id, sequence number: each packet says where it belongs


def packet(if_id: int, seq: int, size: int = 1500) -> bytes:
    return _HEAD.pack(if_id, seq) + bytes([seq & 0xFF]) * (size - _HEAD.size)


class Recorder:
    """The scheduler's callbacks: DL packets, flow reports and command answers."""

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []
        self.flow: list[tuple[int, bool]] = []
        self.responses: list[Command] = []
        self.waiting = True

    def on_receive(self, if_id: int, pkt: bytes) -> None:
        self.received.append((if_id, pkt))

    def on_flow(self, if_id: int, stopped: bool) -> None:
        self.flow.append((if_id, stopped))

    def on_response(self, cmd: Command) -> bool:
        self.responses.append(cmd)
        return self.waiting


def make(mode: MuxMode, credit: bool = False, sessions: range = range(8),
         ul_head_pad_len: int = 0) -> tuple[MuxScheduler, Recorder]:
    """A scheduler with `sessions` open (as if OPEN_SESSION had been answered)."""
    sched = MuxScheduler(mode, credit)
    rec = Recorder()
    sched.on_receive, sched.on_flow, sched.on_response = (rec.on_receive, rec.on_flow,
                                                          rec.on_response)
    for if_id in sessions:
        sched.session_opened(sched.add_session(if_id), ul_head_pad_len)
    rec.flow.clear()  # opening reports every link as going
    return sched, rec


def session(sched: MuxScheduler, if_id: int) -> Session:
    s = sched.sessions[if_id]
    assert s is not None, f"session {if_id} is not in the table"
    return s


def datagrams(transfers: list[bytes], pad: int = 0) -> list[tuple[int, bytes]]:
    """The (if_id, packet) a device decodes from UL transfers, in order; QLTH carry none."""
    out: list[tuple[int, bytes]] = []
    for t in transfers:
        sig = signature_of(t)
        if sig == Sig.ADGH:
            if_id, pkt, _sc = decode_adgh(t, pad)
            out.append((if_id, pkt))
        elif sig == Sig.ADBH:
            content = decode_adb(t, pad, allow_qlth=True)
            assert content.stopped is None
            out += [(if_id, t[a:b]) for if_id, a, b, _sc in content.datagrams]
        else:
            assert sig == Sig.QLTH, f"unexpected UL transfer {sig:#010x}"
            decode_table(t, Sig.QLTH)
    return out


def data_bytes(transfers: list[bytes]) -> int:
    """What the pending-byte counter counts: ADGH and ADB, not tables or commands."""
    return sum(len(t) for t in transfers if signature_of(t) in (Sig.ADGH, Sig.ADBH))


def command(mode: MuxMode, code: int, if_id: int, tid: int, params: dict[str, int]) -> bytes:
    cmd = Command(code, if_id, tid, params)
    return encode_lite_cmd(cmd) if mode is MuxMode.LITE else encode_acb([cmd], 0)


def decode_commands(mode: MuxMode, transfers: list[bytes]) -> list[Command]:
    if mode is MuxMode.LITE:
        return [decode_lite_cmd(t) for t in transfers]
    return [cmd for t in transfers for cmd in decode_acb(t)]


def test_the_scheduler_needs_no_event_loop() -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    sched, _rec = make(MuxMode.LITE, sessions=range(1))
    assert sched.push(0, packet(0, 0))
    assert datagrams(sched.pull()) == [(0, packet(0, 0))]


def test_the_scheduler_module_imports_no_loop_clock_or_io() -> None:
    """Sans-IO by construction: time and I/O belong to the adapter (host.py)."""
    import iosm_cuse.hw.mux.scheduler as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported, "no imports found: the check would prove nothing"
    assert not imported & {"asyncio", "time", "socket", "selectors", "threading", "os"}


# ---- fairness


def test_lite_round_robin_survives_the_110k_stop() -> None:
    """Backlogged sessions take turns of LITE_ROUND packets in if_id order; a turn cut by the
    110 KiB stop goes on, for what was left of it, after the completions."""
    sched, _rec = make(MuxMode.LITE)
    for if_id in range(8):
        for seq in range(200):
            assert sched.push(if_id, packet(if_id, seq))
    sent: list[int] = []
    pulls = 0
    while True:
        out = sched.pull()
        if not out:
            break
        pulls += 1
        sent += [if_id for if_id, _pkt in datagrams(out)]
        sched.reap(0)  # the device consumed everything
    runs = [(k, len(list(g))) for k, g in itertools.groupby(sent)]
    full_rounds = [(i, LITE_ROUND) for _ in range(200 // LITE_ROUND) for i in range(8)]
    assert runs == full_rounds + [(i, 200 % LITE_ROUND) for i in range(8)]
    assert pulls > 8 and sched.global_stops == pulls - 1  # every full window stopped


def test_aggregation_round_robin_serves_turns_in_order() -> None:
    """The same in ADBs, where a pull's datagrams come out per session (tables in if_id order):
    while every session is backlogged, each pull serves a cyclic run of sessions starting where
    the last one stopped, and no session's turn holds more than AGGR_DG_PER_SESSION."""
    sched, _rec = make(MuxMode.AGGREGATION)
    for if_id in range(8):
        for seq in range(QUEUE_LIMIT):
            assert sched.push(if_id, packet(if_id, seq))
    served = [0] * 8
    turns: list[list[int]] = []  # [if_id, datagrams], consecutive pulls merged
    while min(served) < QUEUE_LIMIT:
        backlogged = QUEUE_LIMIT - max(served) > AGGR_DG_PER_SESSION  # no queue can run dry
        out = sched.pull()
        counts = [0] * 8
        for if_id, pkt in datagrams(out):
            assert pkt == packet(if_id, served[if_id])  # in order within the session
            served[if_id] += 1
            counts[if_id] += 1
        sched.reap(0)
        if not backlogged:
            continue
        ids = [i for i in range(8) if counts[i]]
        start = next(i for i in ids if (i - 1) % 8 not in ids)
        for if_id in sorted(ids, key=lambda i: (i - start) % 8):
            if turns and turns[-1][0] == if_id:
                turns[-1][1] += counts[if_id]
            else:
                turns.append([if_id, counts[if_id]])
    assert sched.global_stops > 8
    assert [if_id for if_id, _n in turns] == [i % 8 for i in range(len(turns))]
    assert all(n <= AGGR_DG_PER_SESSION for _i, n in turns)
    assert len(turns) >= 8  # every session had at least one turn


# ---- the 110 KiB stop


@pytest.mark.parametrize("mode", MODES)
def test_the_110k_stop_holds_until_completions_bring_pending_below_10k(mode: MuxMode) -> None:
    sched, rec = make(mode, sessions=range(2))
    for seq in range(QUEUE_LIMIT):
        assert sched.push(0, packet(0, seq))
    out = sched.pull()
    data = [t for t in out if signature_of(t) in (Sig.ADGH, Sig.ADBH)]
    assert sched.global_stop and sched.global_stops == 1
    assert sched.pending_bytes == data_bytes(out) >= UL_HIGH
    assert data_bytes(data[:-1]) < UL_HIGH  # it stopped on crossing, not before or later
    assert rec.flow == [(0, True)]  # full at 256, and still >= 64 queued while stopped
    # while stopped every queue's limit is 64, and nothing goes until completions
    for seq in range(QUEUE_LIMIT_FC):
        assert sched.push(1, packet(1, seq))
    assert rec.flow[-1] == (1, True)
    assert not sched.push(1, packet(1, QUEUE_LIMIT_FC))
    assert sched.pull() == []
    unconsumed = len(out)  # the device has consumed nothing
    while sched.pending_bytes >= UL_LOW:  # completions, oldest first
        unconsumed -= 1
        sched.reap(unconsumed)
        if sched.pending_bytes >= UL_LOW:
            assert sched.pull() == [] and sched.global_stop
    assert sched.pending_bytes == data_bytes(out[len(out) - unconsumed:])
    resumed = sched.pull()
    assert sched.global_stops == 2  # what is left of session 0 is more than 110 KiB again
    got = datagrams(out + resumed)
    for if_id in (0, 1):
        sent = [pkt for i, pkt in got if i == if_id]
        assert sent and sent == [packet(if_id, seq) for seq in range(len(sent))]


def test_credit_mode_has_no_pending_limit() -> None:
    sched, _rec = make(MuxMode.LITE, credit=True, sessions=range(1))
    sched.receive(encode_table(Sig.FCTH, 0, 10**9))
    for seq in range(QUEUE_LIMIT):
        assert sched.push(0, packet(0, seq))
    out = sched.pull()
    assert len(datagrams(out)) == QUEUE_LIMIT and not sched.global_stop
    assert sched.pending_bytes > UL_HIGH


def test_pending_counts_data_only_and_falls_with_completions() -> None:
    sched, _rec = make(MuxMode.LITE, sessions=range(3))
    sched.queue_command(COMMANDS[MuxMode.LITE].open_session, 5, {"dl_head_pad_len": 16})
    control = sched.take_control()
    assert sched.pending_bytes == 0
    for if_id in range(3):
        sched.push(if_id, packet(if_id, 0, 1000))
    out = sched.pull()
    assert sched.pending_bytes == 3 * (MUX_HEADER_SIZE + 1000) == data_bytes(out)
    sched.reap(len(out))  # only the command was consumed
    assert sched.pending_bytes == data_bytes(out)
    sched.reap(1)
    assert sched.pending_bytes == MUX_HEADER_SIZE + 1000
    sched.reap(0)
    assert sched.pending_bytes == 0 and len(control) == 1


# ---- credits


@pytest.mark.parametrize("mode", MODES)
def test_credits_are_granted_spent_and_stall_at_zero(mode: MuxMode) -> None:
    sched, rec = make(mode, credit=True, sessions=range(2))
    for seq in range(5):
        assert sched.push(0, packet(0, seq, 1000))
    assert sched.pull() == []  # no credit: nothing goes
    assert sched.receive(encode_table(Sig.FCTH, 0, 2500))  # a grant asks for a pull
    assert datagrams(sched.pull()) == [(0, packet(0, 0, 1000)), (0, packet(0, 1, 1000))]
    counters = session(sched, 0).counters()
    assert counters["credits"] == 500 and counters["queued"] == 3
    assert datagrams(sched.pull()) == []  # 500 does not cover the next 1000-byte packet
    sched.receive(encode_table(Sig.FCTH, 0, 500))
    assert datagrams(sched.pull()) == [(0, packet(0, 2, 1000))]
    assert session(sched, 0).credits == 0
    assert rec.flow == [] and sched.drops["fcth_ignored"] == 0


def test_credit_grants_are_ignored_without_credit_mode() -> None:
    sched, _rec = make(MuxMode.LITE, sessions=range(1))
    assert not sched.receive(encode_table(Sig.FCTH, 0, 1000))
    assert sched.drops["fcth_ignored"] == 1 and session(sched, 0).credits == 0


# ---- encoding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ul_head_pad_len", [0, 8, 24])
def test_ul_transfers_decode_to_the_packets_pushed(mode: MuxMode, ul_head_pad_len: int) -> None:
    sched, _rec = make(mode, ul_head_pad_len=ul_head_pad_len)
    pad = ul_pad(mode, ul_head_pad_len)
    pushed = [(i, packet(i, seq, size)) for seq, size in enumerate((20, 700, 333, 7))
              for i in range(8)]
    for if_id, pkt in pushed:
        assert sched.push(if_id, pkt)
    out = sched.pull()
    got = datagrams(out, pad)
    for if_id in range(8):
        assert [p for i, p in got if i == if_id] == [p for i, p in pushed if i == if_id]
    if mode is MuxMode.LITE:
        assert len(out) == len(pushed)  # one ADGH each; no QLTH below 10 KiB pending
    else:
        assert len(out) == 1  # one ADB, with a QLTH per session
        assert decode_adb(out[0], pad, allow_qlth=True).queue_levels == dict.fromkeys(range(8), 0)


def test_lite_sends_queue_levels_once_10k_are_pending() -> None:
    sched, _rec = make(MuxMode.LITE, sessions=range(2))
    for seq in range(10):
        sched.push(0, packet(0, seq))
    out = sched.pull()
    levels = [decode_table(t, Sig.QLTH) for t in out if signature_of(t) == Sig.QLTH]
    assert levels == [(0, 0), (1, 0)]


# ---- flow control from the device


@pytest.mark.parametrize("mode", MODES)
def test_device_flow_control_stops_and_allows_one_session(mode: MuxMode) -> None:
    cmds = COMMANDS[mode]
    allow_code = cmds.flow_ctl_disable or cmds.flow_ctl_enable  # Lite: one code, the mask says
    sched, rec = make(mode, sessions=range(3))
    assert not sched.receive(command(mode, cmds.flow_ctl_enable, 2, 77, {"mask": FLOW_MASK_STOP}))
    acks = decode_commands(mode, sched.take_control())
    assert [(a.code, a.if_id, a.transaction_id) for a in acks] == [(cmds.flow_ctl_ack, 2, 77)]
    for seq in range(QUEUE_LIMIT_FC + 1):
        for if_id in range(3):
            sched.push(if_id, packet(if_id, seq, 100))
    assert (2, True) in rec.flow  # 64 queued while flow-controlled: the link stops
    assert session(sched, 2).counters()["tx_dropped_queue_full"] == 1
    assert {i for i, _p in datagrams(sched.pull())} == {0, 1}
    assert session(sched, 2).counters()["device_flow_ctl"] == 1

    assert sched.receive(command(mode, allow_code, 2, 78, {"mask": 0}))  # asks for a pull
    assert rec.flow[-1] == (2, False)
    got = datagrams(sched.pull())
    assert got == [(2, packet(2, seq, 100)) for seq in range(QUEUE_LIMIT_FC)]
    counters = session(sched, 2).counters()
    assert counters["flow_ctl_on"] == 1 and counters["flow_ctl_off"] == 1


def test_flow_control_with_another_mask_changes_nothing() -> None:
    sched, _rec = make(MuxMode.LITE, sessions=range(1))
    code = COMMANDS[MuxMode.LITE].flow_ctl_enable
    sched.receive(command(MuxMode.LITE, code, 0, 1, {"mask": 0x0F}))
    assert sched.rejects.counters == {"flow_ctl_mask": 1}
    assert not session(sched, 0).device_stop
    # acknowledged all the same, as the kernel does
    ack = decode_lite_cmd(sched.take_control()[0])
    assert (ack.code, ack.transaction_id) == (COMMANDS[MuxMode.LITE].flow_ctl_ack, 1)


# ---- drops


def test_drops_are_counted_by_cause() -> None:
    sched, rec = make(MuxMode.LITE, sessions=range(2))
    too_big = max_ip_packet(MuxMode.LITE) + 1
    assert not sched.push(0, bytes(too_big)) and not sched.push(0, b"")
    assert sched.push(0, bytes(too_big - 1))
    for seq in range(QUEUE_LIMIT):
        assert sched.push(1, packet(1, seq, 40))
    assert rec.flow == [(1, True)]  # full: said before the first drop
    assert not sched.push(1, packet(1, 999, 40))
    assert not sched.push(5, packet(5, 0)) and not sched.push(9, packet(9, 0))
    sched.close_session(session(sched, 1))
    assert not sched.push(1, packet(1, 1000, 40))
    c0, c1 = session(sched, 0).counters(), session(sched, 1).counters()
    assert c0["tx_dropped_too_big"] == 2 and c0["queued"] == 1
    assert c1["tx_dropped_queue_full"] == 1
    assert c1["tx_dropped_closed"] == QUEUE_LIMIT + 1  # the purged queue and the late packet
    assert sched.drops["tx_no_session"] == 2


def test_losing_the_channel_stops_every_link_and_names_the_open_sessions() -> None:
    sched, rec = make(MuxMode.LITE, sessions=range(3))
    sched.close_session(session(sched, 1))
    sched.push(0, packet(0, 0))
    assert sched.drop_sessions() == [0, 2]
    assert rec.flow == [(0, True), (1, True), (2, True)]
    assert sched.sessions == [None] * 8 and sched.open_ids() == []


# ---- downlink


@pytest.mark.parametrize("mode", MODES)
def test_downlink_is_dispatched_per_session(mode: MuxMode) -> None:
    sched, rec = make(mode, sessions=range(2))
    adb = AdbBuilder(pad=DL_HEAD_PAD)
    for if_id in (0, 1, 3):
        assert adb.add(if_id, packet(if_id, 1, 200))
    sched.receive(encode_adgh(1, packet(1, 0, 100)))
    sched.receive(adb.finish())
    sched.receive(b"WHAT" + bytes(30))
    assert rec.received == [(1, packet(1, 0, 100)), (0, packet(0, 1, 200)),
                            (1, packet(1, 1, 200))]
    assert sched.drops["dl_no_session"] == 1 and sched.dl_transfers == 3
    assert sched.rejects.counters == {"signature": 1}
    c1 = session(sched, 1).counters()
    assert c1["rx_packets"] == 2 and c1["rx_bytes"] == 300


@pytest.mark.parametrize("mode", MODES)
def test_session_commands_and_their_answers(mode: MuxMode) -> None:
    cmds = COMMANDS[mode]
    sched, rec = make(mode, sessions=range(0))
    s = sched.add_session(4)
    sched.queue_command(cmds.open_session, 4, {"dl_head_pad_len": DL_HEAD_PAD})
    sent = decode_commands(mode, sched.take_control())
    assert [(c.code, c.if_id, c.params["dl_head_pad_len"]) for c in sent] == \
        [(cmds.open_session, 4, DL_HEAD_PAD)]
    assert not sched.push(4, packet(4, 0))  # not open until answered
    answer = {"response": RESP_SUCCESS, "ul_head_pad_len": 0}
    sched.receive(command(mode, cmds.open_session_resp, 4, sent[0].transaction_id, answer))
    assert [(c.code, c.params["response"]) for c in rec.responses] == \
        [(cmds.open_session_resp, RESP_SUCCESS)]
    sched.session_opened(s, rec.responses[0].params["ul_head_pad_len"])
    assert sched.push(4, packet(4, 0)) and sched.open_ids() == [4]
    rec.waiting = False  # a second answer nobody waits for
    sched.receive(command(mode, cmds.open_session_resp, 4, 0, answer))
    assert sched.rejects.counters == {"unexpected_response": 1}


# ---- nothing lost, nothing reordered

_ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 3), st.integers(1, 80)),
    st.tuples(st.just("pull"), st.just(0), st.just(0)),
    st.tuples(st.just("complete"), st.integers(0, 100), st.just(0)),
    st.tuples(st.just("stop"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("credit"), st.integers(0, 3), st.integers(0, 60_000)),
), max_size=60)


@pytest.mark.parametrize("credit", [False, True])
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=7))
def test_property_accepted_packets_leave_once_in_order(
        mode: MuxMode, credit: bool, ops: list[tuple[str, int, int]], sizes: list[int]) -> None:
    """Across any interleaving of pushes, pulls, completions, device flow control and credit
    grants, each session's accepted packets leave exactly once and in order; refusals happen
    only at the queue limits; the pending counter is what has been sent and not completed."""
    cmds = COMMANDS[mode]
    sched, _rec = make(mode, credit, sessions=range(4))
    accepted: list[list[bytes]] = [[] for _ in range(4)]
    sent: list[bytes] = []  # every transfer taken, in order (data and control)
    not_done: list[int] = []  # counted bytes of the transfers the device has not consumed
    seq = 0

    def take(out: list[bytes]) -> None:
        sent.extend(out)
        not_done.extend(data_bytes([t]) for t in out)

    def complete(unconsumed: int) -> None:
        sched.reap(unconsumed)
        del not_done[:max(0, len(not_done) - unconsumed)]

    for op, a, b in ops:
        if op == "push":
            for _ in range(b):
                pkt = packet(a, seq, sizes[seq % len(sizes)])
                seq += 1
                before = len(session(sched, a).queue)
                if sched.push(a, pkt):
                    accepted[a].append(pkt)
                else:
                    assert before >= QUEUE_LIMIT_FC  # refused only at a queue limit
        elif op == "pull":
            take(sched.pull())
        elif op == "complete":
            complete(a)
        elif op == "stop":
            mask = FLOW_MASK_STOP if b else 0
            sched.receive(command(mode, cmds.flow_ctl_enable, a, 0, {"mask": mask}))
            take(sched.take_control())
        else:
            sched.receive(encode_table(Sig.FCTH, a, b))
        assert sched.pending_bytes == sum(not_done)
    # let everything go: flow allowed, credit for all, every transfer completed
    for if_id in range(4):
        sched.receive(command(mode, cmds.flow_ctl_enable, if_id, 0, {"mask": 0}))
        sched.receive(encode_table(Sig.FCTH, if_id, 10**9))
    take(sched.take_control())
    while any(s is not None and s.queue for s in sched.sessions):
        complete(0)
        out = sched.pull()
        assert out, "queued packets that never leave"
        take(out)
    complete(0)
    assert sched.pending_bytes == 0
    got: list[list[bytes]] = [[] for _ in range(4)]
    for if_id, pkt in datagrams([t for t in sent if signature_of(t) not in (Sig.CMDH, Sig.ACBH)]):
        got[if_id].append(pkt)
    assert got == accepted
