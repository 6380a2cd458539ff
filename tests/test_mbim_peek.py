"""The MBIM peeks the ports use (mbim.message): the PTY framer's stream length, the port's OPEN
MaxControlTransfer, a COMMAND's service and CID for the loopback's answers, and the name of an
answer's kind that port_alone and bench/hostile.py count by.

Each takes untrusted bytes: a truncated, oversized or wrong-typed message is rejected (None, or
the codec's MessageError), never any other exception.
"""

from __future__ import annotations

import contextlib
import struct
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.chardev.loopback import answer_open
from iosm_cuse.mbim.constants import CommandType, MessageType, ProtocolError, Status
from iosm_cuse.mbim.message import (
    Close,
    CloseDone,
    Command,
    CommandDone,
    FunctionError,
    IndicateStatus,
    MessageError,
    Open,
    command_target,
    describe_transfer,
    encode_message,
    fragment,
    open_max_control_transfer,
    stream_message_length,
)
from iosm_cuse.mbim.uuids import Service

OPEN = encode_message(Open(7, 4096))
COMMAND = encode_message(Command(9, Service.BASIC_CONNECT.value, 1, CommandType.QUERY, b""))
HDR = struct.Struct("<III")


# ---- stream_message_length


def test_stream_length_of_each_message_at_any_offset() -> None:
    stream = b"junk" + OPEN + COMMAND
    assert stream_message_length(stream, 4, 4096) == 16
    assert stream_message_length(stream, 20, 4096) == len(COMMAND)


@pytest.mark.parametrize("n", range(8))
def test_stream_length_waits_for_eight_bytes(n: int) -> None:
    assert stream_message_length(OPEN[:n], 0, 4096) is None
    assert stream_message_length(b"x" + OPEN[:n], 1, 4096) is None


@pytest.mark.parametrize(("head", "error"), [
    (struct.pack("<II", 0x12345678, 16), ProtocolError.UNKNOWN),          # wrong type
    (struct.pack("<II", MessageType.OPEN, 11), ProtocolError.LENGTH_MISMATCH),  # below a header
    (struct.pack("<II", MessageType.OPEN, 4097), ProtocolError.LENGTH_MISMATCH),  # oversized
    (struct.pack("<II", MessageType.COMMAND, 0xFFFFFFFF), ProtocolError.LENGTH_MISMATCH),
])
def test_stream_length_rejects_what_starts_no_message(head: bytes, error: ProtocolError) -> None:
    with pytest.raises(MessageError) as info:
        stream_message_length(head, 0, 4096)
    assert info.value.error is error


def test_stream_length_bounds_are_inclusive() -> None:
    assert stream_message_length(struct.pack("<II", MessageType.CLOSE, 12), 0, 100) == 12
    assert stream_message_length(struct.pack("<II", MessageType.CLOSE, 100), 0, 100) == 100


# ---- open_max_control_transfer


def test_open_max_control_transfer_of_an_open() -> None:
    assert open_max_control_transfer(OPEN) == 4096
    assert open_max_control_transfer(encode_message(Open(1, 64))) == 64


@pytest.mark.parametrize("data", [
    OPEN[:15],                                                 # truncated
    OPEN[:4],
    b"",
    HDR.pack(MessageType.OPEN, 17, 1) + b"\0\x10\0\0\0",        # oversized
    OPEN + b"\0",
    HDR.pack(MessageType.OPEN, 20, 1) + b"\0\x10\0\0",          # MessageLength disagrees
    HDR.pack(MessageType.CLOSE, 16, 1) + b"\0\x10\0\0",         # wrong type, right size
    HDR.pack(MessageType.HOST_ERROR, 16, 1) + b"\0\x10\0\0",
    encode_message(Close(1)),
    COMMAND,
], ids=["truncated", "header-only", "empty", "oversized", "trailing", "length", "close-sized",
        "host-error", "close", "command"])
def test_open_max_control_transfer_rejects_anything_else(data: bytes) -> None:
    assert open_max_control_transfer(data) is None


# ---- command_target


