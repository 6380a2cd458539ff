"""Announcing the driver's ports to ModemManager, and withdrawing them: the asyncio adapter
around the pure codecs of uevent.py and dbus.py (docs/modemmanager.md).

The MBIM port is sent as a forged libudev monitor event (NETLINK_KOBJECT_UEVENT, the udev
group) in this process's network namespace, which is the daemon's; the TUN data link is a real
network device, re-triggered through udevd when it runs (the rule installed by `install-udev`
tags it) and forged with the same properties when it does not. Both are announced whenever
ModemManager appears on the system bus, and withdrawn on stop and while the modem is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from iosm_cuse.system import uevent
from iosm_cuse.system.dbus import MM_NAME, BusWatch, system_bus_path

log = logging.getLogger("iosm_cuse.system.announce")

NETLINK_KOBJECT_UEVENT = 15
UDEVD_CONTROL = Path("/run/udev/control")
RETRY_BUS = 5.0  # s between attempts to reach a system bus that is not there (yet)
TRIGGER_TIMEOUT = 10.0


def send_uevent(props: dict[str, str]) -> None:
    """One monitor message to the udev group of this network namespace (root only)."""
    data = uevent.encode(props)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT) as sock:
        sock.sendto(data, (0, 1 << (uevent.UDEV_GROUP - 1)))


def _seqnums() -> itertools.count[int]:
    # Listeners only need SEQNUM to be non-zero; starting high keeps ours apart from udevd's in
    # a `udevadm monitor` log.
    return itertools.count(1 << 40)


def _usec_now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def port_numbers(node: str) -> tuple[int, int]:
    st = os.stat(node)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


class Announcer:
    """Tells ModemManager about one daemon's ports (`--modemmanager auto`)."""

    def __init__(self, instance: str, port_name: str, *, at_ports: tuple[str, ...] = (),
                 send: Callable[[dict[str, str]], None] = send_uevent) -> None:
        self.instance = instance
        self.port_name = port_name
        self.at_ports = at_ports  # the AT ports' node names, announced with the MBIM port
        self._send = send
        self._seq = _seqnums()
        self._ports: uevent.Ports | None = None
        self.modem_up = False
        self.mm_present = False
        self.announced = False
        self._watch: asyncio.Task[None] | None = None
        self.sent = 0  # events sent, for `status`

    # -- what the daemon calls

    def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_bus())

    def port_ready(self) -> None:
        """The port and the link exist and the modem runs: announce when ModemManager is on."""
        self.modem_up = True
        self._update()

    def modem_down(self) -> None:
        self.modem_up = False
        self._update()

    async def stop(self) -> None:
        self.modem_up = False
        self._update()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    # -- the state: announced exactly while the modem is up and ModemManager listens

    def _update(self) -> None:
        want = self.modem_up and self.mm_present
        if want and not self.announced:
            self._announce()
        elif not want and self.announced:
            self._withdraw()

    def _announce(self) -> None:
        try:
            major, minor = port_numbers(f"/dev/{self.port_name}")
        except OSError as exc:  # the PTY fallback has no device number: nothing to announce
            log.info("ModemManager: /dev/%s cannot be announced (%s)", self.port_name,
                     exc.strerror)
            return
        ports = uevent.Ports(self.instance, self.port_name, major, minor, ifindex(self.instance),
                             self._at_nodes())
        try:
            self._emit(uevent.port_event(ports, "add", next(self._seq), _usec_now()))
            for props in uevent.at_port_events(ports, "add", self._seq, _usec_now()):
                self._emit(props)
            self._announce_link(ports)
        except OSError as exc:
            log.warning("ModemManager: announcing /dev/%s failed: %s", self.port_name, exc)
            return
        self._ports = ports
        self.announced = True
        log.info("ModemManager: announced /dev/%s%s and %s", self.port_name,
                 "".join(f", /dev/{n.name}" for n in ports.at_ports), self.instance)

    def _at_nodes(self) -> tuple[uevent.Node, ...]:
        """The AT ports that are CUSE nodes (behind a PTY they have no device number)."""
        nodes = []
        for name in self.at_ports:
            try:
                nodes.append(uevent.Node(name, *port_numbers(f"/dev/{name}")))
            except OSError as exc:
                log.info("ModemManager: /dev/%s cannot be announced (%s)", name, exc.strerror)
        return tuple(nodes)

    def _announce_link(self, ports: uevent.Ports) -> None:
        if UDEVD_CONTROL.exists():
            # udevd applies the rule (ID_MM_* on the TUN) and broadcasts the result.
            argv = ["udevadm", "trigger", "--action=add", f"/sys/class/net/{self.instance}"]
            try:
                res = subprocess.run(argv, check=False, capture_output=True, text=True,
                                     timeout=TRIGGER_TIMEOUT)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("ModemManager: %s: %s", " ".join(argv), exc)
            else:
                if res.returncode == 0:
                    return
                log.warning("ModemManager: %s: %s", " ".join(argv), res.stderr.strip())
        self._emit(uevent.net_event(ports, "add", next(self._seq), _usec_now()))

    def _withdraw(self) -> None:
        """`remove` for both ports: a net port left behind keeps ModemManager's device (and so
        blocks the next add) (docs/modemmanager.md §3)."""
        ports, self._ports = self._ports, None
        self.announced = False
        if ports is None:
            return
        try:
            self._emit(uevent.port_event(ports, "remove", next(self._seq), _usec_now()))
            for props in uevent.at_port_events(ports, "remove", self._seq, _usec_now()):
                self._emit(props)
            self._emit(uevent.net_event(ports, "remove", next(self._seq), _usec_now()))
        except OSError as exc:
            log.warning("ModemManager: withdrawing /dev/%s failed: %s", self.port_name, exc)
            return
        log.info("ModemManager: withdrew /dev/%s and %s", self.port_name, self.instance)

    def _emit(self, props: dict[str, str]) -> None:
        self._send(props)
        self.sent += 1

    # -- the system bus

    def _presence(self, present: bool) -> None:
        if present != self.mm_present:
            log.debug("ModemManager %s the system bus", "on" if present else "off")
        if present and self.mm_present:
            # A new owner without a vanish seen in between: it has not seen our ports.
            self.announced = False
        self.mm_present = present
        if not present:
            self.announced = False  # nobody kept them
            self._ports = None
        self._update()

    async def _watch_bus(self) -> None:
        said = False
        while True:
            path = system_bus_path()
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError as exc:
                if not said:
                    log.info("ModemManager: no system bus at %s (%s); will announce when "
                             "ModemManager appears", path, exc.strerror)
                    said = True
                await asyncio.sleep(RETRY_BUS)
                continue
            try:
                await self._follow(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                log.info("ModemManager: system bus connection lost: %s", exc)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._presence(False)
            await asyncio.sleep(RETRY_BUS)

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        watch = BusWatch(os.getuid(), MM_NAME)
        writer.write(watch.start())
        said_absent = False
        while True:
            data = await reader.read(65536)
            if not data:
                raise OSError("the bus closed the connection")
            out, changes = watch.feed(data)
            if out:
                writer.write(out)
            for present in changes:
                if not present and not said_absent and not self.mm_present:
                    log.info("ModemManager: not on the system bus; will announce when it "
                             "appears")
                    said_absent = True
                self._presence(present)
