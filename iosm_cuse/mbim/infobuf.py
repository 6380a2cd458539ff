"""Information buffers: one generic encoder/decoder driven by field tables.

A ``Layout`` is a list of ``Field``s, the way libmbim's JSON describes a CID: the fixed part holds
the fields in order; strings, referenced structs and address arrays live in a data area after it
and are reached by offsets counted from the start of the enclosing buffer (a referenced struct is
its own buffer). Every variable item is zero-padded to 4 bytes, padding not counted in its size.

Values are plain data: ``dict[str, Any]`` with ``int``, ``str``, ``uuid.UUID``, ``bytes``,
``ipaddress.IPv4Address``/``IPv6Address``, nested dicts for structs and lists for arrays. Fields
that only count the elements of another field are filled in by ``encode`` and left out by
``decode``, so ``decode(layout, encode(layout, v)) == v``.

``decode`` takes untrusted bytes: every offset, size and count is checked against the buffer and
any violation raises ``InfoBufferError`` (the model answers INVALID_PARAMETERS).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv6Address
from typing import Any
from uuid import UUID


class InfoBufferError(ValueError):
    """Malformed or unencodable information buffer."""


class Kind(Enum):
    U32 = "guint32"
    U64 = "guint64"
    UUID = "uuid"
    IPV4 = "ipv4"                      # 4 bytes inline
    IPV6 = "ipv6"                      # 16 bytes inline
    STRING = "string"                  # (offset, size) -> UTF-16LE
    U32_ARRAY = "guint32-array"        # count u32 inline (count from another field)
    BYTE_ARRAY = "byte-array"          # fixed number of bytes inline
    REF_BYTE_ARRAY = "ref-byte-array"  # (offset, size) -> bytes
    UNSIZED_BYTE_ARRAY = "unsized-byte-array"  # the rest of the buffer; last field only
    STRUCT = "struct"                  # inline struct
    STRUCT_ARRAY = "struct-array"      # offset -> count contiguous fixed-size structs
    REF_STRUCT_ARRAY = "ref-struct-array"  # count (offset, size) pairs inline -> one struct each
    STRING_ARRAY = "string-array"      # count (offset, size) pairs inline -> one string each
    REF_IPV4 = "ref-ipv4"              # offset (0: absent) -> 4 bytes
    REF_IPV6 = "ref-ipv6"              # offset (0: absent) -> 16 bytes
    IPV4_ARRAY = "ipv4-array"          # offset -> count addresses
    IPV6_ARRAY = "ipv6-array"          # offset -> count addresses


_COUNTED = {
    Kind.U32_ARRAY, Kind.STRUCT_ARRAY, Kind.REF_STRUCT_ARRAY, Kind.STRING_ARRAY,
    Kind.IPV4_ARRAY, Kind.IPV6_ARRAY,
}
# Bytes a field takes in the fixed part (None: depends on the value).
_INLINE_SIZE = {
    Kind.U32: 4, Kind.U64: 8, Kind.UUID: 16, Kind.IPV4: 4, Kind.IPV6: 16, Kind.STRING: 8,
    Kind.REF_BYTE_ARRAY: 8, Kind.STRUCT_ARRAY: 4, Kind.REF_IPV4: 4, Kind.REF_IPV6: 4,
    Kind.IPV4_ARRAY: 4, Kind.IPV6_ARRAY: 4, Kind.UNSIZED_BYTE_ARRAY: 0,
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    count: str | None = None          # name of the u32 field holding the element count
    struct: Layout | None = None      # element layout of struct kinds
    size: int = 0                     # BYTE_ARRAY length


@dataclass(frozen=True)
class Layout:
    name: str
    fields: tuple[Field, ...] = ()
    count_fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate field names")
        counts: set[str] = set()
        for i, f in enumerate(self.fields):
            if f.kind in _COUNTED:
                # The count must come first: the decoder reads it before the array.
                if f.count is None or f.count not in names[:i]:
                    raise ValueError(f"{self.name}.{f.name}: count field must precede it")
                if self.fields[names.index(f.count)].kind is not Kind.U32:
                    raise ValueError(f"{self.name}.{f.name}: count field must be guint32")
                counts.add(f.count)
            if f.kind in (Kind.STRUCT, Kind.STRUCT_ARRAY, Kind.REF_STRUCT_ARRAY):
                if f.struct is None:
                    raise ValueError(f"{self.name}.{f.name}: struct layout missing")
                if f.kind is Kind.STRUCT_ARRAY and not f.struct.is_fixed:
                    raise ValueError(f"{self.name}.{f.name}: struct-array needs fixed elements")
            if f.kind is Kind.UNSIZED_BYTE_ARRAY and (
                    i != len(self.fields) - 1 or not Layout("_", self.fields[:i]).is_fixed):
                # It is read from the end of the fixed part: no data area may come before it.
                raise ValueError(f"{self.name}.{f.name}: unsized byte array must be last, "
                                 "after fixed fields only")
        object.__setattr__(self, "count_fields", frozenset(counts))

    @property
    def is_fixed(self) -> bool:
        """True if the layout has no data area and a constant size."""
        return all(f.kind in (Kind.U32, Kind.U64, Kind.UUID, Kind.IPV4, Kind.IPV6,
                              Kind.BYTE_ARRAY)
                   or (f.kind is Kind.STRUCT and f.struct is not None and f.struct.is_fixed)
                   for f in self.fields)

    @property
    def min_size(self) -> int:
        """Size of the fixed part with every counted array empty."""
        total = 0
        for f in self.fields:
            if f.kind is Kind.BYTE_ARRAY:
                total += f.size
            elif f.kind is Kind.STRUCT:
                assert f.struct is not None
                total += f.struct.min_size
            else:
                total += _INLINE_SIZE.get(f.kind, 0)
        return total


# Small constructors so tables read like libmbim's JSON.
def u32(name: str) -> Field:
    return Field(name, Kind.U32)


def u64(name: str) -> Field:
    return Field(name, Kind.U64)


def uuid(name: str) -> Field:
    return Field(name, Kind.UUID)


def ipv4(name: str) -> Field:
    return Field(name, Kind.IPV4)


def ipv6(name: str) -> Field:
    return Field(name, Kind.IPV6)


def string(name: str) -> Field:
    return Field(name, Kind.STRING)


def u32_array(name: str, count: str) -> Field:
    return Field(name, Kind.U32_ARRAY, count=count)


def byte_array(name: str, size: int) -> Field:
    return Field(name, Kind.BYTE_ARRAY, size=size)


def ref_byte_array(name: str) -> Field:
    return Field(name, Kind.REF_BYTE_ARRAY)


def unsized_byte_array(name: str) -> Field:
    return Field(name, Kind.UNSIZED_BYTE_ARRAY)


def inline_struct(name: str, layout: Layout) -> Field:
    return Field(name, Kind.STRUCT, struct=layout)


def struct_array(name: str, layout: Layout, count: str) -> Field:
    return Field(name, Kind.STRUCT_ARRAY, count=count, struct=layout)


def ref_struct_array(name: str, layout: Layout, count: str) -> Field:
    return Field(name, Kind.REF_STRUCT_ARRAY, count=count, struct=layout)


def string_array(name: str, count: str) -> Field:
    return Field(name, Kind.STRING_ARRAY, count=count)


def ref_ipv4(name: str) -> Field:
    return Field(name, Kind.REF_IPV4)


def ref_ipv6(name: str) -> Field:
    return Field(name, Kind.REF_IPV6)


def ipv4_array(name: str, count: str) -> Field:
    return Field(name, Kind.IPV4_ARRAY, count=count)


def ipv6_array(name: str, count: str) -> Field:
    return Field(name, Kind.IPV6_ARRAY, count=count)


EMPTY = Layout("Empty")

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PAIR = struct.Struct("<II")
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


# ---------------------------------------------------------------------------------- encoding


class _Writer:
    """Builds one buffer: a fixed part, then the data area; offsets are from the buffer start."""

    def __init__(self, fixed_size: int) -> None:
        self.fixed = bytearray()
        self.fixed_size = fixed_size
        self.data = bytearray()

    def add_data(self, blob: bytes) -> int:
        """Append a variable item to the data area, padded; return its offset."""
        offset = self.fixed_size + len(self.data)
        self.data += _pad4(blob)
        return offset

    def ref(self, blob: bytes) -> None:
        """An (offset, size) pair; empty items are (0, 0) as libmbim writes them."""
        if not blob:
            self.fixed += _PAIR.pack(0, 0)
        else:
            self.fixed += _PAIR.pack(self.add_data(blob), len(blob))


def encode(layout: Layout, values: dict[str, Any]) -> bytes:
    """Encode ``values`` (count fields may be omitted) into an information buffer."""
    try:
        fixed_size = _fixed_size(layout, values)
        w = _Writer(fixed_size)
        _encode_fields(layout, values, w)
        assert len(w.fixed) == fixed_size, (layout.name, len(w.fixed), fixed_size)
        return bytes(w.fixed + w.data)
    except InfoBufferError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, struct.error, OverflowError) as e:
        raise InfoBufferError(f"{layout.name}: cannot encode: {e!r}") from e


def _fixed_size(layout: Layout, values: dict[str, Any]) -> int:
    total = 0
    for f in layout.fields:
        if f.kind is Kind.BYTE_ARRAY:
            total += f.size
        elif f.kind is Kind.U32_ARRAY:
            total += 4 * len(values[f.name])
        elif f.kind in (Kind.REF_STRUCT_ARRAY, Kind.STRING_ARRAY):
            total += 8 * len(values[f.name])
        elif f.kind is Kind.STRUCT:
            assert f.struct is not None
            total += _fixed_size(f.struct, values[f.name])
        else:
            total += _INLINE_SIZE[f.kind]
    return total


def _count_value(layout: Layout, name: str, values: dict[str, Any]) -> int:
    for f in layout.fields:
        if f.count == name:
            return len(values[f.name])
    raise AssertionError(name)


def _encode_fields(layout: Layout, values: dict[str, Any], w: _Writer) -> None:
    for f in layout.fields:
        if f.name in layout.count_fields:
            w.fixed += _U32.pack(_count_value(layout, f.name, values))
            continue
        _encode_field(f, values[f.name], w)


def _encode_field(f: Field, v: Any, w: _Writer) -> None:
    k = f.kind
    if k is Kind.U32:
        w.fixed += _U32.pack(int(v))
    elif k is Kind.U64:
        w.fixed += _U64.pack(int(v))
    elif k is Kind.UUID:
        w.fixed += UUID(str(v)).bytes
    elif k is Kind.IPV4:
        w.fixed += IPv4Address(v).packed
    elif k is Kind.IPV6:
        w.fixed += IPv6Address(v).packed
    elif k is Kind.STRING:
        w.ref(str(v).encode("utf-16-le"))
    elif k is Kind.REF_BYTE_ARRAY:
        w.ref(bytes(v))
    elif k is Kind.BYTE_ARRAY:
        if len(v) != f.size:
            raise InfoBufferError(f"{f.name}: needs {f.size} bytes, got {len(v)}")
        w.fixed += bytes(v)
    elif k is Kind.UNSIZED_BYTE_ARRAY:
        w.data += bytes(v)  # the rest of the buffer, unpadded
    elif k is Kind.U32_ARRAY:
        w.fixed += b"".join(_U32.pack(int(x)) for x in v)
    elif k is Kind.STRUCT:
        assert f.struct is not None
        # An inline struct is flattened into its parent: its data goes to the parent's area.
        _encode_fields(f.struct, v, w)
    elif k is Kind.STRUCT_ARRAY:
        assert f.struct is not None
        blob = b"".join(encode(f.struct, item) for item in v)
        w.fixed += _U32.pack(w.add_data(blob) if v else 0)
    elif k is Kind.REF_STRUCT_ARRAY:
        assert f.struct is not None
        for item in v:
            w.ref(encode(f.struct, item))
    elif k is Kind.STRING_ARRAY:
        for item in v:
            w.ref(str(item).encode("utf-16-le"))
    elif k in (Kind.REF_IPV4, Kind.REF_IPV6):
        if v is None:
            w.fixed += _U32.pack(0)
        else:
            packed = (IPv4Address(v) if k is Kind.REF_IPV4 else IPv6Address(v)).packed
            w.fixed += _U32.pack(w.add_data(packed))
    elif k in (Kind.IPV4_ARRAY, Kind.IPV6_ARRAY):
        cls = IPv4Address if k is Kind.IPV4_ARRAY else IPv6Address
        blob = b"".join(cls(a).packed for a in v)
        w.fixed += _U32.pack(w.add_data(blob) if v else 0)
    else:  # pragma: no cover - every Kind is handled above
        raise AssertionError(k)


# ---------------------------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise InfoBufferError(f"{what}: needs {n} bytes at {self.pos}, buffer {len(self.buf)}")
        chunk = self.buf[self.pos:end]
        self.pos = end
        return chunk

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def at(self, offset: int, size: int, what: str) -> memoryview:
        """Bytes of the data area, checked against the buffer (offsets from the buffer start)."""
        if offset + size > len(self.buf):
            raise InfoBufferError(
                f"{what}: offset {offset} + size {size} beyond buffer of {len(self.buf)}")
        return self.buf[offset:offset + size]


def decode(layout: Layout, buf: bytes | memoryview) -> dict[str, Any]:
    """Decode an information buffer; trailing bytes after the items are allowed."""
    r = _Reader(buf)
    return _decode_fields(layout, r)


def _decode_fields(layout: Layout, r: _Reader) -> dict[str, Any]:
    counts: dict[str, int] = {}
    out: dict[str, Any] = {}
    for f in layout.fields:
        if f.name in layout.count_fields:
            n = r.u32(f.name)
            counts[f.name] = n
            continue
        count = counts[f.count] if f.count is not None else 0
        out[f.name] = _decode_field(f, count, r)
    return out


def _check_count(f: Field, count: int, elem_size: int, r: _Reader) -> None:
    # A count that cannot fit in the buffer is rejected before any loop runs over it.
    if count * max(elem_size, 1) > len(r.buf):
        raise InfoBufferError(f"{f.name}: count {count} cannot fit in {len(r.buf)} bytes")


def _decode_string(blob: memoryview, what: str) -> str:
    if len(blob) % 2:
        raise InfoBufferError(f"{what}: odd UTF-16 size {len(blob)}")
    try:
        return bytes(blob).decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise InfoBufferError(f"{what}: bad UTF-16: {e}") from e


def _decode_field(f: Field, count: int, r: _Reader) -> Any:
    k = f.kind
    if k is Kind.U32:
        return r.u32(f.name)
    if k is Kind.U64:
        return int(_U64.unpack(r.take(8, f.name))[0])
    if k is Kind.UUID:
        return UUID(bytes=bytes(r.take(16, f.name)))
    if k is Kind.IPV4:
        return IPv4Address(bytes(r.take(4, f.name)))
    if k is Kind.IPV6:
        return IPv6Address(bytes(r.take(16, f.name)))
    if k is Kind.STRING:
        off, size = _PAIR.unpack(r.take(8, f.name))
        return _decode_string(r.at(off, size, f.name), f.name)
    if k is Kind.REF_BYTE_ARRAY:
        off, size = _PAIR.unpack(r.take(8, f.name))
        return bytes(r.at(off, size, f.name))
    if k is Kind.BYTE_ARRAY:
        return bytes(r.take(f.size, f.name))
    if k is Kind.UNSIZED_BYTE_ARRAY:
        return bytes(r.take(len(r.buf) - r.pos, f.name))
    if k is Kind.U32_ARRAY:
        _check_count(f, count, 4, r)
        return [int(x) for (x,) in struct.iter_unpack("<I", r.take(4 * count, f.name))]
    if k is Kind.STRUCT:
        assert f.struct is not None
        return _decode_fields(f.struct, r)
    if k is Kind.STRUCT_ARRAY:
        return _decode_struct_array(f, count, r)
    if k is Kind.REF_STRUCT_ARRAY:
        assert f.struct is not None
        _check_count(f, count, 8, r)
        items = []
        for _ in range(count):
            off, size = _PAIR.unpack(r.take(8, f.name))
            items.append(decode(f.struct, r.at(off, size, f.name)))
        return items
    if k is Kind.STRING_ARRAY:
        _check_count(f, count, 8, r)
        strings = []
        for _ in range(count):
            off, size = _PAIR.unpack(r.take(8, f.name))
            strings.append(_decode_string(r.at(off, size, f.name), f.name))
        return strings
    if k in (Kind.REF_IPV4, Kind.REF_IPV6):
        off = r.u32(f.name)
        if off == 0:
            return None
        if k is Kind.REF_IPV4:
            return IPv4Address(bytes(r.at(off, 4, f.name)))
        return IPv6Address(bytes(r.at(off, 16, f.name)))
    if k in (Kind.IPV4_ARRAY, Kind.IPV6_ARRAY):
        size = 4 if k is Kind.IPV4_ARRAY else 16
        off = r.u32(f.name)
        _check_count(f, count, size, r)
        blob = r.at(off, size * count, f.name) if count else memoryview(b"")
        cls = IPv4Address if k is Kind.IPV4_ARRAY else IPv6Address
        return [cls(bytes(blob[i:i + size])) for i in range(0, size * count, size)]
    raise AssertionError(k)  # pragma: no cover


def _decode_struct_array(f: Field, count: int, r: _Reader) -> list[dict[str, Any]]:
    assert f.struct is not None
    off = r.u32(f.name)
    elem = f.struct.min_size
    _check_count(f, count, elem, r)
    if count == 0:
        return []
    blob = r.at(off, elem * count, f.name)
    return [decode(f.struct, blob[i * elem:(i + 1) * elem]) for i in range(count)]
