"""The vhost-user protocol as the device end speaks it, pure: bytes in, messages and bytes out
(docs/uml-virtpci.md §4).

Every message is a 12-byte header (request, flags, payload size) and a payload whose layout the
request decides; the layouts are `Record`s declared once below, and `PAYLOADS` says which request
carries which. File descriptors travel beside the bytes (SCM_RIGHTS): `FD_COUNT` says how many a
request takes, so the adapter can hand each message the fds that belong to it.

`MessageSplitter` cuts a byte stream into messages and rejects what cannot be one (through
`Rejects`); a header whose size cannot be trusted leaves the stream unsynchronised, and the
splitter then says so (`broken`) instead of guessing where the next message starts.
`VhostSession` is the device end's state: features, the memory table, per-queue ring settings;
it answers GET requests and tells the adapter what to do with fds (`Effect`s).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iosm_cuse.wire.record import Record
from iosm_cuse.wire.rejects import Rejects


class Request(enum.IntEnum):
    """Front-end requests (the subset a virtio_uml front end sends, plus their neighbours)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SET_SLAVE_REQ_FD = 21
    GET_CONFIG = 24
    SET_CONFIG = 25


VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

F_PROTOCOL_FEATURES = 1 << 30  # transport feature: protocol features are negotiated
F_VERSION_1 = 1 << 32  # virtio 1.0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_SLAVE_REQ = 1 << 5
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_INBAND_NOTIFICATIONS = 1 << 14

# What this device end offers. SLAVE_REQ is not optional for UML: without it virtio_uml never
# gets its own irq and its call pipes collide with the timer (docs/uml-virtpci.md §4).
# No REPLY_ACK: the front end then never waits for acknowledgements.
DEVICE_FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES
DEVICE_PROTOCOL_FEATURES = PROTOCOL_F_SLAVE_REQ

VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8  # in SET_VRING_KICK/CALL/ERR: no fd comes with this message
MAX_QUEUES = 2  # virt-pci: 0 = commands, 1 = interrupts
MAX_VRING_NUM = 32768  # split rings: a power of two up to 2^15
MAX_REGIONS = 8
MAX_PAYLOAD = 4096  # nothing the device end accepts is larger; a bigger size is a broken stream

HEADER = Record.sequential("vhost_user_header", ("request", "I"), ("flags", "I"), ("size", "I"))
U64 = Record.sequential("vhost_user_u64", ("value", "Q"))
VRING_STATE = Record.sequential("vhost_user_vring_state", ("index", "I"), ("num", "I"))
VRING_ADDR = Record.sequential("vhost_user_vring_addr", ("index", "I"), ("flags", "I"),
                               ("desc", "Q"), ("used", "Q"), ("avail", "Q"), ("log", "Q"))
MEM_TABLE = Record.sequential("vhost_user_memory", ("num", "I"), ("_padding", "I"))
MEM_REGION = Record.sequential("vhost_user_mem_region", ("guest_addr", "Q"), ("size", "Q"),
                               ("user_addr", "Q"), ("mmap_offset", "Q"))

# The fixed part of each request's payload (None: no payload). SET_MEM_TABLE's regions follow
# its head, `num` of them.
PAYLOADS: dict[Request, Record | None] = {
    Request.GET_FEATURES: None,
    Request.SET_FEATURES: U64,
    Request.SET_OWNER: None,
    Request.RESET_OWNER: None,
    Request.SET_MEM_TABLE: MEM_TABLE,
    Request.SET_LOG_BASE: U64,
    Request.SET_LOG_FD: None,
    Request.SET_VRING_NUM: VRING_STATE,
    Request.SET_VRING_ADDR: VRING_ADDR,
    Request.SET_VRING_BASE: VRING_STATE,
    Request.GET_VRING_BASE: VRING_STATE,
    Request.SET_VRING_KICK: U64,
    Request.SET_VRING_CALL: U64,
    Request.SET_VRING_ERR: U64,
    Request.GET_PROTOCOL_FEATURES: None,
    Request.SET_PROTOCOL_FEATURES: U64,
    Request.GET_QUEUE_NUM: None,
    Request.SET_VRING_ENABLE: VRING_STATE,
    Request.SET_SLAVE_REQ_FD: None,
    Request.GET_CONFIG: None,
    Request.SET_CONFIG: None,
}


