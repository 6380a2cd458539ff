"""The MBIM codec: information buffers driven by the CID tables, messages and fragments."""

from __future__ import annotations

import contextlib
import struct
from enum import IntFlag
from ipaddress import IPv4Address, IPv6Address
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.constants import MessageType, ProtocolError
from iosm_cuse.mbim.infobuf import InfoBufferError, InfoLayout, Kind
from iosm_cuse.mbim.message import (
    Close,
    CloseDone,
    Command,
    CommandDone,
    Fragment,
    FragmentCollector,
    FragmentError,
    FunctionError,
    HostError,
    IndicateStatus,
    MessageError,
    Open,
    OpenDone,
    decode_message,
    decode_transfer,
    encode_message,
    fragment,
)
from iosm_cuse.mbim.uuids import ContextType, Service

U32 = st.integers(0, 0xFFFFFFFF)
TEXT = st.text(max_size=12)


def values_for(layout: InfoLayout) -> st.SearchStrategy[dict[str, Any]]:
    """Any value dict the layout can carry (count fields are implied by the arrays)."""
    return st.fixed_dictionaries({f.name: _field_values(f) for f in layout.fields
                                  if f.name not in layout.count_fields})


def _field_values(f: infobuf.Field) -> st.SearchStrategy[Any]:
    k = f.kind
    if f.enum is not None and not issubclass(f.enum, IntFlag):
        # Only the enum's members round-trip; the rest is rejected (test_mbim_enums.py).
        return st.sampled_from(list(f.enum))
    simple: dict[Kind, st.SearchStrategy[Any]] = {
        Kind.U32: U32, Kind.U64: st.integers(0, 2**64 - 1), Kind.UUID: st.uuids(),
        Kind.IPV4: st.ip_addresses(v=4), Kind.IPV6: st.ip_addresses(v=6), Kind.STRING: TEXT,
        Kind.U32_ARRAY: st.lists(U32, max_size=4), Kind.REF_BYTE_ARRAY: st.binary(max_size=9),
        Kind.UNSIZED_BYTE_ARRAY: st.binary(max_size=9),
        Kind.BYTE_ARRAY: st.binary(min_size=f.size, max_size=f.size),
        Kind.STRING_ARRAY: st.lists(TEXT, max_size=3),
        Kind.REF_IPV4: st.none() | st.ip_addresses(v=4),
        Kind.REF_IPV6: st.none() | st.ip_addresses(v=6),
        Kind.IPV4_ARRAY: st.lists(st.ip_addresses(v=4), max_size=3),
        Kind.IPV6_ARRAY: st.lists(st.ip_addresses(v=6), max_size=3),
    }
    if k in simple:
        return simple[k]
    assert f.struct is not None
    if k is Kind.STRUCT:
        return values_for(f.struct)
    return st.lists(values_for(f.struct), max_size=3)


LAYOUTS = sorted({layout for spec in cids.CIDS
                  for layout in (spec.set, spec.query, spec.response, spec.notification)
                  if layout is not None}, key=lambda lay: lay.name)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_declared_layout_round_trips(layout: InfoLayout, data: st.DataObject) -> None:
    values = data.draw(values_for(layout))
    encoded = infobuf.encode(layout, values)
    assert len(encoded) % 4 == 0 or any(f.kind is Kind.UNSIZED_BYTE_ARRAY for f in layout.fields)
    assert len(encoded) >= layout.min_size
    assert infobuf.decode(layout, encoded) == values


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoding_untrusted_bytes_fails_cleanly(layout: InfoLayout, data: st.DataObject) -> None:
    """Random or mutated buffers decode or raise InfoBufferError, nothing else."""
    valid = infobuf.encode(layout, data.draw(values_for(layout)))
    blob = data.draw(st.one_of(
        st.binary(max_size=200),
        st.builds(lambda cut: valid[:cut], st.integers(0, max(len(valid) - 1, 0))),
        st.builds(lambda i, b: valid[:i] + bytes([b]) + valid[i + 1:],
                  st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 255)),
        st.builds(lambda i, v: valid[:i] + struct.pack("<I", v) + valid[i + 4:],
                  st.integers(0, max(len(valid) - 4, 0)), U32),
    ))
    with contextlib.suppress(InfoBufferError):
        infobuf.decode(layout, blob)


