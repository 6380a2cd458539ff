"""The device (CP) side of the IOSM IPC protocol: what the modem plays on its Bus.

`DeviceModel.service()` is the synchronous core, run on every host doorbell (and on a short
timer while DL transfers wait for buffers): it follows the IPC doorbell through UNINIT -> INIT ->
RUNNING, completes ring messages, opens/closes pipes, consumes UL TDs and fills DL TDs.
`DeviceModel.run()` is the asyncio adapter.

Channel functions attach per Contract 3 (`model.attach(channel_id, fn)`, `fn.opened(send)`,
`fn.receive(bytes)`, `fn.closed()`). Everything the host wrote is checked as strictly as the host
checks the device: addresses must lie in the DMA pool, indices in their rings, types be known.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from iosm_cuse.bus.base import BAR0, BAR2, Bus, BusError, doorbell_offset
from iosm_cuse.wire.channels import channel_of_pipe
from iosm_cuse.wire.ipc import (
    CAP_DL_AGGR,
    CAP_UL_AGGR,
    CHIP_INFO_SIZE,
    CHIP_INFO_SIZE_BYTE,
    CONTEXT_INFO,
    DEVICE_INFO,
    MESSAGES,
    MSG_SIZE,
    MSG_STATUS_OFFSET,
    MSG_TYPE_OFFSET,
    NUM_PIPES,
    SCRATCHPAD,
    TD_SIZE,
    TD_STRUCT,
    Doorbell,
    ExecStage,
    IpcState,
    MsgStatus,
    MsgType,
    TdStatus,
)
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.sim.device")

Send = Callable[[bytes], bool]
_END = int(TdStatus.END_TRANSFER) << 24
_MAX_MSG_ENTRIES = 1024
_MAX_UL_TRANSFER = 1 << 20  # the largest DL/UL buffer of the channel table (loopback)


class ChannelFunction(Protocol):
    """Contract 3: what gives a channel's bytes a meaning on the device side."""

    def opened(self, send: Send) -> None: ...
    def receive(self, ul_transfer: bytes) -> None: ...
    def closed(self) -> None: ...


@dataclass
class DeviceConfig:
    cp_version: int = 0x0100
    capabilities: int = 0  # Lite (XMM7560); CAP_UL_AGGR|CAP_DL_AGGR for Aggregation
    chip_info_version: int = 1
    dl_backlog: int = 4096  # DL transfers kept while the host has no buffer posted

    @classmethod
    def for_mux(cls, mux: str, **kw: int) -> DeviceConfig:
        caps = CAP_UL_AGGR | CAP_DL_AGGR if mux == "aggregation" else 0
        return cls(capabilities=caps, **kw)


@dataclass
class _Pipe:
    number: int
    ring_addr: int
    count: int
    tail: int = 0


@dataclass
class _Channel:
    id: int
    fn: ChannelFunction
    ul: _Pipe | None = None
    dl: _Pipe | None = None
    live: bool = False  # opened() called
    generation: int = 0
    backlog: collections.deque[bytes] = field(default_factory=collections.deque)


class _Sink:
    """The function of a channel no function was attached to: UL is consumed and counted."""

    def __init__(self, model: DeviceModel) -> None:
        self.model = model

    def opened(self, send: Send) -> None:
        return None

    def receive(self, ul_transfer: bytes) -> None:
        self.model.ul_unclaimed += 1

    def closed(self) -> None:
        return None


_Taken = tuple[_Channel, int, list[bytes]]  # (channel, its generation then, UL copies)


@dataclass
class _Shared:
    """Addresses from the host's context info, each checked against the pool."""

    device_info: int
    head_array: int
    tail_array: int
    msg_head: int
    msg_tail: int
    msg_ring: int
    entries: int


