"""The whole stack over UIO: the modem model on the VM's HOST serving the ivshmem backing file
(`iosm-cuse modem --shm`), `iosm-cuse up --device uio:<bdf>` in the guest, and mbimcli on the
real CUSE node. Host and guest meet only in the ivshmem memory, as a driver and its device do.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import guest_up
import pytest
from guest_up import IOSM_CUSE

pytestmark = pytest.mark.kernel

PORT_NAME = "wwan1mbim0"  # test_stack.py owns wwan0mbim0
STEP = 120  # seconds; everything is slow under TCG


def test_engine_over_ivshmem_against_the_model_on_the_host(
        ivshmem: Any, host_process: Callable[[list[str]], str]) -> None:
    """The IPC boot handshake and a channel opening across the VM boundary: the engine in the
    guest on the UIO bus (polled: no interrupt), the bare model on the host on the file."""
    from iosm_cuse.bus.uio import open_uio_bus
    from iosm_cuse.hw.engine import IpcEngine

    host_process([sys.executable, "-m", "iosm_cuse.sim", "--shm", ivshmem.host_path])

    async def main() -> tuple[str, str]:
        bus = open_uio_bus(f"uio:{ivshmem.bdf}")
        engine = IpcEngine(bus, init_tries=3000)  # the host's Python may still be starting
        try:
            assert bus.event_fd is None
            await asyncio.wait_for(engine.start(), STEP)
            ch = await engine.open_channel(6, lambda data: None)
            await ch.close()
            state = engine.state.name
            await engine.stop()
            return state, engine.state.name
        finally:
            bus.close()

    try:
        assert asyncio.run(main()) == ("RUNNING", "STOPPED")
    finally:
        guest_up.restore_runner_token(ivshmem)


def test_up_over_uio_with_the_model_on_the_host(ivshmem: Any,
                                               host_process: Callable[[list[str]], str]) -> None:
    host_process([IOSM_CUSE, "modem", "--shm", ivshmem.host_path])
    up = guest_up.start("--device", f"uio:{ivshmem.bdf}", "--transport", "cuse",
                        "--port-name", PORT_NAME,
                        ready=(f"MBIM port /dev/{PORT_NAME} (cuse)", "ivshmem test device"))
    try:
        res = subprocess.run(["mbimcli", "-d", f"/dev/{PORT_NAME}", "--query-device-caps"],
                             capture_output=True, text=True, timeout=STEP, check=False)
        assert res.returncode == 0, res.stderr
        assert "Max sessions: '8'" in res.stdout
        # a connect: MBIM on channel 6 across the VM boundary, and the model's session state
        for args, expect in (("--attach-packet-service", "'attached'"),
                             ("--connect=apn=internet", "Activation state: 'activated'")):
            res = subprocess.run(["mbimcli", "-d", f"/dev/{PORT_NAME}", args],
                                 capture_output=True, text=True, timeout=STEP, check=False)
            assert res.returncode == 0 and expect in res.stdout, (args, res.stdout, res.stderr)
        up.send_signal(signal.SIGTERM)
        assert up.wait(STEP) == 0, up.stderr.read()
        assert not Path(f"/dev/{PORT_NAME}").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        guest_up.restore_runner_token(ivshmem)


def test_watch_starts_the_stack_on_bind(ivshmem: Any, host_process: Callable[[list[str]], str],
                                        tmp_path: Path) -> None:
    """`iosm-cuse watch` running before the device is bound starts `up` when the bind uevent
    arrives (MBIM port appears) and stops it on unbind (the port goes away)."""
    from iosm_cuse.bus.pci import read_device

    port = Path("/dev/wwan2mbim0")
    bdf = ivshmem.bdf
    sysdev = Path("/sys/bus/pci/devices") / bdf
    (sysdev / "driver" / "unbind").write_text(bdf)
    host_process([IOSM_CUSE, "modem", "--shm", ivshmem.host_path])
    errlog = tmp_path / "watch.err"
    cmd = f"{IOSM_CUSE} up --device uio:{{bdf}} --transport cuse --port-name {port.name}"
    with open(errlog, "w") as err:
        watch = subprocess.Popen([IOSM_CUSE, "watch", "--test-device", "1af4:1110",
                                  "--exec", cmd], stderr=err)
    try:
        _wait(lambda: "watching for" in errlog.read_text(), "watch to start")
        assert not port.exists()
        (sysdev / "driver_override").write_text("uio_pci_generic")
        Path("/sys/bus/pci/drivers_probe").write_text(bdf)
        _wait(port.exists, f"{port} after the bind", errlog)
        res = subprocess.run(["mbimcli", "-d", str(port), "--query-device-caps"],
                             capture_output=True, text=True, timeout=STEP, check=False)
        assert res.returncode == 0, res.stderr
        (sysdev / "driver" / "unbind").write_text(bdf)
        _wait(lambda: not port.exists(), f"{port} to go after the unbind", errlog)
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(STEP) == 0, errlog.read_text()
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        if read_device(bdf).driver is None:  # hand the device back bound, as conftest wants it
            (sysdev / "driver_override").write_text("uio_pci_generic")
            Path("/sys/bus/pci/drivers_probe").write_text(bdf)
        guest_up.restore_runner_token(ivshmem)


def _wait(cond: Callable[[], bool], what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + STEP
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\n{log.read_text()}" if log else ""))
        time.sleep(0.1)
