"""Tier 4: the kernel's own iosm driver (UML, tests/uml/run.py) drives the modem model.

Runs only inside the UML guest (`python3 -m tests.uml`); on the host these tests are skipped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mbimcli_scenario
import pytest

from iosm_cuse.sim.config import ModemConfig

pytestmark = pytest.mark.uml
PORT = "/dev/wwan0mbim0"


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


def test_no_warn_bug_or_oops_in_the_kernel_log() -> None:
    bad = [ln for ln in _dmesg().splitlines()
           if any(m in ln for m in ("WARNING:", "BUG:", "Oops", "virt-pci delay"))]
    assert not bad, bad
