"""`iosm-cuse modem --shm FILE`: the model alone on a shared file, as the ivshmem backing file of
a VM; here a host engine in this process meets it through the same file (both sides poll).

Also the daemon's functions factory: what it attaches must answer on channel 6 (MBIM) and
channel 0 (MUX sessions), which only the model process can show.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from helpers import until_async

from iosm_cuse.bus.shm import HOST, ShmBus
from iosm_cuse.devices import MODEL_START_TIMEOUT, spawn_model
from iosm_cuse.hw.engine import IpcEngine
from iosm_cuse.hw.mux.host import MuxHost
from iosm_cuse.mbim.message import Open, OpenDone, decode_message, encode_message
from iosm_cuse.options import UpOptions
from iosm_cuse.sim.assembly import MODEL, MODEL_CREDIT_WINDOW
from iosm_cuse.sim.device import DeviceConfig
from iosm_cuse.sim.process import ModelError, ModelProcess
from iosm_cuse.wire.ipc import CAP_UL_FLOW_CREDIT

IOSM_CUSE = str(Path(sys.executable).parent / "iosm-cuse")


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    shm = tmp_path / "ivshmem.shm"
    proc = subprocess.Popen([IOSM_CUSE, "modem", "--shm", str(shm), "--size", str(1 << 22)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(30), "no line from iosm-cuse modem"
        line = proc.stdout.readline()
        assert f"serving {shm} (4194304 bytes, MUX lite)" in line, line
        assert "-device ivshmem-plain" in line
        yield proc, shm
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_engine_meets_the_standalone_model_on_the_file(
        modem: tuple[subprocess.Popen[str], Path]) -> None:
    proc, shm = modem
    assert shm.stat().st_size == 1 << 22

    async def main() -> None:
        bus = ShmBus.open_file(shm, HOST)
        engine = IpcEngine(bus, init_tries=1500)  # the model's Python may still be importing
        try:
            await asyncio.wait_for(engine.start(), 40)
            # Channel 6: the MBIM function answers OPEN.
            got: asyncio.Queue[bytes] = asyncio.Queue()
            ch = await engine.open_channel(6, got.put_nowait)
            ch.send(encode_message(Open(tid=1, max_control_transfer=4096)))
            done = decode_message(await asyncio.wait_for(got.get(), 10))
            assert done == OpenDone(tid=1, status=0)
            await ch.close()
            # Channel 0: the model's MUX opens and closes a session.
            mux = MuxHost(engine)
            await asyncio.wait_for(mux.open_session(3), 10)
            assert mux.sessions == [3]
            await asyncio.wait_for(mux.close_session(3), 10)
        finally:
            await engine.stop()
            bus.close()

    asyncio.run(main())
    assert proc.poll() is None, "the model must outlive a host that stopped"


def test_modem_refuses_an_unusable_file(tmp_path: Path) -> None:
    res = subprocess.run([IOSM_CUSE, "modem", "--shm", str(tmp_path / "no" / "dir.shm")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "No such file or directory" in res.stderr and "Traceback" not in res.stderr


# ---- the model process: start timeout, own session ----------------------------------------------


def slow_functions(model: object, options: dict[str, float]) -> None:
    """A factory that takes its time, as importing the model does in the TCG guest."""
    time.sleep(options["sleep"])


def test_model_start_timeout_is_a_parameter() -> None:
    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(ModelError, match=r"'ping' in 0\.5 s"):
            await ModelProcess.spawn(functions=f"{__name__}:slow_functions",
                                     options={"sleep": 4.0}, start_timeout=0.5)
        assert time.monotonic() - t0 < 3.5  # gave up at its own timeout, not the default
        mp = await ModelProcess.spawn(functions=f"{__name__}:slow_functions",
                                      options={"sleep": 0.2}, start_timeout=30)
        try:
            assert mp.start_timeout == 30 and (await mp.command("ping"))["ok"]
        finally:
            await mp.close()

    asyncio.run(main())


def test_model_runs_in_its_own_session_so_ctrl_c_reaches_only_the_daemon() -> None:
    async def main() -> None:
        mp = await ModelProcess.spawn()
        try:
            assert mp.pid is not None
            assert os.getsid(mp.pid) == mp.pid != os.getsid(0)
            assert os.getpgid(mp.pid) != os.getpgid(0)
        finally:
            await mp.close()
        assert not mp.alive

    asyncio.run(main())


def test_daemon_spawns_the_plain_model_process_with_a_long_start_timeout() -> None:
    async def main() -> None:
        dev = await spawn_model(UpOptions(device="sim"))
        try:
            assert type(dev) is ModelProcess
            assert dev.start_timeout == MODEL_START_TIMEOUT >= 60
        finally:
            await dev.close()

    asyncio.run(main())


def test_daemon_model_grants_ul_credit_when_its_capabilities_say_so() -> None:
    """Capability bit 21 makes the host send on credits only: the daemon's model must then
    grant them, or no UL packet would ever leave."""

    async def main() -> None:
        mp = await ModelProcess.spawn(
            functions=MODEL,
            config=asdict(DeviceConfig(capabilities=CAP_UL_FLOW_CREDIT)))
        engine = IpcEngine(mp.bus)
        try:
            await engine.start()
            mux = MuxHost(engine)
            assert mux.ul_credit
            await asyncio.wait_for(mux.open_session(0), 10)
            await until_async(lambda: mux.status()["sessions"][0]["credits"] > 0, 5,
                              "no UL credit granted", poll=0.05)
            assert mux.status()["sessions"][0]["credits"] == MODEL_CREDIT_WINDOW
        finally:
            await engine.stop()
            await mp.close()

    asyncio.run(main())
