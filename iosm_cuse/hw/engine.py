"""The asyncio host engine: boot handshake, message ring, channels, interrupts, watchdog.

Contract 1 of docs/architecture.md:

    engine = IpcEngine(bus); await engine.start(); engine.add_state_listener(cb)
    ch = await engine.open_channel(6, on_receive); ch.send(data); await ch.close()
    await engine.stop()

The ring and pipe logic lives in `hw/protocol.py` (sans-IO); this module owns the Bus, the event
loop hooks (event fd reader or polling task), the 500 ms ring-message timeout and a watchdog that
notices a crashed, vanished or hung device and reports DOWN.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from iosm_cuse.bus.base import BAR2, Bus, BusError, DmaRegion
from iosm_cuse.hw.protocol import DlPipe, SharedArea, UlPipe
from iosm_cuse.wire.channels import (
    ChannelConfig,
    MuxMode,
    channel_config,
    mux_mode_from_caps,
)
from iosm_cuse.wire.ipc import (
    AP_SHARED,
    CAP_UL_FLOW_CREDIT,
    CHIP_INFO_SIZE_BYTE,
    CP_VERSION_INVALID,
    CP_VERSION_MIN,
    FEATURE_INBAND_CRASH,
    SCRATCHPAD,
    SLEEP_ENTER,
    SLEEP_TARGET_DEVICE,
    TD_SIZE,
    Doorbell,
    ExecStage,
    Hpda,
    IpcState,
    MsgStatus,
    MsgType,
)
from iosm_cuse.wire.rejects import Rejects

if TYPE_CHECKING:  # the MUX imports the engine; this is only its type
    from iosm_cuse.hw.mux.host import MuxHost

log = logging.getLogger("iosm_cuse.hw.engine")

_SP = {f.name: f.offset for f in SCRATCHPAD.fields}


class EngineError(Exception):
    """The engine cannot (or can no longer) talk to the device; the message says why."""


class ChannelError(OSError):
    """A channel operation failed; `errno` says how (EIO: device down, ENOTCONN: closed...)."""

    def __init__(self, err: int, what: str = "") -> None:
        super().__init__(err, what or os.strerror(err))


class EngineState(enum.Enum):
    UNINIT = "UNINIT"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DOWN = "DOWN"
    STOPPED = "STOPPED"


Listener = Callable[[EngineState], None]
Receiver = Callable[[bytes], None]
ErrorCallback = Callable[[ChannelError], None]
UlDone = Callable[[], None]


class IpcChannel:
    """An open channel: `send` queues UL transfers, DL transfers go to `on_receive`."""

    def __init__(self, engine: IpcEngine, cfg: ChannelConfig, ul: UlPipe, dl: DlPipe,
                 on_receive: Receiver, on_error: ErrorCallback | None,
                 on_ul_done: UlDone | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.id = cfg.channel
        self.ul = ul
        self.dl = dl
        self.on_receive = on_receive
        self.on_error = on_error
        self.on_ul_done = on_ul_done
        self.queue: collections.deque[bytes] = collections.deque()
        self.error: ChannelError | None = None
        self.closing = False
        self.closed = False
        self.sent = 0
        self.received = 0
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def max_transfer(self) -> int:
        return self.cfg.ul_buf_size

    @property
    def pending(self) -> int:
        """UL transfers not yet consumed by the device (queued + in flight)."""
        return len(self.queue) + self.ul.in_flight

    def send(self, data: bytes) -> None:
        """Queue one UL transfer (one TD). Raises ChannelError if it cannot be sent."""
        self.send_many([data])

    def send_many(self, transfers: list[bytes]) -> None:
        """Queue UL transfers, one TD each, in order: the data path's bursts pay for the
        channel checks and the doorbell once. Raises ChannelError (nothing queued) if one of
        them cannot be sent."""
        if self.error is not None:
            raise self.error
        if self.closing or self.closed:
            raise ChannelError(errno.ENOTCONN, f"channel {self.id} is closed")
        limit = self.cfg.ul_buf_size
        biggest = max(map(len, transfers), default=0)
        if biggest > limit:
            raise ChannelError(errno.EMSGSIZE, f"{biggest} bytes > {limit}")
        ul = self.ul
        now = 0
        if not self.queue:                  # free TDs (count-1 rule) take them directly
            now = min(len(transfers), (ul.tail - ul.head - 1) % ul.count)
            push = ul.push
            for i in range(now):
                push(transfers[i])
        if now < len(transfers):
            self.queue.extend([bytes(d) for d in transfers[now:]])
        self._drained.clear()
        self.sent += len(transfers)
        if self not in self.engine._ul_bell_channels:
            self.engine._schedule_ul_doorbell(self)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every UL transfer was consumed by the device."""
        if self.pending == 0:
            return
        await asyncio.wait_for(self._drained.wait(), timeout)
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        await self.engine._close_channel(self)

    # engine side

    def _fill(self) -> int:
        """Move queued transfers into free TDs; returns how many."""
        return self.ul.push_many(self.queue)

    def _update_drained(self) -> None:
        if self.pending == 0:
            self._drained.set()

    def _fail(self, err: ChannelError) -> None:
        if self.error is not None:
            return
        self.error = err
        self.queue.clear()
        self._drained.set()
        if self.on_error is not None:
            try:
                self.on_error(err)
            except Exception:
                log.exception("channel %d error callback failed", self.id)


