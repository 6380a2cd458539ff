"""What one daemon keeps in the run directory (control.run_dir(), /run/iosm-cuse): the
flock'ed locks that let only one daemon drive a device and serve a wwan instance, and the
PTY fallback's symlink.

Several modems: a UIO device is one modem, driven by one daemon (its device lock). The built-in
model is not one device but as many as are started: each `up --device sim` is a modem of its
own and takes the next free instance, as the kernel numbers a second iosm device wwan1
(`wwanN`, `/dev/wwanNmbim0`, its links, control socket and model process). The instance lock
alone decides which: two `up`s started at once never get the same N (`Lock.try_acquire`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
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
        while True:
            f = open(self.path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                return False
            if _same_file(f, self.path):
                break
            # The owner released it between our open and our flock: it unlinked the file we
            # locked, and a third process may hold a new one at the path. Start over there.
            f.close()
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


def _same_file(f: IO[str], path: Path) -> bool:
    """Whether the open file `f` is still the one at `path` (not unlinked or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def device_lock_path(lock_key: str) -> Path:
    return control.run_dir() / f"device-{lock_key}.lock"


def instance_lock_path(instance: str) -> Path:
    return control.run_dir() / f"{instance}.lock"


def pty_link_path(port_name: str) -> Path:
    """Where the PTY fallback's symlink goes (and what `status` shows as the port's path)."""
    return control.run_dir() / port_name


def claim_instance(spec: DeviceSpec, port_name: str | None) -> tuple[str, str, list[Lock]]:
    """Lock the device (a UIO one; each model is a device of its own) and a wwan instance
    name; returns (instance, port name, locks). Raises UpError naming the daemon that holds
    the device or the name, or saying what is wrong with `port_name`."""
    names = port_name_choices(port_name)
    held: list[Lock] = []
    if spec.lock_key is not None:
        dev_lock = Lock(device_lock_path(spec.lock_key))
        if not dev_lock.try_acquire():
            raise UpError(f"device {spec} is already driven by iosm-cuse (pid "
                          f"{dev_lock.owner()}); `iosm-cuse status` shows it")
        held.append(dev_lock)
    for instance, port in names:
        lock = Lock(instance_lock_path(instance))
        if lock.try_acquire():
            return instance, port, [*held, lock]
    for dev_lock in held:
        dev_lock.release()
    if port_name is None:
        raise UpError(f"all of wwan0..wwan{len(names) - 1} are served by iosm-cuse; "
                      "`iosm-cuse status --instance N` shows each")
    raise UpError(f"{names[0][1]} is already served by iosm-cuse (pid {lock.owner()}); "
                  "choose another --port-name")


def running_instances() -> list[str]:
    """The wwan instances whose daemon answers on its control socket now, in numeric order.
    Probed by connecting (nothing is sent): a socket a killed daemon left behind refuses, and
    no lock is touched that a starting `up` could find taken."""
    found: list[str] = []
    for path in control.run_dir().glob("wwan*.sock"):
        instance = path.name.removesuffix(".sock")
        if not instance[4:].isdigit():
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(path))
            except OSError:
                continue
        found.append(instance)
    return sorted(found, key=lambda name: int(name[4:]))
