"""The host MUX: IP sessions over channel 0 (Contract 2 of docs/architecture.md).

    mux = MuxHost(engine)                  # or MuxHost(open_channel, MuxMode.LITE) in tests,
                                           # open_channel(0, on_receive) -> channel
    mux.on_receive = cb                    # cb(if_id, ip_packet)
    mux.on_flow = cb                       # cb(if_id, stopped)
    await mux.open_session(if_id)          # channel 0 is opened with the first session
    mux.transmit(if_id, ip_packet) -> bool # False: dropped and counted
    await mux.close_session(if_id)         # channel 0 is closed after the last session

What the kernel driver does (iosm-protocol.md §4), kept here:
- OPEN_SESSION carries dl_head_pad_len 16; the response is matched by command type within 1 s
  (commands are serialized, so that match is unambiguous) and gives ul_head_pad_len.
- Uplink: Lite sends one ADGH per UL transfer; Aggregation packs an ADB (ADTH + QLTH per
  session) and finishes it when full, when pending UL bytes reach 110 KiB, on device flow
  control, and at the end of every batch (the batch is everything queued before the event loop
  ran the drain: that is what the kernel's 500 us ADB timer approximates).
- Fairness: sessions are served round-robin, one turn (LITE_ROUND packets / one ADB's share)
  each, and the round survives the 110 KiB stop: the next drain resumes with the session whose
  turn was cut, for what was left of it. (Starting every drain at session 0 gave the lowest
  ids nearly all of the ~75 packets a 110 KiB window holds when all sessions are backlogged.)
- Flow control: a pending-UL byte counter stops every session at 110 KiB and restarts them below
  10 KiB; per-session queue limit 256 packets, 64 while the session is flow-controlled; packets
  beyond are dropped and counted (never blocking the other sessions). The device's FLOW_CTL
  command stops (mask all ones) or allows (mask 0) one session. With UL credits (capability bit
  21) there is no pending-byte limit: a packet goes only if the session's credit (granted by
  FCTH) covers it; a session without credit just fills its queue.

Pending UL bytes: the channel reports how many UL transfers the device has not consumed yet
(`pending`, engine Contract 1's IpcChannel has it); the MUX keeps the sizes of the transfers it
sent in order, so the oldest ones beyond `pending` are the completed ones.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from iosm_cuse.wire.channels import IP_MUX_CHANNEL, MuxMode
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
    mux_mode,
    signature_of,
    ul_pad,
)
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.hw.mux")

CMD_TIMEOUT = 1.0  # §2.9 MUX command
UL_HIGH = 110 * 1024  # stop every session's TX
UL_LOW = 10 * 1024  # restart below this
QUEUE_LIMIT = 256  # per session
QUEUE_LIMIT_FC = 64  # per session while it is flow-controlled
AGGR_DG_PER_SESSION = 100  # datagrams of one session in one ADB
LITE_ROUND = 64  # packets one session sends before the next gets its turn
POLL_PENDING = 0.0005  # while stopped on pending bytes: how often to look at completions
# (only for channels that cannot report UL completions; the engine's on_ul_done restarts the
# uplink from the interrupt that reaped them, with no timer)
ADB_CAPACITY = 16 * 1024

Receiver = Callable[[bytes], None]


class ChannelLike(Protocol):
    def send(self, data: bytes) -> None: ...
    def send_many(self, transfers: list[bytes]) -> None: ...
    def close(self) -> Awaitable[None]: ...


OpenChannel = Callable[[int, Receiver], Awaitable[ChannelLike]]  # (0, on_receive)


class MuxError(OSError):
    """A session operation failed; errno says how (ETIMEDOUT, EIO, EINVAL, ENODEV)."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, what)


