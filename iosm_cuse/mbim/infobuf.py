"""Information buffers: one generic encoder/decoder driven by field tables.

An ``InfoLayout`` is a list of ``Field``s, the way libmbim's JSON describes a CID: the fixed
part holds the fields in order; strings, referenced structs and address arrays live in a data
area after it and are reached by offsets counted from the start of the enclosing buffer (a
referenced struct is its own buffer). Every variable item is zero-padded to 4 bytes, padding not
counted in its size.

Values are plain data: ``dict[str, Any]`` with ``int``, ``str``, ``uuid.UUID``, ``bytes``,
``ipaddress.IPv4Address``/``IPv6Address``, nested dicts for structs and lists for arrays. Fields
that only count the elements of another field are filled in by ``encode`` and left out by
``decode``, so ``decode(layout, encode(layout, v)) == v``.

``decode`` takes untrusted bytes: every offset, size and count is checked against the buffer and
any violation raises ``InfoBufferError`` (the model answers INVALID_PARAMETERS).

A ``guint32`` field may be tied to its enum (``u32("RadioState", RadioState)``): ``decode`` then
returns the enum member and rejects a value the enum does not name, once for every CID, so no
handler re-checks it. Flag enums (``IntFlag``) keep unknown bits, as libmbim does with masks.
``encode`` packs whatever integer it is given: the model only writes members, and tests build
hostile buffers with it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum, IntFlag
from functools import cached_property
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
# Kinds whose room in the fixed part depends on the value (inline arrays).
_VALUE_SIZED = {Kind.U32_ARRAY, Kind.REF_STRUCT_ARRAY, Kind.STRING_ARRAY}
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
    struct: InfoLayout | None = None      # element layout of struct kinds
    size: int = 0                     # BYTE_ARRAY length
    enum: type[IntEnum] | type[IntFlag] | None = None  # guint32 values this field may carry


@dataclass(frozen=True)
class InfoLayout:
    name: str
    fields: tuple[Field, ...] = ()
    count_fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate field names")
        counts: set[str] = set()
        for i, f in enumerate(self.fields):
            if f.enum is not None and f.kind is not Kind.U32:
                raise ValueError(f"{self.name}.{f.name}: only guint32 fields carry an enum")
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
                    i != len(self.fields) - 1 or not InfoLayout("_", self.fields[:i]).is_fixed):
                # It is read from the end of the fixed part: no data area may come before it.
                raise ValueError(f"{self.name}.{f.name}: unsized byte array must be last, "
                                 "after fixed fields only")
        object.__setattr__(self, "count_fields", frozenset(counts))

    @cached_property
    def static_size(self) -> int | None:
        """Size of the fixed part when no value can change it (no inline arrays), else None."""
        if any(f.kind in _VALUE_SIZED or (f.kind is Kind.STRUCT and f.struct is not None
                                          and f.struct.static_size is None)
               for f in self.fields):
            return None
        return self.min_size

    @cached_property
    def encode_steps(self) -> tuple[tuple[str, str | None, _Encoder], ...]:
        """(field name, array it counts or None, encoder) per field: the encoder's plan."""
        counted = {f.count: f.name for f in self.fields if f.count is not None}
        return tuple((f.name, counted.get(f.name), _ENCODERS[f.kind]) for f in self.fields)

    @cached_property
    def decode_steps(self) -> tuple[tuple[Field, bool, _Decoder], ...]:
        """(field, is a count field, decoder) per field: the decoder's plan."""
        return tuple((f, f.name in self.count_fields, _DECODERS[f.kind]) for f in self.fields)

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
def u32(name: str, enum: type[IntEnum] | type[IntFlag] | None = None) -> Field:
    return Field(name, Kind.U32, enum=enum)


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


def inline_struct(name: str, layout: InfoLayout) -> Field:
    return Field(name, Kind.STRUCT, struct=layout)


