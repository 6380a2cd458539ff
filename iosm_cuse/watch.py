"""`iosm-cuse watch`: run one `iosm-cuse up` per UIO-bound modem, following udev/kernel uevents.

`WatchCore` decides (pure: events in, actions out, timers as data); `Watcher` is the asyncio
adapter around a pyudev monitor and child processes. Use this where systemd is absent; with
systemd, the udev rules and `iosm-cuse@.service` do the same job.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from iosm_cuse.bus.pci import (
    IOSM_PCI_IDS,
    SYSFS,
    PciError,
    PciId,
    normalize_bdf,
    parse_pci_id,
    scan_pci,
)

log = logging.getLogger("iosm_cuse.watch")

UDEV_CONTROL = Path("/run/udev/control")
DEFAULT_COMMAND = "iosm-cuse up --device uio:{bdf}"


# --- the pure core ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceEvent:
    """A uevent, reduced to what the decision needs. `pci_id` is None when it cannot be known
    (remove events: the device is gone from sysfs)."""

    action: str  # add, remove, bind, unbind, change, or "present" for devices found at start
    subsystem: str  # "pci" or "uio"
    bdf: str
    pci_id: PciId | None
    uio_bound: bool


@dataclass(frozen=True)
class Start:
    """Start a child for `bdf`; report it back with this `gen`, so that the exit of a child we
    already stopped is never taken for a crash of its successor."""

    bdf: str
    gen: int


@dataclass(frozen=True)
class Stop:
    bdf: str


@dataclass(frozen=True)
class StartAfter:
    """A timer: call `WatchCore.timer_fired(bdf)` after `delay` seconds."""

    bdf: str
    delay: float


Action = Start | Stop | StartAfter


@dataclass
class WatchCore:
    """At most one child per device, ever: a device re-bound while its old child is still
    stopping gets its new child when the old one has exited."""

    accepted: frozenset[PciId] = IOSM_PCI_IDS
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 30.0  # a child that ran this long resets its backoff
    wanted: set[str] = field(default_factory=set)  # bound devices we keep a child for
    outstanding: dict[str, int] = field(default_factory=dict)  # started, not exited: bdf -> gen
    started_at: dict[str, float] = field(default_factory=dict)  # when the outstanding one ran
    stopping: set[str] = field(default_factory=set)  # Stop sent to the outstanding child
    failures: dict[str, int] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)  # restart timers armed
    gen: dict[str, int] = field(default_factory=dict)  # generation of the newest Start

    def event(self, ev: DeviceEvent) -> list[Action]:
        if ev.action in ("remove", "unbind"):
            return self._unwant(ev.bdf)
        if ev.action in ("add", "bind", "present", "change") and ev.uio_bound \
                and ev.pci_id in self.accepted and ev.bdf not in self.wanted:
            self.wanted.add(ev.bdf)
            self.failures.pop(ev.bdf, None)
            if ev.bdf in self.outstanding:
                return []  # the old child is still stopping: child_exited starts the new one
            return [self._start(ev.bdf)]
        return []

    def _start(self, bdf: str) -> Start:
        self.gen[bdf] = self.gen.get(bdf, 0) + 1
        self.outstanding[bdf] = self.gen[bdf]
        self.started_at.pop(bdf, None)
        return Start(bdf, self.gen[bdf])

    def child_started(self, bdf: str, gen: int, now: float) -> None:
        if self.outstanding.get(bdf) == gen:
            self.started_at[bdf] = now

    def child_exited(self, bdf: str, gen: int, returncode: int, now: float) -> list[Action]:
        """A child ended. If we still want the device: a child we stopped is replaced at once
        (the device was re-bound meanwhile); a failed one is restarted with backoff; a clean
        exit (0) is left alone, as systemd's Restart=on-failure does."""
        if self.outstanding.get(bdf) != gen:
            return []
        del self.outstanding[bdf]
        started = self.started_at.pop(bdf, None)
        was_stopped = bdf in self.stopping
        self.stopping.discard(bdf)
        if bdf not in self.wanted:
            return []
        if was_stopped:
            return [self._start(bdf)]
        if returncode == 0:
            return []
        if started is not None and now - started >= self.stable_after:
            self.failures[bdf] = 0
        n = self.failures.get(bdf, 0) + 1
        self.failures[bdf] = n
        self.pending.add(bdf)
        delay = min(self.backoff_max, self.backoff_initial * 2 ** (n - 1))
        return [StartAfter(bdf, delay)]

    def timer_fired(self, bdf: str) -> list[Action]:
        armed = bdf in self.pending
        self.pending.discard(bdf)
        if armed and bdf in self.wanted and bdf not in self.outstanding:
            return [self._start(bdf)]
        return []

    def stop_all(self) -> list[Action]:
        actions: list[Action] = []
        for bdf in sorted(self.wanted | set(self.outstanding)):
            actions += self._unwant(bdf)
        return actions

    def _unwant(self, bdf: str) -> list[Action]:
        self.wanted.discard(bdf)
        self.pending.discard(bdf)
        if bdf in self.outstanding and bdf not in self.stopping:
            self.stopping.add(bdf)
            return [Stop(bdf)]
        return []