class VhostUserError(Exception):
    """The stream cannot be followed any further (the connection must be dropped)."""


@dataclass(frozen=True)
class Message:
    request: int
    flags: int
    payload: bytes

    def fields(self) -> dict[str, Any]:
        """The fixed payload's fields (empty for requests without one)."""
        rec = PAYLOADS.get(Request(self.request)) if self.request in _KNOWN else None
        return rec.unpack(self.payload) if rec is not None else {}


_KNOWN = frozenset(int(r) for r in Request)


def fd_count(msg: Message) -> int:
    """How many of the fds received beside the stream belong to `msg`."""
    req = msg.request
    if req == Request.SET_MEM_TABLE and len(msg.payload) >= MEM_TABLE.size:
        return min(int(MEM_TABLE.get(msg.payload, 0, "num")), MAX_REGIONS)
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        if len(msg.payload) >= U64.size:
            return 0 if U64.get(msg.payload, 0, "value") & VRING_NOFD else 1
        return 0
    if req in (Request.SET_SLAVE_REQ_FD, Request.SET_LOG_FD):
        return 1
    return 0


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """One message (the front end's side: the tests' fake front end uses it too)."""
    return HEADER.pack(request=request, flags=flags, size=len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, VERSION | FLAG_REPLY)


def encode_mem_table(regions: list[dict[str, int]]) -> bytes:
    return MEM_TABLE.pack(num=len(regions)) + b"".join(MEM_REGION.pack(**r) for r in regions)