def struct_array(name: str, layout: InfoLayout, count: str) -> Field:
    return Field(name, Kind.STRUCT_ARRAY, count=count, struct=layout)


def ref_struct_array(name: str, layout: InfoLayout, count: str) -> Field:
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


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PAIR = struct.Struct("<II")


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
        self.data += blob
        self.data += b"\0" * (-len(blob) % 4)
        return offset

    def ref(self, blob: bytes) -> None:
        """An (offset, size) pair; empty items are (0, 0) as libmbim writes them."""
        if not blob:
            self.fixed += _PAIR.pack(0, 0)
        else:
            self.fixed += _PAIR.pack(self.add_data(blob), len(blob))


def encode(layout: InfoLayout, values: dict[str, Any]) -> bytes:
    """Encode ``values`` (count fields may be omitted) into an information buffer."""
    try:
        fixed_size = layout.static_size
        if fixed_size is None:
            fixed_size = _fixed_size(layout, values)
        w = _Writer(fixed_size)
        _encode_fields(layout, values, w)
        assert len(w.fixed) == fixed_size, (layout.name, len(w.fixed), fixed_size)
        return bytes(w.fixed + w.data)
    except InfoBufferError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, struct.error, OverflowError) as e:
        raise InfoBufferError(f"{layout.name}: cannot encode: {e!r}") from e


def _fixed_size(layout: InfoLayout, values: dict[str, Any]) -> int:
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


def _encode_fields(layout: InfoLayout, values: dict[str, Any], w: _Writer) -> None:
    for name, counted, encoder in layout.encode_steps:
        if counted is not None:
            w.fixed += _U32.pack(len(values[counted]))
        else:
            encoder(layout, name, values[name], w)


# One small encoder per Kind; (layout, field name) lets them find their Field when needed.
_Encoder = Callable[[InfoLayout, str, Any, _Writer], None]


def _field(layout: InfoLayout, name: str) -> Field:
    for f in layout.fields:
        if f.name == name:
            return f
    raise AssertionError(name)  # pragma: no cover


