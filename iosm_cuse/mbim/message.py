"""MBIM control messages: header, fragment header, bodies, fragmentation and reassembly.

Every message starts with ``MessageType u32, MessageLength u32, TransactionId u32``. COMMAND,
COMMAND_DONE and INDICATE_STATUS follow it with ``TotalFragments u32, CurrentFragment u32``;
each fragment repeats the full 20 bytes and carries a slice of the body that follows them.
The bodies are declared once in ``BODIES``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from uuid import UUID

from iosm_cuse.mbim.constants import MessageType, ProtocolError, Status

HEADER = struct.Struct("<III")       # MessageType, MessageLength, TransactionId
FRAGMENT = struct.Struct("<II")      # TotalFragments, CurrentFragment
HEADER_SIZE = HEADER.size
FRAGMENT_HEADER_SIZE = HEADER.size + FRAGMENT.size

# Fields after the header (after the fragment header for fragmented types), as struct codes.
# The command-like bodies end with InformationBufferLength; the buffer follows it.
BODIES: dict[MessageType, tuple[tuple[str, str], ...]] = {
    MessageType.OPEN: (("max_control_transfer", "I"),),
    MessageType.CLOSE: (),
    MessageType.HOST_ERROR: (("error", "I"),),
    MessageType.OPEN_DONE: (("status", "I"),),
    MessageType.CLOSE_DONE: (("status", "I"),),
    MessageType.FUNCTION_ERROR: (("error", "I"),),
    MessageType.COMMAND: (("service", "16s"), ("cid", "I"), ("command_type", "I"),
                          ("info_length", "I")),
    MessageType.COMMAND_DONE: (("service", "16s"), ("cid", "I"), ("status", "I"),
                               ("info_length", "I")),
    MessageType.INDICATE_STATUS: (("service", "16s"), ("cid", "I"), ("info_length", "I")),
}
FRAGMENTED = frozenset({MessageType.COMMAND, MessageType.COMMAND_DONE,
                        MessageType.INDICATE_STATUS})
_BODY_STRUCTS = {t: struct.Struct("<" + "".join(code for _, code in fields))
                 for t, fields in BODIES.items()}
_TYPES = {int(t): t for t in MessageType}


class MessageError(ValueError):
    """A message that cannot be accepted; ``error`` is the FUNCTION_ERROR/HOST_ERROR code.

    ``tid`` is the offending message's TransactionId, None when not even a header was readable.
    """

    def __init__(self, error: ProtocolError, tid: int | None, reason: str) -> None:
        super().__init__(f"{error.name}: {reason}")
        self.error = error
        self.tid = tid


class FragmentError(MessageError):
    """Reassembly failed (out of sequence, duplicated TID, too large, timed out)."""


@dataclass(frozen=True)
class Open:
    tid: int
    max_control_transfer: int
    TYPE = MessageType.OPEN


@dataclass(frozen=True)
class Close:
    tid: int
    TYPE = MessageType.CLOSE


@dataclass(frozen=True)
class HostError:
    tid: int
    error: int
    TYPE = MessageType.HOST_ERROR


@dataclass(frozen=True)
class OpenDone:
    tid: int
    status: int
    TYPE = MessageType.OPEN_DONE


@dataclass(frozen=True)
class CloseDone:
    tid: int
    status: int
    TYPE = MessageType.CLOSE_DONE


@dataclass(frozen=True)
class FunctionError:
    tid: int
    error: int
    TYPE = MessageType.FUNCTION_ERROR


@dataclass(frozen=True)
class Command:
    tid: int
    service: UUID
    cid: int
    command_type: int
    info: bytes = b""
    TYPE = MessageType.COMMAND


@dataclass(frozen=True)
class CommandDone:
    tid: int
    service: UUID
    cid: int
    status: int
    info: bytes = b""
    TYPE = MessageType.COMMAND_DONE


@dataclass(frozen=True)
class IndicateStatus:
    tid: int
    service: UUID
    cid: int
    info: bytes = b""
    TYPE = MessageType.INDICATE_STATUS


Message = (Open | Close | HostError | OpenDone | CloseDone | FunctionError | Command | CommandDone
           | IndicateStatus)
_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls for cls in (Open, Close, HostError, OpenDone, CloseDone, FunctionError,
                              Command, CommandDone, IndicateStatus)
}


@dataclass(frozen=True)
class Fragment:
    """One transfer of a fragmented message type; ``payload`` is everything after byte 20."""

    type: MessageType
    tid: int
    total: int
    current: int
    payload: bytes


# ---------------------------------------------------------------------------------- encoding


def encode_message(msg: Message) -> bytes:
    """Encode a whole message (fragmented types as the single fragment 0 of 1)."""
    t = msg.TYPE
    info: bytes = getattr(msg, "info", b"")
    values: list[object] = []
    for name, _ in BODIES[t]:
        if name == "info_length":
            values.append(len(info))
        elif name == "service":
            values.append(getattr(msg, "service").bytes)  # noqa: B009 - only some types have it
        else:
            values.append(getattr(msg, name))
    body = _BODY_STRUCTS[t].pack(*values)
    if t in FRAGMENTED:
        body = FRAGMENT.pack(1, 0) + body + info
    return HEADER.pack(t, HEADER_SIZE + len(body), msg.tid) + body


def fragment(data: bytes, max_transfer: int) -> list[bytes]:
    """Split one complete message into transfers of at most ``max_transfer`` bytes."""
    if len(data) <= max_transfer:
        return [data]
    mtype, _, tid = HEADER.unpack_from(data)
    if mtype not in FRAGMENTED:
        raise ValueError(f"message type {mtype:#x} cannot be fragmented")
    chunk = max_transfer - FRAGMENT_HEADER_SIZE
    if chunk <= 0:
        raise ValueError(f"max transfer {max_transfer} leaves no room for payload")
    payload = data[FRAGMENT_HEADER_SIZE:]
    total = -(-len(payload) // chunk)
    out = []
    for i in range(total):
        part = payload[i * chunk:(i + 1) * chunk]
        out.append(HEADER.pack(mtype, FRAGMENT_HEADER_SIZE + len(part), tid)
                   + FRAGMENT.pack(total, i) + part)
    return out


# ---------------------------------------------------------------------------------- decoding


def peek_header(data: bytes) -> tuple[int, int, int]:
    """(type, length, tid) of a transfer; raises MessageError if shorter than a header."""
    if len(data) < HEADER_SIZE:
        raise MessageError(ProtocolError.LENGTH_MISMATCH, None,
                           f"{len(data)} bytes, shorter than a header")
    mtype, length, tid = HEADER.unpack_from(data)
    return int(mtype), int(length), int(tid)


def decode_transfer(data: bytes) -> Message | Fragment:
    """Decode one transfer: a complete message, or a Fragment of a fragmented message type.

    A single fragment (total 1) of a fragmented type comes back as its complete message.
    """
    mtype_raw, length, tid = peek_header(data)
    mtype = _TYPES.get(mtype_raw)
    if mtype is None:
        raise MessageError(ProtocolError.UNKNOWN, tid, f"unknown message type {mtype_raw:#x}")
    if length != len(data):
        raise MessageError(ProtocolError.LENGTH_MISMATCH, tid,
                           f"MessageLength {length} but transfer of {len(data)} bytes")
    if mtype not in FRAGMENTED:
        return _decode_body(mtype, tid, data[HEADER_SIZE:])
    if len(data) < FRAGMENT_HEADER_SIZE:
        raise MessageError(ProtocolError.LENGTH_MISMATCH, tid, "no room for a fragment header")
    total, current = FRAGMENT.unpack_from(data, HEADER_SIZE)
    if total == 0 or current >= total:
        raise MessageError(ProtocolError.FRAGMENT_OUT_OF_SEQUENCE, tid,
                           f"fragment {current} of {total}")
    if total == 1:
        return _decode_body(mtype, tid, data[FRAGMENT_HEADER_SIZE:])
    return Fragment(mtype, tid, total, current, bytes(data[FRAGMENT_HEADER_SIZE:]))


def decode_message(data: bytes) -> Message:
    """Decode one complete, unfragmented message (reassembled ones included)."""
    result = decode_transfer(data)
    if isinstance(result, Fragment):
        raise MessageError(ProtocolError.FRAGMENT_OUT_OF_SEQUENCE, result.tid,
                           f"fragment {result.current} of {result.total}, not a whole message")
    return result


def _decode_body(mtype: MessageType, tid: int, body: bytes) -> Message:
    st = _BODY_STRUCTS[mtype]
    fixed = len(body) == st.size if mtype not in FRAGMENTED else len(body) >= st.size
    if not fixed:
        raise MessageError(ProtocolError.LENGTH_MISMATCH, tid,
                           f"{mtype.name} body of {len(body)} bytes, needs {st.size}")
    values = dict(zip((name for name, _ in BODIES[mtype]), st.unpack_from(body), strict=True))
    if mtype in FRAGMENTED:
        info = body[st.size:]
        if values.pop("info_length") != len(info):
            raise MessageError(ProtocolError.LENGTH_MISMATCH, tid,
                               "InformationBufferLength does not match the message")
        values["service"] = UUID(bytes=values["service"])
        values["info"] = bytes(info)
    return _CLASSES[mtype](tid=tid, **values)


# ------------------------------------------------------------------ peeking (ports, hot path)

# Where a stream can tell a message's type and length: the header without its TransactionId.
TYPE_AND_LENGTH = struct.Struct("<II")
TYPE_AND_LENGTH_SIZE = TYPE_AND_LENGTH.size
OPEN_SIZE = HEADER_SIZE + _BODY_STRUCTS[MessageType.OPEN].size
_COMMAND_TARGET = struct.Struct("<16sI")   # service, cid: the start of a COMMAND body


def stream_message_length(buf: bytes | bytearray, at: int, max_length: int) -> int | None:
    """The MessageLength of a message starting at `at` of a byte stream: None while fewer than
    the 8 bytes that tell are in; MessageError if no message starts there (an unknown type, a
    length below a header's or above `max_length`). One unpack per message: the PTY framer
    calls this for every message it reassembles."""
    if len(buf) - at < TYPE_AND_LENGTH_SIZE:
        return None
    mtype, length = TYPE_AND_LENGTH.unpack_from(buf, at)
    if mtype not in _TYPES:
        raise MessageError(ProtocolError.UNKNOWN, None, f"unknown message type {mtype:#x}")
    if not HEADER_SIZE <= length <= max_length:
        raise MessageError(ProtocolError.LENGTH_MISMATCH, None,
                           f"MessageLength {length} outside {HEADER_SIZE}..{max_length}")
    return int(length)


def open_max_control_transfer(data: bytes) -> int | None:
    """The MaxControlTransfer of `data` if it is exactly one well-formed OPEN, else None (any
    other message, a truncated or oversized OPEN, or a MessageLength that disagrees). Cheap
    for the non-OPEN case: the port asks this of every host write."""
    if len(data) != OPEN_SIZE:
        return None
    mtype, length, _tid, mct = _OPEN_WHOLE.unpack_from(data)
    if mtype != MessageType.OPEN or length != OPEN_SIZE:
        return None
    return int(mct)


_OPEN_WHOLE = struct.Struct(HEADER.format + _BODY_STRUCTS[MessageType.OPEN].format[1:])


def command_target(data: bytes) -> tuple[UUID, int]:
    """(service, cid) of a COMMAND transfer that carries them: the whole message or its first
    fragment. MessageError for another type, a later fragment, or too few bytes."""
    mtype, _, tid = peek_header(data)
    if mtype != MessageType.COMMAND:
        raise MessageError(ProtocolError.UNKNOWN, tid, f"message type {mtype:#x}, not COMMAND")
    if len(data) < FRAGMENT_HEADER_SIZE + _BODY_STRUCTS[MessageType.COMMAND].size:
        raise MessageError(ProtocolError.LENGTH_MISMATCH, tid,
                           f"COMMAND of {len(data)} bytes: no room for its body")
    total, current = FRAGMENT.unpack_from(data, HEADER_SIZE)
    if current != 0 or total == 0:
        raise MessageError(ProtocolError.FRAGMENT_OUT_OF_SEQUENCE, tid,
                           f"fragment {current} of {total} carries no service and CID")
    service, cid = _COMMAND_TARGET.unpack_from(data, FRAGMENT_HEADER_SIZE)
    return UUID(bytes=service), int(cid)


# ------------------------------------------------------------------------------- reassembly


@dataclass
class _Partial:
    type: MessageType
    tid: int
    total: int
    next: int
    started: float
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


@dataclass(frozen=True)
class FeedResult:
    """What one fragment produced: a whole message (as bytes) and/or errors to report."""

    message: bytes | None = None
    errors: tuple[FragmentError, ...] = ()


class FragmentCollector:
    """Reassembles fragmented messages, one at a time, as the MBIM collector rules say.

    Fragments must start at 0 and go up by one with the same TID and total; anything else
    drops the partial message and reports FRAGMENT_OUT_OF_SEQUENCE (a restart with the same
    TID: DUPLICATED_TID). Reassembled messages bigger than ``max_size`` give MAX_TRANSFER.
    """

    def __init__(self, max_size: int = 65536) -> None:
        self.max_size = max_size
        self._partial: _Partial | None = None

    @property
    def started(self) -> float | None:
        """When the partial message in progress began, None when idle."""
        return self._partial.started if self._partial is not None else None

    def reset(self) -> None:
        self._partial = None

    def expire(self, now: float, timeout: float) -> FragmentError | None:
        """Drop a partial message older than ``timeout``: TIMEOUT_FRAGMENT for its TID."""
        p = self._partial
        if p is None or now - p.started < timeout:
            return None
        self._partial = None
        return FragmentError(ProtocolError.TIMEOUT_FRAGMENT, p.tid,
                             f"fragments of TID {p.tid} not complete after {timeout} s")

    def feed(self, frag: Fragment, now: float = 0.0) -> FeedResult:
        errors: list[FragmentError] = []
        p = self._partial
        if p is not None and (frag.tid != p.tid or frag.type != p.type):
            # A new message interrupts the one in progress: that one is lost.
            self._partial = None
            errors.append(FragmentError(ProtocolError.FRAGMENT_OUT_OF_SEQUENCE, p.tid,
                                        f"TID {p.tid} interrupted by TID {frag.tid}"))
            p = None
        if p is None:
            if frag.current != 0:
                errors.append(FragmentError(ProtocolError.FRAGMENT_OUT_OF_SEQUENCE, frag.tid,
                                            f"first fragment is {frag.current}, not 0"))
                return FeedResult(None, tuple(errors))
            p = self._partial = _Partial(frag.type, frag.tid, frag.total, 0, now)
        elif frag.current == 0:
            self._partial = None
            errors.append(FragmentError(ProtocolError.DUPLICATED_TID, frag.tid,
                                        f"TID {frag.tid} restarted while collecting"))
            return FeedResult(None, tuple(errors))
        elif frag.current != p.next or frag.total != p.total:
            self._partial = None
            errors.append(FragmentError(ProtocolError.FRAGMENT_OUT_OF_SEQUENCE, frag.tid,
                                        f"fragment {frag.current}/{frag.total}, expected "
                                        f"{p.next}/{p.total}"))
            return FeedResult(None, tuple(errors))
        p.parts.append(frag.payload)
        p.size += len(frag.payload)
        p.next += 1
        if p.size + FRAGMENT_HEADER_SIZE > self.max_size:
            self._partial = None
            errors.append(FragmentError(ProtocolError.MAX_TRANSFER, frag.tid,
                                        f"reassembled message above {self.max_size} bytes"))
            return FeedResult(None, tuple(errors))
        if p.next < p.total:
            return FeedResult(None, tuple(errors))
        self._partial = None
        payload = b"".join(p.parts)
        whole = (HEADER.pack(p.type, FRAGMENT_HEADER_SIZE + len(payload), p.tid)
                 + FRAGMENT.pack(1, 0) + payload)
        return FeedResult(whole, tuple(errors))


_STATUS_AT = {  # where the status or error code sits in the first (or only) transfer
    MessageType.OPEN_DONE: HEADER_SIZE,
    MessageType.CLOSE_DONE: HEADER_SIZE,
    MessageType.FUNCTION_ERROR: HEADER_SIZE,
    MessageType.HOST_ERROR: HEADER_SIZE,
    MessageType.COMMAND_DONE: FRAGMENT_HEADER_SIZE + _COMMAND_TARGET.size,
}


def describe_transfer(data: bytes) -> str:
    """A short name for what a transfer says, for counting answers by kind: its type, and for
    _DONE messages and errors its status or error code by name ("FUNCTION_ERROR
    LENGTH_MISMATCH", "COMMAND_DONE NO_DEVICE_SUPPORT", "COMMAND_DONE fragment"). Never raises:
    what cannot be read is "unreadable" or "type 0x…"."""
    if len(data) < HEADER_SIZE:
        return "unreadable"
    mtype = _TYPES.get(HEADER.unpack_from(data)[0])
    if mtype is None:
        return f"type {HEADER.unpack_from(data)[0]:#x}"
    at = _STATUS_AT.get(mtype)
    if at is None:
        return mtype.name
    if mtype in FRAGMENTED and (len(data) < FRAGMENT_HEADER_SIZE
                                or FRAGMENT.unpack_from(data, HEADER_SIZE)[1] != 0):
        return f"{mtype.name} fragment"
    if len(data) < at + 4:
        return f"{mtype.name} truncated"
    code = int.from_bytes(data[at:at + 4], "little")
    names = ProtocolError if mtype in (MessageType.FUNCTION_ERROR, MessageType.HOST_ERROR) \
        else Status
    try:
        return f"{mtype.name} {names(code).name}"
    except ValueError:
        return f"{mtype.name} {code}"
