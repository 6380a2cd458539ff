"""Several modems on one machine, in the Debian-kernel guest with CUSE and stock ModemManager:
`iosm-cuse up --device sim --transport cuse` N times gives /dev/wwan0mbim0 .. /dev/wwanN-1mbim0
and links wwan0 .. wwanN-1; each answers mbimcli on its own port, connects through ModemManager
and pings over its own wwanK, and ModemManager lists every one as a modem of its own.

Two modems, then eight (six started beside the two). Under TCG (~11x slower) the file took
about 3 minutes as two runs of two and eight; the figures
each run measures are in the JUnit XML (record_property) and the README.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import guest_up
import pytest
from helpers import until
from mm_guest import Services, have_modemmanager, keyvalues, modems, run

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(not have_modemmanager(),
                                 reason="modemmanager is not installed (./dev TEST_PACKAGES)")]

LISTED_PER_MODEM = 30.0  # s ModemManager may take per modem to list them all, under TCG


@pytest.fixture
def start_modems() -> Iterator[Callable[[int], list[subprocess.Popen[str]]]]:
    """start(n): modems until n run, wwan0 first; all stopped at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(n: int) -> list[subprocess.Popen[str]]:
        for k in range(len(started), n):
            started.append(guest_up.start("--device", "sim", "--transport", "cuse",
                                          ready=f"MBIM port /dev/wwan{k}mbim0 (cuse)"))
        return started

    try:
        yield start
    finally:
        for proc in reversed(started):
            guest_up.stop(proc)


def modem_of(instance: str, listed: list[str]) -> str:
    """The number of the ModemManager modem whose ports are wwanKmbim0 and wwanK."""
    for path in listed:
        m = path.rsplit("/", 1)[1]
        info = keyvalues("-m", m)
        ports = " ".join(v for k, v in info.items() if k.startswith("modem.generic.ports"))
        if f"{instance}mbim0 (mbim)" in ports:
            assert f"{instance} (net)" in ports, info
            return m
    raise AssertionError(f"no modem with port {instance}mbim0 among {listed}")


def check_modem(k: int, m: str) -> str:
    """Modem wwanK answers mbimcli on its own port (through ModemManager's proxy, which holds
    it), connects and pings over its own link; returns its IMEI."""
    instance = f"wwan{k}"
    caps = run("mbimcli", "-p", "-d", f"/dev/{instance}mbim0", "--query-device-caps",
               check=True)
    imei = re.search(r"Device ID: '(\d+)'", caps.stdout)
    assert imei, caps.stdout
    gw, addr = f"10.99.{8 * k}.1", f"10.99.{8 * k}.2"
    run("mmcli", "-m", m, "--simple-connect=apn=internet", check=True)
    info = keyvalues("-m", m)
    bearers = [v for key, v in info.items() if key.startswith("modem.generic.bearers.value")]
    assert len(bearers) == 1, info
    b = keyvalues("-b", bearers[0].rsplit("/", 1)[1])
    assert b["bearer.status.interface"] == instance, b
    assert (b["bearer.ipv4-config.address"], b["bearer.ipv4-config.gateway"]) == (addr, gw), b
    run("ip", "link", "set", instance, "up", check=True)
    run("ip", "addr", "add", f"{addr}/24", "dev", instance, check=True)
    try:
        before = Path(f"/sys/class/net/{instance}/statistics/rx_packets").read_text()
        run("ping", "-c", "2", "-W", "20", "-I", instance, gw, check=True)
        after = Path(f"/sys/class/net/{instance}/statistics/rx_packets").read_text()
        assert int(after) >= int(before) + 2
    finally:
        run("ip", "addr", "flush", "dev", instance)
    run("mmcli", "-m", m, "--simple-disconnect", check=True)
    return imei.group(1)


def test_two_then_eight_modems_each_answer_ping_and_are_listed(
        services: Services, start_modems: Callable[[int], object],
        record_property: Callable[[str, object], None]) -> None:
    """Two modems, then six more beside them (one boot of the file's cost): each new one is
    listed as a modem of its own, answers on its own port and pings over its own link, and the
    ones already there stay listed."""
    checked_modems = 0
    imeis: set[str] = set()
    listed: list[str] = []

    def all_listed(n: int) -> bool:
        listed[:] = modems()
        return len(listed) == n

    for n in (2, 8):
        t0 = time.monotonic()
        start_modems(n)
        started = time.monotonic()
        record_property(f"started_{n}_s", round(started - t0, 1))
        for k in range(n):
            assert Path(f"/dev/wwan{k}mbim0").exists() and Path(f"/sys/class/net/wwan{k}").exists()
        until(lambda n=n: all_listed(n), LISTED_PER_MODEM * n,
              lambda: f"mmcli -L: {listed}; ModemManager: {services.log('ModemManager')}",
              poll=0.5)
        record_property(f"listed_{n}_s", round(time.monotonic() - started, 1))
        numbers = [modem_of(f"wwan{k}", listed) for k in range(n)]
        assert len(set(numbers)) == n
        checked = time.monotonic()
        imeis |= {check_modem(k, numbers[k]) for k in range(checked_modems, n)}
        assert len(imeis) == n, imeis  # an IMEI of its own each
        checked_modems = n
        record_property(f"checked_{n}_s", round(time.monotonic() - checked, 1))
        print(f"{n} modems: started in {started - t0:.0f} s, listed after "
              f"{checked - started:.0f} s, checked in {time.monotonic() - checked:.0f} s")
