"""The shared fixed-record mechanism: C-struct order declarations and the hot-path Struct."""

import pytest

from iosm_cuse.wire.ipc import TD
from iosm_cuse.wire.record import Record


def test_sequential_offsets_skip_reserved_and_padding() -> None:
    lay = Record.sequential("s", ("a", "I"), ("_rsvd", "H"), ("b", "H"), ("c", "Q"), ("_", "8x"))
    assert [(f.name, f.offset) for f in lay.fields] == [("a", 0), ("b", 6), ("c", 8)]
    assert lay.size == 24
    raw = lay.pack(a=1, b=2, c=3)
    assert raw[4:6] == b"\0\0" and raw[16:] == bytes(8)
    assert lay.unpack(raw) == {"a": 1, "b": 2, "c": 3}
    # a field may be called "offset" (FUSE's read_in has one)
    off = Record.sequential("o", ("offset", "Q"))
    buf = bytearray(8)
    off.pack_into(buf, 0, offset=7)
    assert off.unpack(buf) == {"offset": 7}


def test_record_struct_is_refused_for_bit_fields() -> None:
    assert any(f.bits is not None for f in TD.fields)
    with pytest.raises(ValueError, match="bit fields"):
        _ = TD.record
    lay = Record.sequential("r", ("x", "B"), ("_", "3x"), ("y", "I"))
    assert lay.record.pack(1, 2) == lay.pack(x=1, y=2)
