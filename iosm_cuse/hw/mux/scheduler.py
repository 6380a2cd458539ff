"""The host MUX's decisions, sans I/O: the uplink scheduler, flow control and the downlink
dispatcher of channel 0 (the part of the kernel's iosm_mux.c that is not timers and locks).

    sched = MuxScheduler(MuxMode.LITE, ul_credit=False)
    sched.on_receive = cb                  # cb(if_id, ip_packet): a DL datagram of an open session
    sched.on_flow = cb                     # cb(if_id, stopped): a session's queue filled / drained
    sched.on_response = cb                 # cb(command) -> bool: an OPEN/CLOSE_SESSION answer;
                                           # False: nobody waited for it (counted as rejected)
    s = sched.add_session(if_id); sched.queue_command(...); sched.session_opened(s, ul_pad_len)
    sched.push(if_id, ip_packet) -> bool   # False: dropped and counted
    sched.reap(unconsumed)                 # UL completions: transfers the device still holds
    sched.pull() -> list[bytes]            # UL transfers to send now, in order
    sched.receive(dl_transfer) -> bool     # True: the uplink may move, pull soon
    sched.take_control() -> list[bytes]    # commands and replies to the device's commands

No event loop, no clock, no channel: the adapter (`host.MuxHost`) owns those, sends what `pull`
and `take_control` return, in that order, and calls `pull` when `push` or `receive` asks for it.
Every transfer taken from the scheduler is assumed sent; if the channel fails the adapter calls
`reset_ul` and `drop_sessions`.

What the kernel driver does (docs/architecture.md, Contract 2), kept here:
- Uplink: Lite sends one ADGH per UL transfer; Aggregation packs an ADB (ADTH + QLTH per
  session) and finishes it when full, when pending UL bytes reach 110 KiB, on device flow
  control, and at the end of every `pull` (the adapter pulls once per batch, everything queued
  before the event loop ran it: that is what the kernel's 500 us ADB timer approximates).
- Fairness: sessions are served round-robin, one turn (LITE_ROUND packets / one ADB's share)
  each, and the round survives the 110 KiB stop: the next pull resumes with the session whose
  turn was cut, for what was left of it. (Starting every pull at session 0 gave the lowest
  ids nearly all of the ~75 packets a 110 KiB window holds when all sessions are backlogged.)
- Flow control: a pending-UL byte counter stops every session at 110 KiB and restarts them below
  10 KiB; per-session queue limit 256 packets, 64 while the session is flow-controlled; packets
  beyond are dropped and counted (never blocking the other sessions). The device's FLOW_CTL
  command stops (mask all ones) or allows (mask 0) one session. With UL credits (capability bit
  21) there is no pending-byte limit: a packet goes only if the session's credit (granted by
  FCTH) covers it; a session without credit just fills its queue.

Pending UL bytes: the adapter reports how many UL transfers the device has not consumed yet
(`reap(unconsumed)`, the channel's `pending`); the scheduler keeps the sizes of the transfers it
handed out in order, so the oldest ones beyond `unconsumed` are the completed ones.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from iosm_cuse.wire.channels import MuxMode
from iosm_cuse.wire.mux import (
    ADGH_S,
    COMMANDS,
    DL_HEAD_PAD,
    FLOW_MASK_STOP,
    MAX_SESSIONS,
    MUX_HEADER_SIZE,
    RESP_SUCCESS,
    AdbBuilder,
    Command,
    MuxDecodeError,
    Sig,
    decode_acb,
    decode_adb,
    decode_adgh,
    decode_lite_cmd,
    decode_table,
    encode_acb,
    encode_lite_cmd,
    encode_table,
    max_ip_packet,
    signature_of,
    ul_pad,
)
from iosm_cuse.wire.rejects import PACKET_LOG_EVERY, Rejects

log = logging.getLogger("iosm_cuse.hw.mux")

UL_HIGH = 110 * 1024  # stop every session's TX
UL_LOW = 10 * 1024  # restart below this
QUEUE_LIMIT = 256  # per session
QUEUE_LIMIT_FC = 64  # per session while it is flow-controlled
# Why a session refused or threw away a host packet (the names `status` shows).
QUEUE_FULL, TOO_BIG, CLOSED = "tx_dropped_queue_full", "tx_dropped_too_big", "tx_dropped_closed"
SESSION_DROPS = (QUEUE_FULL, TOO_BIG, CLOSED)
AGGR_DG_PER_SESSION = 100  # datagrams of one session in one ADB
LITE_ROUND = 64  # packets one session sends before the next gets its turn
ADB_CAPACITY = 16 * 1024


class Session:
    """One IP session's queue, flow state and counters."""

    __slots__ = ("credits", "device_stop", "drops", "flow_off", "flow_on", "if_id", "open",
                 "pad", "queue", "reported", "rx_bytes", "rx_packets", "tx_bytes", "tx_packets")

    def __init__(self, if_id: int) -> None:
        self.if_id = if_id
        self.open = False
        self.queue: collections.deque[bytes] = collections.deque()
        self.pad = 0
        self.device_stop = False
        self.credits = 0
        self.reported: bool | None = None  # last on_flow value given
        self.tx_packets = self.tx_bytes = self.rx_packets = self.rx_bytes = 0
        # Packets refused from the host's own links: the caller is told (push returns False)
        # and the link counts and logs its side, so these are counted without a line of their own.
        self.drops = Rejects(log, PACKET_LOG_EVERY, what=f"MUX session {if_id}",
                             kinds=SESSION_DROPS)
        self.flow_on = self.flow_off = 0

    def counters(self) -> dict[str, int]:
        return {"tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                **self.drops.counters,
                "flow_ctl_on": self.flow_on, "flow_ctl_off": self.flow_off,
                "device_flow_ctl": int(self.device_stop),
                "queued": len(self.queue), "credits": self.credits}


