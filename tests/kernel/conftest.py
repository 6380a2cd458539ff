"""Fixtures of the kernel-tier guest tests shared by more than one module."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import until
from mm_guest import UDEV, Services, bus_ready, mm_on_bus, sbin


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """dbus-daemon --system, polkitd, systemd-udevd with our rules, ModemManager."""
    for module in ("cuse", "tun"):
        subprocess.run(["modprobe", "-q", module], check=False)
    svc = Services(tmp_path_factory.mktemp("services"), {})
    mounted: list[str] = []
    rules = Path("/run/udev/rules.d")
    # The plain guest has no udevd, and later tests (iosm-cuse watch) rely on that: whatever
    # udevd leaves in /run/udev (its control socket above all) goes when it stops.
    udev_run_existed = Path("/run/udev").exists()
    try:
        os.makedirs("/run/dbus", exist_ok=True)
        Path("/run/dbus/system_bus_socket").unlink(missing_ok=True)
        svc.start("dbus", "dbus-daemon", "--system", "--nofork", "--nopidfile")
        until(bus_ready, 60, lambda: f"system bus: {svc.log('dbus')}", poll=0.5)
        polkitd = Path("/usr/lib/polkit-1/polkitd")
        if polkitd.exists():
            svc.start("polkitd", str(polkitd), "--no-debug")
        rules.mkdir(parents=True, exist_ok=True)
        shutil.copy(UDEV / "70-iosm-cuse.rules", rules / "70-iosm-cuse.rules")
        svc.start("udevd", sbin("systemd-udevd") if shutil.which("systemd-udevd")
                  else "/lib/systemd/systemd-udevd")
        until(lambda: Path("/run/udev/control").exists(), 60,
              lambda: f"udevd: {svc.log('udevd')}", poll=0.2)
        svc.start("ModemManager", sbin("ModemManager"))
        until(mm_on_bus, 120, lambda: f"ModemManager: {svc.log('ModemManager')}", poll=0.5)
        yield svc
    finally:
        for name in reversed(list(svc.procs)):
            svc.stop(name)
        (rules / "70-iosm-cuse.rules").unlink(missing_ok=True)
        if udev_run_existed:
            Path("/run/udev/control").unlink(missing_ok=True)
        else:
            shutil.rmtree("/run/udev", ignore_errors=True)
        for path in reversed(mounted):
            subprocess.run(["umount", path], check=False)
