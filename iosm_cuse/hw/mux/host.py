"""The host MUX: IP sessions over channel 0 (Contract 2 of docs/architecture.md).

    mux = MuxHost(engine)                  # or MuxHost(open_channel, MuxMode.LITE) in tests,
                                           # open_channel(0, on_receive) -> channel
    mux.on_receive = cb                    # cb(if_id, ip_packet)
    mux.on_flow = cb                       # cb(if_id, stopped)
    await mux.open_session(if_id)          # channel 0 is opened with the first session
    mux.transmit(if_id, ip_packet) -> bool # False: dropped and counted
    await mux.close_session(if_id)         # channel 0 is closed after the last session

This is the asyncio adapter: it owns channel 0, the command lock and futures, and the loop's
call_soon / call_later; every decision (queues, round-robin, the 110 KiB stop, credits, encoding,
flow control, DL dispatch, counters) is the sans-IO `scheduler.MuxScheduler`'s.

What the kernel driver does here (docs/iosm-protocol.md §4):
- OPEN_SESSION carries dl_head_pad_len 16; the response is matched by command type within 1 s
  (commands are serialized, so that match is unambiguous) and gives ul_head_pad_len.
- The uplink is pulled once per batch: `transmit` schedules one drain with call_soon, so the
  drain takes everything queued before the event loop ran it.
- Pending UL bytes: the channel reports how many UL transfers the device has not consumed yet
  (`pending`, engine Contract 1's IpcChannel has it) and each drain hands that to the scheduler.
  While stopped at 110 KiB the engine's on_ul_done drains again from the interrupt that reaped
  completions; channels without it are polled.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from iosm_cuse.hw.engine import EngineState, IpcEngine
from iosm_cuse.hw.mux.scheduler import (
    QUEUE_LIMIT,
    QUEUE_LIMIT_FC,
    UL_HIGH,
    MuxScheduler,
)
from iosm_cuse.wire.channels import IP_MUX_CHANNEL, MuxMode
from iosm_cuse.wire.mux import (
    COMMANDS,
    DL_HEAD_PAD,
    MAX_SESSIONS,
    RESP_SUCCESS,
    Command,
    mux_mode,
)
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.hw.mux")

CMD_TIMEOUT = 1.0  # MUX command answer (docs/iosm-protocol.md §2.9)
POLL_PENDING = 0.0005  # while stopped on pending bytes: how often to look at completions
# (only for channels that cannot report UL completions; the engine's on_ul_done restarts the
# uplink from the interrupt that reaped them, with no timer)

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


class MuxHost:
    """Host side of the IP MUX on channel 0."""

    def __init__(self, source: IpcEngine | OpenChannel, mode: MuxMode | None = None, *,
                 ul_credit: bool | None = None, cmd_timeout: float = CMD_TIMEOUT) -> None:
        """`source` is the IPC engine (mode, credits and channel 0 come from it, and it is told
        `engine.mux = self`) or a coroutine function `open_channel(0, on_receive)` returning a
        channel with send(bytes) and close() (the engine's own open_channel fits)."""
        self.cmd_timeout = cmd_timeout
        self.engine: IpcEngine | None = None
        self._open: OpenChannel
        if isinstance(source, IpcEngine):
            self.engine = source
            self._open = self._open_engine_channel
        else:
            self._open = source
        self._mode_arg = mode
        self._credit_arg = ul_credit
        self._sched = MuxScheduler(*self._caps(), rejects=Rejects(log))
        self._sched.on_response = self._on_response
        self._push = self._sched.push  # transmit's hot path: one call
        self._sessions = self._sched.sessions  # the scheduler's table (tests reach into it)
        self._channel: ChannelLike | None = None
        self._cmd_lock = asyncio.Lock()
        self._waiting: dict[int, asyncio.Future[Command]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_pending = False
        self._poll: asyncio.TimerHandle | None = None
        self._ul_done_events = False  # the channel calls _on_ul_done: no polling needed
        self._lost: set[int] = set()
        self._reopening: asyncio.Task[None] | None = None
        self.ul_transfers = 0
        if self.engine is not None:
            self.engine.mux = self
            self.engine.add_state_listener(self._on_engine_state)

    # ---- configuration and the scheduler's state, as Contract 2 shows it

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
    def on_receive(self) -> Callable[[int, bytes], None] | None:
        return self._sched.on_receive

    @on_receive.setter
    def on_receive(self, cb: Callable[[int, bytes], None] | None) -> None:
        self._sched.on_receive = cb

    @property
    def on_flow(self) -> Callable[[int, bool], None] | None:
        return self._sched.on_flow

    @on_flow.setter
    def on_flow(self, cb: Callable[[int, bool], None] | None) -> None:
        self._sched.on_flow = cb

    @property
    def mode(self) -> MuxMode:
        return self._sched.mode

    @property
    def ul_credit(self) -> bool:
        return self._sched.ul_credit

    @property
    def max_ip_packet(self) -> int:
        return self._sched.max_ip

    @property
    def rejects(self) -> Rejects:
        return self._sched.rejects

    @property
    def pending_bytes(self) -> int:
        return self._sched.pending_bytes

    @property
    def global_stop(self) -> bool:
        return self._sched.global_stop

    @property
    def global_stops(self) -> int:
        return self._sched.global_stops

    @property
    def dl_transfers(self) -> int:
        return self._sched.dl_transfers

    @property
    def dl_no_session(self) -> int:
        return self._sched.drops["dl_no_session"]

    @property
    def tx_no_session(self) -> int:
        return self._sched.drops["tx_no_session"]

    @property
    def fcth_ignored(self) -> int:
        return self._sched.drops["fcth_ignored"]

    async def _open_engine_channel(self, ch_id: int, on_receive: Receiver) -> ChannelLike:
        if self.engine is None:  # only set as the opener when there is an engine
            raise MuxError(errno.ENODEV, "no IPC engine")
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
            s = self._sched.add_session(if_id)
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
                self._sched.forget_session(s)
                await self._close_channel_if_idle()
                raise
            self._sched.session_opened(s, resp.params.get("ul_head_pad_len", 0))
            self._lost.discard(if_id)

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
            self._sched.close_session(s)
            if self._channel is not None:
                cmds = COMMANDS[self.mode]
                try:
                    await self._command(cmds.close_session, if_id, {}, cmds.close_session_resp)
                except MuxError as exc:
                    log.warning("closing MUX session %d: %s", if_id, exc.strerror)
            self._sched.remove_session(if_id)
            await self._close_channel_if_idle()

    @property
    def sessions(self) -> list[int]:
        return self._sched.open_ids()

    async def _ensure_channel(self) -> ChannelLike:
        if self._channel is None:
            self._sched.configure(*self._caps())
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
        self._sched.reset_ul()
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
            self._sched.queue_command(code, if_id, params)
            self._send_many(self._sched.take_control())
            return await asyncio.wait_for(fut, self.cmd_timeout)
        except TimeoutError:
            raise MuxError(errno.ETIMEDOUT, f"session {if_id}: no answer to command {code} "
                           f"in {self.cmd_timeout * 1000:.0f} ms") from None
        finally:
            if self._waiting.get(expect) is fut:
                del self._waiting[expect]

    def _on_response(self, cmd: Command) -> bool:
        """The scheduler got an OPEN/CLOSE_SESSION response: False if nobody waits for it."""
        fut = self._waiting.get(cmd.code)
        if fut is None or fut.done():
            return False
        fut.set_result(cmd)
        return True

    def _send_many(self, transfers: list[bytes]) -> None:
        """UL transfers from the scheduler, in the order it gave them."""
        ch = self._channel
        if ch is None:
            raise MuxError(errno.ENOTCONN, "the MUX channel is not open")
        try:
            ch.send_many(transfers)
        except OSError as exc:
            self._channel_failed(str(exc))
            raise MuxError(errno.EIO, f"MUX channel: {exc}") from None
        self.ul_transfers += len(transfers)

    # ---- uplink

    def transmit(self, if_id: int, ip_packet: bytes) -> bool:
        """Queue one IP packet for session `if_id`. False: dropped (and counted)."""
        if not self._push(if_id, ip_packet):
            return False
        if not self._drain_pending:
            self._drain_pending = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._drain)
        return True

    def _drain(self) -> None:
        self._drain_pending = False
        ch = self._channel
        if ch is None:
            return
        sched = self._sched
        sched.reap(getattr(ch, "pending", None) or 0)
        out = sched.pull()
        if out:
            try:
                self._send_many(out)
            except MuxError:
                return  # the channel failed: _channel_failed has reset everything
        if sched.global_stop:
            self._poll_later()

    def _on_ul_done(self) -> None:
        """The engine reaped UL completions: a stopped uplink may go again right now (in the
        interrupt, so the new TDs leave with this loop pass's doorbell)."""
        if self._sched.global_stop and self._channel is not None:
            self._drain()

    def _poll_later(self) -> None:
        if self._ul_done_events:
            return  # _on_ul_done will call _drain
        if self._poll is None and self._loop is not None:
            self._poll = self._loop.call_later(POLL_PENDING, self._poll_now)

    def _poll_now(self) -> None:
        self._poll = None
        self._drain()
        self._sched.update_flows()

    def _schedule_drain(self) -> None:
        if not self._drain_pending and self._loop is not None:
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    # ---- downlink

    def _on_dl(self, data: bytes) -> None:
        """One DL transfer for the scheduler; then its replies to the modem's commands go out,
        and the uplink is drained if the transfer may have unblocked it."""
        sched = self._sched
        wants_drain = sched.receive(data)
        if sched.control_out:
            try:
                self._send_many(sched.take_control())
            except MuxError as exc:
                log.warning("could not answer MUX commands: %s", exc.strerror)
        if wants_drain:
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
        self._lost.update(self._sched.drop_sessions())

    def _on_engine_state(self, state: EngineState) -> None:
        if state is EngineState.DOWN:
            self._channel_failed("modem down")
        elif state is EngineState.RUNNING and self._lost and self._reopening is None:
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
        s = self._sched
        return {
            "mode": str(s.mode), "ul_credit": s.ul_credit,
            "channel_open": self._channel is not None,
            "ul_pending_bytes": s.pending_bytes, "ul_stopped": s.global_stop,
            "ul_stops": s.global_stops, "ul_transfers": self.ul_transfers,
            "dl_transfers": s.dl_transfers, "dl_no_session": self.dl_no_session,
            "tx_no_session": self.tx_no_session,
            "fcth_ignored": self.fcth_ignored,
            "sessions": {x.if_id: x.counters() for x in s.sessions if x is not None},
            "rejects": dict(s.rejects.counters),
        }

    @property
    def counters(self) -> dict[str, int]:
        """Rejected device input and drops, flat (for `status` errors)."""
        out = {f"mux_{k}": v for k, v in self.rejects.counters.items()}
        out["mux_dl_no_session"] = self.dl_no_session
        return out


__all__ = ["QUEUE_LIMIT", "QUEUE_LIMIT_FC", "UL_HIGH", "MuxError", "MuxHost"]
