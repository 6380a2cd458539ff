"""The sans-IO D-Bus client that follows ModemManager's bus name (iosm_cuse/system/dbus.py),
against hand-built server bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iosm_cuse.system import dbus
from iosm_cuse.system.dbus import BusWatch, DbusError

NAME = "org.freedesktop.ModemManager1"


def _string(s: str, order: str, pos: int) -> bytes:
    raw = s.encode()
    return b"\0" * (-pos % 4) + struct.pack(order + "I", len(raw)) + raw + b"\0"


def server_message(mtype: int, serial: int, fields: list[tuple[int, str, str | int]],
                   sig: str, args: list[str | int], little: bool = True) -> bytes:
    """What a bus sends: written independently of dbus.method_call, in either byte order."""
    order = "<" if little else ">"
    body = b""
    for code, arg in zip(sig, args, strict=True):
        if code == "s":
            body += _string(str(arg), order, len(body))
        else:
            body += b"\0" * (-len(body) % 4) + struct.pack(order + "I", int(arg))
    fields = [*fields, (dbus.SIGNATURE, "g", sig)] if sig else fields
    head = b""
    for code, ftype, value in fields:
        head += b"\0" * (-(16 + len(head)) % 8) + bytes([code, 1]) + ftype.encode() + b"\0"
        if ftype == "u":
            head += b"\0" * (-(16 + len(head)) % 4) + struct.pack(order + "I", int(value))
        elif ftype == "g":
            head += bytes([len(str(value))]) + str(value).encode() + b"\0"
        else:
            head += _string(str(value), order, 16 + len(head))
    fixed = struct.pack(order + "cBBBIII", b"l" if little else b"B", mtype, 0, 1, len(body),
                        serial, len(head))
    return fixed + head + b"\0" * (-len(head) % 8) + body


def reply(serial: int, reply_to: int, sig: str, args: list[str | int]) -> bytes:
    return server_message(dbus.METHOD_RETURN, serial, [(dbus.REPLY_SERIAL, "u", reply_to),
                                                       (dbus.SENDER, "s", dbus.BUS_NAME)],
                          sig, args)


def owner_changed(serial: int, old: str, new: str, little: bool = True,
                  name: str = NAME, sender: str = dbus.BUS_NAME) -> bytes:
    return server_message(dbus.SIGNAL, serial, [
        (dbus.PATH, "o", dbus.BUS_PATH), (dbus.INTERFACE, "s", dbus.BUS_NAME),
        (dbus.MEMBER, "s", "NameOwnerChanged"), (dbus.SENDER, "s", sender)],
        "sss", [name, old, new], little)


def authed() -> tuple[BusWatch, bytes]:
    w = BusWatch(0, NAME)
    assert w.start() == b"\0AUTH EXTERNAL 30\r\n"  # "0" in hex
    out, changes = w.feed(b"OK 0123456789abcdef0123456789abcdef\r\n")
    assert changes == []
    return w, out


def test_after_auth_hello_match_and_has_owner_are_sent() -> None:
    _w, out = authed()
    assert out.startswith(b"BEGIN\r\n")
    calls = out[len(b"BEGIN\r\n"):]
    members = []
    while calls:
        total = dbus.message_length(calls)
        assert total is not None
        msg = dbus.parse(calls[:total])
        assert msg.type == dbus.METHOD_CALL and msg.fields[dbus.DESTINATION] == dbus.BUS_NAME
        members.append((msg.serial, msg.fields[dbus.MEMBER], msg.args()))
        calls = calls[total:]
    rule = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{NAME}'")
    assert members == [(1, "Hello", []), (2, "AddMatch", [rule]), (3, "NameHasOwner", [NAME])]


def test_presence_from_the_reply_and_from_signals_in_both_byte_orders() -> None:
    w, _ = authed()
    stream = (reply(1, 1, "s", [":1.7"]) + reply(2, 2, "", []) + reply(3, 3, "b", [1])
              + owner_changed(4, ":1.3", "") + owner_changed(5, "", ":1.9", little=False)
              + owner_changed(6, "", ":1.10", name="org.example.Other")
              + owner_changed(7, ":1.9", "", sender=":1.66"))  # forged by a peer: ignored
    changes: list[bool] = []
    for i in range(0, len(stream), 7):  # byte-sliced: framing must not depend on reads
        changes += w.feed(stream[i:i + 7])[1]
    assert changes == [True, False, True]
    assert w.unique_name == ":1.7"


def test_refused_auth_and_malformed_messages_are_rejected() -> None:
    w = BusWatch(0, NAME)
    with pytest.raises(DbusError):
        w.feed(b"REJECTED EXTERNAL\r\n")
    assert w.rejects["rejected"] == 1
    w, _ = authed()
    bad = bytearray(reply(1, 1, "s", [":1.7"]))
    bad[3] = 2  # protocol version
    with pytest.raises(DbusError):
        w.feed(bytes(bad))
    w, _ = authed()
    with pytest.raises(DbusError):
        w.feed(b"X" + bytes(15))  # no such byte order


@given(st.binary(min_size=1, max_size=300))
def test_garbage_after_auth_is_a_dbus_error_or_waits(data: bytes) -> None:
    w, _ = authed()
    try:
        w.feed(data)
    except DbusError:
        assert w.rejects["rejected"] == 1


def test_system_bus_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    assert dbus.system_bus_path() == "/run/dbus/system_bus_socket"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "tcp:host=x;unix:guid=1,path=/tmp/bus")
    assert dbus.system_bus_path() == "/tmp/bus"
