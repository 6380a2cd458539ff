"""Announcing the ports to ModemManager (iosm_cuse/system/announce.py): when events go out,
first with the bus presence driven by hand, then against a real dbus-daemon whose bus name
ModemManager's is claimed and released by a second connection (docs/modemmanager.md §3, §5)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run, until, until_async

from iosm_cuse.system import announce, dbus, uevent
from iosm_cuse.system.announce import Announcer


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """No udevd (the link is forged too) and a port whose device number is made up."""
    monkeypatch.setattr(announce, "UDEVD_CONTROL", Path("/nonexistent/udev/control"))
    monkeypatch.setattr(announce, "port_numbers", lambda node: (10, 99))
    return []


def kinds(events: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(e["ACTION"], e["SUBSYSTEM"]) for e in events]


ADD = [("add", "wwan"), ("add", "net")]
REMOVE = [("remove", "wwan"), ("remove", "net")]


def test_announced_exactly_while_the_modem_runs_and_modemmanager_listens(
        sent: list[dict[str, str]]) -> None:
    a = Announcer("wwan0", "wwan0mbim0", send=sent.append)
    a.port_ready()
    assert sent == []  # nobody listens yet
    a._presence(True)
    assert kinds(sent) == ADD
    assert sent[0]["DEVNAME"] == "/dev/wwan0mbim0" and sent[0]["MINOR"] == "99"
    a._presence(True)  # a new owner we did not see arrive: it has not heard of us
    assert kinds(sent) == ADD * 2
    a.modem_down()  # a crash: withdraw until the modem is back
    assert kinds(sent) == ADD * 2 + REMOVE
    a.modem_down()
    a.port_ready()
    assert kinds(sent) == ADD * 2 + REMOVE + ADD
    a._presence(False)  # ModemManager gone: nobody to tell
    a._presence(True)
    assert kinds(sent) == ADD * 2 + REMOVE + ADD * 2
    run(a.stop())
    assert kinds(sent) == ADD * 2 + REMOVE + ADD * 2 + REMOVE
    seqnums = [int(e["SEQNUM"]) for e in sent]
    assert seqnums == sorted(set(seqnums))


def test_the_at_ports_come_and_go_with_the_mbim_port_as_one_modem(
        sent: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/at-ports.md §3: same ID_MM_PHYSDEV_UID, primary and secondary hints; one that is
    no device node (a PTY) is left out."""
    def numbers(node: str) -> tuple[int, int]:
        if node == "/dev/wwan0at1":
            raise FileNotFoundError(2, "No such file or directory")
        return 10, {"/dev/wwan0mbim0": 99, "/dev/wwan0at0": 98}[node]

    monkeypatch.setattr(announce, "port_numbers", numbers)
    a = Announcer("wwan0", "wwan0mbim0", at_ports=("wwan0at0", "wwan0at1"), send=sent.append)
    a.port_ready()
    a._presence(True)
    assert kinds(sent) == [("add", "wwan"), ("add", "wwan"), ("add", "net")]
    at0 = sent[1]
    assert at0["DEVNAME"] == "/dev/wwan0at0" and at0["MINOR"] == "98"
    assert at0["ID_MM_PORT_TYPE_AT_PRIMARY"] == "1" and "ID_MM_PORT_TYPE_MBIM" not in at0
    assert {e["ID_MM_PHYSDEV_UID"] for e in sent} == {"iosm-cuse-wwan0"}
    run(a.stop())
    assert kinds(sent[3:]) == [("remove", "wwan"), ("remove", "wwan"), ("remove", "net")]
    assert sent[4]["DEVNAME"] == "/dev/wwan0at0"
    seqnums = [int(e["SEQNUM"]) for e in sent]
    assert seqnums == sorted(set(seqnums))
    two = uevent.Ports("wwan0", "wwan0mbim0", 10, 99, None,
                       (uevent.Node("wwan0at0", 10, 98), uevent.Node("wwan0at1", 10, 97)))
    second = uevent.at_port_events(two, "add", iter((5, 6)), 1)[1]
    assert second["ID_MM_PORT_TYPE_AT_SECONDARY"] == "1" and second["SEQNUM"] == "6"


