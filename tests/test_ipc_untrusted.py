"""Engine and model in one process (one loop) where a test can misbehave on either side.

Device-written garbage (TDs, tails, completions) is rejected, counted and logged while every
other transfer arrives intact; the model is as strict about what the host writes. Also: the
single-file (ivshmem) layout with polling instead of eventfds, and handshake failures.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from helpers import ShmPair, engine_running, model_running, run, shared_addr, until_async

from iosm_cuse.bus.base import BAR2
from iosm_cuse.bus.shm import DEVICE, HOST, ShmBus
from iosm_cuse.hw.engine import ChannelError, EngineError, EngineState, IpcEngine
from iosm_cuse.sim.device import DeviceConfig, DeviceModel, Send
from iosm_cuse.wire.channels import dma_bytes_needed
from iosm_cuse.wire.ipc import (
    AP_SHARED,
    MSG_SIZE,
    SCRATCHPAD,
    TD,
    Doorbell,
    Hpda,
    MsgType,
)


class Source:
    """Sends whatever the test asks for; records UL transfers."""

    def __init__(self) -> None:
        self.send: Send | None = None
        self.ul: list[bytes] = []

    def opened(self, send: Send) -> None:
        self.send = send

    def receive(self, data: bytes) -> None:
        self.ul.append(data)

    def closed(self) -> None:
        self.send = None


class Corrupting(DeviceModel):
    """Spoils chosen DL transfers (by their running number) or completion types."""

    def __init__(self, bus: ShmBus, corrupt: dict[int, str]) -> None:
        super().__init__(bus)
        self.corrupt = corrupt
        self.n_dl = 0
        self.spoil_type = False

    def _fill_td(self, ring: memoryview, i: int, data: bytes) -> bool:
        ok = super()._fill_td(ring, i, data)
        how = self.corrupt.get(self.n_dl)
        self.n_dl += 1
        at = i * 16
        if how == "size":
            TD.set(ring, at, "size", 0xFFFFFF)
        elif how == "address":
            TD.set(ring, at, "address", TD.get(ring, at, "address") + 64)
        elif how in ("abort", "invalid"):
            TD.set(ring, at, "status", 4 if how == "abort" else 0)
        return ok

    def _message(self, entry: memoryview) -> Any:
        status = super()._message(entry)
        if self.spoil_type:
            entry[11] = 0x55
        return status


def poke(dev: ShmBus, addr: int, value: int) -> None:
    dev.dma.view_at(addr, 4)[:] = value.to_bytes(4, "little")


def test_spoiled_dl_tds_are_dropped_alone(shm_pair: ShmPair,
                                          caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        bad = {3: "size", 7: "address", 11: "abort", 15: "invalid", 16: "size"}
        model = Corrupting(dev, bad)
        fn = Source()
        model.attach(6, fn)
        async with engine_running(model, host) as eng:
            got: list[bytes] = []
            await eng.open_channel(6, got.append)
            assert fn.send is not None
            for i in range(40):
                assert fn.send(b"m%d" % i)
                await asyncio.sleep(0.002 if i % 5 == 0 else 0)
            want = [b"m%d" % i for i in range(40) if i not in bad]
            await until_async(lambda: len(got) == len(want), 2.0, "the intact transfers")
            await asyncio.sleep(0.02)
            assert got == want
            assert eng.counters == {"dl_td_size": 2, "dl_td_address": 1, "dl_td_abort": 1,
                                    "dl_td_status": 1}
            assert eng.state is EngineState.RUNNING
            logged = [r for r in caplog.records if "dl_td_size" in r.getMessage()]
            assert len(logged) == 1  # one line per kind, not one per event
            await eng.stop()
            assert eng.state is EngineState.STOPPED

    with caplog.at_level(logging.WARNING):
        run(body())


def test_bad_tails_and_msg_tail_are_ignored_and_counted(shm_pair: ShmPair) -> None:
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        model = DeviceModel(dev)
        fn = Source()
        model.attach(6, fn)
        async with engine_running(model, host) as eng:
            got: list[bytes] = []
            ch = await eng.open_channel(6, got.append)
            tails = shared_addr(dev, "tail_array_address")
            msg_tail = shared_addr(dev, "msg_tail_address")
            real_msg_tail = int.from_bytes(dev.dma.view_at(msg_tail, 4), "little")

            poke(dev, tails + 4 * 13, 99)  # DL tail outside the ring
            poke(dev, tails + 4 * 12, 2)  # UL tail past a head of 0
            poke(dev, msg_tail, 4000)
            dev.notify()
            await until_async(lambda: len(eng.counters) == 3, 2.0, "the three rejects counted")
            assert eng.counters == {"tail_range": 1, "tail_beyond_head": 1, "msg_tail_range": 1}
            assert not got and eng.state is EngineState.RUNNING
            # the device puts things right: traffic flows as if nothing happened
            poke(dev, tails + 4 * 13, 0)
            poke(dev, tails + 4 * 12, 0)
            poke(dev, msg_tail, real_msg_tail)
            ch.send(b"up")
            assert fn.send is not None and fn.send(b"down")
            await until_async(lambda: got == [b"down"] and fn.ul == [b"up"], 2.0,
                              "traffic after the repair")
            await ch.close()
            ch6 = await eng.open_channel(6, got.append)  # the message ring still works
            await ch6.close()
            await eng.stop()
            assert eng.state is EngineState.STOPPED

    run(body())


def test_completion_with_another_type_fails_only_that_request(shm_pair: ShmPair) -> None:
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        model = Corrupting(dev, {})
        model.attach(6, Source())
        async with engine_running(model, host) as eng:
            model.spoil_type = True
            with pytest.raises(ChannelError) as exc:
                await eng.open_channel(6, lambda b: None)
            assert exc.value.errno == errno.EIO
            assert eng.counters == {"msg_type": 1} and eng.state is EngineState.RUNNING
            model.spoil_type = False
            ch = await eng.open_channel(6, lambda b: None)  # re-opening the pipe works
            await ch.close()
            await eng.stop()
            assert eng.state is EngineState.STOPPED

    run(body())


def test_model_rejects_bad_host_requests(shm_pair: ShmPair) -> None:
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        model = DeviceModel(dev)
        async with engine_running(model, host) as eng:
            # OPEN_PIPE with a TD ring outside DMA memory, an unknown pipe, a closed pipe
            for fields in ({"td_ring_address": 1 << 40, "td_count": 4, "pipe": 12},
                           {"td_ring_address": 0, "td_count": 4, "pipe": 30},
                           {"td_ring_address": 0, "td_count": 1, "pipe": 12}):
                with pytest.raises(EngineError, match="status 2"):
                    await eng._message(MsgType.OPEN_PIPE, **fields)
            with pytest.raises(EngineError, match="status 2"):
                await eng._message(MsgType.CLOSE_PIPE, pipe=5)
            # an entry of an unknown type, written raw
            area = eng._area
            assert area is not None
            at = AP_SHARED.offset_of("msg_ring", area.msg_head)
            area.mem[at:at + MSG_SIZE] = bytes(11) + b"\x66" + bytes(12)
            area.msg_head += 1
            AP_SHARED.set(area.mem, 0, "msg_head", area.msg_head)
            host.doorbell(Doorbell.HPDA, Hpda.MSG_RING)
            await until_async(lambda: area.mem[at + 20] == 2, 2.0,  # completed with ERROR
                              "the unknown entry completed")
            # a head index outside the ring
            AP_SHARED.set(area.mem, 0, "head_array", 77, 13)
            ch = await eng.open_channel(6, lambda b: None)
            assert model.rejects.counters["open_pipe"] == 3
            assert model.rejects.counters["close_pipe"] == 1
            assert model.rejects.counters["msg_type"] == 1
            assert eng.state is EngineState.RUNNING
            await ch.close()
            await eng.stop()
            assert eng.state is EngineState.STOPPED

    run(body())


def test_dl_backlog_is_bounded(shm_pair: ShmPair) -> None:
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        model = DeviceModel(dev, DeviceConfig(dl_backlog=8))
        fn = Source()
        model.attach(6, fn)
        async with engine_running(model, host) as eng:
            got: list[bytes] = []
            await eng.open_channel(6, got.append)
            assert fn.send is not None
            accepted = [fn.send(b"%d" % i) for i in range(20)]
            assert accepted == [True] * 8 + [False] * 12 and model.dl_refused == 12
            await until_async(lambda: len(got) == 8, 2.0, "the accepted backlog")
            assert got == [b"%d" % i for i in range(8)]
            await eng.stop()
            assert eng.state is EngineState.STOPPED

    run(body())


def test_single_file_layout_with_polling(tmp_path: Path) -> None:
    """The ivshmem arrangement: one file, DMA addresses = offsets in it, no eventfds."""

    async def body() -> None:
        path = tmp_path / "ivshmem"
        path.write_bytes(bytes(4 * 1024 * 1024))
        with closing(ShmBus.open_file(path, HOST)) as host, \
                closing(ShmBus.open_file(path, DEVICE)) as dev:
            assert host.event_fd is None and dev.event_fd is None
            model = DeviceModel(dev)
            model.attach(6, fn := Source())
            async with engine_running(model, host) as eng:
                got: list[bytes] = []
                ch = await eng.open_channel(6, got.append)
                assert ch.dl.slab.addr >= 8192  # past the BAR0 and BAR2 pages of the file
                ch.send(b"over the file")
                assert fn.send is not None and fn.send(b"and back")
                await until_async(lambda: got == [b"and back"] and fn.ul == [b"over the file"],
                                  2.0, "the transfer each way")
                await ch.close()
                # Lite channel 0 + MBIM need what dma_bytes_needed says: more than 4 MiB
                need = dma_bytes_needed((0, 6))
                assert host.dma.size < need
                await eng.open_channel(6, got.append)
                with pytest.raises(ChannelError) as exc:
                    await eng.open_channel(0, got.append)
                assert exc.value.errno == errno.ENOMEM
                await eng.stop()
                assert eng.state is EngineState.STOPPED

        path.write_bytes(bytes(8192 + need))  # ... and that much is enough
        with closing(ShmBus.open_file(path, HOST)) as host, \
                closing(ShmBus.open_file(path, DEVICE)) as dev:
            async with engine_running(DeviceModel(dev), host) as eng:
                chans = [await eng.open_channel(c, got.append) for c in (0, 6)]
                assert host.dma.in_use == need
                for c in chans:
                    await c.close()

    run(body())


def test_handshake_refuses_bad_chip_info(shm_pair: ShmPair) -> None:
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        model = DeviceModel(dev)
        dev.bar(BAR2)[SCRATCHPAD["chip_info"].offset + 1] = 57
        async with model_running(model):
            eng = IpcEngine(host)
            with pytest.raises(EngineError, match="Chip Info"):
                await eng.start()
            assert eng.state is EngineState.DOWN

    run(body())
