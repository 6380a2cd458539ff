"""What one daemon keeps in the run directory (control.run_dir(), /run/iosm-cuse): the
flock'ed locks that let only one daemon drive a device and serve a wwan instance, and the
PTY fallback's symlink."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

from iosm_cuse import control
from iosm_cuse.options import UpError, port_name_choices

if TYPE_CHECKING:
    from iosm_cuse.devices import DeviceSpec


class Lock:
    """An flock'ed file under the run directory holding the owner's pid; the kernel drops the
    lock when the process dies, so a crashed daemon never blocks the next one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def try_acquire(self) -> bool:
        control.prepare_run_dir(self.path.parent)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return True

    def owner(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._file.close()
            self._file = None


def device_lock_path(lock_key: str) -> Path:
    return control.run_dir() / f"device-{lock_key}.lock"


def instance_lock_path(instance: str) -> Path:
    return control.run_dir() / f"{instance}.lock"


def pty_link_path(port_name: str) -> Path:
    """Where the PTY fallback's symlink goes (and what `status` shows as the port's path)."""
    return control.run_dir() / port_name


def claim_instance(spec: DeviceSpec, port_name: str | None) -> tuple[str, str, list[Lock]]:
    """Lock the device and a wwan instance name; returns (instance, port name, locks).
    Raises UpError naming the daemon that holds the device or the name, or saying what is
    wrong with `port_name`."""
    dev_lock = Lock(device_lock_path(spec.lock_key))
    if not dev_lock.try_acquire():
        raise UpError(f"device {spec} is already driven by iosm-cuse (pid {dev_lock.owner()}); "
                      "`iosm-cuse status` shows it")
    try:
        names = port_name_choices(port_name)
    except UpError:
        dev_lock.release()
        raise
    for instance, port in names:
        lock = Lock(instance_lock_path(instance))
        if lock.try_acquire():
            return instance, port, [dev_lock, lock]
    dev_lock.release()
    raise UpError(f"{names[0][1]} is already served by iosm-cuse (pid {lock.owner()}); "
                  "choose another --port-name")