def test_a_port_without_a_device_number_is_not_announced(
        sent: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_node(node: str) -> tuple[int, int]:
        raise FileNotFoundError(2, "No such file or directory", node)

    monkeypatch.setattr(announce, "port_numbers", no_node)
    a = Announcer("wwan0", "wwan0mbim0", send=sent.append)
    a._presence(True)
    a.port_ready()
    run(a.stop())
    assert sent == [] and not a.announced


# ---- against a real dbus-daemon -------------------------------------------------------------

@pytest.fixture
def bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private dbus-daemon standing in for the system bus (session policy: anyone may own
    any name), always stopped."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("no dbus-daemon")
    path = str(tmp_path / "bus")
    proc = subprocess.Popen(["dbus-daemon", "--session", f"--address=unix:path={path}",
                             "--nofork", "--nopidfile"], stderr=subprocess.DEVNULL)
    try:
        until(lambda: os.path.exists(path), 10, "dbus-daemon's socket")
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={path}")
        yield path
    finally:
        proc.terminate()
        proc.wait(10)


def own_name(path: str) -> socket.socket:
    """A connection that owns ModemManager's name until it is closed."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.settimeout(10)
    sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    assert sock.recv(100).startswith(b"OK ")
    sock.sendall(b"BEGIN\r\n" + dbus.method_call(1, "Hello")
                 + dbus.method_call(2, "RequestName", (dbus.MM_NAME, 4)))  # DO_NOT_QUEUE
    return sock


def test_announces_whenever_modemmanager_appears_on_the_bus(
        bus: str, sent: list[dict[str, str]]) -> None:
    async def body() -> None:
        a = Announcer("wwan0", "wwan0mbim0", send=sent.append)
        a.start()
        try:
            a.port_ready()
            await asyncio.sleep(0.2)  # connected, asked NameHasOwner: no owner, nothing sent
            assert sent == []
            mm = own_name(bus)
            await until_async(lambda: len(sent) == 2, 10, lambda: f"announce: {sent}")
            assert kinds(sent) == ADD
            mm.close()  # ModemManager stops...
            await until_async(lambda: not a.mm_present, 10, "ModemManager seen leaving")
            mm = own_name(bus)  # ...and starts again: it has to hear about us again
            await until_async(lambda: len(sent) == 4, 10, lambda: f"again: {sent}")
            assert kinds(sent) == ADD * 2
        finally:
            await a.stop()
        assert kinds(sent) == ADD * 2 + REMOVE
        mm.close()
    run(body())


def test_modemmanager_already_on_the_bus_is_told_at_once(
        bus: str, sent: list[dict[str, str]]) -> None:
    async def body() -> None:
        mm = own_name(bus)
        a = Announcer("wwan0", "wwan0mbim0", send=sent.append)
        a.start()
        try:
            a.port_ready()
            await until_async(lambda: len(sent) == 2, 10, lambda: f"announce: {sent}")
        finally:
            await a.stop()
            mm.close()
        assert kinds(sent) == ADD + REMOVE
    run(body())


def test_no_system_bus_is_one_info_line(
        sent: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'none'}")
    monkeypatch.setattr(announce, "RETRY_BUS", 0.01)

    async def body() -> None:
        a = Announcer("wwan0", "wwan0mbim0", send=sent.append)
        with caplog.at_level("INFO", logger="iosm_cuse.system.announce"):
            a.start()
            a.port_ready()
            await asyncio.sleep(0.2)  # many retries
            await a.stop()
    run(body())
    lines = [r for r in caplog.records if "no system bus" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert [r for r in caplog.records if r.levelno >= 30] == [] and sent == []