def _enc_u32(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += _U32.pack(v)


def _enc_u64(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += _U64.pack(v)


def _enc_uuid(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += v.bytes if isinstance(v, UUID) else UUID(str(v)).bytes


def _enc_ipv4(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += IPv4Address(v).packed


def _enc_ipv6(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += IPv6Address(v).packed


def _enc_string(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    if not isinstance(v, str):
        raise InfoBufferError(f"{lay.name}.{name}: expected a string, got {v!r}")
    w.ref(v.encode("utf-16-le"))


def _enc_ref_bytes(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.ref(bytes(v))


def _enc_bytes(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    size = _field(lay, name).size
    if len(v) != size:
        raise InfoBufferError(f"{lay.name}.{name}: needs {size} bytes, got {len(v)}")
    w.fixed += bytes(v)


def _enc_unsized(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.data += bytes(v)  # the rest of the buffer, unpadded


def _enc_u32_array(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += struct.pack(f"<{len(v)}I", *v)


def _enc_struct(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    # An inline struct is flattened into its parent: its data goes to the parent's area.
    sub = _field(lay, name).struct
    assert sub is not None
    _encode_fields(sub, v, w)


def _enc_struct_array(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    sub = _field(lay, name).struct
    assert sub is not None
    blob = b"".join(encode(sub, item) for item in v)
    w.fixed += _U32.pack(w.add_data(blob) if v else 0)


def _enc_ref_struct_array(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    sub = _field(lay, name).struct
    assert sub is not None
    for item in v:
        w.ref(encode(sub, item))


def _enc_string_array(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    for item in v:
        _enc_string(lay, name, item, w)


def _enc_ref_ipv4(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += _U32.pack(0 if v is None else w.add_data(IPv4Address(v).packed))


def _enc_ref_ipv6(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    w.fixed += _U32.pack(0 if v is None else w.add_data(IPv6Address(v).packed))


def _enc_ipv4_array(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    blob = b"".join(IPv4Address(a).packed for a in v)
    w.fixed += _U32.pack(w.add_data(blob) if v else 0)


def _enc_ipv6_array(lay: InfoLayout, name: str, v: Any, w: _Writer) -> None:
    blob = b"".join(IPv6Address(a).packed for a in v)
    w.fixed += _U32.pack(w.add_data(blob) if v else 0)


_ENCODERS: dict[Kind, _Encoder] = {
    Kind.U32: _enc_u32, Kind.U64: _enc_u64, Kind.UUID: _enc_uuid, Kind.IPV4: _enc_ipv4,
    Kind.IPV6: _enc_ipv6, Kind.STRING: _enc_string, Kind.U32_ARRAY: _enc_u32_array,
    Kind.BYTE_ARRAY: _enc_bytes, Kind.REF_BYTE_ARRAY: _enc_ref_bytes,
    Kind.UNSIZED_BYTE_ARRAY: _enc_unsized, Kind.STRUCT: _enc_struct,
    Kind.STRUCT_ARRAY: _enc_struct_array, Kind.REF_STRUCT_ARRAY: _enc_ref_struct_array,
    Kind.STRING_ARRAY: _enc_string_array, Kind.REF_IPV4: _enc_ref_ipv4,
    Kind.REF_IPV6: _enc_ref_ipv6, Kind.IPV4_ARRAY: _enc_ipv4_array,
    Kind.IPV6_ARRAY: _enc_ipv6_array,
}


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


def decode(layout: InfoLayout, buf: bytes | memoryview) -> dict[str, Any]:
    """Decode an information buffer; trailing bytes after the items are allowed."""
    return _decode_fields(layout, _Reader(buf))


def _decode_fields(layout: InfoLayout, r: _Reader) -> dict[str, Any]:
    counts: dict[str, int] = {}
    out: dict[str, Any] = {}
    for f, is_count, decoder in layout.decode_steps:
        if is_count:
            counts[f.name] = r.u32(f.name)
        else:
            out[f.name] = decoder(f, counts[f.count] if f.count is not None else 0, r)
    return out


_Decoder = Callable[[Field, int, _Reader], Any]


def _check_count(f: Field, count: int, elem_size: int, r: _Reader) -> None:
    # A count that cannot fit in the buffer is rejected before any loop runs over it.
    if count * max(elem_size, 1) > len(r.buf):
        raise InfoBufferError(f"{f.name}: count {count} cannot fit in {len(r.buf)} bytes")


def _string_at(blob: memoryview, what: str) -> str:
    if len(blob) % 2:
        raise InfoBufferError(f"{what}: odd UTF-16 size {len(blob)}")
    try:
        return bytes(blob).decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise InfoBufferError(f"{what}: bad UTF-16: {e}") from e


def _dec_u32(f: Field, count: int, r: _Reader) -> Any:
    value = r.u32(f.name)
    if f.enum is None:
        return value
    try:
        return f.enum(value)
    except ValueError:
        raise InfoBufferError(f"{f.name}: {value} is not a {f.enum.__name__}") from None


def _dec_u64(f: Field, count: int, r: _Reader) -> Any:
    return int(_U64.unpack(r.take(8, f.name))[0])


def _dec_uuid(f: Field, count: int, r: _Reader) -> Any:
    return UUID(bytes=bytes(r.take(16, f.name)))


def _dec_ipv4(f: Field, count: int, r: _Reader) -> Any:
    return IPv4Address(bytes(r.take(4, f.name)))


def _dec_ipv6(f: Field, count: int, r: _Reader) -> Any:
    return IPv6Address(bytes(r.take(16, f.name)))


def _dec_string(f: Field, count: int, r: _Reader) -> Any:
    off, size = _PAIR.unpack(r.take(8, f.name))
    return _string_at(r.at(off, size, f.name), f.name)


def _dec_ref_bytes(f: Field, count: int, r: _Reader) -> Any:
    off, size = _PAIR.unpack(r.take(8, f.name))
    return bytes(r.at(off, size, f.name))


def _dec_bytes(f: Field, count: int, r: _Reader) -> Any:
    return bytes(r.take(f.size, f.name))


def _dec_unsized(f: Field, count: int, r: _Reader) -> Any:
    return bytes(r.take(len(r.buf) - r.pos, f.name))


def _dec_u32_array(f: Field, count: int, r: _Reader) -> Any:
    _check_count(f, count, 4, r)
    return list(struct.unpack(f"<{count}I", r.take(4 * count, f.name)))


def _dec_struct(f: Field, count: int, r: _Reader) -> Any:
    assert f.struct is not None
    return _decode_fields(f.struct, r)


def _dec_struct_array(f: Field, count: int, r: _Reader) -> Any:
    assert f.struct is not None
    off = r.u32(f.name)
    elem = f.struct.min_size
    _check_count(f, count, elem, r)
    if count == 0:
        return []
    blob = r.at(off, elem * count, f.name)
    return [decode(f.struct, blob[i * elem:(i + 1) * elem]) for i in range(count)]


def _dec_ref_struct_array(f: Field, count: int, r: _Reader) -> Any:
    assert f.struct is not None
    _check_count(f, count, 8, r)
    items = []
    for _ in range(count):
        off, size = _PAIR.unpack(r.take(8, f.name))
        items.append(decode(f.struct, r.at(off, size, f.name)))
    return items


def _dec_string_array(f: Field, count: int, r: _Reader) -> Any:
    _check_count(f, count, 8, r)
    return [_dec_string(f, 0, r) for _ in range(count)]


def _dec_ref_ipv4(f: Field, count: int, r: _Reader) -> Any:
    off = r.u32(f.name)
    return None if off == 0 else IPv4Address(bytes(r.at(off, 4, f.name)))


def _dec_ref_ipv6(f: Field, count: int, r: _Reader) -> Any:
    off = r.u32(f.name)
    return None if off == 0 else IPv6Address(bytes(r.at(off, 16, f.name)))


def _dec_address_array(f: Field, count: int, r: _Reader) -> Any:
    v4 = f.kind is Kind.IPV4_ARRAY
    size = 4 if v4 else 16
    off = r.u32(f.name)
    _check_count(f, count, size, r)
    if count == 0:
        return []
    blob = bytes(r.at(off, size * count, f.name))
    cls = IPv4Address if v4 else IPv6Address
    return [cls(blob[i:i + size]) for i in range(0, size * count, size)]


_DECODERS: dict[Kind, _Decoder] = {
    Kind.U32: _dec_u32, Kind.U64: _dec_u64, Kind.UUID: _dec_uuid, Kind.IPV4: _dec_ipv4,
    Kind.IPV6: _dec_ipv6, Kind.STRING: _dec_string, Kind.U32_ARRAY: _dec_u32_array,
    Kind.BYTE_ARRAY: _dec_bytes, Kind.REF_BYTE_ARRAY: _dec_ref_bytes,
    Kind.UNSIZED_BYTE_ARRAY: _dec_unsized, Kind.STRUCT: _dec_struct,
    Kind.STRUCT_ARRAY: _dec_struct_array, Kind.REF_STRUCT_ARRAY: _dec_ref_struct_array,
    Kind.STRING_ARRAY: _dec_string_array, Kind.REF_IPV4: _dec_ref_ipv4,
    Kind.REF_IPV6: _dec_ref_ipv6, Kind.IPV4_ARRAY: _dec_address_array,
    Kind.IPV6_ARRAY: _dec_address_array,
}
assert set(_ENCODERS) == set(_DECODERS) == set(Kind)

EMPTY = InfoLayout("Empty")
