"""Tier 4: the kernel's own iosm driver (UML, tests/uml/run.py) drives the modem model.

Runs only inside the UML guest (`python3 -m tests.uml`); on the host these tests are skipped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import mbimcli_scenario
import pytest
from helpers import until

from iosm_cuse.sim.config import ModemConfig

pytestmark = pytest.mark.uml
PORT = "/dev/wwan0mbim0"
DYNDBG = "/sys/kernel/debug/dynamic_debug/control"  # debugfs: mounted by tests/uml/run.py
IOSM_DRIVER = "/sys/bus/pci/drivers/iosm"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def _dmesg() -> str:
    return _run("dmesg").stdout


def test_the_driver_created_its_four_ports() -> None:
    for name in ("wwan0mbim0", "wwan0at0", "wwan0at1"):
        assert Path("/dev", name).exists(), name
    assert Path("/sys/class/net/wwan0").exists()


def test_the_probe_went_through_the_stand_in_root_port() -> None:
    log = _dmesg()
    assert "stand-in PCIe root port" in log
    assert "ASPM L1 not supported" in log or "iosm" in log


def test_mbimcli_scenario_against_the_kernel_port() -> None:
    mbimcli_scenario.run(ModemConfig(), lambda *args: _run("mbimcli", "-d", PORT, *args))


def _connect(session: int, link: str) -> str:
    """CONNECT session `session` by MBIM - with no ATTACH first: the modem attaches by itself
    once registered, as a real one does - address `link` as the configuration says and bring it
    up; the echo gateway's address for the session."""
    ip = ModemConfig().session_ip(session)
    res = _run("mbimcli", "-d", PORT, f"--connect=session-id={session},apn=internet")
    assert res.returncode == 0 and "'activated'" in res.stdout, res.stdout + res.stderr
    for cmd in (("ip", "addr", "add", str(ip.ipv4), "dev", link), ("ip", "link", "set", link,
                                                                    "up")):
        res = _run(*cmd)
        assert res.returncode == 0, (cmd, res.stderr)
    return str(ip.ipv4_gateway)


def _disconnect(session: int, link: str) -> None:
    _run("ip", "link", "set", link, "down")
    _run("ip", "addr", "flush", "dev", link)
    _run("mbimcli", "-d", PORT, f"--disconnect={session}")


def _ping(gateway: str, *args: str, count: int = 50) -> None:
    ping = _run("ping", "-c", str(count), "-i", "0.02", "-W", "2", *args, gateway)
    assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr


def test_ping_over_wwan0_through_the_echo_gateway() -> None:
    """IP over the kernel's wwan0 (session 0), connected without an explicit attach: 50 pings
    of 1400 bytes, then 10 of 3000 bytes - larger than the MTU, so they go up in IPv4 fragments
    that the echo gateway reassembles, and come back in fragments the kernel reassembles."""
    gateway = _connect(0, "wwan0")
    try:
        _ping(gateway, "-s", "1400")
        _ping(gateway, "-s", "3000", count=10)
    finally:
        _disconnect(0, "wwan0")


def test_ipv6_ping_in_fragments_over_wwan0() -> None:
    """IPv6 over wwan0: the session's IPv6 address (no DAD), 10 pings of 3000 bytes to the echo
    gateway's IPv6 address - up in fragments with Fragment headers, down the same way."""
    ip = ModemConfig().session_ip(0)
    _connect(0, "wwan0")
    try:
        res = _run("ip", "-6", "addr", "add", str(ip.ipv6), "dev", "wwan0", "nodad")
        assert res.returncode == 0, res.stderr
        _ping(str(ip.ipv6_gateway), "-6", "-s", "3000", count=10)
    finally:
        _disconnect(0, "wwan0")


def test_a_second_session_on_the_kernels_own_wwan_link() -> None:
    """`ip link add wwan0-1 parentdev wwan0 type wwan linkid 1` (the kernel's wwan
    rtnetlink ops, not our CLI; `link wwan0` is refused with EINVAL: the parent is the wwan
    device, not a net device), MBIM session 1 connected, IP over it while session 0 is up."""
    res = _run("ip", "link", "add", "wwan0-1", "parentdev", "wwan0", "type", "wwan",
               "linkid", "1")
    assert res.returncode == 0, res.stderr
    try:
        gw0 = _connect(0, "wwan0")
        gw1 = _connect(1, "wwan0-1")
        _ping(gw1, "-s", "1000", count=20)
        _ping(gw0, count=10)
        rx = int(Path("/sys/class/net/wwan0-1/statistics/rx_packets").read_text())
        assert rx >= 20, rx
    finally:
        _disconnect(1, "wwan0-1")
        _disconnect(0, "wwan0")
        _run("ip", "link", "del", "wwan0-1")


