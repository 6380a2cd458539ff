"""Just enough of the D-Bus wire protocol to learn when a name appears on the system bus, pure
(bytes in, bytes and events out): AUTH EXTERNAL, Hello, AddMatch for NameOwnerChanged,
NameHasOwner, and the signals and replies that answer them (docs/modemmanager.md §5).

Only little-endian messages are written; both byte orders are read. Anything malformed is
counted through Rejects and ends the connection (the framing cannot be trusted after it); the
adapter (announce.py) then reconnects.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.system.dbus")

MM_NAME = "org.freedesktop.ModemManager1"
SYSTEM_BUS = "/run/dbus/system_bus_socket"
BUS_NAME = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
# Header fields (code: signature)
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SENDER, SIGNATURE = range(1, 9)
_FIELD_TYPES = {PATH: "o", INTERFACE: "s", MEMBER: "s", ERROR_NAME: "s", REPLY_SERIAL: "u",
                DESTINATION: "s", SENDER: "s", SIGNATURE: "g", 9: "u"}
FIXED_HEADER = 16
MAX_MESSAGE = 1 << 27  # the specification's limit
MAX_BUFFER = 1 << 20  # what we hold for one message we only need a few strings from


def system_bus_path() -> str:
    """The system bus socket: DBUS_SYSTEM_BUS_ADDRESS's unix:path=, else the standard one."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "")
    for part in address.split(";"):
        kind, _, params = part.partition(":")
        if kind == "unix":
            for param in params.split(","):
                key, _, value = param.partition("=")
                if key == "path" and value:
                    return value
    return SYSTEM_BUS


def _pad(n: int, align: int) -> int:
    return -n % align


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def align(self, n: int) -> None:
        self.buf += b"\0" * _pad(len(self.buf), n)

    def u32(self, v: int) -> None:
        self.align(4)
        self.buf += struct.pack("<I", v)

    def string(self, s: str) -> None:
        data = s.encode()
        self.u32(len(data))
        self.buf += data + b"\0"

    def signature(self, s: str) -> None:
        data = s.encode()
        self.buf += bytes([len(data)]) + data + b"\0"


def method_call(serial: int, member: str, args: tuple[str | int, ...] = ()) -> bytes:
    """A call to the bus itself; arguments are strings (s) and u32 (u)."""
    body = _Writer()
    for arg in args:
        if isinstance(arg, int):
            body.u32(arg)
        else:
            body.string(arg)
    signature = "".join("u" if isinstance(arg, int) else "s" for arg in args)
    fields = _Writer()
    for code, value in ((PATH, BUS_PATH), (INTERFACE, BUS_NAME), (MEMBER, member),
                        (DESTINATION, BUS_NAME)) + (((SIGNATURE, signature),) if args else ()):
        fields.align(8)
        fields.buf.append(code)
        sig = _FIELD_TYPES[code]
        fields.signature(sig)
        if sig == "g":
            fields.signature(str(value))
        else:
            fields.string(str(value))
    head = struct.pack("<cBBBIII", b"l", METHOD_CALL, 0, 1, len(body.buf), serial,
                       len(fields.buf))
    return head + bytes(fields.buf) + b"\0" * _pad(len(fields.buf), 8) + bytes(body.buf)


class DbusError(ValueError):
    """Bytes that are not a well-formed message."""


@dataclass
class Message:
    type: int
    serial: int
    fields: dict[int, str | int] = field(default_factory=dict)
    body: bytes = b""
    little: bool = True

    def args(self) -> list[str | int]:
        """The body's values, for the signatures this client reads: strings, booleans, u32."""
        sig = str(self.fields.get(SIGNATURE, ""))
        reader = _Reader(self.body, 0, self.little)
        out: list[str | int] = []
        for code in sig:
            if code in "sog":
                out.append(reader.signature() if code == "g" else reader.string())
            elif code in "bu":
                out.append(reader.u32())
            else:
                raise DbusError(f"unsupported body signature {sig!r}")
        return out


class _Reader:
    def __init__(self, data: bytes, pos: int, little: bool) -> None:
        self.data = data
        self.pos = pos
        self.end = "<" if little else ">"

    def need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise DbusError(f"truncated at {self.pos} (+{n} of {len(self.data)})")

    def align(self, n: int) -> None:
        pad = _pad(self.pos, n)
        self.need(pad)
        self.pos += pad

    def byte(self) -> int:
        self.need(1)
        self.pos += 1
        return self.data[self.pos - 1]

    def u32(self) -> int:
        self.align(4)
        self.need(4)
        (v,) = struct.unpack_from(self.end + "I", self.data, self.pos)
        self.pos += 4
        return int(v)

    def _text(self, n: int) -> str:
        self.need(n + 1)
        raw = self.data[self.pos:self.pos + n]
        if self.data[self.pos + n] != 0:
            raise DbusError("string without its NUL")
        self.pos += n + 1
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise DbusError("string not UTF-8") from exc

    def string(self) -> str:
        return self._text(self.u32())

    def signature(self) -> str:
        return self._text(self.byte())


