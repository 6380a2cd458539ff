"""The modem model's MUX: the device end of channel 0 (Contract 3 of docs/architecture.md).

    mux = MuxDevice(gateway.uplink)        # or a gateway object, or None (a counting sink)
    model.attach(0, mux)                   # ChannelFunction: opened(send) / receive / closed
    mux.downlink(if_id, ip_packet) -> bool # towards the host
    mux.assert_flow_control(if_id, True)   # the device's FLOW_CTL: stops the host's uplink
    mux.grant_credits(if_id, nbytes)       # FCTH (for hosts in credit mode)

It answers OPEN_SESSION / CLOSE_SESSION with response 0 and ul_head_pad_len 0 (so the host puts
no UL padding), hands UL datagrams of open sessions to the gateway and encodes DL: Lite one
ADGH per DL transfer with the IP packet at offset 16, Aggregation ADBs whose datagrams carry the
16-byte DL head pad the host asked for. The mode is given, or learned from the host's first
structure (a Lite CMDH or an ACBH), since both modes open a session first.

What the host writes is checked strictly (the host checks the device just as strictly): a bad
structure is rejected and counted, with one log line per kind.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from iosm_cuse.wire.channels import MuxMode
from iosm_cuse.wire.mux import (
    AGGR_BUF,
    COMMANDS,
    DL_HEAD_PAD,
    FLOW_MASK_STOP,
    LITE_BUF,
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
    encode_adgh,
    encode_lite_cmd,
    encode_table,
    max_ip_packet,
    signature_of,
)
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.sim.mux")

Send = Callable[[bytes], bool]
Uplink = Callable[[int, bytes], None]
MAX_DL_HEAD_PAD = 256  # what the model accepts as dl_head_pad_len
RETRY = 0.001  # a DL block the backlog refused is offered again this soon
# The first credit grant of a session follows its OPEN_SESSION response this much later. Sent in
# the same DL burst, the kernel's iosm driver decodes it before the session opener registered the
# session's net device and drops it; credits are additive and never resent, so the uplink would
# stall for good (docs/uml-virtpci.md §9). A real modem grants once the session is up.
FIRST_GRANT_DELAY = 0.1

_LITE_FIRST = (Sig.CMDH, Sig.ADGH, Sig.QLTH)
_AGGR_FIRST = (Sig.ACBH, Sig.ADBH)


class CountingSink:
    """The default gateway: counts what arrives per session."""

    def __init__(self) -> None:
        self.packets: collections.Counter[int] = collections.Counter()
        self.bytes: collections.Counter[int] = collections.Counter()

    def uplink(self, if_id: int, ip_packet: bytes) -> None:
        self.packets[if_id] += 1
        self.bytes[if_id] += len(ip_packet)


class MuxDevice:
    def __init__(self, gateway: Uplink | Any = None, mode: MuxMode | str | None = None, *,
                 credit_window: int = 0) -> None:
        """`credit_window` > 0: play a modem that announces UL flow on credits (capability
        bit 21): each opened session gets that many bytes of credit (FCTH), and the bytes it
        sends are granted again once half a window was used."""
        if gateway is None:
            gateway = CountingSink()
        self.gateway = gateway
        self._uplink: Uplink = gateway if callable(gateway) else gateway.uplink
        self.fixed_mode = MuxMode(mode) if mode is not None else None
        self.mode: MuxMode | None = self.fixed_mode
        self.rejects = Rejects(log, what="rejected host input")
        self.counters: collections.Counter[str] = collections.Counter()
        self.queue_levels: dict[int, int] = {}
        self.sessions: set[int] = set()
        self.flow_asserted: set[int] = set()
        self.credit_window = credit_window
        self._used: dict[int, int] = {}
        self._dl_pad: dict[int, int] = {}
        self._send: Send | None = None
        self._tid = 0
        self._seq = 0
        self._adb = AdbBuilder(AGGR_BUF, pad=DL_HEAD_PAD)
        self._blocks: collections.deque[bytes] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False
        self._retry: asyncio.TimerHandle | None = None
        self._first_grants: dict[int, asyncio.TimerHandle] = {}
        # the protocol recorder (sim/recorder.py): None, the default, records nothing
        self.record: Callable[..., None] | None = None

    # ---- ChannelFunction (Contract 3)

    def opened(self, send: Send) -> None:
        self._reset()
        self._send = send
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # sans loop (unit use): call flush() by hand

    def closed(self) -> None:
        self._send = None
        self._reset()

    def _reset(self) -> None:
        self.mode = self.fixed_mode
        self.sessions.clear()
        self.flow_asserted.clear()
        self.queue_levels.clear()
        self._used.clear()
        self._dl_pad.clear()
        self._adb = AdbBuilder(AGGR_BUF, pad=DL_HEAD_PAD)
        self._blocks.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for handle in self._first_grants.values():
            handle.cancel()
        self._first_grants.clear()

    def receive(self, data: bytes) -> None:
        """One UL transfer from the host: exactly one top-level structure."""
        sig = signature_of(data)
        try:
            mode = self.mode or self._learn_mode(sig)
            if mode is MuxMode.LITE:
                self._receive_lite(sig, data)
            else:
                self._receive_aggr(sig, data)
        except MuxDecodeError as exc:
            self.rejects(exc.reason, exc.detail)

    def _learn_mode(self, sig: int) -> MuxMode:
        if sig in _LITE_FIRST:
            self.mode = MuxMode.LITE
        elif sig in _AGGR_FIRST:
            self.mode = MuxMode.AGGREGATION
        else:
            raise MuxDecodeError("signature", f"UL transfer with signature {sig:#010x}")
        return self.mode

    def _receive_lite(self, sig: int, data: bytes) -> None:
        if sig == Sig.ADGH:
            if_id, pkt, _sc = decode_adgh(data)
            if data[4] | data[5] << 8 != len(data):
                raise MuxDecodeError("length", f"ADGH length differs from the transfer "
                                     f"of {len(data)}")
            self._to_gateway(if_id, pkt)
        elif sig == Sig.CMDH:
            cmd = decode_lite_cmd(data)
            if data[4] | data[5] << 8 != len(data):
                raise MuxDecodeError("cmd_len", f"CMDH cmd_len differs from the transfer "
                                     f"of {len(data)}")
            self._command(cmd, MuxMode.LITE)
        elif sig == Sig.QLTH:
            if_id, level = decode_table(data, Sig.QLTH)
            self.queue_levels[if_id] = level
            self.counters["qlth"] += 1
        else:
            raise MuxDecodeError("signature", f"{sig:#010x} from a Lite host")

    def _receive_aggr(self, sig: int, data: bytes) -> None:
        if sig == Sig.ADBH:
            content = decode_adb(data, 0, allow_qlth=True)
            if content.stopped is not None:
                raise MuxDecodeError("table", content.stopped)
            if int.from_bytes(data[8:12], "little") != len(data):
                raise MuxDecodeError("block_length", "ADB block_length differs from the "
                                     f"transfer of {len(data)}")
            self.queue_levels.update(content.queue_levels)
            for if_id, start, end, _sc in content.datagrams:
                self._to_gateway(if_id, data[start:end])
            self.counters["ul_blocks"] += 1
        elif sig == Sig.ACBH:
            # the host leaves ACBH.block_length at 16: the TD size bounds the chain
            for cmd in decode_acb(data, use_block_length=False):
                self._command(cmd, MuxMode.AGGREGATION)
        else:
            raise MuxDecodeError("signature", f"{sig:#010x} from an Aggregation host")

    def _to_gateway(self, if_id: int, pkt: bytes) -> None:
        c = self.counters
        if if_id not in self.sessions:
            self.rejects("ul_dropped_no_session", "UL datagram for session %d, which is not open",
                         if_id)
            return
        if if_id in self.flow_asserted:
            c["ul_while_flow_ctl"] += 1  # in flight before the host saw FLOW_CTL
        c["ul_packets"] += 1
        c["ul_bytes"] += len(pkt)
        if self.credit_window > 0:
            self._give_back(if_id, len(pkt))
        try:
            self._uplink(if_id, pkt)
        except Exception:
            log.exception("gateway uplink failed")

    # ---- commands

    def _command(self, cmd: Command, mode: MuxMode) -> None:
        c, code, if_id = COMMANDS[mode], cmd.code, cmd.if_id
        if self.record is not None:
            self.record("mux_ul", cmd=command_name(mode, code), if_id=if_id)
        if if_id >= MAX_SESSIONS:
            raise MuxDecodeError("if_id", f"command {code} for if_id {if_id}")
        if code == c.open_session:
            pad = cmd.params.get("dl_head_pad_len")
            if pad is None or pad > MAX_DL_HEAD_PAD:
                raise MuxDecodeError("params", f"OPEN_SESSION with dl_head_pad_len {pad}")
            self._dl_pad[if_id] = pad
            self.sessions.add(if_id)
            self.counters["sessions_opened"] += 1
            self._reply(Command(c.open_session_resp, if_id, cmd.transaction_id,
                                {"response": RESP_SUCCESS, "ul_head_pad_len": 0}))
            if self.credit_window > 0:
                self._used[if_id] = 0
                self._grant_first(if_id, FIRST_GRANT_DELAY)
        elif code == c.close_session:
            self._close_session(if_id)
            self._reply(Command(c.close_session_resp, if_id, cmd.transaction_id,
                                {"response": RESP_SUCCESS}))
        elif code == c.flow_ctl_ack:
            self.counters["flow_ctl_acks"] += 1
        elif code == c.link_status_resp:
            self.counters["link_status_resps"] += 1
        else:
            raise MuxDecodeError("command", f"unexpected command {code} from the host")

    def _grant_first(self, if_id: int, delay: float) -> None:
        """The session's first window of credit, `delay` s from now (at once without a loop)."""
        old = self._first_grants.pop(if_id, None)
        if old is not None:
            old.cancel()
        if self._loop is None:
            self.grant_credits(if_id, self.credit_window)
            return
        self._first_grants[if_id] = self._loop.call_later(delay, self._first_grant_due, if_id)

    def _first_grant_due(self, if_id: int) -> None:
        self._first_grants.pop(if_id, None)
        if if_id in self.sessions and not self.grant_credits(if_id, self.credit_window):
            self._grant_first(if_id, RETRY)  # the DL backlog is full: try again

    def _close_session(self, if_id: int) -> None:
        handle = self._first_grants.pop(if_id, None)
        if handle is not None:
            handle.cancel()
        if if_id in self.sessions:
            self.flush()  # what was already accepted for the session still goes down
        self.sessions.discard(if_id)
        self.flow_asserted.discard(if_id)
        self.counters["sessions_closed"] += 1

    def _reply(self, cmd: Command) -> None:
        self._send_control(cmd)

    def _send_control(self, cmd: Command) -> bool:
        if self._send is None or self.mode is None:
            return False
        if self.mode is MuxMode.LITE:
            data = encode_lite_cmd(cmd)
        else:
            data = encode_acb([cmd], self._next_seq())
        if not self._send(data):
            self.counters["control_refused"] += 1
            return False
        if self.record is not None:
            self.record("mux_dl", cmd=command_name(self.mode, cmd.code), if_id=cmd.if_id)
        return True

    def _next_tid(self) -> int:
        tid = self._tid
        self._tid = (tid + 1) & 0xFFFFFFFF
        return tid

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFF
        return seq

    def assert_flow_control(self, if_id: int, on: bool) -> bool:
        """Send the device FLOW_CTL command for `if_id`: on = stop the host's uplink of that
        session, off = allow it again. False if it could not be sent."""
        if self.mode is None or not 0 <= if_id < MAX_SESSIONS:
            return False
        c = COMMANDS[self.mode]
        code = c.flow_ctl_enable
        if self.mode is MuxMode.AGGREGATION and not on:
            assert c.flow_ctl_disable is not None
            code = c.flow_ctl_disable
        mask = FLOW_MASK_STOP if on else 0
        if not self._send_control(Command(code, if_id, self._next_tid(), {"mask": mask})):
            return False
        if on:
            self.flow_asserted.add(if_id)
        else:
            self.flow_asserted.discard(if_id)
        return True

    def link_status_report(self, if_id: int, payload: int = 1) -> bool:
        if self.mode is None:
            return False
        c = COMMANDS[self.mode]
        return self._send_control(Command(c.link_status, if_id, self._next_tid(),
                                          {"payload": payload}))

    def grant_credits(self, if_id: int, nbytes: int) -> bool:
        """FCTH: `nbytes` more UL credit for session `if_id`."""
        if self._send is None:
            return False
        if not self._send(encode_table(Sig.FCTH, if_id, nbytes & 0xFFFFFFFF)):
            self.counters["control_refused"] += 1
            return False
        self.counters["credit_grants"] += 1
        if self.record is not None:
            self.record("mux_dl", cmd="FCTH", if_id=if_id)
        return True

    def _give_back(self, if_id: int, n: int) -> None:
        used = self._used.get(if_id, 0) + n
        self._used[if_id] = used
        if used * 2 >= self.credit_window:
            if self.grant_credits(if_id, used):
                self._used[if_id] = 0
            elif self._loop is not None:  # the DL backlog is full: the host would starve
                self._loop.call_later(RETRY, self._regrant)

    def _regrant(self) -> None:
        for if_id, used in list(self._used.items()):
            if used and if_id in self.sessions:
                if not self.grant_credits(if_id, used):
                    if self._loop is not None:
                        self._loop.call_later(RETRY, self._regrant)
                    return
                self._used[if_id] = 0

    # ---- downlink

    @property
    def max_ip_packet(self) -> int:
        return max_ip_packet(self.mode or MuxMode.LITE)

    def downlink(self, if_id: int, ip_packet: bytes) -> bool:
        """Towards the host. False: refused (session not open, too big, backlog full)."""
        c = self.counters
        if self._send is None or if_id not in self.sessions:
            c["dl_dropped_no_session"] += 1
            return False
        n = len(ip_packet)
        if n == 0 or n > self.max_ip_packet:
            c["dl_dropped_too_big"] += 1
            return False
        if self.mode is MuxMode.LITE:
            extra = self._dl_pad.get(if_id, DL_HEAD_PAD) - MUX_HEADER_SIZE
            if extra < 0:
                extra = 0
            if MUX_HEADER_SIZE + extra + n > LITE_BUF:
                c["dl_dropped_too_big"] += 1
                return False
            if not self._send(encode_adgh(if_id, ip_packet, extra)):
                c["dl_refused"] += 1
                return False
        else:
            if self._blocks and not self._push_blocks():
                c["dl_refused"] += 1
                return False
            pad = self._dl_pad.get(if_id, DL_HEAD_PAD)
            if not self._adb.add(if_id, ip_packet, 0, pad):
                self._blocks.append(self._adb.finish(self._next_seq()))
                self._push_blocks()
                if not self._adb.add(if_id, ip_packet, 0, pad):
                    c["dl_dropped_too_big"] += 1
                    return False
            self._schedule_flush()
        c["dl_packets"] += 1
        c["dl_bytes"] += n
        return True

    def _schedule_flush(self) -> None:
        if not self._flush_pending and self._loop is not None:
            self._flush_pending = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        """Finish the ADB being filled and hand every finished block to the channel."""
        if not self._adb.empty:
            self._blocks.append(self._adb.finish(self._next_seq()))
        self._push_blocks()

    def _push_blocks(self) -> bool:
        send, blocks = self._send, self._blocks
        if send is None:
            blocks.clear()
            return True
        while blocks:
            if not send(blocks[0]):
                self._retry_later()
                return False
            blocks.popleft()
            self.counters["dl_blocks"] += 1
        return True

    def _retry_later(self) -> None:
        if self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(RETRY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._push_blocks()

    def status(self) -> dict[str, Any]:
        return {"mode": str(self.mode) if self.mode else None,
                "sessions": sorted(self.sessions), "flow_asserted": sorted(self.flow_asserted),
                "counters": dict(self.counters), "rejects": dict(self.rejects.counters)}


__all__ = ["CountingSink", "MuxDevice"]


def command_name(mode: MuxMode, code: int) -> str:
    """OPEN_SESSION, FLOW_CTL_ENABLE...: the name of a command code in `mode` (for the
    recorder), or the code itself."""
    c = COMMANDS[mode]
    for f in dataclasses.fields(c):
        if getattr(c, f.name) == code:
            return f.name.upper()
    return str(code)