# --- from uevents and sysfs to DeviceEvents -----------------------------------------------------

def _bdf_from_devpath(subsystem: str, devpath: str) -> str | None:
    """pci: /devices/pci0000:00/0000:00:03.0 -> its last component; uio:
    /devices/pci0000:00/0000:00:03.0/uio/uio0 -> the component before 'uio'."""
    parts = [p for p in devpath.split("/") if p]
    if subsystem == "uio":
        if len(parts) < 3 or parts[-2] != "uio":
            return None  # a UIO device with no PCI parent (platform UIO): not ours
        candidate = parts[-3]
    else:
        if not parts:
            return None
        candidate = parts[-1]
    try:
        return normalize_bdf(candidate)
    except PciError:
        return None


def _read_id(dev_dir: Path) -> PciId | None:
    try:
        return PciId(int((dev_dir / "vendor").read_text().strip(), 16),
                     int((dev_dir / "device").read_text().strip(), 16))
    except (OSError, ValueError):
        return None


def describe_uevent(props: Mapping[str, str], sysfs: Path = SYSFS) -> DeviceEvent | None:
    """A uevent's properties (ACTION, SUBSYSTEM, DEVPATH, PCI_ID) -> DeviceEvent, reading sysfs
    for what the event does not carry (whether a UIO node exists, the parent's id)."""
    action, subsystem = props.get("ACTION", ""), props.get("SUBSYSTEM", "")
    devpath = props.get("DEVPATH", "")
    if subsystem not in ("pci", "uio") or ".." in devpath.split("/"):
        return None
    bdf = _bdf_from_devpath(subsystem, devpath)
    if bdf is None:
        return None
    dev_dir = sysfs / "bus" / "pci" / "devices" / bdf
    pci_id: PciId | None = None
    if "PCI_ID" in props:
        try:
            pci_id = parse_pci_id(props["PCI_ID"])
        except PciError:
            pci_id = None
    if pci_id is None and action not in ("remove", "unbind"):
        pci_id = _read_id(dev_dir)
    uio_bound = action not in ("remove", "unbind") and (dev_dir / "uio").is_dir()
    return DeviceEvent(action, subsystem, bdf, pci_id, uio_bound)


def present_devices(sysfs: Path = SYSFS) -> list[DeviceEvent]:
    """Devices already there at start, as 'present' events."""
    return [DeviceEvent("present", "pci", d.bdf, d.pci_id, d.uio_bound) for d in scan_pci(sysfs)]


def monitor_source(control: Path = UDEV_CONTROL) -> str:
    """'udev' when udevd runs (its monitor re-broadcasts processed events), else 'kernel':
    a udev-source monitor receives nothing, silently, without udevd."""
    return "udev" if control.exists() else "kernel"


# --- the asyncio adapter ------------------------------------------------------------------------

