"""Raw-IP TUN devices for the data links, and the ioctls that follow them across namespaces.

Why the daemon calls TUNSETIFF itself instead of pyroute2's persistent `tuntap` devices: a TUN
that is not persistent disappears with the last fd, so a daemon that crashes leaves no stale
`wwan0-N` behind, exactly as the kernel's links vanish with the driver. The fd is what the data
path reads and writes anyway.

Why ioctls instead of (Async)IPRoute for MTU, flags and admin state: users move links into other
network namespaces (a link per client namespace is the common test and routing set-up); an
rtnetlink socket in the daemon's namespace no longer sees such a link, whereas TUNGETDEVNETNS on
the TUN fd always names the namespace the device lives in now, and a socket made there answers
SIOCGIFFLAGS for it. One NETLINK_ROUTE socket hears link events of our namespace and of the
ones links were moved to, so admin up/down is noticed when it happens, not by polling alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from typing import Protocol

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNGETDEVNETNS = 0x54E3          # _IO('T', 227), Linux >= 5.2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_POINTOPOINT = 0x10
IFF_NOARP = 0x80
IFF_MULTICAST = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCGIFINDEX = 0x8933
SIOCSIFTXQLEN = 0x8943
SIOCGIFTXQLEN = 0x8942
CLONE_NEWNET = 0x40000000
RTMGRP_LINK = 1
IFNAMSIZ = 16
_IFREQ = 40                        # struct ifreq: 16-byte name + 24-byte union

FLAG_NAMES = ((IFF_POINTOPOINT, "POINTOPOINT"), (IFF_NOARP, "NOARP"),
              (IFF_MULTICAST, "MULTICAST"), (IFF_UP, "UP"), (IFF_RUNNING, "LOWER_UP"))


class TunDevice(Protocol):
    """What the link manager and the bridge need of a link's device (a fake fits in tests)."""

    fd: int

    def name(self) -> str: ...
    def ifindex(self) -> int: ...
    def flags(self) -> int: ...
    def set_up(self, up: bool) -> None: ...
    def mtu(self) -> int: ...
    def set_mtu(self, mtu: int) -> None: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


def _ifreq(name: str, data: bytes = b"") -> bytearray:
    req = bytearray(_IFREQ)
    raw = name.encode()
    req[:len(raw)] = raw
    req[16:16 + len(data)] = data
    return req


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in_netns(netns_fd: int | None, family: int, kind: int,
                    proto: int = 0) -> socket.socket:
    """A socket created inside the namespace `netns_fd` (None: our own); the calling thread
    returns to its namespace before this returns."""
    if netns_fd is None:
        return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        finally:
            _setns(own)
    finally:
        os.close(own)


_OWN_KEY = os.stat("/proc/self/ns/net").st_ino
_own_ctl: socket.socket | None = None
SOL_NETLINK = 270
NETLINK_LISTEN_ALL_NSID = 8


def link_event_socket() -> socket.socket:
    """A NETLINK_ROUTE socket in our namespace that also hears link events of the namespaces
    our links were moved to (NETLINK_LISTEN_ALL_NSID): holding no socket inside those
    namespaces keeps `ip netns del` working, which destroys the links in them as it does the
    kernel's."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.bind((0, RTMGRP_LINK))
        sock.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _ctl_socket(tun_fd: int) -> Iterator[socket.socket]:
    """An ioctl socket in the namespace the TUN device is in now (it may have been moved).
    One in a foreign namespace is made per use and closed: a socket kept there would keep that
    namespace alive after `ip netns del`."""
    global _own_ctl
    try:
        ns_fd = fcntl.ioctl(tun_fd, TUNGETDEVNETNS)
    except OSError:
        ns_fd = -1
    try:
        if ns_fd < 0 or os.fstat(ns_fd).st_ino == _OWN_KEY:
            if _own_ctl is None:
                _own_ctl = socket_in_netns(None, socket.AF_INET, socket.SOCK_DGRAM)
            yield _own_ctl
            return
        sock = socket_in_netns(ns_fd, socket.AF_INET, socket.SOCK_DGRAM)
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
    with sock:
        yield sock


class Tun:
    """A raw-IP (IFF_TUN|IFF_NO_PI), non-persistent TUN device owned by this process."""

    def __init__(self, fd: int, name: str, offload: bool = False) -> None:
        self.fd = fd
        self._name = name
        self.offload = offload

    @classmethod
    def create(cls, name: str, *, mtu: int = 1500, txqueuelen: int = 1000,
               offload: bool = False) -> Tun:
        """Create `name` in our namespace; EEXIST if any device of that name exists (TUNSETIFF
        would otherwise attach to someone else's persistent TUN).

        `offload`: every read and write carries a virtio_net_hdr (IFF_VNET_HDR) and the kernel
        may hand over and accept TCP super-packets of up to 64 KiB (TSO4/TSO6 with checksum
        offload); `net/gso.py` turns them into MTU-sized packets and back."""
        try:
            socket.if_nametoindex(name)
        except OSError:
            pass
        else:
            raise OSError(errno.EEXIST, f"a device named {name} already exists")
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            req = fcntl.ioctl(fd, TUNSETIFF, bytes(_ifreq(name, struct.pack("H", flags))))
            if offload:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            tun = cls(fd, req[:16].rstrip(b"\0").decode(), offload)
            tun.set_mtu(mtu)
            tun._ioctl(SIOCSIFTXQLEN, struct.pack("i", txqueuelen))
            return tun
        except BaseException:
            os.close(fd)
            raise

    # -- what the kernel says about the device now

    def name(self) -> str:
        """Its current name (`ip link set ... name` may have changed it)."""
        try:
            req = fcntl.ioctl(self.fd, TUNGETIFF, bytes(_IFREQ))
            self._name = req[:16].split(b"\0", 1)[0].decode()
        except OSError:
            pass
        return self._name

    def _ioctl(self, request: int, data: bytes = b"") -> bytes:
        with _ctl_socket(self.fd) as ctl:
            out: bytes = fcntl.ioctl(ctl.fileno(), request, bytes(_ifreq(self.name(), data)))
        return out

    def ifindex(self) -> int:
        value: int = struct.unpack_from("i", self._ioctl(SIOCGIFINDEX), 16)[0]
        return value

    def flags(self) -> int:
        value: int = struct.unpack_from("H", self._ioctl(SIOCGIFFLAGS), 16)[0]
        return value

    def set_up(self, up: bool) -> None:
        flags = self.flags()
        self._ioctl(SIOCSIFFLAGS, struct.pack("H", (flags | IFF_UP) if up else
                                              (flags & ~IFF_UP & 0xFFFF)))

    def mtu(self) -> int:
        value: int = struct.unpack_from("i", self._ioctl(SIOCGIFMTU), 16)[0]
        return value

    def set_mtu(self, mtu: int) -> None:
        self._ioctl(SIOCSIFMTU, struct.pack("i", mtu))

    def txqueuelen(self) -> int:
        value: int = struct.unpack_from("i", self._ioctl(SIOCGIFTXQLEN), 16)[0]
        return value

    def alive(self) -> bool:
        """False once the device is gone while we hold its fd (deleted with its namespace,
        or by `ip link del`): the fd then answers EBADFD."""
        try:
            fcntl.ioctl(self.fd, TUNGETIFF, bytes(_IFREQ))
        except OSError as exc:
            return exc.errno != errno.EBADFD
        return True

    def close(self) -> None:
        """Closing the only fd removes the (non-persistent) device."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES if flags & bit]
