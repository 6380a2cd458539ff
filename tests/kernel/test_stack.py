"""The whole stack in the Debian-kernel guest: `iosm-cuse up` with a real CUSE /dev/wwan0mbim0,
driven by mbimcli and mbim-network exactly as on a machine with the modem.

One daemon start for the whole module: Python is about 11x slower under TCG.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import guest_up
import mbimcli_scenario
import pytest
from guest_up import IOSM_CUSE, STEP_TIMEOUT

from iosm_cuse.sim.config import ModemConfig

pytestmark = pytest.mark.kernel

PORT = "/dev/wwan0mbim0"


def _run(*argv: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack() -> Iterator[subprocess.Popen[str]]:
    subprocess.run(["modprobe", "-q", "cuse"], check=False)
    subprocess.run(["modprobe", "-q", "tun"], check=False)
    assert os.path.exists("/dev/cuse"), "no /dev/cuse after modprobe cuse"
    proc = guest_up.start("--device", "sim", "--transport", "cuse",
                          ready=f"MBIM port {PORT} (cuse)")
    try:
        yield proc
    finally:
        guest_up.stop(proc)


def test_device_caps_through_cuse(stack: subprocess.Popen[str]) -> None:
    assert Path(PORT).is_char_device()
    res = _run("mbimcli", "-d", PORT, "--query-device-caps")
    assert res.returncode == 0, res.stderr
    assert "Max sessions: '8'" in res.stdout
    st = _run(IOSM_CUSE, "status", "--json")
    assert st.returncode == 0, st.stderr
    port = json.loads(st.stdout)["port"]
    assert (port["path"], port["transport"], port["openers"]) == (PORT, "cuse", 0)
    # The opener's pid, from the CUSE OPEN request, in status.
    fd = os.open(PORT, os.O_RDWR)
    try:
        st = _run(IOSM_CUSE, "status", "--json")
        port = json.loads(st.stdout)["port"]
        assert port["openers"] == 1 and port["opener_pids"] == [os.getpid()], port
        text = _run(IOSM_CUSE, "status").stdout
        assert f"open by 1 (pid {os.getpid()})" in text, text
    finally:
        os.close(fd)


def test_connect_and_mbim_network(stack: subprocess.Popen[str], tmp_path: Path) -> None:
    # The whole mbimcli sequence, checked against the configuration the daemon runs
    # with (the default one here), then mbim-network on the same port.
    mbimcli_scenario.run(ModemConfig(), lambda *args: _run("mbimcli", "-d", PORT, *args))

    profile = tmp_path / "mbim-network.conf"
    profile.write_text("APN=internet\n")
    # mbim-network keeps its transaction id in /tmp/mbim-network-state-wwan0mbim0.
    start = _run("mbim-network", f"--profile={profile}", PORT, "start")
    assert start.returncode == 0, start.stdout + start.stderr
    assert "Network started successfully" in start.stdout
    status = _run("mbim-network", f"--profile={profile}", PORT, "status")
    assert re.search(r"Status: activated", status.stdout), status.stdout
    stop = _run("mbim-network", f"--profile={profile}", PORT, "stop")
    assert stop.returncode == 0 and "Network stopped successfully" in stop.stdout, stop.stdout


def test_sigterm_removes_the_device(stack: subprocess.Popen[str]) -> None:
    stack.send_signal(signal.SIGTERM)
    assert stack.wait(STEP_TIMEOUT) == 0, stack.stderr.read() if stack.stderr else ""
    deadline = time.monotonic() + 10
    while os.path.exists(PORT) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(PORT)
    assert not Path("/sys/class/net/wwan0").exists()


def test_a_dead_cuse_connection_stops_the_daemon_with_status_1() -> None:
    """Aborting the CUSE connection (the device's sysfs `abort`, fs/fuse/cuse.c) leaves no port:
    the daemon says so and exits 1 for systemd to restart it, instead of running on."""
    proc = guest_up.start("--device", "sim", "--transport", "cuse",
                          ready=f"MBIM port {PORT} (cuse)")
    try:
        Path("/sys/class/cuse", Path(PORT).name, "abort").write_text("1")
        assert proc.wait(STEP_TIMEOUT) == 1
        err = proc.stderr.read() if proc.stderr else ""
        assert f"MBIM port {PORT} lost" in err and "Traceback" not in err, err
        assert not os.path.exists(PORT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
