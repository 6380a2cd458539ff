"""The sans-IO CUSE codec: struct sizes from fuse.h, round trips, and untrusted bytes."""

from __future__ import annotations

import asyncio
import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.chardev import cuse
from iosm_cuse.chardev.cuse import Op
from iosm_cuse.chardev.loopback import LoopbackOpener, answer_open
from iosm_cuse.chardev.port import MbimPort
from iosm_cuse.chardev.server import CuseSession

# Sizes checked with gcc against include/uapi/linux/fuse.h (docs/cuse.md §3).
SIZES = {"in_header": 40, "out_header": 16, "cuse_init_in": 16, "cuse_init_out": 72,
         "open_in": 8, "open_out": 16, "read_in": 40, "write_in": 40, "write_out": 8,
         "flush_in": 24, "release_in": 24, "fsync_in": 16, "ioctl_in": 32, "ioctl_out": 16,
         "ioctl_iovec": 16, "poll_in": 24, "poll_out": 8, "notify_poll_wakeup_out": 8,
         "interrupt_in": 8}


def test_struct_sizes_match_fuse_h() -> None:
    assert {name: lay.size for name, lay in cuse.LAYOUTS.items()} == SIZES


def test_every_opcode_round_trips() -> None:
    for opcode, (cls, layout, _, take) in cuse.OPCODES.items():
        body = ({f.name: i + 3 for i, f in enumerate(cuse.LAYOUTS[layout].fields)}
                if layout else {})
        data = b""
        if opcode == Op.WRITE:
            body["size"], data = 5, b"hello"
        if opcode == Op.IOCTL:
            body["in_size"], data = 2, b"io"
        ev = cuse.decode_request(cuse.encode_request(opcode, 42, body, data))
        assert isinstance(ev, cls) and ev.unique == 42 and opcode == ev.OPCODE
        for f in take:
            assert getattr(ev, f) == body[f]


def test_replies_are_exactly_framed() -> None:
    assert cuse.reply_error(8, errno.EAGAIN) == cuse.OUT_HEADER.pack(len=16, error=-11, unique=8)
    note = cuse.decode_reply(cuse.notify_poll(0xABC))
    assert (note.unique, note.error, note.body) == (0, 1, (0xABC).to_bytes(8, "little"))
    init = cuse.reply_init(2, "wwan0mbim0")
    assert len(init) == 16 + 72 + len(b"DEVNAME=wwan0mbim0\0")
    retry = cuse.decode_reply(cuse.reply_ioctl_retry(4, [(0x1000, 2)]))
    assert len(retry.body) == 16 + 16


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_never_raises(data: bytes) -> None:
    ev = cuse.decode_request(data)
    if isinstance(ev, cuse.Rejected):
        assert ev.errno in (errno.EINVAL, errno.ENOSYS)
        assert ev.unique is None or len(data) >= 40


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([*sorted(cuse.OPCODES), 0, 999]),
                          st.binary(max_size=64), st.booleans()), max_size=12))
def test_session_answers_garbage_with_valid_replies(reqs: list[tuple[int, bytes, bool]]) -> None:
    """Any mix of well-headed and mangled requests: the session never raises, and everything
    it writes is one well-formed reply or notification."""
    async def body() -> list[bytes]:
        out: list[bytes] = []
        session = CuseSession(MbimPort(LoopbackOpener(answer_open)), out.append)
        for i, (opcode, payload, honest) in enumerate(reqs):
            raw = cuse.IN_HEADER.pack(len=40 + len(payload), opcode=opcode, unique=2 * i + 2)
            raw += payload
            session.handle(raw if honest else raw[:-1] if payload else raw + b"\0")
            await asyncio.sleep(0)
        session.shutdown()
        await session.wait_closed()
        return out
    for reply in asyncio.run(body()):
        r = cuse.decode_reply(reply)
        assert (r.unique == 0 and r.error == cuse.FUSE_NOTIFY_POLL) or -1000 < r.error <= 0
