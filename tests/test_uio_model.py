"""The host engine over a UioBus and the modem model (`iosm-cuse modem --shm`, its own process)
over the same file: what happens in the test VM with ivshmem, without the VM. The fake sysfs
device's resource2 IS the shared file, as BAR2 is the backing file under QEMU; both sides poll.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import stop_process
from uio_fakesys import FakeSysfs

from iosm_cuse.bus.uio import open_uio_bus

IVSHMEM = "0000:00:03.0"
SIZE = 4 << 20
MBIM_OPEN, MBIM_OPEN_DONE = 0x1, 0x80000001


@pytest.fixture
def shared(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_pci(IVSHMEM, 0x1AF4, 0x1110, {0: 0x100, 2: SIZE})
    fs.bind(IVSHMEM, "uio_pci_generic", "uio0")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "uio0").write_bytes(b"")  # irq 0 in sysfs: the bus polls, as in the VM
    return fs


def test_engine_boots_and_opens_a_channel_against_the_bare_model(shared: FakeSysfs) -> None:
    """The model's own entry point with no channel functions: the boot handshake and the pipe
    opening of channel 6 over the polled UIO bus."""
    resource2 = shared.dev_dir(IVSHMEM) / "resource2"
    model = subprocess.Popen([sys.executable, "-m", "iosm_cuse.sim", "--shm", str(resource2)],
                             stderr=subprocess.PIPE, text=True)

    async def main() -> tuple[str, str]:
        from iosm_cuse.hw.engine import IpcEngine

        bus = open_uio_bus(f"uio:{IVSHMEM}", sysfs=shared.root, dev=shared.root.parent / "dev")
        engine = IpcEngine(bus)
        try:
            assert bus.event_fd is None  # irq 0: polled, like ivshmem-plain
            await asyncio.wait_for(engine.start(), 30)
            ch = await engine.open_channel(6, lambda data: None)
            await ch.close()
            state = engine.state.name
            await engine.stop()
            return state, engine.state.name
        finally:
            await engine.stop()  # idempotent: after a failure too, before the bus goes
            bus.close()

    try:
        assert asyncio.run(main()) == ("RUNNING", "STOPPED")
    finally:
        stop_process(model, 10)


def test_engine_boots_and_mbim_open_round_trips_through_the_file(shared: FakeSysfs) -> None:
    resource2 = shared.dev_dir(IVSHMEM) / "resource2"
    model = subprocess.Popen([str(Path(sys.executable).parent / "iosm-cuse"), "modem", "--shm",
                              str(resource2)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert model.stdout is not None
        assert "serving" in model.stdout.readline()

        async def main() -> bytes:
            from iosm_cuse.hw.engine import EngineError, IpcEngine

            bus = open_uio_bus(f"uio:{IVSHMEM}", sysfs=shared.root,
                               dev=shared.root.parent / "dev")
            engine = IpcEngine(bus)
            try:
                try:
                    await asyncio.wait_for(engine.start(), 30)
                except EngineError as exc:
                    dead = "" if model.poll() is None else \
                        f"; the model exited: {model.stderr.read() if model.stderr else ''}"
                    pytest.fail(f"engine over the UIO bus did not start: {exc}{dead}")
                got: asyncio.Queue[bytes] = asyncio.Queue()
                ch = await engine.open_channel(6, got.put_nowait)
                ch.send(struct.pack("<IIII", MBIM_OPEN, 16, 1, 4096))
                reply = await asyncio.wait_for(got.get(), 10)
                await ch.close()
                return reply
            finally:
                await engine.stop()
                bus.close()

        reply = asyncio.run(main())
        msg_type, length, tid, status = struct.unpack_from("<IIII", reply)
        assert (msg_type, length, tid, status) == (MBIM_OPEN_DONE, 16, 1, 0)
    finally:
        stop_process(model, 10)
