"""UIO with QEMU's ivshmem-plain device in the Debian-kernel guest: binding, the BAR2 bus shared
with the host, the udev rules under `udevadm test`, and `watch` reacting to a real bind.

Needs from the runner (tests/vm): an `ivshmem-plain` device (1af4:1110) backed by a host file,
described in $IOSM_VM_IVSHMEM_INFO (tokens at file offsets; the runner checks the guest's token
in the host file after the run). Kept lean: Python is ~11x slower here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iosm_cuse.bus.pci import IVSHMEM_PCI_ID, PciDevice, find_iosm_devices, read_device
from iosm_cuse.bus.uio import open_uio_bus

pytestmark = pytest.mark.kernel

UDEV = Path(__file__).resolve().parents[2] / "udev"
IOSM_CUSE = str(Path(sys.executable).parent / "iosm-cuse")
PCI = Path("/sys/bus/pci")
TIMEOUT = 120


def _ivshmem() -> PciDevice:
    devs = find_iosm_devices(extra_ids=frozenset({IVSHMEM_PCI_ID}))
    devs = [d for d in devs if d.pci_id == IVSHMEM_PCI_ID]
    if not devs:
        pytest.fail("no ivshmem device (1af4:1110) in the guest: the runner must add "
                    "-device ivshmem-plain,memdev=...")
    return devs[0]


def _unbind(bdf: str) -> None:
    dev = read_device(bdf)
    if dev.driver is not None:
        (PCI / "devices" / bdf / "driver" / "unbind").write_text(bdf)
    (PCI / "devices" / bdf / "driver_override").write_text("\n")  # clears it


def _bind_uio(bdf: str) -> None:
    """What the rules do: driver_override, then ask the PCI core to probe."""
    (PCI / "devices" / bdf / "driver_override").write_text("uio_pci_generic")
    (PCI / "drivers_probe").write_text(bdf)


def _wait(cond: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ivshmem_dev() -> Iterator[PciDevice]:
    """The ivshmem device, handed back bound to uio_pci_generic (as tests/conftest.py's session
    fixture `ivshmem` expects it) whatever these tests did to it."""
    subprocess.run(["modprobe", "uio_pci_generic"], check=True, timeout=TIMEOUT)
    dev = _ivshmem()
    yield dev
    if read_device(dev.bdf).driver != "uio_pci_generic":
        _unbind(dev.bdf)
        _bind_uio(dev.bdf)
    _wait(lambda: read_device(dev.bdf).uio, "the ivshmem device to be bound again", 30)


def _runner_info() -> dict[str, Any]:
    path = os.environ.get("IOSM_VM_IVSHMEM_INFO")
    if not path or not Path(path).is_file():
        pytest.fail(f"the runner gave no ivshmem description (IOSM_VM_IVSHMEM_INFO={path!r})")
    info: dict[str, Any] = json.loads(Path(path).read_text())
    return info


def test_bar2_bus_is_shared_with_the_host_file(ivshmem_dev: PciDevice,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The runner pre-wrote a token into the host file and checks, after the run, the token this
    test writes back (tests/vm/run.py); in between, the bus must map the file by its offsets."""
    info = _runner_info()
    _unbind(ivshmem_dev.bdf)
    _bind_uio(ivshmem_dev.bdf)
    caplog.set_level("INFO", logger="iosm_cuse.bus.uio")
    bus = open_uio_bus(f"uio:{ivshmem_dev.bdf}")
    try:
        assert bus.device.pci.driver == "uio_pci_generic"
        # ivshmem-plain has no INTx pin: the UIO core answers EIO, the bus polls, says so once
        assert bus.event_fd is None and bus.ack_event() == 0
        assert sum("polling every" in r.message for r in caplog.records) == 1
        assert bus.shared is not None and len(bus.shared) == info["size"]
        # host -> guest: the token the host wrote at its file offset
        off = info["host_token_offset"]
        assert bytes(bus.shared[off:off + 16]).hex() == info["host_token"]
        # DMA address = offset in the region, through the real mapping
        nonce = os.urandom(16)
        region = bus.dma.alloc(len(nonce))
        region.view[:] = nonce
        assert bytes(bus.shared[region.addr:region.addr + 16]) == nonce
        bus.dma.free(region)
        # guest -> host: the runner compares the file with this after the guest is gone
        off = info["guest_token_offset"]
        bus.shared[off:off + 16] = bytes.fromhex(info["guest_token"])
        Path(info["guest_wrote_marker"]).touch()
    finally:
        bus.close()


