"""libudev monitor messages, pure: properties in, bytes out (and back, for tests and checks).

A libudev listener (ModemManager, NetworkManager, `udevadm monitor --udev`) learns about devices
from netlink NETLINK_KOBJECT_UEVENT messages in multicast group 2, each a 40-byte header and a
block of NUL-terminated KEY=VALUE properties (docs/modemmanager.md §2). The driver's MBIM
port is a CUSE node, which udev files under `cuse`; announcing it as a `wwan` port with the
properties ModemManager reads is what makes stock ModemManager pick the modem up
(docs/modemmanager.md §3).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

UDEV_GROUP = 2  # the "udev" multicast group; 1 is the kernel's own uevents
PREFIX = b"libudev\0"
MAGIC = 0xFEEDCAFE
# prefix, magic (big-endian), header size, properties offset, properties length (native),
# MurmurHash2 of SUBSYSTEM and of DEVTYPE, tag bloom filter hi/lo (big-endian):
# docs/modemmanager.md §2.
_HEAD_MAGIC = struct.Struct(">8sI")
_HEAD_SIZES = struct.Struct("=III")
_HEAD_FILTER = struct.Struct(">IIII")
HEADER_SIZE = _HEAD_MAGIC.size + _HEAD_SIZES.size + _HEAD_FILTER.size  # 40
# A receiver refuses a message whose properties start less than 32 bytes before its end
# (docs/modemmanager.md §2);
# ACTION, DEVPATH, SUBSYSTEM and SEQNUM, each at least one character, take 42.
MIN_PROPERTIES = 32
MAX_MESSAGE = 8192  # libudev's receive buffer

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmurhash2(data: bytes, seed: int = 0) -> int:
    """Austin Appleby's 32-bit MurmurHash2, reading 4-byte blocks little-endian as systemd does
    on the little-endian machines this driver runs on (docs/modemmanager.md §2)."""
    h = (seed ^ len(data)) & _MASK
    end = len(data) & ~3
    for i in range(0, end, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = data[end:]
    if tail:
        for i in reversed(range(len(tail))):
            h ^= tail[i] << (8 * i)
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _filter_hash(value: str | None) -> int:
    return murmurhash2(value.encode()) if value else 0


class UeventError(ValueError):
    """Properties that cannot be sent (a key or value with NUL, '=' in a key, no SUBSYSTEM...),
    or bytes that are not a libudev monitor message."""


REQUIRED = ("ACTION", "DEVPATH", "SUBSYSTEM", "SEQNUM")  # a listener drops events without them


def encode(props: Mapping[str, str]) -> bytes:
    """One monitor message: header + properties in the given order."""
    for key in REQUIRED:
        if not props.get(key):
            raise UeventError(f"{key} is required")
    body = bytearray()
    for key, value in props.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise UeventError(f"bad property {key!r}={value!r}")
        body += f"{key}={value}".encode() + b"\0"
    # The four required properties alone are longer than MIN_PROPERTIES.
    if HEADER_SIZE + len(body) > MAX_MESSAGE:
        raise UeventError(f"{len(body)} bytes of properties: too long")
    return (_HEAD_MAGIC.pack(PREFIX, MAGIC)
            + _HEAD_SIZES.pack(HEADER_SIZE, HEADER_SIZE, len(body))
            + _HEAD_FILTER.pack(_filter_hash(props.get("SUBSYSTEM")),
                                _filter_hash(props.get("DEVTYPE")), 0, 0)
            + bytes(body))


@dataclass(frozen=True)
class Message:
    props: dict[str, str]
    subsystem_hash: int
    devtype_hash: int


def decode(data: bytes) -> Message:
    """The inverse of `encode`, with every field bounds-checked (UeventError otherwise)."""
    if len(data) < HEADER_SIZE or len(data) > MAX_MESSAGE:
        raise UeventError(f"{len(data)} bytes: not a monitor message")
    prefix, magic = _HEAD_MAGIC.unpack_from(data)
    if prefix != PREFIX or magic != MAGIC:
        raise UeventError("no libudev prefix or magic")
    size, off, length = _HEAD_SIZES.unpack_from(data, _HEAD_MAGIC.size)
    if size != HEADER_SIZE or off < HEADER_SIZE or off + length != len(data) \
            or length < MIN_PROPERTIES:
        raise UeventError(f"header size {size}, properties {off}+{length} in {len(data)} bytes")
    sub_hash, type_hash = _HEAD_FILTER.unpack_from(data, _HEAD_MAGIC.size + _HEAD_SIZES.size)[:2]
    props: dict[str, str] = {}
    for item in data[off:].split(b"\0"):
        if not item:
            continue
        key, eq, value = item.partition(b"=")
        if not eq or not key:
            raise UeventError(f"property without '=': {item[:40]!r}")
        try:
            props[key.decode()] = value.decode()
        except UnicodeDecodeError as exc:
            raise UeventError(f"property not UTF-8: {item[:40]!r}") from exc
    return Message(props, sub_hash, type_hash)


# ---- the driver's two ports, as ModemManager wants them (docs/modemmanager.md §3)

def physdev_uid(instance: str) -> str:
    """What groups the MBIM port and the data link into one modem (ID_MM_PHYSDEV_UID); the
    udev rule for the TUN link computes the same string from its name (udev/70-iosm-cuse.rules)."""
    return f"iosm-cuse-{instance}"


# The properties that make ModemManager take a port: a candidate, processed whatever the
# filter policy, grouped by a physical-device uid (docs/modemmanager.md §3).
MM_TAGS = ("ID_MM_CANDIDATE", "ID_MM_DEVICE_PROCESS")
# Intel's ids for the XMM7560, as a PCI modem would show them, and the driver this program
# stands in for; ModemManager shows the driver, but reads the ids only from a PCI or USB
# parent (docs/modemmanager.md §4).
INTEL_VENDOR, XMM7560_PRODUCT = "8086", "7560"
DRIVER = "iosm"


@dataclass(frozen=True)
class Node:
    """A character device node of the driver: its name under /dev and its numbers."""

    name: str  # wwan0at0
    major: int
    minor: int


@dataclass(frozen=True)
class Ports:
    """The driver's MBIM port (a CUSE node), its data link (a TUN interface) and its AT ports
    (CUSE nodes too, docs/at-ports.md §3), in the kernel's order."""

    instance: str  # wwan0
    port_name: str  # wwan0mbim0
    major: int
    minor: int
    ifindex: int | None  # None when the link is gone already
    at_ports: tuple[Node, ...] = ()


