"""The link manager: link ids 0..7 <-> TUN devices <-> MUX sessions (Contract 2).

Kernel semantics kept (docs/iosm-protocol.md §6):
- `wwan0` is link id 0 and exists from `start()`; `wwan0-N` are added with a link id 0..7.
  A used id -> EBUSY, an id >= 8 -> EINVAL, a parent other than the base -> ENODEV, a name
  over 15 characters or already taken -> EINVAL / EEXIST. A failed request changes nothing.
- Deleting `wwan0` is allowed, as the kernel's wwan dellink allows deleting the default link;
  link id 0 can then be added again under any name.
- Admin up opens the MUX session (the MUX opens its channel on the first one), admin down closes
  it: what ndo_open/ndo_stop do. A session that cannot be opened puts the link back down, as a
  failing ndo_open leaves it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from iosm_cuse.link.args import LinkError, check_ifname
from iosm_cuse.link.bridge import Counters, SessionBridge
from iosm_cuse.net.tun import IFF_UP, Tun, TunDevice, flag_names, link_event_socket
from iosm_cuse.wire.rejects import PACKET_LOG_EVERY, Rejects

log = logging.getLogger(__name__)

MAX_LINKS = 8
DEFAULT_MTU = 1500
MIN_MTU = 68
CLOSE_TIMEOUT = 2.0     # a modem that does not answer CLOSE_SESSION does not hold us up
POLL_INTERVAL = 1.0     # safety net beside the netlink events (e.g. a link moved to a new netns)


class MuxHostLike(Protocol):
    """Contract 2 of docs/architecture.md."""

    on_receive: Callable[[int, bytes], None] | None
    on_flow: Callable[[int, bool], None] | None

    @property
    def max_ip_packet(self) -> int: ...  # read-only: MuxHost derives it from the MUX mode

    def open_session(self, if_id: int) -> Awaitable[Any]: ...
    def transmit(self, if_id: int, pkt: bytes) -> bool: ...
    def close_session(self, if_id: int) -> Awaitable[Any]: ...


TunFactory = Callable[[str, int], TunDevice]   # (name, mtu) -> device


def default_tun_factory(name: str, mtu: int) -> TunDevice:
    return Tun.create(name, mtu=mtu, txqueuelen=1000)


@dataclass
class LinkInfo:
    name: str
    parent: str
    linkid: int
    ifindex: int
    mtu: int
    up: bool
    session: str
    flags: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Link:
    link_id: int
    tun: TunDevice
    bridge: SessionBridge
    session: str = "closed"        # closed | opening | open | closing
    admin_up: bool = False         # as last seen
    sync: asyncio.Task[None] | None = None
    open_errors: int = 0


class LinkManager:
    def __init__(self, mux: MuxHostLike, base_name: str = "wwan0", *,
                 tun_factory: TunFactory = default_tun_factory, mtu: int = DEFAULT_MTU,
                 poll_interval: float = POLL_INTERVAL,
                 event_socket: Callable[[], socket.socket] | None = link_event_socket) -> None:
        check_ifname(base_name)
        self.mux = mux
        self.base_name = base_name
        self._factory = tun_factory
        self._mtu = mtu
        self._poll_interval = poll_interval
        self._links: dict[str, _Link] = {}            # by name at creation
        self._by_id: list[_Link | None] = [None] * MAX_LINKS
        # DL packets for an if_id with no link
        self.drops = Rejects(log, PACKET_LOG_EVERY, "links", kinds=("dl_unknown_link",))
        self._events: socket.socket | None = None
        self._event_source = event_socket
        self._poller: asyncio.Task[None] | None = None
        self._refresh_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        mux.on_receive = self._on_receive
        mux.on_flow = self._on_flow

    # -- lifecycle

    async def start(self) -> None:
        """Create the base link (session 0) and follow admin state changes."""
        self._loop = asyncio.get_running_loop()
        if self._event_source is not None:
            try:
                self._events = self._event_source()
                self._loop.add_reader(self._events.fileno(), self._on_link_event, self._events)
            except OSError as exc:  # polling alone still works
                log.warning("no link events (%s): following admin state by polling", exc)
        await self.add(self.base_name, 0)
        self._poller = self._loop.create_task(self._poll())

    async def stop(self) -> None:
        """Close every session and remove every TUN this manager created."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        # Concurrently: each close waits for the modem's answer, and a dead modem must not
        # make shutdown take a command timeout per link.
        await asyncio.gather(*(self._delete_quietly(name) for name in list(self._links)))
        if self._events is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._events.fileno())
            self._events.close()
            self._events = None

    # -- requests

    async def add(self, name: str, link_id: int, *, parent: str | None = None,
                  mtu: int | None = None) -> LinkInfo:
        self._loop = asyncio.get_running_loop()
        self._validate_add(name, link_id, parent, mtu)
        max_mtu = self.mux.max_ip_packet
        want_mtu = min(mtu if mtu is not None else self._mtu, max_mtu)
        try:
            tun = self._factory(name, want_mtu)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise LinkError(err, f"cannot create {name}: {exc.strerror or exc}") from exc
        bridge = SessionBridge(link_id, tun.fd, name, self.mux.transmit, max_mtu)
        link = _Link(link_id, tun, bridge)
        bridge.on_dead = lambda _b: self._schedule_gone_check()
        self._links[name] = link
        self._by_id[link_id] = link
        self.refresh()
        log.info("link %s: link id %d, mtu %d", name, link_id, want_mtu)
        return self._info(name, link)

    def _validate_add(self, name: str, link_id: int, parent: str | None,
                      mtu: int | None) -> None:
        check_ifname(name)
        if parent is not None and parent != self.base_name:
            raise LinkError(errno.ENODEV, f'parent "{parent}" is not a wwan device here; '
                                          f'use parentdev-name {self.base_name}')
        if not isinstance(link_id, int) or not 0 <= link_id < MAX_LINKS:
            raise LinkError(errno.EINVAL, f"link id {link_id} is out of range 0..{MAX_LINKS - 1}")
        holder = self._by_id[link_id]
        if holder is not None:
            raise LinkError(errno.EBUSY, f"link id {link_id} is in use by "
                                         f"{self._name_of(holder)}")
        if name in self._links or any(self._name_of(ln) == name for ln in self._links.values()):
            raise LinkError(errno.EEXIST, f"{name} already exists")
        if mtu is not None and not MIN_MTU <= mtu <= self.mux.max_ip_packet:
            raise LinkError(errno.EINVAL, f"mtu {mtu} is out of range {MIN_MTU}.."
                                          f"{self.mux.max_ip_packet} for this MUX mode")

    async def delete(self, name: str) -> None:
        key = self._key_of(name)
        link = self._links.pop(key)
        self._by_id[link.link_id] = None
        if link.sync is not None:
            link.sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link.sync
        link.bridge.close()
        if link.session in ("open", "opening", "closing"):
            await self._close_session(link)
        link.tun.close()
        log.info("link %s (link id %d) deleted", name, link.link_id)

    def show(self, name: str | None = None) -> list[LinkInfo]:
        if name is not None:
            key = self._key_of(name)
            return [self._info(key, self._links[key])]
        return [self._info(k, ln) for k, ln in sorted(self._links.items(),
                                                       key=lambda kv: kv[1].link_id)]

    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The control socket's `link.*` operations (control.OPS) -> {"links": [...]}."""
        if op == "link.add":
            dev = args.get("dev")
            if not isinstance(dev, str):
                raise LinkError(errno.EINVAL, 'Not enough information: "dev" argument is '
                                              'required.')
            info = await self.add(dev, args["linkid"], parent=args.get("parent"),
                                  mtu=args.get("mtu"))
            return {"links": [info.as_dict()]}
        if op == "link.del":
            dev = args.get("dev")
            if dev is None and isinstance(args.get("linkid"), int):
                lid = args["linkid"]
                holder = self._by_id[lid] if 0 <= lid < MAX_LINKS else None
                if holder is None:
                    raise LinkError(errno.ENODEV, f"no link with link id {lid}")
                dev = self._name_of(holder)
            if not isinstance(dev, str):
                raise LinkError(errno.EINVAL, 'Not enough information: "dev" argument is '
                                              'required.')
            await self.delete(dev)
            return {"links": []}
        if op == "link.show":
            return {"links": [i.as_dict() for i in self.show(args.get("dev"))]}
        raise LinkError(errno.EOPNOTSUPP, f"unknown link operation {op}")

    def counters(self) -> dict[str, Any]:
        """Manager-wide counters for `status`."""
        return self.drops.as_dict()

    # -- names

    def _name_of(self, link: _Link) -> str:
        try:
            return link.tun.name()
        except OSError:
            return link.bridge.name

    def _key_of(self, name: str) -> str:
        if name in self._links:
            return name
        for key, link in self._links.items():
            if self._name_of(link) == name:
                return key
        raise LinkError(errno.ENODEV, f'Cannot find device "{name}"')

    def _info(self, key: str, link: _Link) -> LinkInfo:
        try:
            flags, ifindex, mtu = link.tun.flags(), link.tun.ifindex(), link.tun.mtu()
        except OSError:
            flags, ifindex, mtu = 0, 0, 0
        counters = link.bridge.snapshot()
        counters["session_open_errors"] = link.open_errors
        return LinkInfo(self._name_of(link), self.base_name, link.link_id, ifindex, mtu,
                        bool(flags & IFF_UP), link.session, flag_names(flags), counters)

    # -- admin state -> sessions

    def _schedule_gone_check(self) -> None:
        if not self._refresh_pending and self._loop is not None:
            self._refresh_pending = True
            self._loop.call_soon(self._after_event)

    def _reap(self) -> None:
        """Links whose device was destroyed behind our back (its namespace deleted, `ip link
        del`) are removed, their sessions closed: what the kernel's dellink does."""
        assert self._loop is not None
        for key, link in list(self._links.items()):
            if not link.tun.alive():
                log.warning("link %s (link id %d): the device is gone; removing the link",
                            key, link.link_id)
                self._loop.create_task(self._delete_quietly(key))

    async def _delete_quietly(self, key: str) -> None:
        with contextlib.suppress(LinkError):
            await self.delete(key)

    def refresh(self) -> None:
        """Look at every link's admin state now and open/close sessions to match."""
        self._refresh_pending = False
        for link in self._links.values():
            try:
                up = bool(link.tun.flags() & IFF_UP)
            except OSError:
                up = False
            if up != link.admin_up:
                link.admin_up = up
                if link.sync is None or link.sync.done():
                    assert self._loop is not None
                    link.sync = self._loop.create_task(self._sync(link))

    async def settle(self) -> None:
        """Refresh and wait until every link's session matches its admin state (tests)."""
        self.refresh()
        tasks = [ln.sync for ln in self._links.values() if ln.sync is not None]
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sync(self, link: _Link) -> None:
        while True:
            if link.admin_up and link.session == "closed":
                await self._open_session(link)
            elif not link.admin_up and link.session == "open":
                link.bridge.stop()
                await self._close_session(link)
            else:
                return

    async def _open_session(self, link: _Link) -> None:
        link.session = "opening"
        try:
            await self.mux.open_session(link.link_id)
        except Exception as exc:  # any failure of the MUX means: the link cannot go up
            link.session = "closed"
            link.open_errors += 1
            log.error("%s: opening MUX session %d failed (%s); setting the link down",
                      link.bridge.name, link.link_id, exc or type(exc).__name__)
            link.admin_up = False
            with contextlib.suppress(OSError):
                link.tun.set_up(False)
            return
        link.session = "open"
        link.bridge.set_flow(False)
        link.bridge.start()

    async def _close_session(self, link: _Link) -> None:
        link.session = "closing"
        try:
            await asyncio.wait_for(self.mux.close_session(link.link_id), CLOSE_TIMEOUT)
        except Exception as exc:  # the session is gone for us either way
            log.warning("%s: closing MUX session %d: %s", link.bridge.name, link.link_id,
                        exc or type(exc).__name__)
        link.session = "closed"

    # -- events

    def _on_link_event(self, sock: socket.socket) -> None:
        # The content does not matter: any link change means "look again" (cheap ioctls).
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass
        self._schedule_gone_check()

    def _after_event(self) -> None:
        self._reap()
        self.refresh()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            self._after_event()

    # -- MUX callbacks (hot path)

    def _on_receive(self, if_id: int, pkt: bytes) -> None:
        link = self._by_id[if_id] if 0 <= if_id < MAX_LINKS else None
        if link is None:
            self.drops("dl_unknown_link", "dropped a downlink packet for if_id %d: no link",
                       if_id)
            return
        link.bridge.deliver(pkt)

    def _on_flow(self, if_id: int, stopped: bool) -> None:
        link = self._by_id[if_id] if 0 <= if_id < MAX_LINKS else None
        if link is not None:
            link.bridge.set_flow(stopped)


__all__ = [
    "Counters",
    "LinkError",
    "LinkInfo",
    "LinkManager",
    "MuxHostLike",
    "default_tun_factory",
]