class IpcEngine:
    """The host side of the IOSM IPC protocol over a Bus."""

    def __init__(self, bus: Bus, *, msg_timeout: float = 0.5, watchdog_interval: float = 0.1,
                 ul_stall_timeout: float = 2.0, init_poll: float = 0.02,
                 init_tries: int = 500, heartbeat: float | None = None) -> None:
        self.bus = bus
        self.msg_timeout = msg_timeout
        self.watchdog_interval = watchdog_interval
        self.ul_stall_timeout = ul_stall_timeout
        self.init_poll = init_poll
        self.init_tries = init_tries
        # Optional liveness probe while idle (the kernel has none: an idle hung modem goes
        # unnoticed there until the next request). A FEATURE_SET repeats what boot sent.
        self.heartbeat = heartbeat
        self._last_answer = 0.0
        self._probe: asyncio.Task[None] | None = None
        self.state = EngineState.UNINIT
        self.last_error: str | None = None
        self.rejects = Rejects(log)
        self.cp_version = CP_VERSION_INVALID
        self.capabilities = 0
        self.mux_mode: MuxMode | None = None
        self.chip_info = b""
        self.mux: MuxHost | None = None  # the host MUX (hw.mux) attaches itself here
        self.channels: dict[int, IpcChannel] = {}
        self._listeners: list[Listener] = []
        self._area: SharedArea | None = None
        self._area_region: DmaRegion | None = None
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ul_bell_pending = False
        self._ul_bell_channels: set[IpcChannel] = set()
        self._dl_bell_pending = False
        self.interrupts = 0

    # ---- public API

    @property
    def counters(self) -> dict[str, int]:
        """Rejected device input by kind (for status output)."""
        return self.rejects.counters

    @property
    def ul_flow_credit(self) -> bool:
        return self.cp_version >= CP_VERSION_MIN and bool(self.capabilities & CAP_UL_FLOW_CREDIT)

    def add_state_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    async def start(self) -> None:
        """The boot handshake of docs/iosm-protocol.md §1.6; EngineError with the reason on failure.
        Also used after DOWN: everything from the previous run is forgotten first."""
        self._loop = asyncio.get_running_loop()
        self._teardown_run()
        self.last_error = None
        self._set_state(EngineState.STARTING)
        try:
            await self._handshake()
        except (EngineError, BusError) as exc:
            self._teardown_run()
            self.last_error = str(exc)
            self._set_state(EngineState.DOWN)
            raise EngineError(str(exc)) from None
        self._set_state(EngineState.RUNNING)

    async def stop(self) -> None:
        """Close channels, tell the device UNINIT, release everything."""
        if self.state is EngineState.RUNNING:
            for ch in list(self.channels.values()):
                try:
                    await ch.close()
                except (ChannelError, EngineError) as exc:
                    log.debug("closing channel %d at stop: %s", ch.id, exc)
            self.bus.doorbell(Doorbell.IPC, IpcState.UNINIT)
            for _ in range(3):  # the kernel waits up to 30 ms for UNINIT
                if self._reg32("ipc_status") == IpcState.UNINIT:
                    break
                await asyncio.sleep(0.01)
        self._fail_channels(ChannelError(errno.ESHUTDOWN, "engine stopped"))
        self._teardown_run()
        self._set_state(EngineState.STOPPED)

    async def open_channel(self, ch_id: int, on_receive: Receiver,
                           on_error: ErrorCallback | None = None,
                           on_ul_done: UlDone | None = None) -> IpcChannel:
        """OPEN_PIPE(UL), OPEN_PIPE(DL), post count-1 DL buffers, ring HPDA. `on_ul_done()` is
        called from the interrupt after the device consumed UL transfers (`ch.pending` fell),
        so a sender stopped on pending bytes restarts at once instead of polling."""
        if self.state is not EngineState.RUNNING or self._area is None:
            raise ChannelError(errno.EIO, f"modem not running ({self.state.value})")
        if ch_id in self.channels:
            raise ChannelError(errno.EBUSY, f"channel {ch_id} already open")
        try:
            cfg = channel_config(ch_id, self.mux_mode or MuxMode.LITE)
        except KeyError:
            raise ChannelError(errno.ENODEV, f"no channel {ch_id}") from None
        area = self._area
        regions: list[DmaRegion] = []
        try:
            ul = UlPipe(cfg.ul_pipe, cfg.ul_tds, cfg.ul_buf_size,
                        self._alloc(regions, cfg.ul_tds * TD_SIZE),
                        self._alloc(regions, cfg.ul_tds * cfg.ul_buf_size, zero=False), area)
            dl = DlPipe(cfg.dl_pipe, cfg.dl_tds, cfg.dl_buf_size,
                        self._alloc(regions, cfg.dl_tds * TD_SIZE),
                        self._alloc(regions, cfg.dl_tds * cfg.dl_buf_size, zero=False), area)
        except BusError as exc:
            for r in regions:
                self.bus.dma.free(r)
            raise ChannelError(errno.ENOMEM, str(exc)) from None
        ch = IpcChannel(self, cfg, ul, dl, on_receive, on_error, on_ul_done)
        self.channels[ch_id] = ch
        try:
            for pipe in (ul, dl):
                area.set_head(pipe.number, 0)
                area.set_tail(pipe.number, 0)
                await self._message(MsgType.OPEN_PIPE, td_ring_address=pipe.ring.addr,
                                    td_count=pipe.count, pipe=pipe.number, irq_vector=0,
                                    backoff_us=cfg.backoff_us)
        except (EngineError, ChannelError) as exc:
            self.channels.pop(ch_id, None)
            self._release_pipes(ch)
            raise ChannelError(errno.EIO, f"opening channel {ch_id}: {exc}") from None
        dl.post_all()
        self.bus.doorbell(Doorbell.HPDA, cfg.hpda_id)
        return ch

    # ---- channel internals

    def _alloc(self, regions: list[DmaRegion], size: int, zero: bool = True) -> DmaRegion:
        r = self.bus.dma.alloc(size, zero=zero)
        regions.append(r)
        return r

    def _release_pipes(self, ch: IpcChannel) -> None:
        if self._area is not None:
            for p in (ch.ul, ch.dl):
                self._area.set_head(p.number, 0)
                self._area.set_tail(p.number, 0)
        for p in (ch.ul, ch.dl):
            for r in (p.ring, p.slab):
                # after a DOWN the pool was reset: nothing left to free
                with contextlib.suppress(BusError):
                    self.bus.dma.free(r)

    async def _close_channel(self, ch: IpcChannel) -> None:
        if ch.closed:
            return
        if ch.error is None and self.state is EngineState.RUNNING:
            # the kernel waits up to 500 ms for pending UL data
            with contextlib.suppress(TimeoutError, ChannelError):
                await ch.drain(timeout=0.5)
        ch.closing = True
        try:
            if ch.error is None and self.state is EngineState.RUNNING:
                for pipe in (ch.ul, ch.dl):
                    await self._message(MsgType.CLOSE_PIPE, pipe=pipe.number)
        finally:
            ch.closed = True
            if self.channels.get(ch.id) is ch:
                del self.channels[ch.id]
            self._release_pipes(ch)
            self._ul_bell_channels.discard(ch)

    def _schedule_ul_doorbell(self, ch: IpcChannel) -> None:
        """UL doorbells are batched: one HPDA per loop iteration for all channels that queued."""
        self._ul_bell_channels.add(ch)
        if not self._ul_bell_pending and self._loop is not None:
            self._ul_bell_pending = True
            self._loop.call_soon(self._ring_ul)

    def _ring_ul(self) -> None:
        self._ul_bell_pending = False
        chans, self._ul_bell_channels = self._ul_bell_channels, set()
        if self.state is not EngineState.RUNNING:
            return
        rung = False
        for ch in chans:
            if ch.closed or ch.error is not None or not ch.ul.unpublished:
                continue  # (already published and rung by the interrupt handler)
            ch.ul.publish()
            rung = True
        if rung:
            self.bus.doorbell(Doorbell.HPDA, Hpda.UL_WRITE_TD)

    # ---- messages

    async def _message(self, kind: MsgType, **fields: int) -> None:
        """Post one ring message and wait for its completion (500 ms). A timeout means the
        device stopped answering: the engine goes DOWN."""
        area = self._area
        if area is None or self._loop is None:
            raise EngineError("engine not started")
        idx = area.post(kind, **fields)
        if idx is None:
            raise EngineError("message ring full")
        fut: asyncio.Future[int] = self._loop.create_future()
        self._waiters[idx] = fut
        self.bus.doorbell(Doorbell.HPDA, Hpda.MSG_RING)
        try:
            status = await asyncio.wait_for(fut, self.msg_timeout)
        except TimeoutError:
            self._waiters.pop(idx, None)
            reason = (f"timeout: {kind.name} not completed in "
                      f"{self.msg_timeout * 1000:.0f} ms")
            self._go_down(reason)
            raise EngineError(reason) from None
        if status != MsgStatus.SUCCESS:
            raise EngineError(f"{kind.name} completed with status {status}")

    # ---- handshake

    def _reg32(self, name: str) -> int:
        return self.bus.read32(BAR2, _SP[name])

    async def _handshake(self) -> None:
        await self._wait_exec_stage()
        chip = bytes(self.bus.bar(BAR2)[_SP["chip_info"]:_SP["chip_info"] + 60])
        if chip[1] != CHIP_INFO_SIZE_BYTE:
            raise EngineError(f"Unexpected Chip Info: size byte {chip[1]} (want 58)")
        self.chip_info = chip
        if self._reg32("ipc_status") != IpcState.UNINIT:
            # left over from a previous run: ask for UNINIT first
            self.bus.doorbell(Doorbell.IPC, IpcState.UNINIT)
            await self._poll_reg("ipc_status", IpcState.UNINIT, 0.01, 100, "UNINIT")
        self.bus.dma.reset()
        region = self.bus.dma.alloc(AP_SHARED.size)
        self._area_region = region
        area = SharedArea(region, self.rejects)
        area.init_context_info()
        self._area = area
        self.bus.doorbell(Doorbell.IPC, IpcState.INIT)
        await self._poll_reg("ipc_status", IpcState.INIT, self.init_poll, self.init_tries, "INIT")
        self.bus.write64(BAR2, _SP["ap_window_base"], 0)
        self.bus.write64(BAR2, _SP["ap_window_end"], 0)
        self.bus.write64(BAR2, _SP["context_info_address"], region.addr)
        self._attach_interrupt()
        self.bus.doorbell(Doorbell.IPC, IpcState.RUNNING)
        deadline = time.monotonic() + 1.0
        while area.device_ipc_status() != IpcState.RUNNING:
            if time.monotonic() > deadline:
                raise EngineError("device did not report IPC RUNNING in device_info within 1 s")
            await asyncio.sleep(0.001)
        self._tasks.append(asyncio.ensure_future(self._watchdog()))
        await self._message(MsgType.SLEEP, target=SLEEP_TARGET_DEVICE, state=SLEEP_ENTER)
        await self._message(MsgType.FEATURE_SET, features=FEATURE_INBAND_CRASH)
        self._read_capabilities()

    async def _wait_exec_stage(self) -> None:
        for _ in range(50):  # 50 x 20 ms, as at probe
            stage = self._reg32("exec_stage")
            if stage == ExecStage.RUN:
                return
            await asyncio.sleep(0.02)
        raise EngineError(f"device not in RUN stage (exec stage {stage:#010x})")

    async def _poll_reg(self, name: str, want: int, every: float, tries: int, what: str) -> None:
        for _ in range(tries):
            if self._reg32(name) == want:
                return
            stage = self._reg32("exec_stage")
            if stage != ExecStage.RUN:
                raise EngineError(f"device left the RUN stage ({stage:#010x}) during the "
                                  f"handshake")
            await asyncio.sleep(every)
        raise EngineError(f"device did not reach IPC {what} ({name} = {self._reg32(name)}) "
                          f"after {tries * every:.1f} s")

    def _read_capabilities(self) -> None:
        self.cp_version = self._reg32("cp_version")
        if self.cp_version == CP_VERSION_INVALID:
            raise EngineError("invalid CP version 0xFFFFFFFF")
        self.capabilities = self._reg32("cp_capabilities")
        self.mux_mode = mux_mode_from_caps(self.cp_version, self.capabilities)
        log.info("CP version %#06x, capabilities %#010x: MUX %s", self.cp_version,
                 self.capabilities, self.mux_mode)

    # ---- interrupts

    def _attach_interrupt(self) -> None:
        assert self._loop is not None
        self.bus.ack_event()
        fd = self.bus.event_fd
        if fd is not None:
            self._loop.add_reader(fd, self._on_event)
            self._reader_fd = fd
        else:
            self._tasks.append(asyncio.ensure_future(self._poll_loop()))

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.bus.poll_interval)
            self._service()

    def _on_event(self) -> None:
        self.bus.ack_event()
        try:
            self._service()
        except Exception as exc:  # a bug must not stop the interrupt handler for good
            self.rejects("internal_error", f"{type(exc).__name__}: {exc}")
            log.exception("servicing the interrupt")

    def _service(self) -> None:
        """One interrupt (docs/iosm-protocol.md §1.5): exec stage, message completions, every
        open pipe."""
        self.interrupts += 1
        if self.state not in (EngineState.RUNNING, EngineState.STARTING):
            return
        if self._check_stage():
            return
        area = self._area
        if area is None:
            return
        for c in area.completions():
            self._last_answer = time.monotonic()
            fut = self._waiters.pop(c.index, None)
            if fut is not None and not fut.done():
                fut.set_result(c.status)
        ring_dl = False
        ring_ul = False
        for ch in list(self.channels.values()):
            if ch.closed or ch.error is not None:
                continue
            n, drained = ch.dl.reap(self._receiver(ch))
            if n:
                # control pipes: doorbell per batch; IP MUX: only if the ring ran dry
                # (docs/iosm-protocol.md §2.8)
                ring_dl |= (not ch.cfg.is_ip_mux) or drained
            if ch.ul.reap():
                if ch.on_ul_done is not None:
                    # first, so what the sender queues now leaves with this doorbell
                    self._ul_done(ch, ch.on_ul_done)
                    if ch.closed or ch.error is not None or self._area is not area:
                        continue
                ch._fill()
                if ch.ul.unpublished:
                    ch.ul.publish()
                    ring_ul = True
                ch._update_drained()
        if ring_ul:
            self.bus.doorbell(Doorbell.HPDA, Hpda.UL_WRITE_TD)
        elif ring_dl:
            self.bus.doorbell(Doorbell.HPDA, Hpda.DL_PROCESS)

    @staticmethod
    def _ul_done(ch: IpcChannel, cb: UlDone) -> None:
        try:
            cb()
        except Exception:
            log.exception("channel %d UL completion callback failed", ch.id)

    def _receiver(self, ch: IpcChannel) -> Receiver:
        def deliver(data: bytes) -> None:
            ch.received += 1
            try:
                ch.on_receive(data)
            except Exception:
                log.exception("channel %d receiver failed", ch.id)

        return deliver

    def _check_stage(self) -> bool:
        """True (and DOWN) if the device left the RUN stage: crash, link down, vanished."""
        stage = self._reg32("exec_stage")
        if stage == ExecStage.RUN and self._area is not None and \
                self.state is EngineState.RUNNING:
            # read there once RUNNING (docs/iosm-protocol.md §1.3)
            stage = self._area.device_exec_stage()
        if stage == ExecStage.RUN:
            return False
        if stage == ExecStage.CRASH:
            self._go_down("crash: modem reported exec stage CRASH")
        else:
            self._go_down(f"link down: exec stage {stage:#010x}")
        return True

    async def _watchdog(self) -> None:
        """Polls the exec stage (crash/link down without an interrupt) and UL progress (hang)."""
        while self.state in (EngineState.RUNNING, EngineState.STARTING):
            await asyncio.sleep(self.watchdog_interval)
            if self.state not in (EngineState.RUNNING, EngineState.STARTING):
                return
            if self._check_stage():
                return
            now = time.monotonic()
            if self.heartbeat and self.state is EngineState.RUNNING and \
                    now - self._last_answer > self.heartbeat and \
                    (self._probe is None or self._probe.done()):
                self._probe = asyncio.ensure_future(self._heartbeat())
            for ch in list(self.channels.values()):
                ul = ch.ul
                if ul.in_flight and now - ul.last_progress > self.ul_stall_timeout:
                    self._go_down(f"timeout: UL pipe {ul.number} made no progress for "
                                  f"{self.ul_stall_timeout:.1f} s")
                    return
                if not ul.in_flight:
                    ul.last_progress = now

    async def _heartbeat(self) -> None:
        self._last_answer = time.monotonic()
        with contextlib.suppress(EngineError):  # a timeout already took the engine DOWN
            await self._message(MsgType.FEATURE_SET, features=FEATURE_INBAND_CRASH)

    # ---- state

    def _go_down(self, reason: str) -> None:
        if self.state in (EngineState.DOWN, EngineState.STOPPED):
            return
        log.debug("modem down: %s", reason)  # the state listener (daemon) reports it
        self.last_error = reason
        starting = self.state is EngineState.STARTING
        self._fail_channels(ChannelError(errno.EIO, f"modem down: {reason}"))
        self._teardown_run()
        if not starting:  # start() reports its own failure
            self._set_state(EngineState.DOWN)

    def _fail_channels(self, err: ChannelError) -> None:
        for ch in list(self.channels.values()):
            ch._fail(err)
            ch.closed = True
        self.channels.clear()

    def _teardown_run(self) -> None:
        if self._reader_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        current = asyncio.current_task() if self._loop is not None else None
        for t in self._tasks:
            if t is not current:
                t.cancel()
        self._tasks.clear()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(EngineError(self.last_error or "engine reset"))
        self._waiters.clear()
        self._area = None
        self._area_region = None
        self.bus.dma.reset()

    def _set_state(self, state: EngineState) -> None:
        self.state = state
        if state not in (EngineState.RUNNING, EngineState.DOWN):
            return
        for cb in list(self._listeners):
            try:
                cb(state)
            except Exception:
                log.exception("state listener failed")