def message_length(data: bytes) -> int | None:
    """The whole length of the message at the start of `data`, None until 16 bytes are there."""
    if len(data) < FIXED_HEADER:
        return None
    end = data[0:1]
    if end not in (b"l", b"B"):
        raise DbusError(f"bad endianness byte {end!r}")
    order = "<" if end == b"l" else ">"
    body_len, _serial, fields_len = struct.unpack_from(order + "III", data, 4)
    total = FIXED_HEADER + int(fields_len) + _pad(fields_len, 8) + int(body_len)
    if total > MAX_MESSAGE:
        raise DbusError(f"message of {total} bytes")
    return total


def parse(data: bytes) -> Message:
    """One whole message (as long as message_length says)."""
    little = data[0:1] == b"l"
    order = "<" if little else ">"
    _e, mtype, _flags, version, body_len, serial, fields_len = struct.unpack_from(
        order + "cBBBIII", data)
    if version != 1:
        raise DbusError(f"protocol version {version}")
    msg = Message(mtype, serial, little=little)
    end = FIXED_HEADER + fields_len
    r = _Reader(data[:end], FIXED_HEADER, little)
    while r.pos < end:
        r.align(8)
        code = r.byte()
        sig = r.signature()
        if sig in ("s", "o"):
            value: str | int = r.string()
        elif sig == "g":
            value = r.signature()
        elif sig == "u":
            value = r.u32()
        else:
            raise DbusError(f"header field {code} of type {sig!r}")
        if code in _FIELD_TYPES and _FIELD_TYPES[code] != sig:
            raise DbusError(f"header field {code} of type {sig!r}")
        msg.fields[code] = value
    body_start = end + _pad(end, 8)
    msg.body = data[body_start:body_start + body_len]
    if len(msg.body) != body_len:
        raise DbusError("truncated body")
    return msg


class BusWatch:
    """Sans-IO: follows whether `name` has an owner on the bus. `start()` gives the first bytes
    to send; `feed(data)` gives bytes to send and the presence changes (True: the name has an
    owner now, False: it has none) in order."""

    def __init__(self, uid: int, name: str) -> None:
        self.uid = uid
        self.name = name
        self.rejects = Rejects(log, what="D-Bus", kinds=("rejected",))
        self._buf = bytearray()
        self._authed = False
        self._serial = 0
        self._has_owner_serial = 0
        self.unique_name: str | None = None

    def start(self) -> bytes:
        return b"\0AUTH EXTERNAL " + str(self.uid).encode().hex().encode() + b"\r\n"

    def _call(self, member: str, *args: str | int) -> bytes:
        self._serial += 1
        return method_call(self._serial, member, args)

    def feed(self, data: bytes) -> tuple[bytes, list[bool]]:
        self._buf += data
        out = bytearray()
        changes: list[bool] = []
        try:
            if not self._authed:
                out += self._auth()
            while self._authed:
                total = message_length(bytes(self._buf[:FIXED_HEADER]))
                if total is None or len(self._buf) < total:
                    if total is not None and total > MAX_BUFFER:
                        raise DbusError(f"message of {total} bytes")
                    break
                msg = parse(bytes(self._buf[:total]))
                del self._buf[:total]
                changes.extend(self._handle(msg))
        except DbusError as exc:
            self.rejects("rejected", "%s", exc)
            raise
        return bytes(out), changes

    def _auth(self) -> bytes:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > 4096:
                raise DbusError("no authentication reply line")
            return b""
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        if not line.startswith(b"OK "):
            raise DbusError(f"authentication refused: {line[:80]!r}")
        self._authed = True
        rule = (f"type='signal',sender='{BUS_NAME}',interface='{BUS_NAME}',"
                f"member='NameOwnerChanged',arg0='{self.name}'")
        hello = self._call("Hello")
        match = self._call("AddMatch", rule)
        has_owner = self._call("NameHasOwner", self.name)
        self._has_owner_serial = self._serial
        return b"BEGIN\r\n" + hello + match + has_owner

    def _handle(self, msg: Message) -> list[bool]:
        if msg.type == METHOD_RETURN and msg.fields.get(REPLY_SERIAL) == 1:
            args = msg.args()
            self.unique_name = str(args[0]) if args else None
        elif msg.type == METHOD_RETURN and msg.fields.get(REPLY_SERIAL) == self._has_owner_serial:
            args = msg.args()
            if args and isinstance(args[0], int):
                return [bool(args[0])]
        elif msg.type == ERROR:
            log.info("D-Bus: call %s failed: %s", msg.fields.get(REPLY_SERIAL),
                     msg.fields.get(ERROR_NAME))
        elif (msg.type == SIGNAL and msg.fields.get(MEMBER) == "NameOwnerChanged"
              and msg.fields.get(SENDER) == BUS_NAME):
            args = msg.args()
            if len(args) == 3 and args[0] == self.name:
                return [bool(args[2])]
        return []