def test_string_layout_matches_libmbim_rules() -> None:
    # As libmbim encodes it: proxy CONFIGURATION for /dev/null is offset 0x0c, size 0x12,
    # timeout 30; UTF-16LE without NUL, padded to 4 bytes, padding not counted.
    encoded = infobuf.encode(cids.PROXY_CONFIGURATION, {"DevicePath": "/dev/null", "Timeout": 30})
    assert encoded[:12] == struct.pack("<III", 0x0C, 0x12, 0x1E)
    assert encoded[12:30] == "/dev/null".encode("utf-16-le")
    assert encoded[30:] == b"\0\0"
    # empty strings are offset 0, size 0, with nothing in the data area
    empty = infobuf.encode(cids.REGISTER_STATE_SET,
                           {"ProviderId": "", "RegisterAction": 0, "DataClass": 0})
    assert empty == bytes(16)


# Bytes written by Debian's mbimcli 1.28.2 (captured from tests/test_mbim_host.py's PTY).
MBIMCLI_OPEN = "01000000100000000100000000100000"
MBIMCLI_CLOSE = "020000000c00000003000000"
MBIMCLI_ATTACH = ("0300000034000000020000000100000000000000a289cc33bcbb8b4fb6b0133ec2aae6df"
                  "0a000000010000000400000000000000")
MBIMCLI_CONNECT_PAP = (
    "030000008c000000020000000100000000000000a289cc33bcbb8b4fb6b0133ec2aae6df0c00000001000000"
    "5c00000001000000010000003c000000100000004c0000000800000054000000080000000000000001000000"
    "010000007e5e2a7e4e6f7272736b656e7e5e2a7e69006e007400650072006e0065007400750073006500720070"
    "00610073007300")
MBIMCLI_IP_CONFIG_QUERY = (
    "030000006c000000030000000100000000000000a289cc33bcbb8b4fb6b0133ec2aae6df0f00000000000000"
    "3c000000" + "01000000" + "00" * 56)
MBIMCLI_ENTER_PIN = (
    "0300000050000000020000000100000000000000a289cc33bcbb8b4fb6b0133ec2aae6df0400000001000000"
    "200000000200000000000000180000000800000000000000000000003100320033003400")
BC = Service.BASIC_CONNECT.value


def _command(cid: int, command_type: int, layout: InfoLayout, values: dict[str, Any],
             tid: int = 2) -> bytes:
    return encode_message(Command(tid, BC, cid, command_type, infobuf.encode(layout, values)))


def test_encoder_reproduces_mbimcli_bytes() -> None:
    assert encode_message(Open(1, 4096)).hex() == MBIMCLI_OPEN
    assert encode_message(Close(3)).hex() == MBIMCLI_CLOSE
    assert _command(10, 1, cids.PACKET_SERVICE_SET, {"PacketServiceAction": 0}).hex() \
        == MBIMCLI_ATTACH
    connect = {"SessionId": 1, "ActivationCommand": 1, "AccessString": "internet",
               "UserName": "user", "Password": "pass", "Compression": 0, "AuthProtocol": 1,
               "IpType": 1, "ContextType": ContextType.INTERNET.value}
    assert _command(12, 1, cids.CONNECT_SET, connect).hex() == MBIMCLI_CONNECT_PAP
    query = {"SessionId": 1, "IPv4ConfigurationAvailable": 0, "IPv6ConfigurationAvailable": 0,
             "IPv4Address": [], "IPv6Address": [], "IPv4Gateway": None, "IPv6Gateway": None,
             "IPv4DnsServer": [], "IPv6DnsServer": [], "IPv4Mtu": 0, "IPv6Mtu": 0}
    assert _command(15, 0, cids.IP_CONFIGURATION, query, tid=3).hex() == MBIMCLI_IP_CONFIG_QUERY
    pin = {"PinType": 2, "PinOperation": 0, "Pin": "1234", "NewPin": ""}
    assert _command(4, 1, cids.PIN_SET, pin).hex() == MBIMCLI_ENTER_PIN