# What each AT port is to ModemManager, by position: the first carries the commands, the
# second is a spare (docs/at-ports.md §3).
AT_PORT_TYPES = ("ID_MM_PORT_TYPE_AT_PRIMARY", "ID_MM_PORT_TYPE_AT_SECONDARY")


def _wwan_port(instance: str, node: Node, port_type: str, action: str, seqnum: int,
               usec: int) -> dict[str, str]:
    props = {
        "ACTION": action,
        "DEVPATH": f"/devices/virtual/cuse/{node.name}",
        "SUBSYSTEM": "wwan",
        "DEVTYPE": "wwan_port",
        "DEVNAME": f"/dev/{node.name}",
        "MAJOR": str(node.major),
        "MINOR": str(node.minor),
        "SEQNUM": str(seqnum),
        "USEC_INITIALIZED": str(usec),
        "DRIVER": DRIVER,
        "ID_VENDOR_ID": INTEL_VENDOR,
        "ID_MODEL_ID": XMM7560_PRODUCT,
    }
    props.update(dict.fromkeys(MM_TAGS, "1"))
    props[port_type] = "1"
    props["ID_MM_PHYSDEV_UID"] = physdev_uid(instance)
    return props


def port_event(ports: Ports, action: str, seqnum: int, usec: int) -> dict[str, str]:
    """The MBIM port as a `wwan` subsystem port (docs/modemmanager.md §3)."""
    node = Node(ports.port_name, ports.major, ports.minor)
    return _wwan_port(ports.instance, node, "ID_MM_PORT_TYPE_MBIM", action, seqnum, usec)


def at_port_events(ports: Ports, action: str, seqnums: Iterator[int], usec: int
                   ) -> list[dict[str, str]]:
    """The AT ports as `wwan` subsystem ports of the same modem (same ID_MM_PHYSDEV_UID), each
    with the next of `seqnums` (docs/at-ports.md §3)."""
    return [_wwan_port(ports.instance, node, AT_PORT_TYPES[min(i, 1)], action, next(seqnums),
                       usec) for i, node in enumerate(ports.at_ports)]


def net_event(ports: Ports, action: str, seqnum: int, usec: int) -> dict[str, str]:
    """The data link, with the properties the udev rule gives it, for when no udevd runs to
    apply the rule and for its removal (docs/modemmanager.md §3)."""
    props = {
        "ACTION": action,
        "DEVPATH": f"/devices/virtual/net/{ports.instance}",
        "SUBSYSTEM": "net",
        "INTERFACE": ports.instance,
        "DRIVER": DRIVER,
        "SEQNUM": str(seqnum),
        "USEC_INITIALIZED": str(usec),
    }
    if ports.ifindex is not None:
        props["IFINDEX"] = str(ports.ifindex)
    props.update(dict.fromkeys(MM_TAGS, "1"))
    props["ID_MM_PHYSDEV_UID"] = physdev_uid(ports.instance)
    return props