class MessageSplitter:
    """Bytes of the socket in, whole messages out."""

    def __init__(self, rejects: Rejects) -> None:
        self.rejects = rejects
        self._buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> list[Message]:
        if self.broken:
            return []
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            head = HEADER.unpack(self._buf)
            size = int(head["size"])
            if size > MAX_PAYLOAD:
                self.rejects("vhost_size", "message %d with a %d-byte payload", head["request"],
                             size)
                self.broken = True
                self._buf.clear()
                return out
            if len(self._buf) < HEADER.size + size:
                break
            payload = bytes(self._buf[HEADER.size:HEADER.size + size])
            del self._buf[:HEADER.size + size]
            out.append(Message(int(head["request"]), int(head["flags"]), payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes of a message not yet complete (a truncated message at EOF)."""
        return len(self._buf)


# ---- the device end's session state --------------------------------------------------------


@dataclass(frozen=True)
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass
class VringConfig:
    num: int = 0
    base: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    addr_set: bool = False
    enabled: bool = False
    kicked: bool = False  # a kick fd (or VRING_NOFD) arrived: the ring is started

    @property
    def ready(self) -> bool:
        return self.enabled and self.addr_set and self.num > 0


@dataclass(frozen=True)
class Effect:
    """What the adapter must do for a message: `kind` is one of
    memory (regions + fds), kick, call (queue + fd or None), slave (fd), stop (queue),
    start (queue), reset; `fds` are handed over (the adapter owns and closes them)."""

    kind: str
    queue: int = -1
    fds: tuple[int, ...] = ()
    regions: tuple[MemRegion, ...] = ()


@dataclass
class VhostSession:
    """The device end of one front-end connection."""

    rejects: Rejects
    features: int = 0
    protocol_features: int = 0
    owner: bool = False
    vrings: list[VringConfig] = field(default_factory=lambda: [VringConfig()
                                                                for _ in range(MAX_QUEUES)])
    seen: list[int] = field(default_factory=list)  # requests in arrival order (tests, logs)

    def handle(self, msg: Message, fds: tuple[int, ...]) -> tuple[bytes | None, list[Effect]]:
        """One message and the fds that came with it -> (reply or None, effects). fds that
        no effect takes are returned in a `close` effect."""
        self.seen.append(msg.request)
        if msg.flags & FLAG_VERSION_MASK != VERSION or msg.flags & FLAG_REPLY:
            self.rejects("vhost_flags", "request %d with flags %#x", msg.request, msg.flags)
            return None, _close(fds)
        if msg.request not in _KNOWN:
            self.rejects("vhost_request", "unknown request %d", msg.request)
            return None, _close(fds)
        req = Request(msg.request)
        rec = PAYLOADS[req]
        if rec is not None and len(msg.payload) < rec.size:
            self.rejects("vhost_short", "%s with %d payload bytes", req.name, len(msg.payload))
            return None, _close(fds)
        handler = _HANDLERS.get(req)
        if handler is None:
            self.rejects("vhost_request", "%s is not supported", req.name)
            return None, _close(fds)
        return handler(self, msg, fds)

    def _queue(self, req: Request, index: int) -> VringConfig | None:
        if index >= MAX_QUEUES:
            self.rejects("vhost_queue", "%s for queue %d", req.name, index)
            return None
        return self.vrings[index]

    def _get_features(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        return encode_reply(msg.request, U64.pack(value=DEVICE_FEATURES)), _close(fds)

    def _set_features(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        self.features = int(msg.fields()["value"]) & DEVICE_FEATURES
        return None, _close(fds)

    def _set_owner(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        self.owner = True
        return None, _close(fds)

    def _reset_owner(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        self.owner = False
        self.vrings = [VringConfig() for _ in range(MAX_QUEUES)]
        return None, [*_close(fds), Effect("reset")]

    def _get_protocol_features(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        return encode_reply(msg.request, U64.pack(value=DEVICE_PROTOCOL_FEATURES)), _close(fds)

    def _set_protocol_features(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        self.protocol_features = int(msg.fields()["value"]) & DEVICE_PROTOCOL_FEATURES
        return None, _close(fds)

    def _get_queue_num(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        return encode_reply(msg.request, U64.pack(value=MAX_QUEUES)), _close(fds)

    def _set_mem_table(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        num = int(msg.fields()["num"])
        if not 1 <= num <= MAX_REGIONS or len(msg.payload) < MEM_TABLE.size + num * MEM_REGION.size:
            self.rejects("vhost_mem_table", "%d regions in %d bytes", num, len(msg.payload))
            return None, _close(fds)
        if len(fds) != num:
            self.rejects("vhost_mem_table", "%d regions with %d fds", num, len(fds))
            return None, _close(fds)
        regions = []
        for i in range(num):
            r = MEM_REGION.unpack(msg.payload, MEM_TABLE.size + i * MEM_REGION.size)
            if r["size"] == 0 or r["size"] > 1 << 40 or r["guest_addr"] + r["size"] > 1 << 64:
                self.rejects("vhost_mem_table", "region %d: %#x+%#x", i, r["guest_addr"],
                             r["size"])
                return None, _close(fds)
            regions.append(MemRegion(r["guest_addr"], r["size"], r["user_addr"],
                                     r["mmap_offset"]))
        return None, [Effect("memory", fds=fds, regions=tuple(regions))]

    def _vring_state(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        req = Request(msg.request)
        f = msg.fields()
        vr = self._queue(req, int(f["index"]))
        if vr is None:
            return None, _close(fds)
        num = int(f["num"])
        if req is Request.SET_VRING_NUM:
            if num == 0 or num > MAX_VRING_NUM or num & (num - 1):
                self.rejects("vhost_vring", "queue %d: %d entries", f["index"], num)
                return None, _close(fds)
            vr.num = num
        elif req is Request.SET_VRING_BASE:
            vr.base = num & 0xFFFF
        elif req is Request.SET_VRING_ENABLE:
            vr.enabled = bool(num)
            kind = "start" if vr.enabled else "stop"
            return None, [*_close(fds), Effect(kind, int(f["index"]))]
        return None, _close(fds)

    def _get_vring_base(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        """The front end stops a ring and asks where the device got to: the adapter fills in
        the index (a `stop` effect first)."""
        f = msg.fields()
        vr = self._queue(Request.GET_VRING_BASE, int(f["index"]))
        if vr is None:
            return None, _close(fds)
        vr.enabled = False
        return None, [*_close(fds), Effect("get_base", int(f["index"]))]

    def _set_vring_addr(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        f = msg.fields()
        vr = self._queue(Request.SET_VRING_ADDR, int(f["index"]))
        if vr is None:
            return None, _close(fds)
        vr.desc, vr.avail, vr.used = int(f["desc"]), int(f["avail"]), int(f["used"])
        vr.addr_set = True
        return None, _close(fds)

    def _vring_fd(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        req = Request(msg.request)
        value = int(msg.fields()["value"])
        index = value & VRING_INDEX_MASK
        vr = self._queue(req, index)
        if vr is None or value & ~(VRING_INDEX_MASK | VRING_NOFD):
            if vr is not None:
                self.rejects("vhost_vring", "%s value %#x", req.name, value)
            return None, _close(fds)
        want = 0 if value & VRING_NOFD else 1
        if len(fds) != want:
            self.rejects("vhost_fds", "%s with %d fds", req.name, len(fds))
            return None, _close(fds)
        if req is Request.SET_VRING_ERR:
            return None, _close(fds)  # errors are never signalled by this device
        kind = "kick" if req is Request.SET_VRING_KICK else "call"
        if kind == "kick":
            vr.kicked = True
            # without protocol features a kick fd starts the ring by itself (vhost-user spec)
            if not self.features & F_PROTOCOL_FEATURES:
                vr.enabled = True
        return None, [Effect(kind, index, fds)]

    def _set_slave_req_fd(self, msg: Message, fds: tuple[int, ...]) -> _Result:
        if len(fds) != 1:
            self.rejects("vhost_fds", "SET_SLAVE_REQ_FD with %d fds", len(fds))
            return None, _close(fds)
        return None, [Effect("slave", fds=fds)]


_Result = tuple[bytes | None, list[Effect]]


def _close(fds: tuple[int, ...]) -> list[Effect]:
    return [Effect("close", fds=fds)] if fds else []


_HANDLERS: dict[Request, Callable[[VhostSession, Message, tuple[int, ...]], _Result]] = {
    Request.GET_FEATURES: VhostSession._get_features,
    Request.SET_FEATURES: VhostSession._set_features,
    Request.SET_OWNER: VhostSession._set_owner,
    Request.RESET_OWNER: VhostSession._reset_owner,
    Request.GET_PROTOCOL_FEATURES: VhostSession._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: VhostSession._set_protocol_features,
    Request.GET_QUEUE_NUM: VhostSession._get_queue_num,
    Request.SET_MEM_TABLE: VhostSession._set_mem_table,
    Request.SET_VRING_NUM: VhostSession._vring_state,
    Request.SET_VRING_BASE: VhostSession._vring_state,
    Request.SET_VRING_ENABLE: VhostSession._vring_state,
    Request.GET_VRING_BASE: VhostSession._get_vring_base,
    Request.SET_VRING_ADDR: VhostSession._set_vring_addr,
    Request.SET_VRING_KICK: VhostSession._vring_fd,
    Request.SET_VRING_CALL: VhostSession._vring_fd,
    Request.SET_VRING_ERR: VhostSession._vring_fd,
    Request.SET_SLAVE_REQ_FD: VhostSession._set_slave_req_fd,
}
