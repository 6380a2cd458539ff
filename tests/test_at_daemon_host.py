"""The AT ports of `iosm-cuse up --transport pty` as a real process: wwan0at0 and wwan0at1 next
to the MBIM port's symlink, answered by the model over channels 2 and 4, agreeing with what
the real mbimcli reads over MBIM (docs/at-ports.md)."""

from __future__ import annotations

import os
import re
import select
import time

import pytest
from daemon_up import Up

pytestmark = pytest.mark.host


def at_command(path: str, line: bytes, until: bytes = b"OK\r\n", timeout: float = 20) -> bytes:
    """Open the port, send one command line, read up to its final result code, close."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        os.write(fd, line)
        got = b""
        deadline = time.monotonic() + timeout
        while not (got.endswith(until) or got.endswith(b"ERROR\r\n")):
            left = deadline - time.monotonic()
            assert left > 0, f"{path}: no answer to {line!r} after {got!r}"
            if select.select([fd], [], [], left)[0]:
                got += os.read(fd, 4096)
        return got
    finally:
        os.close(fd)


def test_at_ports_answer_and_agree_with_mbim(up: Up) -> None:
    st = up.status()
    ports = {p["path"].rsplit("/", 1)[1]: p for p in st["at_ports"]}
    assert set(ports) == {"wwan0at0", "wwan0at1"}
    assert all(p["transport"] == "pty" and p["gone"] is None for p in ports.values())
    at0, at1 = ports["wwan0at0"]["path"], ports["wwan0at1"]["path"]
    assert os.path.dirname(at0) == os.path.dirname(up.port)  # next to the MBIM port's link

    ati = at_command(at0, b"ATI\r")
    assert ati.startswith(b"ATI\r")  # echoed: ATE1 is the default
    assert b"\r\nIntel\r\n" in ati and b"\r\nXMM7560 (simulated)\r\n" in ati

    caps = up.mbimcli("--query-device-caps")
    assert caps.returncode == 0, caps.stderr
    imei = re.search(r"Device ID: '(\d+)'", caps.stdout)
    assert imei, caps.stdout
    assert f"\r\n{imei.group(1)}\r\n".encode() in at_command(at1, b"AT+CGSN\r")

    # The radio off over AT: the MBIM side reports it; on again over MBIM: AT sees it.
    assert at_command(at0, b"ATE0;+CFUN=0\r").endswith(b"\r\nOK\r\n")
    radio = up.mbimcli("--query-radio-state")
    assert radio.returncode == 0 and "Software radio state: 'off'" in radio.stdout, radio.stdout
    assert b"+CFUN: 4" in at_command(at1, b"AT+CFUN?\r")
    assert up.mbimcli("--set-radio-state=on").returncode == 0
    assert b"+CREG: 0,1" in at_command(at0, b"AT+CREG?\r")

    after = up.status()["at_ports"]
    assert all(p["counters"]["rx"] > 0 and p["counters"]["tx"] > 0 for p in after), after
    text = up.cli("status")
    assert text.returncode == 0, text.stderr
    # the PTY transport holds the one handle of each (docs/mbim-port.md §6)
    assert f"at:     {at0} (pty), open by 1; {at1} (pty), open by 1" in text.stdout, text.stdout