class Watcher:
    def __init__(self, core: WatchCore, command: list[str], sysfs: Path = SYSFS,
                 stop_timeout: float = 10.0) -> None:
        self.core = core
        self.command = command  # argv with "{bdf}" in it
        self.sysfs = sysfs
        self.stop_timeout = stop_timeout
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self._waiters: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    def apply(self, actions: list[Action]) -> None:
        loop = asyncio.get_running_loop()
        for action in actions:
            if isinstance(action, Start):
                self._spawn_task(self._start(action))
            elif isinstance(action, Stop):
                self._spawn_task(self._stop(action.bdf))
            else:
                log.info("restarting %s in %.1f s", action.bdf, action.delay)
                loop.call_later(action.delay, self._timer, action.bdf)

    def _timer(self, bdf: str) -> None:
        if not self._stopping.is_set():
            self.apply(self.core.timer_fired(bdf))

    def _spawn_task(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    async def _start(self, action: Start) -> None:
        bdf, gen = action.bdf, action.gen
        argv = [a.replace("{bdf}", bdf) for a in self.command]
        loop = asyncio.get_running_loop()
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            log.error("%s: cannot start %s: %s", bdf, shlex.join(argv), exc)
            self.core.child_started(bdf, gen, loop.time())
            self.apply(self.core.child_exited(bdf, gen, 127, loop.time()))
            return
        log.info("%s: started %s (pid %d)", bdf, shlex.join(argv), proc.pid)
        self.children[bdf] = proc
        self.core.child_started(bdf, gen, loop.time())
        if bdf in self.core.stopping:
            self._spawn_task(self._stop(bdf))  # unbound while we were spawning it
        rc = await proc.wait()
        if self.children.get(bdf) is proc:
            del self.children[bdf]
        log.info("%s: pid %d exited with %d", bdf, proc.pid, rc)
        self.apply(self.core.child_exited(bdf, gen, rc, loop.time()))

    async def _stop(self, bdf: str) -> None:
        proc = self.children.get(bdf)
        if proc is None or proc.returncode is not None:
            return
        log.info("%s: stopping pid %d", bdf, proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), self.stop_timeout)
        except TimeoutError:
            log.warning("%s: pid %d ignored SIGTERM for %.0f s, killing it", bdf, proc.pid,
                        self.stop_timeout)
            proc.kill()
            await proc.wait()

    def on_uevent(self, props: Mapping[str, str]) -> None:
        ev = describe_uevent(props, self.sysfs)
        if ev is not None:
            log.debug("uevent %s", ev)
            self.apply(self.core.event(ev))

    async def run(self, source: str) -> None:
        """Watch until SIGTERM/SIGINT, then stop every child and return."""
        import pyudev  # late: libudev is needed only here

        loop = asyncio.get_running_loop()
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        monitor.filter_by(subsystem="pci")
        monitor.filter_by(subsystem="uio")
        monitor.start()  # subscribe before the scan, so no bind falls between the two

        def drain() -> None:
            while (device := monitor.poll(timeout=0)) is not None:
                props = dict(device.properties)
                props.setdefault("ACTION", device.action or "")
                self.on_uevent(props)

        loop.add_reader(monitor.fileno(), drain)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            for ev in present_devices(self.sysfs):
                self.apply(self.core.event(ev))
            ids = ", ".join(sorted(map(str, self.core.accepted)))
            log.info("watching for %s bound to UIO", ids)
            await self._stopping.wait()
        finally:
            loop.remove_reader(monitor.fileno())
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.shutdown()

    async def shutdown(self) -> None:
        self._stopping.set()
        self.apply(self.core.stop_all())
        while self._waiters:
            await asyncio.gather(*list(self._waiters), return_exceptions=True)


def default_command() -> str:
    """`iosm-cuse up` by the path this process was started from, so a venv install works."""
    exe = Path(sys.argv[0])
    if exe.name == "iosm-cuse" and exe.exists():
        return f"{shlex.quote(str(exe.resolve()))} up --device uio:{{bdf}}"
    return DEFAULT_COMMAND


@click.command("watch")
@click.option("--test-device", "test_ids", multiple=True, metavar="VENDOR:DEVICE",
              help="Also accept this PCI id (1af4:1110: QEMU's ivshmem test device).")
@click.option("--exec", "command", default=None, metavar="CMD",
              help="Command per device, {bdf} replaced by its address "
                   f"(default: {DEFAULT_COMMAND!r}, by this program's own path).")
@click.option("--source", type=click.Choice(["auto", "udev", "kernel"]), default="auto",
              help="uevent source; auto = udev if udevd runs, else kernel.")
@click.option("--sysfs", type=click.Path(path_type=Path), default=SYSFS, hidden=True,
              help="sysfs root (tests point it at a fake tree).")
@click.option("-v", "--verbose", is_flag=True)
def watch_command(test_ids: tuple[str, ...], command: str | None, source: str, sysfs: Path,
                  verbose: bool) -> None:
    """Start `iosm-cuse up` for each modem bound to a UIO driver, stop it on unbind."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="iosm-cuse watch: %(message)s")
    try:
        extra = frozenset(parse_pci_id(t) for t in test_ids)
    except PciError as exc:
        raise click.BadParameter(str(exc), param_hint="--test-device") from exc
    argv = shlex.split(command or default_command())
    if not argv:
        raise click.BadParameter("empty command", param_hint="--exec")
    if source == "auto":
        source = monitor_source()
        why = "udevd is running" if source == "udev" else f"{UDEV_CONTROL} is missing: no udevd"
        log.info("listening to %s uevents (%s)", source, why)
    if Path("/run/systemd/system").is_dir() and \
            Path("/etc/udev/rules.d/70-iosm-cuse.rules").exists():
        log.warning("the udev rules and iosm-cuse@.service are installed and systemd runs: "
                    "they start iosm-cuse already, and a second daemon per device is refused")
    core = WatchCore(accepted=IOSM_PCI_IDS | extra)
    try:
        asyncio.run(Watcher(core, argv, sysfs).run(source))
    except ImportError as exc:  # pyudev without libudev.so.1
        raise click.ClickException(f"cannot watch uevents: {exc}") from exc