def test_decoder_reads_mbimcli_bytes() -> None:
    msg = decode_message(bytes.fromhex(MBIMCLI_CONNECT_PAP))
    assert isinstance(msg, Command)
    assert (msg.tid, msg.service, msg.cid, msg.command_type) == (2, BC, 12, 1)
    values = infobuf.decode(cids.CONNECT_SET, msg.info)
    assert values["AccessString"] == "internet"
    assert (values["UserName"], values["Password"]) == ("user", "pass")
    assert values["ContextType"] == UUID("7e5e2a7e-4e6f-7272-736b-656e7e5e2a7e")


def test_ip_configuration_response_layout() -> None:
    values = {"SessionId": 0, "IPv4ConfigurationAvailable": 15, "IPv6ConfigurationAvailable": 0,
              "IPv4Address": [{"OnLinkPrefixLength": 24, "IPv4Address": IPv4Address("10.99.0.2")}],
              "IPv6Address": [], "IPv4Gateway": IPv4Address("10.99.0.1"), "IPv6Gateway": None,
              "IPv4DnsServer": [IPv4Address("10.99.0.1")], "IPv6DnsServer": [],
              "IPv4Mtu": 1500, "IPv6Mtu": 0}
    encoded = infobuf.encode(cids.IP_CONFIGURATION, values)
    fixed = struct.unpack_from("<15I", encoded)
    # 60-byte fixed part, then the address element, the gateway, the DNS array
    assert fixed[3:5] == (1, 60) and fixed[7] == 68 and fixed[9:11] == (1, 72)
    assert encoded[60:68] == struct.pack("<I", 24) + IPv4Address("10.99.0.2").packed
    assert fixed[5:7] == (0, 0) and fixed[8] == 0


@pytest.mark.parametrize("blob, reason", [
    (struct.pack("<6I", 0, 0, 0, 0, 0, 0) + struct.pack("<I", 0xFFFF) + bytes(8), "count"),
    (struct.pack("<IIIII", 0, 0x7FFFFFFF, 4, 0, 0) + bytes(16), "beyond"),
    (struct.pack("<IIIII", 0, 20, 3, 0, 0) + bytes(4), "odd UTF-16"),
    (b"\x01\x00", "needs 4 bytes"),
])
def test_bad_buffers_are_rejected_with_a_reason(blob: bytes, reason: str) -> None:
    with pytest.raises(InfoBufferError, match=reason):
        infobuf.decode(cids.SUBSCRIBER_READY_STATUS, blob)


def test_encode_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(InfoBufferError):
        infobuf.encode(cids.RADIO_STATE_SET, {"RadioState": 2**32})
    with pytest.raises(InfoBufferError):
        infobuf.encode(cids.RADIO_STATE_SET, {})


def test_layout_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="count field must precede"):
        InfoLayout("Bad", (infobuf.string_array("Items", count="ItemsCount"),
                       infobuf.u32("ItemsCount")))
    with pytest.raises(ValueError, match="unsized"):
        InfoLayout("Bad", (infobuf.unsized_byte_array("Rest"), infobuf.u32("After")))


# ---------------------------------------------------------------------------------- messages

MESSAGES = st.one_of(
    st.builds(Open, U32, U32), st.builds(Close, U32), st.builds(HostError, U32, U32),
    st.builds(OpenDone, U32, U32), st.builds(CloseDone, U32, U32),
    st.builds(FunctionError, U32, U32),
    st.builds(Command, U32, st.uuids(), U32, U32, st.binary(max_size=300)),
    st.builds(CommandDone, U32, st.uuids(), U32, U32, st.binary(max_size=300)),
    st.builds(IndicateStatus, U32, st.uuids(), U32, st.binary(max_size=300)),
)


@settings(deadline=None)   # a loaded shared machine is not a failure
@given(MESSAGES)
def test_messages_round_trip(msg: Any) -> None:
    data = encode_message(msg)
    assert struct.unpack_from("<III", data) == (msg.TYPE, len(data), msg.tid)
    assert decode_message(data) == msg


@settings(deadline=None)
@given(st.builds(CommandDone, U32, st.uuids(), U32, U32, st.binary(max_size=2000)),
       st.integers(24, 600))