def test_command_target_of_a_whole_command_and_of_a_first_fragment() -> None:
    want = (Service.BASIC_CONNECT.value, 1)
    assert command_target(COMMAND) == want
    big = encode_message(Command(4, UUID(int=5), 77, CommandType.SET, bytes(300)))
    first, *rest = fragment(big, 100)
    assert command_target(first) == (UUID(int=5), 77)
    with pytest.raises(MessageError) as info:
        command_target(rest[0])
    assert info.value.error is ProtocolError.FRAGMENT_OUT_OF_SEQUENCE


@pytest.mark.parametrize(("data", "error"), [
    (COMMAND[:47], ProtocolError.LENGTH_MISMATCH),         # truncated body
    (COMMAND[:11], ProtocolError.LENGTH_MISMATCH),         # not even a header
    (OPEN, ProtocolError.UNKNOWN),                         # wrong type
    (HDR.pack(MessageType.COMMAND_DONE, 48, 1) + COMMAND[12:], ProtocolError.UNKNOWN),
])
def test_command_target_rejects(data: bytes, error: ProtocolError) -> None:
    with pytest.raises(MessageError) as info:
        command_target(data)
    assert info.value.error is error


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([int(t) for t in MessageType] + [0, 0x99]),
       st.integers(0, 0xFFFFFFFF))
def test_no_peek_raises_anything_but_the_codecs_error(tail: bytes, mtype: int,
                                                      length: int) -> None:
    for data in (tail, struct.pack("<II", mtype, length) + tail):
        mct = open_max_control_transfer(data)
        assert mct is None or (len(data) == 16 and mtype == MessageType.OPEN and length == 16)
        with contextlib.suppress(MessageError):
            stream_message_length(data, 0, 65536)
        with contextlib.suppress(MessageError):
            command_target(data)
        assert isinstance(answer_open(data), list)
        assert isinstance(describe_transfer(data), str)


# ---- describe_transfer


def test_describe_transfer_names_the_type_and_its_code() -> None:
    bc = Service.BASIC_CONNECT.value
    done = encode_message(CommandDone(3, bc, 1, Status.NO_DEVICE_SUPPORT, bytes(300)))
    assert describe_transfer(done) == "COMMAND_DONE NO_DEVICE_SUPPORT"
    assert describe_transfer(fragment(done, 128)[0]) == "COMMAND_DONE NO_DEVICE_SUPPORT"
    assert describe_transfer(fragment(done, 128)[1]) == "COMMAND_DONE fragment"
    assert describe_transfer(encode_message(FunctionError(4, ProtocolError.LENGTH_MISMATCH))) \
        == "FUNCTION_ERROR LENGTH_MISMATCH"
    assert describe_transfer(encode_message(CloseDone(5, 77))) == "CLOSE_DONE 77"
    assert describe_transfer(encode_message(IndicateStatus(0, bc, 2))) == "INDICATE_STATUS"
    assert describe_transfer(OPEN) == "OPEN"
    assert describe_transfer(OPEN[:11]) == "unreadable"
    assert describe_transfer(HDR.pack(0x99, 12, 1)) == "type 0x99"
    assert describe_transfer(HDR.pack(MessageType.COMMAND_DONE, 24, 1) + bytes(12)) \
        == "COMMAND_DONE truncated"


# ---- the loopback's answers, built by the codec: the same bytes as the hand-built ones were


def test_loopback_answers_are_byte_for_byte_the_done_messages() -> None:
    assert answer_open(OPEN) == [HDR.pack(MessageType.OPEN_DONE, 16, 7) + bytes(4)]
    assert answer_open(encode_message(Close(8))) == [
        HDR.pack(MessageType.CLOSE_DONE, 16, 8) + bytes(4)]
    body = struct.pack("<II", 1, 0) + COMMAND[20:40] + struct.pack("<II", 0, 0)
    assert answer_open(COMMAND) == [HDR.pack(MessageType.COMMAND_DONE, 12 + len(body), 9) + body]
    assert answer_open(COMMAND[:40]) == [] and answer_open(b"\x01") == []
