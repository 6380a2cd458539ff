"""ModemManager in the kernel-tier guest, for the test modules that drive it
(test_modemmanager.py, test_mm_control.py): its services started by hand (the `services`
fixture in conftest.py is built on `Services`), `mmcli` helpers, and `iosm-cuse up` as the modem
ModemManager lists. Not a test module."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import guest_up
from helpers import until

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


def stop_process(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


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