def _udevadm_test(syspath: str) -> str:
    res = subprocess.run(["udevadm", "test", "--action=add", syspath], capture_output=True,
                         text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout + res.stderr


def test_udev_rules_bind_and_pull_in_the_unit(ivshmem_dev: PciDevice) -> None:
    """udevadm test works without udevd; it writes ATTR{} but never runs RUN, so the test runs
    the rule's RUN line itself, exactly as printed."""
    rules = Path("/run/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)
    for name in ("69-iosm-cuse-test.rules", "70-iosm-cuse.rules"):
        (rules / name).write_text((UDEV / name).read_text())
    try:
        _unbind(ivshmem_dev.bdf)
        out = _udevadm_test(f"/sys/bus/pci/devices/{ivshmem_dev.bdf}")
        assert "IOSM_CUSE=test" in out
        assert (PCI / "devices" / ivshmem_dev.bdf / "driver_override").read_text().strip() == \
            "uio_pci_generic"
        runs = re.findall(r"^run: '(.*)'$", out, re.M)
        ours = [r for r in runs if "drivers_probe" in r]
        assert len(ours) == 1, runs
        subprocess.run(shlex.split(ours[0]), check=True, timeout=TIMEOUT)
        dev = read_device(ivshmem_dev.bdf)
        assert dev.driver == "uio_pci_generic" and dev.uio, dev
        out = _udevadm_test(f"/sys/bus/pci/devices/{ivshmem_dev.bdf}/uio/{dev.uio[0]}")
        assert f"SYSTEMD_WANTS=iosm-cuse@{dev.uio[0]}.service" in out
        assert re.search(r"^TAGS=.*:systemd:", out, re.M)
    finally:
        for name in ("69-iosm-cuse-test.rules", "70-iosm-cuse.rules"):
            (rules / name).unlink(missing_ok=True)


CHILD = ("import signal, sys, time; log = open(sys.argv[1], 'a', buffering=1); "
         "signal.signal(signal.SIGTERM, lambda *a: (log.write('term\\n'), sys.exit(0))); "
         "log.write('start ' + sys.argv[2] + '\\n'); "
         "time.sleep(600)")


def test_watch_follows_bind_and_unbind(ivshmem_dev: PciDevice, tmp_path: Path) -> None:
    _unbind(ivshmem_dev.bdf)
    log = tmp_path / "children"
    cmd = shlex.join([sys.executable, "-c", CHILD, str(log), "{bdf}"])
    errlog = tmp_path / "watch.err"
    with open(errlog, "w") as err:
        proc = subprocess.Popen([IOSM_CUSE, "watch", "--test-device", "1af4:1110",
                                 "--exec", cmd], stderr=err)
    try:
        _wait(lambda: "watching for" in errlog.read_text(), "watch to start")
        assert "listening to kernel uevents" in errlog.read_text()  # no udevd in the guest
        assert not log.exists()  # unbound at start: nothing to run
        _bind_uio(ivshmem_dev.bdf)
        _wait(lambda: log.exists() and f"start {ivshmem_dev.bdf}" in log.read_text(),
              "the child after the bind uevent")
        _unbind(ivshmem_dev.bdf)
        _wait(lambda: "term" in log.read_text(), "the child's SIGTERM after unbind")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, errlog.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
