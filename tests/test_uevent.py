"""The libudev monitor message codec (iosm_cuse/system/uevent.py, docs/modemmanager.md §2)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iosm_cuse.system import uevent
from iosm_cuse.system.uevent import UeventError, decode, encode, murmurhash2


def test_murmurhash2_smhasher_verification_value() -> None:
    """SMHasher's check of a 32-bit hash: hash the keys [], [0], [0,1], ... [0..254] with seed
    256-i, concatenate the results little-endian, hash that with seed 0. MurmurHash2's
    published verification value is 0x27864C1E."""
    key = bytes(range(256))
    hashes = b"".join(murmurhash2(key[:i], 256 - i).to_bytes(4, "little") for i in range(256))
    assert murmurhash2(hashes, 0) == 0x27864C1E


def test_murmurhash2_small_vectors() -> None:
    assert murmurhash2(b"") == 0  # h = 0 ^ len = 0 survives the final mix
    # Confirmed by systemd's own in-kernel filter: `udevadm monitor --subsystem-match=
    # wwan/wwan_port` passes our event only when these equal its hashes
    # (tests/test_announce_host.py).
    assert murmurhash2(b"wwan") == 0x69C7A6D9
    assert murmurhash2(b"net") == 0xA74D3CC8


def test_header_matches_a_hand_built_example() -> None:
    props = {"ACTION": "add", "DEVPATH": "/d", "SUBSYSTEM": "net", "SEQNUM": "1"}
    body = b"ACTION=add\0DEVPATH=/d\0SUBSYSTEM=net\0SEQNUM=1\0"
    assert len(body) == 45
    expected = (b"libudev\0"                      # prefix
                + bytes.fromhex("feedcafe")       # magic, big-endian
                + struct.pack("=III", 40, 40, 45)  # header size, offset, length: native
                + bytes.fromhex("a74d3cc8")       # MurmurHash2("net"), big-endian
                + bytes(4)                        # no DEVTYPE
                + bytes(8)                        # tag bloom filter
                + body)
    assert encode(props) == expected


def test_shortest_message_is_long_enough_for_receivers() -> None:
    """libudev drops a message whose properties are shorter than 32 bytes; the required
    properties alone make sure ours never are."""
    data = encode({"ACTION": "add", "DEVPATH": "/", "SUBSYSTEM": "x", "SEQNUM": "1"})
    assert len(data) - uevent.HEADER_SIZE >= uevent.MIN_PROPERTIES
    with pytest.raises(UeventError):
        decode(data[:uevent.HEADER_SIZE] + b"ACTION=add\0")


@pytest.mark.parametrize("props", [
    {"DEVPATH": "/d", "SUBSYSTEM": "net", "SEQNUM": "1"},
    {"ACTION": "add", "DEVPATH": "/d", "SUBSYSTEM": "net", "SEQNUM": "1", "A=B": "c"},
    {"ACTION": "add", "DEVPATH": "/d", "SUBSYSTEM": "net", "SEQNUM": "1", "K": "v\0"},
    {"ACTION": "add", "DEVPATH": "/d", "SUBSYSTEM": "net", "SEQNUM": "1", "K": "v" * 9000},
])
def test_unsendable_properties_refused(props: dict[str, str]) -> None:
    with pytest.raises(UeventError):
        encode(props)


_key = st.text(st.characters(codec="utf-8", exclude_characters="=\0"), min_size=1, max_size=20)
_value = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)


@given(st.dictionaries(_key, _value, max_size=12), st.sampled_from(["wwan", "net", "usb"]),
       st.one_of(st.none(), st.sampled_from(["wwan_port", "usb_interface"])))
def test_round_trip(extra: dict[str, str], subsystem: str, devtype: str | None) -> None:
    props = {"ACTION": "add", "DEVPATH": "/devices/x", "SUBSYSTEM": subsystem, "SEQNUM": "7"}
    if devtype:
        props["DEVTYPE"] = devtype
    props.update({k: v for k, v in extra.items() if k not in props})
    msg = decode(encode(props))
    assert msg.props == {k: v for k, v in props.items()}
    assert msg.subsystem_hash == murmurhash2(subsystem.encode())
    assert msg.devtype_hash == (murmurhash2(devtype.encode()) if devtype else 0)


@given(st.binary(max_size=200))
def test_decoder_refuses_garbage_with_its_own_error(data: bytes) -> None:
    for candidate in (data, encode({"ACTION": "add", "DEVPATH": "/", "SUBSYSTEM": "x",
                                    "SEQNUM": "1"})[:40] + data):
        with contextlib.suppress(UeventError):
            decode(candidate)


def test_the_two_ports_as_modemmanager_wants_them() -> None:
    ports = uevent.Ports("wwan1", "wwan1mbim0", 10, 123, 5)
    port = uevent.port_event(ports, "add", 9, 100)
    assert port["SUBSYSTEM"] == "wwan" and port["DEVTYPE"] == "wwan_port"
    assert port["DEVNAME"] == "/dev/wwan1mbim0" and port["DEVPATH"].endswith("/wwan1mbim0")
    assert (port["MAJOR"], port["MINOR"]) == ("10", "123")
    assert port["ID_MM_PORT_TYPE_MBIM"] == port["ID_MM_CANDIDATE"] == "1"
    assert port["ID_MM_DEVICE_PROCESS"] == "1"
    assert port["DRIVER"] == "iosm" and (port["ID_VENDOR_ID"], port["ID_MODEL_ID"]) == (
        "8086", "7560")
    net = uevent.net_event(ports, "remove", 10, 100)
    assert net["SUBSYSTEM"] == "net" and net["INTERFACE"] == "wwan1" and net["IFINDEX"] == "5"
    assert net["DEVPATH"] == "/devices/virtual/net/wwan1" and "ID_MM_PORT_TYPE_MBIM" not in net
    assert port["ID_MM_PHYSDEV_UID"] == net["ID_MM_PHYSDEV_UID"] == "iosm-cuse-wwan1"
    gone = uevent.net_event(uevent.Ports("wwan1", "wwan1mbim0", 10, 123, None), "remove", 11, 1)
    assert "IFINDEX" not in gone
    for props in (port, net, gone):
        assert decode(encode(props)).props == props