def test_differential_scenario() -> None:
    """The scenario of the protocol differential (tests/test_differential.py selects this one
    test and records what the model sees); in the full tier it is one more IP check."""
    mbimcli_scenario.run_differential(
        ModemConfig(), lambda *args: _run("mbimcli", "-d", PORT, *args), _run)


@pytest.mark.parametrize("port", ["wwan0at0", "wwan0at1"])
def test_the_kernels_at_ports_answer_from_the_model(port: str) -> None:
    """The model's AT interpreter (docs/at-ports.md §4) behind the kernel's own AT ports: ATI,
    echoed, answered and ended by OK; the same bytes our CUSE ports give."""
    fd = os.open(f"/dev/{port}", os.O_RDWR | os.O_NONBLOCK)
    got = b""
    try:
        os.write(fd, b"ATI\r")

        def answered() -> bool:
            nonlocal got
            with contextlib.suppress(BlockingIOError):
                got += os.read(fd, 4096)
            return got.endswith(b"OK\r\n")

        until(answered, 10, lambda: f"{port}: ATI answered, got {got!r}")
    finally:
        os.close(fd)
    assert got == (b"ATI\r\r\nIntel\r\n\r\nXMM7560 (simulated)\r\n\r\n"
                   b"Revision: iosm-sim 0.1.0\r\n\r\nOK\r\n")


@pytest.mark.parametrize("port", ["wwan0at0", "wwan0at1"])
def test_writes_to_the_at_ports_complete(port: str) -> None:
    """A burst of lines: their UL TDs must all complete whatever the answers, or closing the
    port waits 500 ms and gives up on them ("Pend data Timeout", a debug message: switched on
    here)."""
    Path(DYNDBG).write_text("file iosm_ipc_imem_ops.c +p")
    fd = os.open(f"/dev/{port}", os.O_RDWR | os.O_NONBLOCK)
    try:
        for i in range(40):  # ten times the AT channel's 4 UL TDs
            line = b"AT+CGMI;%d\r" % i

            def wrote(line: bytes = line) -> bool:
                try:
                    return os.write(fd, line) == len(line)
                except BlockingIOError:  # the ring is full: wait for completions
                    return False

            until(wrote, 5, f"{port}: write {i} accepted")
    finally:
        os.close(fd)  # waits (up to 500 ms) for pending UL, and complains if any is left
    assert "Pend data Timeout" not in _dmesg()


def _pci_device() -> str:
    (dev,) = [p.name for p in Path(IOSM_DRIVER).iterdir() if p.name.count(":") == 2]
    return dev


def test_unbind_and_rebind_brings_the_driver_back_to_running() -> None:
    """Unbind the PCI function from iosm (the driver sends IPC UNINIT and frees its rings), bind
    it again: a new handshake to RUNNING, the ports back, MBIM answering and IP flowing."""
    dev = _pci_device()
    Path(IOSM_DRIVER, "unbind").write_text(dev)
    until(lambda: not Path(PORT).exists() and not Path("/sys/class/net/wwan0").exists(), 10,
          "ports gone after unbind")
    Path(IOSM_DRIVER, "bind").write_text(dev)
    until(lambda: Path(PORT).exists() and Path("/dev/wwan0at0").exists(), 20,
          "ports back after bind")
    res = _run("mbimcli", "-d", PORT, "--query-device-caps")
    assert res.returncode == 0 and ModemConfig().device_id in res.stdout, res.stdout + res.stderr
    gateway = _connect(0, "wwan0")
    try:
        _ping(gateway, count=10)
    finally:
        _disconnect(0, "wwan0")


def test_no_warn_bug_or_oops_in_the_kernel_log() -> None:
    """Last in the file: whatever the tests above made the driver do left no trace."""
    bad = [ln for ln in _dmesg().splitlines()
           if any(m in ln for m in ("WARNING:", "BUG:", "Oops", "virt-pci delay"))]
    assert not bad, bad
