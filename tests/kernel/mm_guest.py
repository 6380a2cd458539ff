"""ModemManager in the kernel-tier guest, for the test modules that drive it
(test_modemmanager.py, test_mm_control.py): its services started by hand (the `services`
fixture in conftest.py is built on `Services`), `mmcli` helpers, and `iosm-cuse up` as the modem
ModemManager lists. Not a test module.

(test_at_ports.py starts its own, with ModemManager --debug, through `services_running`.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import guest_up
from helpers import stop_process, until

UDEV = Path(__file__).resolve().parents[2] / "udev"
PORT = "/dev/wwan0mbim0"
LISTED_WITHIN = 10.0  # the promise, from the ready line to `mmcli -L`
DROPPED_AFTER_TERM = 5.0
DROPPED_AFTER_KILL = 10.0
GW4, ADDR4, GW6 = "10.99.0.1", "10.99.0.2", "fd99:0::1"
SLOW = 180  # TCG: a connect through MM and NM takes a while


def run(*argv: str, timeout: float = SLOW, check: bool = False
        ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"{' '.join(argv)}: {res.stdout}{res.stderr}"
    return res


def sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def have_modemmanager() -> bool:
    return shutil.which("ModemManager") is not None or Path("/usr/sbin/ModemManager").exists()


@dataclass
class Services:
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]]

    def start(self, name: str, *argv: str) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process(proc)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def mount_tmpfs(path: str, mounted: list[str]) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path], check=True)
    mounted.append(path)


def bus_ready() -> bool:
    return run("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
               "/org/freedesktop/DBus", "org.freedesktop.DBus.ListNames", timeout=30
               ).returncode == 0


@contextmanager
def services_running(log_dir: Path, *mm_args: str) -> Iterator[Services]:
    """dbus-daemon --system, polkitd, systemd-udevd with our rules, ModemManager (with
    `mm_args`), logging to `log_dir`; all stopped again, and what they left removed."""
    for module in ("cuse", "tun"):
        subprocess.run(["modprobe", "-q", module], check=False)
    svc = Services(log_dir, {})
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
        svc.start("ModemManager", sbin("ModemManager"), *mm_args)
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


def mm_on_bus() -> bool:
    return run("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
               "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
               "string:org.freedesktop.ModemManager1", timeout=30).stdout.rstrip().endswith(
                   "boolean true")


def modems() -> list[str]:
    """The modem object paths `mmcli -L` lists."""
    out = run("mmcli", "-L", timeout=60).stdout
    return re.findall(r"/org/freedesktop/ModemManager1/Modem/\d+", out)


def wait_listed(within: float, services: Services, old: str | None = None) -> tuple[str, float]:
    """The one modem listed (other than `old`), and how long it took."""
    found: list[str] = []

    def listed() -> bool:
        found[:] = [m for m in modems() if m != old]
        return len(found) == 1

    took = until(listed, within, lambda: f"mmcli -L: {found}; ModemManager: "
                 f"{services.log('ModemManager')}", poll=0.2)
    return found[0], took


def keyvalues(*argv: str) -> dict[str, str]:
    out = run("mmcli", "-K", *argv, check=True).stdout
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    modem: str
    listed_s: float


def start_daemon(services: Services, old: str | None = None, *extra: str) -> Daemon:
    """`iosm-cuse up` on the model with a CUSE port (and `extra` options), once listed."""
    proc = guest_up.start("--device", "sim", "--transport", "cuse", *extra,
                          ready=f"MBIM port {PORT} (cuse)")
    try:
        modem, took = wait_listed(LISTED_WITHIN, services, old)
    except BaseException:
        guest_up.stop(proc)
        raise
    return Daemon(proc, modem, took)
