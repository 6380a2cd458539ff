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


def test_ping_over_wwan0_through_the_echo_gateway() -> None:
    """IP over the kernel's wwan0 (session 0): connect by MBIM, address the link as the
    configuration says, ping the gateway the model's echo gateway answers for."""
    ip = ModemConfig().session_ip(0)
    for args in (("--attach-packet-service",), ("--connect=apn=internet",)):
        res = _run("mbimcli", "-d", PORT, *args)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    try:
        for cmd in (("ip", "addr", "add", str(ip.ipv4), "dev", "wwan0"),
                    ("ip", "link", "set", "wwan0", "up")):
            res = _run(*cmd)
            assert res.returncode == 0, (cmd, res.stderr)
        ping = _run("ping", "-c", "50", "-i", "0.02", "-W", "2", "-s", "1400",
                    str(ip.ipv4_gateway))
        assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
    finally:
        _run("ip", "link", "set", "wwan0", "down")
        _run("ip", "addr", "flush", "dev", "wwan0")
        _run("mbimcli", "-d", PORT, "--disconnect")


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


def test_no_warn_bug_or_oops_in_the_kernel_log() -> None:
    """Last in the file: whatever the tests above made the driver do left no trace."""
    bad = [ln for ln in _dmesg().splitlines()
           if any(m in ln for m in ("WARNING:", "BUG:", "Oops", "virt-pci delay"))]
    assert not bad, bad