class DeviceModel:
    def __init__(self, bus: Bus, config: DeviceConfig | None = None) -> None:
        self.bus = bus
        self.config = config or DeviceConfig()
        self.rejects = Rejects(log, what="rejected host input")
        self.functions: dict[int, ChannelFunction] = {}
        self.channels: dict[int, _Channel] = {}
        self.pipes: dict[int, _Pipe] = {}
        self.ipc_state = IpcState.UNINIT
        self.crashed = False
        self.hung = False
        self.features = 0
        self.dl_refused = 0  # send() returned False: backlog full
        self.ul_transfers = 0
        self.ul_unclaimed = 0  # UL transfers on channels without a function (consumed, dropped)
        self.dl_transfers = 0
        self._shared: _Shared | None = None
        self._msg_tail = 0
        self._irq = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        # the protocol recorder (sim/recorder.py): None, the default, records nothing
        self.record: Callable[..., None] | None = None
        self.power_on()

    # ---- configuration

    @property
    def dropped_dl(self) -> int:
        """DL transfers lost: they did not fit the buffer the host posted (each a `dl_td`
        reject)."""
        return self.rejects["dl_td"]

    def attach(self, channel_id: int, fn: ChannelFunction) -> None:
        self.functions[channel_id] = fn

    def power_on(self) -> None:
        """Scratchpad as after boot: RUN, valid chip info, IPC UNINIT, version, capabilities."""
        bar2 = self.bus.bar(BAR2)
        chip = bytearray(CHIP_INFO_SIZE)
        chip[0] = self.config.chip_info_version
        chip[1] = CHIP_INFO_SIZE_BYTE
        chip[2:2 + 18] = b"XMM7560 simulated\0"
        SCRATCHPAD.pack_into(bar2, 0, exec_stage=ExecStage.RUN, chip_info=bytes(chip),
                             ipc_status=IpcState.UNINIT, cp_version=self.config.cp_version,
                             cp_capabilities=self.config.capabilities)
        self.ipc_state = IpcState.UNINIT
        self.crashed = False
        self.hung = False

    # ---- failure injection (recovery tests, `iosm-cuse` debugging)

    def crash(self, stage: ExecStage = ExecStage.CRASH) -> None:
        """In-band crash: exec stage CRASH (or CD_READY, a core dump ready) in the scratchpad
        and device_info, interrupt, silence."""
        self.crashed = True
        self.bus.write32(BAR2, SCRATCHPAD["exec_stage"].offset, stage)
        if self._shared is not None:
            self._wr32(self._shared.device_info + DEVICE_INFO["exec_stage"].offset, stage)
        self.bus.notify()

    def hang(self) -> None:
        """Stop answering anything (no completions, no TDs, no interrupts)."""
        self.hung = True

    def reset(self) -> None:
        """Reboot: every pipe closed, scratchpad back to RUN/UNINIT, ready for a handshake."""
        self._close_all()
        self._shared = None
        self._msg_tail = 0
        self.power_on()

    # ---- memory helpers (all bounds-checked)

    def _view(self, addr: int, size: int) -> memoryview:
        return self.bus.dma.view_at(addr, size)

    def _rd32(self, addr: int) -> int:
        return int.from_bytes(self._view(addr, 4), "little")

    def _wr32(self, addr: int, value: int) -> None:
        self._view(addr, 4)[:] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    # ---- the core

    def service(self) -> None:
        """React to whatever the host did since the last call."""
        if self.crashed or self.hung:
            return
        taken: list[_Taken] = []
        try:
            self._ipc_doorbell()
            if self.ipc_state is IpcState.RUNNING and self._shared is not None:
                self._messages()
                taken = self._uplink()
                self._downlink()
        except BusError as exc:
            self.rejects("dma_range", str(exc))
        # one interrupt for everything completed; the UL transfers go to the functions after
        # it, so the host refills the ring meanwhile (the copied buffers are free, as after a
        # real device's DMA read)
        self._raise_irq()
        self._deliver_ul(taken)

    def _raise_irq(self) -> None:
        if self._irq:
            self._irq = False
            self.bus.notify()

    def _ipc_doorbell(self) -> None:
        req = self.bus.read32(BAR0, doorbell_offset(Doorbell.IPC))
        st = self.ipc_state
        if req == IpcState.UNINIT and st is not IpcState.UNINIT:
            self._close_all()
            self._shared = None
            self._set_ipc(IpcState.UNINIT)
        elif req == IpcState.INIT and st is IpcState.UNINIT:
            self._set_ipc(IpcState.INIT)
        elif req == IpcState.RUNNING and st is IpcState.INIT:
            self._enter_running()

    def _set_ipc(self, st: IpcState) -> None:
        self.ipc_state = st
        if self.record is not None:
            self.record("ipc", state=st.name)
        self.bus.write32(BAR2, SCRATCHPAD["ipc_status"].offset, st)

    def _enter_running(self) -> None:
        addr = self.bus.read64(BAR2, SCRATCHPAD["context_info_address"].offset)
        try:
            ci = CONTEXT_INFO.unpack(self._view(addr, CONTEXT_INFO.size))
            entries = int(ci["msg_ring_entries"])
            if not 2 <= entries <= _MAX_MSG_ENTRIES:
                raise BusError(f"message ring of {entries} entries")
            sh = _Shared(ci["device_info_address"], ci["head_array_address"],
                         ci["tail_array_address"], ci["msg_head_address"],
                         ci["msg_tail_address"], ci["msg_ring_address"], entries)
            for a, n in ((sh.device_info, DEVICE_INFO.size), (sh.head_array, 4 * NUM_PIPES),
                         (sh.tail_array, 4 * NUM_PIPES), (sh.msg_head, 4), (sh.msg_tail, 4),
                         (sh.msg_ring, entries * MSG_SIZE)):
                self._view(a, n)
        except BusError as exc:
            self.rejects("context_info", f"at {addr:#x}: {exc}")
            self._set_ipc(IpcState.ERROR)
            return
        self._shared = sh
        self._msg_tail = 0
        self._wr32(sh.msg_tail, 0)
        DEVICE_INFO.pack_into(self._view(sh.device_info, DEVICE_INFO.size), 0,
                              exec_stage=ExecStage.RUN, ipc_status=IpcState.RUNNING,
                              sleep_notification=0)
        self._set_ipc(IpcState.RUNNING)
        self._irq = True

    # message ring

    def _messages(self) -> None:
        sh = self._shared
        assert sh is not None
        head = self._rd32(sh.msg_head)
        if head >= sh.entries:
            self.rejects("msg_head_range", f"msg_head {head} of {sh.entries}")
            return
        i = self._msg_tail
        while i != head:
            entry = self._view(sh.msg_ring + i * MSG_SIZE, MSG_SIZE)
            status = self._message(entry)
            if self.record is not None:
                self._record_message(entry, status)
            entry[MSG_STATUS_OFFSET:MSG_SIZE] = int(status).to_bytes(4, "little")
            i = (i + 1) % sh.entries
        if i != self._msg_tail:
            self._msg_tail = i
            self._wr32(sh.msg_tail, i)
            self._irq = True

    def _record_message(self, entry: memoryview, status: MsgStatus) -> None:
        assert self.record is not None
        code = entry[MSG_TYPE_OFFSET]
        try:
            kind = MsgType(code)
        except ValueError:
            self.record("msg", type=f"{code:#x}", status=status.name)
            return
        f = MESSAGES[kind].unpack(entry)
        self.record("msg", type=kind.name, pipe=f.get("pipe", -1), tds=f.get("td_count", 0),
                    status=status.name)

    def _message(self, entry: memoryview) -> MsgStatus:
        code = entry[MSG_TYPE_OFFSET]
        try:
            kind = MsgType(code)
        except ValueError:
            self.rejects("msg_type", f"unknown ring message type {code:#x}")
            return MsgStatus.ERROR
        f = MESSAGES[kind].unpack(entry)
        if kind is MsgType.OPEN_PIPE:
            return self._open_pipe(f["pipe"], f["td_ring_address"], f["td_count"])
        if kind in (MsgType.CLOSE_PIPE, MsgType.ABORT_PIPE):
            return self._close_pipe(f["pipe"])
        if kind is MsgType.FEATURE_SET:
            self.features = f["features"]
        return MsgStatus.SUCCESS  # SLEEP: nothing to do, the model never sleeps

    def _open_pipe(self, number: int, ring: int, count: int) -> MsgStatus:
        ch_id = channel_of_pipe(number)
        if number >= NUM_PIPES or ch_id is None or count < 2:
            self.rejects("open_pipe", f"pipe {number} with {count} TDs")
            return MsgStatus.ERROR
        if not self.bus.dma.contains(ring, count * TD_SIZE):
            self.rejects("open_pipe", f"pipe {number}: TD ring {ring:#x} outside DMA memory")
            return MsgStatus.ERROR
        if number in self.pipes:
            self._close_pipe(number)
        pipe = _Pipe(number, ring, count)  # tail restarts at 0 on every open
        self.pipes[number] = pipe
        assert self._shared is not None
        self._wr32(self._shared.tail_array + 4 * number, 0)
        ch = self.channels.get(ch_id)
        if ch is None:
            # A channel with nothing behind it (trace, RPC, loopback in the assembled model)
            # still consumes its UL TDs: a real modem completes them, and a driver that waits
            # for completions (the kernel's, on close and when the ring is full) would hang
            # (docs/uml-virtpci.md §9).
            fn = self.functions.get(ch_id) or _Sink(self)
            ch = self.channels[ch_id] = _Channel(ch_id, fn)
        if number % 2 == 0:
            ch.ul = pipe
        else:
            ch.dl = pipe
        if ch.ul is not None and ch.dl is not None and not ch.live:
            ch.live = True
            ch.generation += 1
            self._call(ch, "opened", self._sender(ch, ch.generation))
        return MsgStatus.SUCCESS

    def _close_pipe(self, number: int) -> MsgStatus:
        pipe = self.pipes.pop(number, None)
        if pipe is None:
            self.rejects("close_pipe", f"pipe {number} is not open")
            return MsgStatus.ERROR
        for ch in self.channels.values():
            if pipe in (ch.ul, ch.dl):
                if ch.ul is pipe:
                    ch.ul = None
                else:
                    ch.dl = None
                self._channel_down(ch)
        return MsgStatus.SUCCESS

    def _channel_down(self, ch: _Channel) -> None:
        ch.backlog.clear()
        if ch.live:
            ch.live = False
            ch.generation += 1
            self._call(ch, "closed")

    def _close_all(self) -> None:
        for ch in self.channels.values():
            ch.ul = ch.dl = None
            self._channel_down(ch)
        self.pipes.clear()

    def _call(self, ch: _Channel, what: str, *args: object) -> None:
        try:
            getattr(ch.fn, what)(*args)
        except Exception:
            log.exception("channel %d function %s() failed", ch.id, what)

    # uplink: consume every TD the host queued

    def _uplink(self) -> list[_Taken]:
        """Copy out every queued UL transfer and complete its TD (tail; the interrupt follows
        in service()); the copies are returned for `_deliver_ul`."""
        sh = self._shared
        assert sh is not None
        taken: list[_Taken] = []
        for ch in list(self.channels.values()):
            pipe = ch.ul
            if pipe is None:
                continue
            head = self._rd32(sh.head_array + 4 * pipe.number)
            if head >= pipe.count:
                self.rejects("ul_head_range", f"pipe {pipe.number}: head {head}/{pipe.count}")
                continue
            if head == pipe.tail:
                continue
            data = self._take_ul(pipe, head)
            if ch.live:
                taken.append((ch, ch.generation, data))
        return taken

    def _deliver_ul(self, taken: list[_Taken]) -> None:
        for ch, generation, data in taken:
            receive = ch.fn.receive
            for transfer in data:
                if ch.generation != generation:  # the function closed the channel meanwhile
                    break
                try:
                    receive(transfer)
                except Exception:
                    log.exception("channel %d function receive() failed", ch.id)

    def _take_ul(self, pipe: _Pipe, head: int) -> list[bytes]:
        """Copies of the TDs from the pipe's tail to `head`; the tail moves to `head`."""
        sh = self._shared
        assert sh is not None
        ring = self._view(pipe.ring_addr, pipe.count * TD_SIZE)
        mem, base, limit = self.bus.dma.mem, self.bus.dma.base_addr, self.bus.dma.size
        unpack, count = TD_STRUCT.unpack_from, pipe.count
        out: list[bytes] = []
        i = pipe.tail
        while i != head:
            addr, word = unpack(ring, i * TD_SIZE)
            size = word & 0xFFFFFF
            off = addr - base
            if size > _MAX_UL_TRANSFER or off < 0 or off + size > limit:
                self.rejects("ul_td", f"pipe {pipe.number} TD {i}: {addr:#x}+{size}")
            else:
                self.ul_transfers += 1
                out.append(bytes(mem[off:off + size]))
                if self.record is not None:
                    self.record("ul_td", channel=channel_of_pipe(pipe.number),
                                pipe=pipe.number, size=size)
            i = (i + 1) % count
        pipe.tail = i
        self._wr32(sh.tail_array + 4 * pipe.number, i)
        self._irq = True
        return out

    # downlink: fill posted buffers from the backlog (head re-read every time)

    def _sender(self, ch: _Channel, generation: int) -> Send:
        def send(data: bytes) -> bool:
            if ch.generation != generation or not ch.live or self.crashed:
                return False
            if len(ch.backlog) >= self.config.dl_backlog:
                self.dl_refused += 1  # the caller keeps it and may retry
                return False
            ch.backlog.append(data)
            self._schedule_flush()
            return True

        return send

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or self._loop is None:
            return
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.crashed or self.hung or self._shared is None:
            return
        try:
            self._downlink()
        except BusError as exc:
            self.rejects("dma_range", str(exc))
        self._raise_irq()

    def _downlink(self) -> None:
        sh = self._shared
        assert sh is not None
        waiting = False
        for ch in self.channels.values():
            pipe = ch.dl
            if pipe is None or not ch.backlog:
                continue
            head = self._rd32(sh.head_array + 4 * pipe.number)
            if head >= pipe.count:
                self.rejects("dl_head_range", f"pipe {pipe.number}: head {head}/{pipe.count}")
                continue
            i = pipe.tail
            if i != head:
                ring = self._view(pipe.ring_addr, pipe.count * TD_SIZE)
                while i != head and ch.backlog:
                    data = ch.backlog.popleft()
                    if self._fill_td(ring, i, data):
                        if self.record is not None:
                            self.record("dl_td", channel=ch.id, pipe=pipe.number,
                                        size=len(data))
                        i = (i + 1) % pipe.count
                pipe.tail = i
                self._wr32(sh.tail_array + 4 * pipe.number, i)
                self._irq = True
            waiting |= bool(ch.backlog)
        if waiting:
            self._retry_later()

    def _fill_td(self, ring: memoryview, i: int, data: bytes) -> bool:
        """Put one transfer in TD i; False if it cannot go there (the transfer is dropped,
        the buffer stays posted for the next one)."""
        addr, word = TD_STRUCT.unpack_from(ring, i * TD_SIZE)
        room = word & 0xFFFFFF
        n = len(data)
        pool = self.bus.dma
        off = addr - pool.base_addr
        if n > room or off < 0 or off + room > pool.size:
            # a transfer the buffer cannot hold is lost, not split (PARTIAL is not reassembled)
            self.rejects("dl_td", "TD %d: %d bytes for a buffer %#x+%d", i, n, addr, room)
            return False
        pool.mem[off:off + n] = data
        TD_STRUCT.pack_into(ring, i * TD_SIZE, addr, n | _END)
        self.dl_transfers += 1
        return True

    def _retry_later(self) -> None:
        """No buffer posted: look at the head indices again soon (the host may re-post on the
        IP MUX pipe without ringing)."""
        if self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(0.001, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._flush()

    # ---- asyncio adapter

    async def run(self) -> None:
        """Serve the bus until cancelled (event fd reader, or polling without one)."""
        self._loop = asyncio.get_running_loop()
        fd = self.bus.event_fd
        try:
            if fd is not None:
                self._loop.add_reader(fd, self._on_doorbell)
                self.service()
                await asyncio.Event().wait()
            while True:
                self.service()
                await asyncio.sleep(self.bus.poll_interval)
        finally:
            if fd is not None:
                self._loop.remove_reader(fd)

    def _on_doorbell(self) -> None:
        self.bus.ack_event()
        if self.record is not None:
            self.record("doorbell")
        self.service()