def test_fragment_and_reassemble(msg: CommandDone, max_transfer: int) -> None:
    data = encode_message(msg)
    parts = fragment(data, max_transfer)
    assert all(len(p) <= max_transfer for p in parts)
    assert len(parts) == 1 or all(struct.unpack_from("<II", p, 12) == (len(parts), i)
                                  for i, p in enumerate(parts))
    collector = FragmentCollector()
    whole = None
    for p in parts:
        item = decode_transfer(p)
        if not isinstance(item, Fragment):
            whole = item
            continue
        result = collector.feed(item)
        assert result.errors == ()
        if result.message is not None:
            whole = decode_message(result.message)
    assert whole == msg


def _fragments(n: int = 3, tid: int = 9) -> list[Fragment]:
    msg = Command(tid, BC, 1, 0, bytes(range(200)))
    return [item for item in map(decode_transfer, fragment(encode_message(msg), 100))
            if isinstance(item, Fragment)][:n]


def test_reassembly_errors() -> None:
    f0, f1, f2 = _fragments()
    c = FragmentCollector()
    (err,) = c.feed(f1).errors            # must start at 0
    assert err.error is ProtocolError.FRAGMENT_OUT_OF_SEQUENCE and err.tid == 9
    assert c.feed(f0).errors == ()
    (err,) = c.feed(f2).errors            # 1 skipped
    assert err.error is ProtocolError.FRAGMENT_OUT_OF_SEQUENCE and c.started is None
    c.feed(f0)
    (err,) = c.feed(f0).errors            # same TID restarted
    assert err.error is ProtocolError.DUPLICATED_TID
    c.feed(f0)
    other = _fragments(tid=10)[0]
    result = c.feed(other)                # interrupted by another TID: the old one is lost
    assert [(e.error, e.tid) for e in result.errors] == [
        (ProtocolError.FRAGMENT_OUT_OF_SEQUENCE, 9)]
    assert c.started is not None
    expired = c.expire(now=5.0, timeout=1.25)
    assert isinstance(expired, FragmentError) and expired.error is ProtocolError.TIMEOUT_FRAGMENT
    small = FragmentCollector(max_size=150)
    small.feed(f0)
    (err,) = small.feed(f1).errors
    assert err.error is ProtocolError.MAX_TRANSFER


@pytest.mark.parametrize("data, error", [
    (b"\x01\x00\x00", ProtocolError.LENGTH_MISMATCH),
    (struct.pack("<IIII", 1, 17, 5, 4096), ProtocolError.LENGTH_MISMATCH),
    (struct.pack("<III", 0x42, 12, 5), ProtocolError.UNKNOWN),
    (struct.pack("<III", 1, 12, 5), ProtocolError.LENGTH_MISMATCH),
    (struct.pack("<IIIII", 3, 20, 5, 0, 0), ProtocolError.FRAGMENT_OUT_OF_SEQUENCE),
    (struct.pack("<IIIII", 3, 20, 5, 2, 2), ProtocolError.FRAGMENT_OUT_OF_SEQUENCE),
    (struct.pack("<IIIII", 3, 20, 5, 1, 0), ProtocolError.LENGTH_MISMATCH),
    (struct.pack("<IIIII16sIII", 3, 48, 5, 1, 0, BC.bytes, 1, 0, 4),
     ProtocolError.LENGTH_MISMATCH),
])
def test_invalid_messages(data: bytes, error: ProtocolError) -> None:
    with pytest.raises(MessageError) as e:
        decode_message(data)
    assert e.value.error is error
    assert e.value.tid == (None if len(data) < 12 else 5)


def test_uuids_are_network_byte_order() -> None:
    data = encode_message(Command(1, BC, 1, 0))
    assert data[20:36] == bytes.fromhex("a289cc33bcbb8b4fb6b0133ec2aae6df")
    assert Service.lookup(BC) is Service.BASIC_CONNECT
    assert Service.lookup(UUID(int=0)) is None
    assert MessageType(struct.unpack_from("<I", data)[0]) is MessageType.COMMAND
    assert IPv6Address("fd99::1").packed == infobuf.encode(
        InfoLayout("A", (infobuf.ipv6("A"),)), {"A": IPv6Address("fd99::1")})
