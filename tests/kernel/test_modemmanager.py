"""Stock ModemManager and NetworkManager over `iosm-cuse up` in the Debian-kernel guest
(docs/modemmanager.md). The guest has no systemd, so the system bus, polkit, udevd,
ModemManager (no options) and NetworkManager are started here by hand, once for the module,
and always stopped. The root is read-only: NetworkManager's state and connection directories
get a tmpfs each; the project's udev rules go into /run/udev/rules.d as install-udev's would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import guest_up
import pytest
from helpers import until
from mm_stack import (
    Services,
    keyvalues,
    mm_on_bus,
    modems,
    mount_tmpfs,
    run,
    sbin,
    services_running,
    wait_listed,
)

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(shutil.which("ModemManager") is None and
                                 not Path("/usr/sbin/ModemManager").exists(),
                                 reason="modemmanager is not installed (./dev TEST_PACKAGES)")]

PORT = "/dev/wwan0mbim0"
LISTED_WITHIN = 10.0  # the promise, from the ready line to `mmcli -L`
DROPPED_AFTER_TERM = 5.0
DROPPED_AFTER_KILL = 10.0
GW4, ADDR4, GW6 = "10.99.0.1", "10.99.0.2", "fd99:0::1"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with services_running(tmp_path_factory.mktemp("services")) as svc:
        yield svc


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    modem: str
    listed_s: float


def start_daemon(services: Services, old: str | None = None) -> Daemon:
    proc = guest_up.start("--device", "sim", "--transport", "cuse",
                          ready=f"MBIM port {PORT} (cuse)")
    try:
        modem, took = wait_listed(LISTED_WITHIN, services, old)
    except BaseException:
        guest_up.stop(proc)
        raise
    return Daemon(proc, modem, took)


@pytest.fixture
def daemon(services: Services,
           record_property: Callable[[str, object], None]) -> Iterator[Daemon]:
    d = start_daemon(services)
    record_property("listed_after_ready_s", round(d.listed_s, 2))  # in the JUnit XML
    try:
        yield d
    finally:
        guest_up.stop(d.proc)


def test_listed_connects_pings_and_disconnects(daemon: Daemon) -> None:
    m = daemon.modem.rsplit("/", 1)[1]
    run("mmcli", "-m", m, "--simple-connect=apn=internet", check=True)
    info = keyvalues("-m", m)
    bearers = [v for k, v in info.items() if k.startswith("modem.generic.bearers.value")]
    assert len(bearers) == 1, info
    b = keyvalues("-b", bearers[0].rsplit("/", 1)[1])
    assert b["bearer.status.connected"] == "yes", b
    assert b["bearer.status.interface"] == "wwan0", b
    assert b["bearer.ipv4-config.address"] == ADDR4 and b["bearer.ipv4-config.prefix"] == "24"
    assert b["bearer.ipv4-config.gateway"] == GW4, b
    assert GW4 in b.get("bearer.ipv4-config.dns.value[1]", ""), b
    # ModemManager reports a static configuration; applying it is the user's (or NM's) job.
    run("ip", "link", "set", "wwan0", "up", check=True)
    run("ip", "addr", "add", f"{ADDR4}/24", "dev", "wwan0", check=True)
    try:
        run("ping", "-c", "1", "-W", "20", "-I", "wwan0", GW4, check=True)
    finally:
        run("ip", "addr", "flush", "dev", "wwan0")
    run("mmcli", "-m", m, "--simple-disconnect", check=True)
    after = keyvalues("-m", m)
    left = [v for k, v in after.items() if k.startswith("modem.generic.bearers.value")]
    for path in left:
        assert keyvalues("-b", path.rsplit("/", 1)[1])["bearer.status.connected"] == "no"


def test_listed_again_after_modemmanager_restarts(daemon: Daemon, services: Services) -> None:
    services.stop("ModemManager")
    until(lambda: not mm_on_bus(), 60, "ModemManager leaving the bus", poll=0.2)
    services.start("ModemManager", sbin("ModemManager"))
    until(mm_on_bus, 120, lambda: services.log("ModemManager"), poll=0.2)
    until(lambda: len(modems()) == 1, LISTED_WITHIN, lambda: services.log("ModemManager"),
          poll=0.2)


def test_daemon_restart_replaces_the_modem(daemon: Daemon, services: Services) -> None:
    guest_up.stop(daemon.proc)
    until(lambda: daemon.modem not in modems(), DROPPED_AFTER_TERM, "old modem dropped",
          poll=0.2)
    again = start_daemon(services, old=daemon.modem)
    try:
        assert again.modem != daemon.modem and modems() == [again.modem]
    finally:
        guest_up.stop(again.proc)


def proxy_pids() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "mbim-proxy":
                pids.append(int(stat.parent.name))
        except OSError:
            continue
    return pids


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` in clock ticks; 0 once it has exited (then it spins no more)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def proxy_cpu_share(pid: int, seconds: float = 5.0) -> float:
    before = cpu_ticks(pid)
    time.sleep(seconds)
    after = cpu_ticks(pid)
    ticks = max(0, after - before) if after else 0
    return ticks / (seconds * os.sysconf("SC_CLK_TCK"))


@pytest.fixture(scope="module")
def network_manager(services: Services) -> Iterator[None]:
    """NetworkManager --no-daemon (its unit's command), with tmpfs for its state and its
    connection files."""
    mounted: list[str] = []
    try:
        for path in ("/var/lib/NetworkManager", "/etc/NetworkManager/system-connections"):
            mount_tmpfs(path, mounted)
        services.start("NetworkManager", sbin("NetworkManager"), "--no-daemon")
        until(lambda: run("nmcli", "-t", "general", "status", timeout=60).returncode == 0,
              120, lambda: services.log("NetworkManager"), poll=0.5)
        yield
    finally:
        services.stop("NetworkManager")
        for path in reversed(mounted):
            subprocess.run(["umount", path], check=False)


def test_networkmanager_brings_wwan0_up_and_down(services: Services, network_manager: None,
                                                  daemon: Daemon) -> None:
    until(lambda: "gsm" in run("nmcli", "-t", "-f", "TYPE", "device", timeout=60).stdout, 60,
          lambda: f"NetworkManager has no modem: {services.log('NetworkManager')}", poll=0.5)
    run("nmcli", "c", "add", "type", "gsm", "ifname", "*", "con-name", "wwan",
        "gsm.apn", "internet", check=True)
    try:
        run("nmcli", "c", "up", "wwan", check=True)
        v4 = run("ip", "-4", "addr", "show", "dev", "wwan0", check=True).stdout
        v6 = run("ip", "-6", "addr", "show", "dev", "wwan0", "scope", "global").stdout
        routes = run("ip", "route", "show", "default", check=True).stdout
        assert f"inet {ADDR4}/" in v4 and "fd99::2/" in v6, v4 + v6
        assert "dev wwan0" in routes, routes
        run("ping", "-c", "1", "-W", "20", GW4, check=True)
        run("nmcli", "c", "down", "wwan", check=True)
        assert "inet " not in run("ip", "-4", "addr", "show", "dev", "wwan0").stdout
        assert "dev wwan0" not in run("ip", "route", "show", "default").stdout
    finally:
        run("nmcli", "c", "delete", "wwan")


@pytest.mark.parametrize("sig, within", [(signal.SIGTERM, DROPPED_AFTER_TERM),
                                         (signal.SIGKILL, DROPPED_AFTER_KILL)])
def test_stopping_leaves_no_proxy_spinning(daemon: Daemon, services: Services,
                                           sig: signal.Signals, within: float,
                                           record_property: Callable[[str, object], None]
                                           ) -> None:
    """SIGTERM (or SIGKILL) while ModemManager's mbim-proxy holds the port: the proxy idles,
    ModemManager drops the modem, the node is gone, and the next `up` is listed again. After
    SIGKILL it is the keeper process that hangs the port up (docs/modemmanager.md §6)."""
    proxies = proxy_pids()
    assert proxies, "ModemManager opened the port through mbim-proxy"
    try:
        daemon.proc.send_signal(sig)
        daemon.proc.wait(60)
        t0 = time.monotonic()
        shares = {pid: proxy_cpu_share(pid) for pid in proxies}  # the following 5 s
        record_property("proxy_cpu_share", max(shares.values()))
        assert all(share < 0.05 for share in shares.values()), shares
        until(lambda: daemon.modem not in modems(),
              max(0.0, within - (time.monotonic() - t0)), "ModemManager dropping the modem",
              poll=0.2)
        record_property("dropped_within_s", round(time.monotonic() - t0, 2))
        assert not Path(PORT).exists()
        again = start_daemon(services, old=daemon.modem)
        guest_up.stop(again.proc)
    finally:
        # What a user would have to do by hand after a failure here: the next tests need an
        # idle machine and a ModemManager without the dead modem.
        for pid in proxy_pids():
            if pid in proxies and cpu_ticks(pid) and sig == signal.SIGKILL:
                os.kill(pid, signal.SIGKILL)


def test_listed_on_a_uio_device_too(services: Services, ivshmem: Any,
                                    host_process: Callable[[list[str]], str]) -> None:
    """The same announcement for a UIO-bound device (the ivshmem test device, the model on the
    VM's host): the port wwan1mbim0 and the link wwan1 are one modem for ModemManager."""
    host_process([guest_up.IOSM_CUSE, "modem", "--shm", ivshmem.host_path])
    proc = guest_up.start("--device", f"uio:{ivshmem.bdf}", "--transport", "cuse",
                          "--port-name", "wwan1mbim0",
                          ready=("MBIM port /dev/wwan1mbim0 (cuse)", "ivshmem test device"))
    try:
        modem, _took = wait_listed(LISTED_WITHIN, services)
        ports = keyvalues("-m", modem.rsplit("/", 1)[1])
        listed = " ".join(v for k, v in ports.items() if k.startswith("modem.generic.ports"))
        assert "wwan1mbim0 (mbim)" in listed and "wwan1 (net)" in listed, ports
    finally:
        guest_up.stop(proc)
        guest_up.restore_runner_token(ivshmem)
    until(lambda: modems() == [], DROPPED_AFTER_TERM, "UIO modem dropped", poll=0.2)