class _Session:
    __slots__ = ("credits", "device_stop", "drop_closed", "drop_queue", "drop_too_big",
                 "flow_off", "flow_on", "if_id", "open", "pad", "queue", "reported",
                 "rx_bytes", "rx_packets", "tx_bytes", "tx_packets")

    def __init__(self, if_id: int) -> None:
        self.if_id = if_id
        self.open = False
        self.queue: collections.deque[bytes] = collections.deque()
        self.pad = 0
        self.device_stop = False
        self.credits = 0
        self.reported: bool | None = None  # last on_flow value given
        self.tx_packets = self.tx_bytes = self.rx_packets = self.rx_bytes = 0
        self.drop_queue = self.drop_too_big = self.drop_closed = 0
        self.flow_on = self.flow_off = 0

    def counters(self) -> dict[str, int]:
        return {"tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                "tx_dropped_queue_full": self.drop_queue,
                "tx_dropped_too_big": self.drop_too_big,
                "tx_dropped_closed": self.drop_closed,
                "flow_ctl_on": self.flow_on, "flow_ctl_off": self.flow_off,
                "device_flow_ctl": int(self.device_stop),
                "queued": len(self.queue), "credits": self.credits}


class MuxHost:
    """Host side of the IP MUX on channel 0."""

    def __init__(self, source: Any, mode: MuxMode | None = None, *,
                 ul_credit: bool | None = None, cmd_timeout: float = CMD_TIMEOUT) -> None:
        """`source` is the IPC engine (mode, credits and channel 0 come from it, and it is told
        `engine.mux = self`) or a coroutine function `open_channel(0, on_receive)` returning a
        channel with send(bytes) and close() (the engine's own open_channel fits)."""
        self.on_receive: Callable[[int, bytes], None] | None = None
        self.on_flow: Callable[[int, bool], None] | None = None
        self.cmd_timeout = cmd_timeout
        self.rejects = Rejects(log)
        self.engine: Any = None
        if hasattr(source, "open_channel"):
            self.engine = source
            source.mux = self
            source.add_state_listener(self._on_engine_state)
            self._open: OpenChannel = self._open_engine_channel
        else:
            self._open = source
        self._mode_arg = mode
        self._credit_arg = ul_credit
        self.mode, self.ul_credit = self._caps()
        self._max_ip = max_ip_packet(self.mode)
        self._sessions: list[_Session | None] = [None] * MAX_SESSIONS
        self._channel: ChannelLike | None = None
        self._cmd_lock = asyncio.Lock()
        self._waiting: dict[int, asyncio.Future[Command]] = {}
        self._tid = 0
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_pending = False
        self._rr = 0  # if_id whose turn it is (round-robin across drains)
        self._turn_left = 0  # packets left in that turn; 0: a fresh turn
        self._poll: asyncio.TimerHandle | None = None
        self._ul_done_events = False  # the channel calls _on_ul_done: no polling needed
        self._inflight: collections.deque[int] = collections.deque()
        self.pending_bytes = 0
        self.global_stop = False
        self.global_stops = 0
        self._adb = AdbBuilder(ADB_CAPACITY, qlth=True, max_per_session=AGGR_DG_PER_SESSION)
        self._lost: set[int] = set()
        self._reopening: asyncio.Task[None] | None = None
        self.dl_no_session = 0
        self.tx_no_session = 0
        self.fcth_ignored = 0
        self.ul_transfers = 0
        self.dl_transfers = 0

    # ---- configuration

    def _caps(self) -> tuple[MuxMode, bool]:
        mode, credit = MuxMode.LITE, False
        if self.engine is not None:
            mode, credit = mux_mode(self.engine.cp_version, self.engine.capabilities)
        if self._mode_arg is not None:
            mode = self._mode_arg
        if self._credit_arg is not None:
            credit = self._credit_arg
        return mode, credit

    @property
    def max_ip_packet(self) -> int:
        return self._max_ip

    async def _open_engine_channel(self, ch_id: int, on_receive: Receiver) -> ChannelLike:
        ch: ChannelLike = await self.engine.open_channel(ch_id, on_receive,
                                                         self._on_channel_error,
                                                         on_ul_done=self._on_ul_done)
        self._ul_done_events = True
        return ch

    # ---- sessions

    async def open_session(self, if_id: int) -> None:
        """OPEN_SESSION for `if_id` (opening channel 0 first if needed); MuxError on failure."""
        if not 0 <= if_id < MAX_SESSIONS:
            raise MuxError(errno.EINVAL, f"session id {if_id} (0..{MAX_SESSIONS - 1})")
        async with self._cmd_lock:
            if self._sessions[if_id] is not None:
                return  # already open
            await self._ensure_channel()
            cmds = COMMANDS[self.mode]
            s = _Session(if_id)
            self._sessions[if_id] = s
            try:
                resp = await self._command(cmds.open_session, if_id,
                                           {"flow_ctrl": 0, "ipv4v6_hints": 0,
                                            "dl_head_pad_len": DL_HEAD_PAD},
                                           cmds.open_session_resp)
                code = resp.params.get("response")
                if code != RESP_SUCCESS:
                    raise MuxError(errno.EIO, f"session {if_id}: the modem refused "
                                   f"OPEN_SESSION (response {code})")
            except BaseException:
                if self._sessions[if_id] is s:
                    self._sessions[if_id] = None
                await self._close_channel_if_idle()
                raise
            s.pad = ul_pad(self.mode, resp.params.get("ul_head_pad_len", 0))
            s.open = True
            self._lost.discard(if_id)
            self._update_flow(s)

    async def close_session(self, if_id: int) -> None:
        """CLOSE_SESSION (its response is awaited up to 1 s, the session goes either way);
        channel 0 is closed after the last session."""
        if not 0 <= if_id < MAX_SESSIONS:
            raise MuxError(errno.EINVAL, f"session id {if_id} (0..{MAX_SESSIONS - 1})")
        self._lost.discard(if_id)
        async with self._cmd_lock:
            s = self._sessions[if_id]
            if s is None:
                return
            s.open = False
            s.drop_closed += len(s.queue)  # the kernel purges the session's UL list
            s.queue.clear()
            if self._channel is not None:
                cmds = COMMANDS[self.mode]
                try:
                    await self._command(cmds.close_session, if_id, {}, cmds.close_session_resp)
                except MuxError as exc:
                    log.warning("closing MUX session %d: %s", if_id, exc.strerror)
            self._sessions[if_id] = None
            await self._close_channel_if_idle()

    @property
    def sessions(self) -> list[int]:
        return [s.if_id for s in self._sessions if s is not None and s.open]

    async def _ensure_channel(self) -> ChannelLike:
        if self._channel is None:
            self.mode, self.ul_credit = self._caps()
            self._max_ip = max_ip_packet(self.mode)
            self._loop = asyncio.get_running_loop()
            self._reset_ul()
            self._ul_done_events = False
            try:
                self._channel = await self._open(IP_MUX_CHANNEL, self._on_dl)
            except OSError as exc:
                raise MuxError(exc.errno or errno.ENODEV,
                               f"opening the MUX channel: {exc.strerror or exc}") from None
        return self._channel

    async def _close_channel_if_idle(self) -> None:
        if any(s is not None for s in self._sessions) or self._channel is None:
            return
        ch, self._channel = self._channel, None
        self._reset_ul()
        try:
            await ch.close()
        except OSError as exc:
            log.warning("closing the MUX channel: %s", exc)

    def _reset_ul(self) -> None:
        self._inflight.clear()
        self.pending_bytes = 0
        self.global_stop = False
        self._adb = AdbBuilder(ADB_CAPACITY, qlth=True, max_per_session=AGGR_DG_PER_SESSION)
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    # ---- commands

    async def _command(self, code: int, if_id: int, params: dict[str, int],
                       expect: int) -> Command:
        assert self._loop is not None
        fut: asyncio.Future[Command] = self._loop.create_future()
        self._waiting[expect] = fut
        try:
            self._send_command(Command(code, if_id, self._next_tid(), params))
            return await asyncio.wait_for(fut, self.cmd_timeout)
        except TimeoutError:
            raise MuxError(errno.ETIMEDOUT, f"session {if_id}: no answer to command {code} "
                           f"in {self.cmd_timeout * 1000:.0f} ms") from None
        finally:
            if self._waiting.get(expect) is fut:
                del self._waiting[expect]

    def _next_tid(self) -> int:
        tid = self._tid
        self._tid = (tid + 1) & 0xFFFFFFFF
        return tid

    def _send_command(self, cmd: Command) -> None:
        if self.mode is MuxMode.LITE:
            data = encode_lite_cmd(cmd)
        else:
            data = encode_acb([cmd], self._next_seq())
        self._send(data)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFF
        return seq

    def _send(self, data: bytes, counted: bool = False) -> None:
        """One UL transfer. `counted`: data (ADGH/ADB) that the pending-byte counter tracks;
        commands and queue-level tables take no part in it, as in the kernel."""
        if counted:
            self.pending_bytes += len(data)
        self._send_many([data], [len(data) if counted else 0])

    def _send_many(self, transfers: list[bytes], counted: list[int]) -> None:
        """UL transfers in order; `counted[i]`: what transfer i adds to the pending-byte
        counter, already added by the caller (which stops at 110 KiB as it goes)."""
        ch = self._channel
        if ch is None:
            raise MuxError(errno.ENOTCONN, "the MUX channel is not open")
        try:
            ch.send_many(transfers)
        except OSError as exc:
            self._channel_failed(str(exc))
            raise MuxError(errno.EIO, f"MUX channel: {exc}") from None
        self._inflight.extend(counted)
        self.ul_transfers += len(transfers)

    # ---- uplink

    def transmit(self, if_id: int, ip_packet: bytes) -> bool:
        """Queue one IP packet for session `if_id`. False: dropped (and counted)."""
        s = self._sessions[if_id] if 0 <= if_id < MAX_SESSIONS else None
        if s is None or not s.open:
            if s is not None:
                s.drop_closed += 1
            else:
                self.tx_no_session += 1
            return False
        n = len(ip_packet)
        if n == 0 or n > self._max_ip:
            s.drop_too_big += 1
            return False
        q = s.queue
        limit = QUEUE_LIMIT_FC if s.device_stop or self.global_stop else QUEUE_LIMIT
        if len(q) >= limit:
            s.drop_queue += 1
            self._update_flow(s)
            return False
        q.append(ip_packet)
        if len(q) >= limit:  # full now: say so before a packet has to be dropped
            self._update_flow(s)
        if not self._drain_pending:
            self._drain_pending = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._drain)
        return True

    def _reap(self) -> None:
        """Forget the transfers the device consumed (see the module doc)."""
        ch = self._channel
        left = getattr(ch, "pending", None) if ch is not None else 0
        inflight = self._inflight
        if left is None:
            left = 0
        while len(inflight) > left:
            self.pending_bytes -= inflight.popleft()

    def _drain(self) -> None:
        self._drain_pending = False
        if self._channel is None:
            return
        self._reap()
        if self.global_stop:
            if self.pending_bytes >= UL_LOW:
                self._poll_later()
                return
            self.global_stop = False
        try:
            if self.mode is MuxMode.LITE:
                self._drain_lite()
            else:
                self._drain_aggr()
        except MuxError:
            return  # the channel failed: _channel_failed has reset everything
        if self.global_stop:
            self._poll_later()
        self._update_flows()

    def _may_send(self, s: _Session) -> bool:
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

    def _send_qlth(self) -> None:
        """Lite: after data went out, queue levels of every active, not flow-controlled
        session, in credit mode or once 10 KiB are pending (§4.2; once per batch here)."""
        if not (self.ul_credit or self.pending_bytes >= UL_LOW):
            return
        for s in self._sessions:
            if s is not None and s.open and not s.device_stop:
                self._send(encode_table(Sig.QLTH, s.if_id, len(s.queue)))

    def _ready_in_turn_order(self) -> list[_Session]:
        """Sessions that may send, starting with the one whose turn it is."""
        r = self._rr
        ready = [s for s in self._sessions if s is not None and self._may_send(s)]
        return [s for s in ready if s.if_id >= r] + [s for s in ready if s.if_id < r]

    def _begin_turn(self, s: _Session, quantum: int) -> int:
        """Packets `s` may send in this turn: what is left of a cut turn, else `quantum`."""
        left = self._turn_left if s.if_id == self._rr and self._turn_left else quantum
        self._rr, self._turn_left = s.if_id, left
        return left

    def _end_turn(self, s: _Session, sent: int) -> None:
        """After `s` sent `sent` packets of its turn: the turn goes on in the next drain if the
        110 KiB stop cut it, else it passes to the next session."""
        left = self._turn_left - sent
        if self.global_stop and left > 0 and s.queue:
            self._turn_left = left
        else:
            self._rr, self._turn_left = (s.if_id + 1) % MAX_SESSIONS, 0

    def _drain_lite(self) -> None:
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
            self._send_many(out, sizes)
            self._send_qlth()

    def _drain_aggr(self) -> None:
        credit, adb = self.ul_credit, self._adb
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
                            s.drop_too_big += 1
                            continue
                        self._finish_adb()
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
            self._finish_adb()
            self._over_high()

    def _finish_adb(self) -> None:
        levels = {s.if_id: len(s.queue) for s in self._sessions if s is not None}
        self._send(self._adb.finish(self._next_seq(), levels), True)

    def _on_ul_done(self) -> None:
        """The engine reaped UL completions: a stopped uplink may go again right now (in the
        interrupt, so the new TDs leave with this loop pass's doorbell)."""
        if self.global_stop and self._channel is not None:
            self._drain()

    def _poll_later(self) -> None:
        if self._ul_done_events:
            return  # _on_ul_done will call _drain
        if self._poll is None and self._loop is not None:
            self._poll = self._loop.call_later(POLL_PENDING, self._poll_now)

    def _poll_now(self) -> None:
        self._poll = None
        self._drain()
        self._update_flows()

    def _schedule_drain(self) -> None:
        if not self._drain_pending and self._loop is not None:
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    # ---- flow reporting

    def _update_flows(self) -> None:
        for s in self._sessions:
            if s is not None and s.open:
                self._update_flow(s)

    def _update_flow(self, s: _Session) -> None:
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

    def _on_dl(self, data: bytes) -> None:
        """One DL transfer: exactly one top-level structure, dispatched by its signature."""
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
        if self.global_stop:
            self._schedule_drain()  # UL completions come with DL interrupts

    def _deliver(self, if_id: int, pkt: bytes) -> None:
        s = self._sessions[if_id]
        if s is None or not s.open:
            self.dl_no_session += 1
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
            fut = self._waiting.get(code)
            if fut is None or fut.done():
                self.rejects("unexpected_response", f"response {code} nobody waits for")
            else:
                fut.set_result(cmd)
            return
        if cmd.if_id >= MAX_SESSIONS:
            self.rejects("if_id", f"command {code} for if_id {cmd.if_id}")
            return
        if code == c.flow_ctl_enable or code == c.flow_ctl_disable:
            self._on_flow_ctl(cmd, code == c.flow_ctl_enable, mode)
            reply = Command(c.flow_ctl_ack, cmd.if_id, cmd.transaction_id)
        elif code == c.link_status:
            reply = Command(c.link_status_resp, cmd.if_id, cmd.transaction_id,
                            {"response": RESP_SUCCESS})
        else:
            self.rejects("unknown_command", f"command {code} from the modem")
            return
        try:
            if mode is MuxMode.LITE:
                self._send(encode_lite_cmd(reply))
            else:
                self._send(encode_acb([reply], self._next_seq()))
        except MuxError as exc:
            log.warning("could not answer MUX command %d: %s", code, exc.strerror)

    def _on_flow_ctl(self, cmd: Command, enable: bool, mode: MuxMode) -> None:
        """The mask decides, whatever the command type (as in the kernel): all ones stops the
        session, 0 allows it, anything else changes nothing. A command too short to hold the
        mask implies it from its type (ENABLE / Lite FLOW_CTL: stop; DISABLE: allow)."""
        mask = cmd.params.get("mask")
        if mask is None:
            mask = FLOW_MASK_STOP if enable else 0
        s = self._sessions[cmd.if_id]
        if s is None:
            return
        if mask == FLOW_MASK_STOP:
            s.flow_on += 1
            s.device_stop = True
        elif mask == 0:
            s.flow_off += 1
            s.device_stop = False
            self._schedule_drain()
        else:
            self.rejects("flow_ctl_mask", f"FLOW_CTL for session {cmd.if_id} with mask "
                         f"{mask:#010x}: ignored")
            return
        self._update_flow(s)

    def _on_credit(self, if_id: int, value: int) -> None:
        if not self.ul_credit:
            self.fcth_ignored += 1
            return
        s = self._sessions[if_id]
        if s is None:
            return
        s.credits += value
        self._update_flow(s)
        self._schedule_drain()

    # ---- failures and modem restarts

    def _on_channel_error(self, err: OSError) -> None:
        self._channel_failed(str(err))

    def _channel_failed(self, why: str) -> None:
        """The channel is gone (modem down): every session is lost; they are opened again when
        the engine runs again."""
        if self._channel is None:
            return
        log.debug("MUX channel lost (%s): %d session(s) down", why, len(self.sessions))
        self._channel = None
        self._reset_ul()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(MuxError(errno.EIO, f"MUX channel lost: {why}"))
        for i, s in enumerate(self._sessions):
            if s is None:
                continue
            if s.open:
                self._lost.add(i)
            s.drop_closed += len(s.queue)
            s.queue.clear()
            s.open = False
            self._sessions[i] = None
            if self.on_flow is not None and s.reported is not True:
                self.on_flow(i, True)

    def _on_engine_state(self, state: Any) -> None:
        name = getattr(state, "value", str(state))
        if name == "DOWN":
            self._channel_failed("modem down")
        elif name == "RUNNING" and self._lost and self._reopening is None:
            self._reopening = asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        try:
            for if_id in sorted(self._lost):
                if if_id not in self._lost:  # closed meanwhile
                    continue
                try:
                    await self.open_session(if_id)
                except MuxError as exc:
                    log.warning("reopening MUX session %d after a modem restart: %s", if_id,
                                exc.strerror)
        finally:
            self._reopening = None

    # ---- status

    def status(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode), "ul_credit": self.ul_credit,
            "channel_open": self._channel is not None,
            "ul_pending_bytes": self.pending_bytes, "ul_stopped": self.global_stop,
            "ul_stops": self.global_stops, "ul_transfers": self.ul_transfers,
            "dl_transfers": self.dl_transfers, "dl_no_session": self.dl_no_session,
            "tx_no_session": self.tx_no_session,
            "fcth_ignored": self.fcth_ignored,
            "sessions": {s.if_id: s.counters() for s in self._sessions if s is not None},
            "rejects": dict(self.rejects.counters),
        }

    @property
    def counters(self) -> dict[str, int]:
        """Rejected device input and drops, flat (for `status` errors)."""
        out = {f"mux_{k}": v for k, v in self.rejects.counters.items()}
        out["mux_dl_no_session"] = self.dl_no_session
        return out


__all__ = ["MuxError", "MuxHost"]
