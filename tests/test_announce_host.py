"""The forged port events as a real libudev listener sees them (root, a network namespace of
its own): `udevadm monitor --udev` with a subsystem/devtype match, which systemd turns into an
in-kernel filter on the header's MurmurHash2 values (docs/modemmanager.md §2). Our wwan port
passes it whole; the net event is filtered out by its hash alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import until

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(shutil.which("udevadm") is None, reason="no udevadm")]

SEND = """
import sys
from iosm_cuse.system import uevent
from iosm_cuse.system.announce import send_uevent
ports = uevent.Ports("wwan4", "wwan4mbim0", 10, 77, None)
seq = int(sys.argv[1])
send_uevent(uevent.net_event(ports, "add", seq, 1))
send_uevent(uevent.port_event(ports, "add", seq + 1, 1))
"""


def test_udevadm_monitor_takes_the_forged_port_event(netns: str, tmp_path: Path) -> None:
    out = tmp_path / "monitor.out"
    with out.open("w") as sink:
        monitor = subprocess.Popen(
            ["ip", "netns", "exec", netns, "udevadm", "monitor", "--udev", "--property",
             "--subsystem-match=wwan/wwan_port"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        seq = iter(range(1000, 10**6, 2))

        def received() -> bool:
            subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SEND,
                            str(next(seq))], check=True, timeout=30)
            return "ID_MM_PHYSDEV_UID=iosm-cuse-wwan4" in out.read_text()

        until(received, 30, lambda: f"no event in: {out.read_text()}", poll=0.2)
    finally:
        monitor.terminate()
        monitor.wait(10)
    text = out.read_text()
    assert "add      /devices/virtual/cuse/wwan4mbim0 (wwan)" in text
    for line in ("SUBSYSTEM=wwan", "DEVTYPE=wwan_port", "DEVNAME=/dev/wwan4mbim0", "MAJOR=10",
                 "MINOR=77", "ID_MM_PORT_TYPE_MBIM=1", "ID_MM_CANDIDATE=1"):
        assert line in text.splitlines(), text
    assert "SUBSYSTEM=net" not in text and "/devices/virtual/net/" not in text
