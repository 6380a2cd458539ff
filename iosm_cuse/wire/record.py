"""Fixed-size little-endian records declared once, as data.

A `Record` is a table of `Field`s (name, offset, struct format, optional bit range or array
count). From the table it derives one precompiled `struct.Struct` for whole-record pack/unpack and
one per field for single-field access. The IOSM IPC layouts (`wire/ipc.py`), the MUX codecs and
the CUSE wire structs (`chardev/cuse.py`) are all tables of this one kind.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    fmt: str  # one struct code: B H I Q or "<n>s"
    bits: tuple[int, int] | None = None  # (shift, width) inside the container at `offset`
    count: int = 1  # > 1: an array of `count` consecutive elements

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt) * self.count


@dataclass
class Record:
    """A fixed-size little-endian record."""

    name: str
    size: int
    fields: list[Field]
    _one: dict[str, struct.Struct] = field(init=False, repr=False)
    _by_name: dict[str, Field] = field(init=False, repr=False)
    _whole: struct.Struct = field(init=False, repr=False)
    _slots: list[tuple[int, list[Field]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {f.name: f for f in self.fields}
        self._one = {f.name: struct.Struct("<" + f.fmt) for f in self.fields}
        # containers: fields sharing one offset (bit fields) share one struct slot
        groups: dict[int, list[Field]] = {}
        for f in self.fields:
            if f.count != 1:
                continue
            groups.setdefault(f.offset, []).append(f)
        fmt, pos, slots = "<", 0, []
        for off in sorted(groups):
            members = groups[off]
            if off < pos:
                raise ValueError(f"{self.name}: field {members[0].name} overlaps")
            fmt += f"{off - pos}x" if off > pos else ""
            fmt += members[0].fmt
            pos = off + members[0].size
            slots.append((off, members))
        if pos > self.size:
            raise ValueError(f"{self.name}: fields end at {pos}, beyond size {self.size}")
        self._whole = struct.Struct(fmt + (f"{self.size - pos}x" if self.size > pos else ""))
        self._slots = slots

    @classmethod
    def sequential(cls, name: str, *fields: tuple[str, str]) -> Record:
        """A C struct written in declaration order, as (name, struct code) pairs: offsets follow
        from the sizes. A name starting with "_" is reserved (packed as zero, never returned) and
        a code ending in "x" is padding."""
        out, pos = [], 0
        for fname, code in fields:
            size = struct.calcsize("<" + code)
            if not fname.startswith("_") and not code.endswith("x"):
                out.append(Field(fname, pos, code))
            pos += size
        return cls(name, pos, out)

    @property
    def record(self) -> struct.Struct:
        """The whole record as one Struct whose arguments are the fields in offset order, for
        hot paths; only for layouts without bit fields or arrays."""
        if any(f.bits is not None or f.count != 1 for f in self.fields):
            raise ValueError(f"{self.name}: has bit fields or arrays; use pack/unpack")
        return self._whole

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    def offset_of(self, name: str, index: int = 0) -> int:
        f = self._by_name[name]
        return f.offset + index * (f.size // f.count)

    # -- whole records

    def pack(self, **values: Any) -> bytes:
        buf = bytearray(self.size)
        self.pack_into(buf, 0, **values)
        return bytes(buf)

    def pack_into(self, buf: Buffer, offset: int, /, **values: Any) -> None:
        """Write the whole record; missing fields (and reserved bytes) become zero."""
        unknown = set(values) - set(self._by_name)
        if unknown:
            raise KeyError(f"{self.name}: no field {sorted(unknown)}")
        args: list[Any] = []
        for _off, members in self._slots:
            first = members[0]
            if first.bits is None:
                args.append(values.get(first.name, b"" if first.fmt.endswith("s") else 0))
                continue
            word = 0
            for m in members:
                assert m.bits is not None
                shift, width = m.bits
                word |= (int(values.get(m.name, 0)) & ((1 << width) - 1)) << shift
            args.append(word)
        self._whole.pack_into(buf, offset, *args)

    def unpack(self, buf: Buffer, offset: int = 0) -> dict[str, Any]:
        """All scalar fields as a dict (arrays are read with `get(name, index)`)."""
        raw = self._whole.unpack_from(buf, offset)
        out: dict[str, Any] = {}
        for (_off, members), val in zip(self._slots, raw, strict=True):
            for m in members:
                if m.bits is None:
                    out[m.name] = val
                else:
                    shift, width = m.bits
                    out[m.name] = (val >> shift) & ((1 << width) - 1)
        return out

    # -- single fields

    def get(self, buf: Buffer, offset: int, name: str, index: int = 0) -> Any:
        f = self._by_name[name]
        val = self._one[name].unpack_from(buf, offset + self.offset_of(name, index))[0]
        if f.bits is not None:
            shift, width = f.bits
            return (val >> shift) & ((1 << width) - 1)
        return val

    def set(self, buf: Buffer, offset: int, name: str, value: Any, index: int = 0) -> None:
        f = self._by_name[name]
        at = offset + self.offset_of(name, index)
        if f.bits is not None:
            shift, width = f.bits
            mask = ((1 << width) - 1) << shift
            old = self._one[name].unpack_from(buf, at)[0]
            value = (old & ~mask) | ((int(value) << shift) & mask)
        self._one[name].pack_into(buf, at, value)