class MuxScheduler:
    """Sessions, the uplink scheduler and the downlink dispatcher of the host MUX, sans I/O."""

    def __init__(self, mode: MuxMode = MuxMode.LITE, ul_credit: bool = False, *,
                 rejects: Rejects | None = None) -> None:
        self.on_receive: Callable[[int, bytes], None] | None = None
        self.on_flow: Callable[[int, bool], None] | None = None
        self.on_response: Callable[[Command], bool] | None = None
        self.rejects = rejects if rejects is not None else Rejects(log)
        self.mode = mode
        self.ul_credit = ul_credit
        self.max_ip = max_ip_packet(mode)
        self.sessions: list[Session | None] = [None] * MAX_SESSIONS  # never rebound
        self.control_out: list[bytes] = []  # commands and replies not taken yet
        self._tid = 0
        self._seq = 0
        self._rr = 0  # if_id whose turn it is (round-robin across pulls)
        self._turn_left = 0  # packets left in that turn; 0: a fresh turn
        self._inflight: collections.deque[int] = collections.deque()
        self.pending_bytes = 0
        self.global_stop = False
        self.global_stops = 0
        self._adb = AdbBuilder(ADB_CAPACITY, qlth=True, max_per_session=AGGR_DG_PER_SESSION)
        self._drain_wanted = False
        # Packets with no session to go to, counted without a line: host packets for a session
        # that does not exist (the caller is told, as above), downlink packets still in flight
        # when their session closed, and credit grants outside credit mode (harmless; the
        # kernel ignores them too). Malformed device input goes to `rejects`, with a line.
        self.drops = Rejects(log, PACKET_LOG_EVERY, what="MUX",
                             kinds=("tx_no_session", "dl_no_session", "fcth_ignored"))
        self.dl_transfers = 0

    # ---- configuration

    def configure(self, mode: MuxMode, ul_credit: bool) -> None:
        """A new channel 0: the mode and credit scheme it runs with, and a fresh uplink."""
        self.mode, self.ul_credit = mode, ul_credit
        self.max_ip = max_ip_packet(mode)
        self.reset_ul()

    def reset_ul(self) -> None:
        """Forget every transfer in flight (the channel is new or gone)."""
        self._inflight.clear()
        self.pending_bytes = 0
        self.global_stop = False
        self.control_out.clear()
        self._adb = AdbBuilder(ADB_CAPACITY, qlth=True, max_per_session=AGGR_DG_PER_SESSION)

    # ---- sessions

    def add_session(self, if_id: int) -> Session:
        """A session being opened: it takes no packets until `session_opened`."""
        s = Session(if_id)
        self.sessions[if_id] = s
        return s

    def session_opened(self, s: Session, ul_head_pad_len: int) -> None:
        """The modem accepted OPEN_SESSION with this UL head pad."""
        s.pad = ul_pad(self.mode, ul_head_pad_len)
        s.open = True
        self._update_flow(s)

    def forget_session(self, s: Session) -> None:
        """An open that failed: the slot is free again unless another session took it."""
        if self.sessions[s.if_id] is s:
            self.sessions[s.if_id] = None

    def close_session(self, s: Session) -> None:
        """No more packets for `s`: the kernel purges the session's UL list."""
        s.open = False
        s.drops.count(CLOSED, len(s.queue))
        s.queue.clear()

    def remove_session(self, if_id: int) -> None:
        self.sessions[if_id] = None

    def drop_sessions(self) -> list[int]:
        """Channel 0 is gone: every session goes, each told it is stopped; returns the ids of
        those that were open (to be opened again when the modem is back)."""
        lost = []
        for i, s in enumerate(self.sessions):
            if s is None:
                continue
            if s.open:
                lost.append(i)
            s.drops.count(CLOSED, len(s.queue))
            s.queue.clear()
            s.open = False
            self.sessions[i] = None
            if self.on_flow is not None and s.reported is not True:
                self.on_flow(i, True)
        return lost

    def open_ids(self) -> list[int]:
        return [s.if_id for s in self.sessions if s is not None and s.open]

    # ---- commands to the device

    def queue_command(self, code: int, if_id: int, params: dict[str, int]) -> None:
        """A command of this mode for `take_control`; its answer comes to `on_response`."""
        self._queue_control(Command(code, if_id, self._next_tid(), params))

    def take_control(self) -> list[bytes]:
        """Commands and replies to send now (they take no part in the pending-byte counter)."""
        out, self.control_out = self.control_out, []
        self._inflight.extend([0] * len(out))
        return out

    def _queue_control(self, cmd: Command) -> None:
        if self.mode is MuxMode.LITE:
            self.control_out.append(encode_lite_cmd(cmd))
        else:
            self.control_out.append(encode_acb([cmd], self._next_seq()))

    def _next_tid(self) -> int:
        tid = self._tid
        self._tid = (tid + 1) & 0xFFFFFFFF
        return tid

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFF
        return seq

    # ---- uplink

    def push(self, if_id: int, ip_packet: bytes) -> bool:
        """Queue one IP packet for session `if_id`. False: dropped (and counted)."""
        s = self.sessions[if_id] if 0 <= if_id < MAX_SESSIONS else None
        if s is None or not s.open:
            if s is not None:
                s.drops.count(CLOSED)
            else:
                self.drops.count("tx_no_session")
            return False
        n = len(ip_packet)
        if n == 0 or n > self.max_ip:
            s.drops.count(TOO_BIG)
            return False
        q = s.queue
        limit = QUEUE_LIMIT_FC if s.device_stop or self.global_stop else QUEUE_LIMIT
        if len(q) >= limit:
            s.drops.count(QUEUE_FULL)
            self._update_flow(s)
            return False
        q.append(ip_packet)
        if len(q) >= limit:  # full now: say so before a packet has to be dropped
            self._update_flow(s)
        return True

    def reap(self, unconsumed: int) -> None:
        """The device holds `unconsumed` of the transfers taken so far: the older ones are
        done, and their bytes leave the pending-byte counter."""
        inflight = self._inflight
        while len(inflight) > unconsumed:
            self.pending_bytes -= inflight.popleft()

    def pull(self) -> list[bytes]:
        """The UL transfers to send now, in order; the sessions' flow state is reported."""
        if self.global_stop:
            if self.pending_bytes >= UL_LOW:
                return []  # still stopped: nothing changed for any session
            self.global_stop = False
        out = self._pull_lite() if self.mode is MuxMode.LITE else self._pull_aggr()
        self.update_flows()
        return out

    def _may_send(self, s: Session) -> bool:
        """Something queued, not flow-controlled, and (credit mode) credit for the head packet:
        the kernel never lets credits go below zero."""
        q = s.queue
        return bool(q) and s.open and not s.device_stop and \
            (not self.ul_credit or s.credits >= len(q[0]))

    def _over_high(self) -> bool:
        """MUX_UL mode: pending UL bytes reached 110 KiB (credit mode has no such limit)."""
        if self.ul_credit or self.pending_bytes < UL_HIGH:
            return False
        if not self.global_stop:
            self.global_stop = True
            self.global_stops += 1
        return True

    def _qlth_tables(self, out: list[bytes], sizes: list[int]) -> None:
        """Lite: after data went out, queue levels of every active, not flow-controlled
        session, in credit mode or once 10 KiB are pending (docs/iosm-protocol.md §4.2; once
        per pull here)."""
        if not (self.ul_credit or self.pending_bytes >= UL_LOW):
            return
        for s in self.sessions:
            if s is not None and s.open and not s.device_stop:
                out.append(encode_table(Sig.QLTH, s.if_id, len(s.queue)))
                sizes.append(0)

    def _ready_in_turn_order(self) -> list[Session]:
        """Sessions that may send, starting with the one whose turn it is."""
        r = self._rr
        ready = [s for s in self.sessions if s is not None and self._may_send(s)]
        return [s for s in ready if s.if_id >= r] + [s for s in ready if s.if_id < r]

    def _begin_turn(self, s: Session, quantum: int) -> int:
        """Packets `s` may send in this turn: what is left of a cut turn, else `quantum`."""
        left = self._turn_left if s.if_id == self._rr and self._turn_left else quantum
        self._rr, self._turn_left = s.if_id, left
        return left

    def _end_turn(self, s: Session, sent: int) -> None:
        """After `s` sent `sent` packets of its turn: the turn goes on in the next pull if the
        110 KiB stop cut it, else it passes to the next session."""
        left = self._turn_left - sent
        if self.global_stop and left > 0 and s.queue:
            self._turn_left = left
        else:
            self._rr, self._turn_left = (s.if_id + 1) % MAX_SESSIONS, 0

    def _pull_lite(self) -> list[bytes]:
        credit, pack, sig = self.ul_credit, ADGH_S.pack, int(Sig.ADGH)
        sessions = self._ready_in_turn_order()
        out: list[bytes] = []
        sizes: list[int] = []
        while sessions and not self.global_stop:
            for s in sessions:
                q, if_id, pad = s.queue, s.if_id, bytes(s.pad)
                burst = min(len(q), self._begin_turn(s, LITE_ROUND))
                mine = 0
                for k in range(burst - 1, -1, -1):  # k: packets after this one in the burst
                    n = len(q[0])
                    if credit:
                        if s.credits < n:
                            break
                        s.credits -= n
                    pkt = q.popleft()
                    size = MUX_HEADER_SIZE + len(pad) + n
                    out.append(pack(sig, size, if_id, 0, 0, k) + pad + pkt)
                    sizes.append(size)
                    self.pending_bytes += size
                    s.tx_packets += 1
                    s.tx_bytes += n
                    mine += 1
                    if self._over_high():
                        break
                self._end_turn(s, mine)
                if self.global_stop:
                    break
            sessions = self._ready_in_turn_order()
        if out:
            self._qlth_tables(out, sizes)
            self._inflight.extend(sizes)
        return out

    def _pull_aggr(self) -> list[bytes]:
        credit, adb = self.ul_credit, self._adb
        out: list[bytes] = []
        sessions = self._ready_in_turn_order()
        while sessions and not self.global_stop:
            for s in sessions:
                q = s.queue
                mine = 0
                for _ in range(min(len(q), self._begin_turn(s, AGGR_DG_PER_SESSION))):
                    pkt = q[0]
                    n = len(pkt)
                    if credit and s.credits < n:
                        break
                    if not adb.add(s.if_id, pkt, 0, s.pad):
                        if adb.empty:  # cannot happen below max_ip_packet; never loop on it
                            q.popleft()
                            s.drops.count(TOO_BIG)
                            continue
                        self._finish_adb(out)
                        if self._over_high():
                            break
                        continue
                    q.popleft()
                    mine += 1
                    s.tx_packets += 1
                    s.tx_bytes += n
                    if credit:
                        s.credits -= n
                self._end_turn(s, mine)
                if self.global_stop:
                    break
            sessions = self._ready_in_turn_order()
        if not adb.empty:
            self._finish_adb(out)
            self._over_high()
        return out

    def _finish_adb(self, out: list[bytes]) -> None:
        levels = {s.if_id: len(s.queue) for s in self.sessions if s is not None}
        block = self._adb.finish(self._next_seq(), levels)
        out.append(block)
        self.pending_bytes += len(block)
        self._inflight.append(len(block))

    # ---- flow reporting

    def update_flows(self) -> None:
        for s in self.sessions:
            if s is not None and s.open:
                self._update_flow(s)

    def _update_flow(self, s: Session) -> None:
        # The link stops when its queue is full, as the kernel stops the netdev queue: 256
        # packets, 64 while flow control (the device's, or 110 KiB pending) holds the session.
        # Until then it keeps queueing, so the uplink goes on at once when flow control ends.
        stopped = s.device_stop or self.global_stop
        want = len(s.queue) >= (QUEUE_LIMIT_FC if stopped else QUEUE_LIMIT)
        if want is not s.reported:
            s.reported = want
            cb = self.on_flow
            if cb is not None:
                try:
                    cb(s.if_id, want)
                except Exception:
                    log.exception("on_flow callback failed")

    # ---- downlink

    def receive(self, data: bytes) -> bool:
        """One DL transfer: exactly one top-level structure, dispatched by its signature.
        True: the uplink may move now (flow allowed, credit granted, or stopped on pending
        bytes: UL completions come with DL interrupts), so the adapter should pull soon."""
        self.dl_transfers += 1
        sig = signature_of(data)
        try:
            if sig == Sig.ADGH:
                if_id, pkt, _sc = decode_adgh(data)
                self._deliver(if_id, pkt)
            elif sig == Sig.ADBH:
                content = decode_adb(data, DL_HEAD_PAD)
                for if_id, start, end, _sc in content.datagrams:
                    self._deliver(if_id, data[start:end])
                if content.stopped is not None:
                    self.rejects("adb_non_adth", content.stopped)
            elif sig == Sig.CMDH:
                self._on_command(decode_lite_cmd(data), MuxMode.LITE)
            elif sig == Sig.ACBH:
                for cmd in decode_acb(data):
                    self._on_command(cmd, MuxMode.AGGREGATION)
            elif sig == Sig.FCTH:
                self._on_credit(*decode_table(data, Sig.FCTH))
            else:
                self.rejects("signature", f"DL transfer with signature {sig:#010x}")
        except MuxDecodeError as exc:
            self.rejects(exc.reason, exc.detail)
        if self._drain_wanted:
            self._drain_wanted = False
            return True
        return self.global_stop

    def _deliver(self, if_id: int, pkt: bytes) -> None:
        s = self.sessions[if_id]
        if s is None or not s.open:
            self.drops.count("dl_no_session")
            return
        s.rx_packets += 1
        s.rx_bytes += len(pkt)
        cb = self.on_receive
        if cb is not None:
            try:
                cb(if_id, pkt)
            except Exception:
                log.exception("on_receive callback failed")

    def _on_command(self, cmd: Command, mode: MuxMode) -> None:
        c = COMMANDS[mode]
        code = cmd.code
        if code in (c.open_session_resp, c.close_session_resp):
            answered = self.on_response
            if answered is None or not answered(cmd):
                self.rejects("unexpected_response", f"response {code} nobody waits for")
            return
        if cmd.if_id >= MAX_SESSIONS:
            self.rejects("if_id", f"command {code} for if_id {cmd.if_id}")
            return
        if code == c.flow_ctl_enable or code == c.flow_ctl_disable:
            self._on_flow_ctl(cmd, code == c.flow_ctl_enable)
            reply = Command(c.flow_ctl_ack, cmd.if_id, cmd.transaction_id)
        elif code == c.link_status:
            reply = Command(c.link_status_resp, cmd.if_id, cmd.transaction_id,
                            {"response": RESP_SUCCESS})
        else:
            self.rejects("unknown_command", f"command {code} from the modem")
            return
        # the reply goes in the framing the command came in, whatever mode we run
        if mode is MuxMode.LITE:
            self.control_out.append(encode_lite_cmd(reply))
        else:
            self.control_out.append(encode_acb([reply], self._next_seq()))

    def _on_flow_ctl(self, cmd: Command, enable: bool) -> None:
        """The mask decides, whatever the command type (as in the kernel): all ones stops the
        session, 0 allows it, anything else changes nothing. A command too short to hold the
        mask implies it from its type (ENABLE / Lite FLOW_CTL: stop; DISABLE: allow)."""
        mask = cmd.params.get("mask")
        if mask is None:
            mask = FLOW_MASK_STOP if enable else 0
        s = self.sessions[cmd.if_id]
        if s is None:
            return
        if mask == FLOW_MASK_STOP:
            s.flow_on += 1
            s.device_stop = True
        elif mask == 0:
            s.flow_off += 1
            s.device_stop = False
            self._drain_wanted = True
        else:
            self.rejects("flow_ctl_mask", f"FLOW_CTL for session {cmd.if_id} with mask "
                         f"{mask:#010x}: ignored")
            return
        self._update_flow(s)

    def _on_credit(self, if_id: int, value: int) -> None:
        if not self.ul_credit:
            self.drops.count("fcth_ignored")
            return
        s = self.sessions[if_id]
        if s is None:
            return
        s.credits += value
        self._update_flow(s)
        self._drain_wanted = True


__all__ = ["ADB_CAPACITY", "AGGR_DG_PER_SESSION", "LITE_ROUND", "QUEUE_LIMIT", "QUEUE_LIMIT_FC",
           "UL_HIGH", "UL_LOW", "MuxScheduler", "Session"]
