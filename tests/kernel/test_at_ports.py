"""The AT ports /dev/wwan0at0 and /dev/wwan0at1 of `iosm-cuse up` on real CUSE nodes in the
Debian-kernel guest, answered by the model over channels 2 and 4; and ModemManager taking them
into the same modem as the MBIM port (docs/at-ports.md).

ModemManager's Command() (`mmcli --command`) works only when it runs with `--debug`, so this
module starts its own ModemManager that way (tests/kernel/mm_guest.py), not the plain one of
test_modemmanager.py.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guest_up
import pytest
from helpers import PortClient, blocked_reader, poller, until
from mm_guest import Services, keyvalues, modems, run, services_running, wait_listed

pytestmark = pytest.mark.kernel

AT0, AT1 = Path("/dev/wwan0at0"), Path("/dev/wwan0at1")
ANSWER_WITHIN = 60.0  # TCG: the daemon and the model are Python, ~11x slower
LISTED_WITHIN = 60.0  # ModemManager probes each AT port before it creates the modem


def read_answer(fd: int, within: float = ANSWER_WITHIN) -> bytes:
    got = b""
    deadline = time.monotonic() + within
    while not (got.endswith(b"OK\r\n") or got.endswith(b"ERROR\r\n")):
        left = deadline - time.monotonic()
        assert left > 0, f"no final result code after {got!r}"
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 4096)
    return got


@pytest.fixture
def daemon() -> Iterator[None]:
    proc = guest_up.start("--device", "sim", "--transport", "cuse",
                          ready="MBIM port /dev/wwan0mbim0 (cuse)")
    try:
        yield
    finally:
        guest_up.stop(proc)
        assert not AT0.exists() and not AT1.exists()


def test_ati_on_the_cuse_at_ports(daemon: None) -> None:
    assert AT0.is_char_device() and AT1.is_char_device()
    fd = os.open(AT0, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 100)  # nothing queued: EAGAIN under O_NONBLOCK
        # what a serial-port minded client does first: the termios ioctls are answered
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        assert termios.tcgetattr(fd)[3] == attrs[3]
        os.write(fd, b"AT")
        os.write(fd, b"I\r")  # one command in two writes: a byte stream
        answer = read_answer(fd)
        assert answer.startswith(b"ATI\r")  # echoed: ATE1 is the default
        assert b"\r\nIntel\r\n" in answer and b"\r\nXMM7560 (simulated)\r\n" in answer
        assert answer.endswith(b"\r\nOK\r\n")
    finally:
        os.close(fd)
    fd = os.open(AT1, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"ATE0;+CGSN;+CPIN?;+CREG?\r")
        answer = read_answer(fd)
        assert b"\r\n356938035643809\r\n" in answer and b"+CPIN: READY" in answer, answer
        assert b"+CREG: 0,1" in answer, answer
        os.write(fd, b"AT+NOSUCH\r")
        assert read_answer(fd) == b"\r\nERROR\r\n"
        # a second opener shares the port and its one queue, as on the kernel's WWAN ports
        other = os.open(AT1, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            os.write(other, b"AT\r")
            assert read_answer(fd) == b"\r\nOK\r\n"  # fd reads what other's command caused
        finally:
            os.close(other)
    finally:
        os.close(fd)


def status() -> dict[str, Any]:
    res = subprocess.run([guest_up.IOSM_CUSE, "status", "--json"], capture_output=True,
                         text=True, timeout=guest_up.STEP_TIMEOUT)
    assert res.returncode == 0, res.stderr
    st: dict[str, Any] = json.loads(res.stdout)
    return st


def test_a_model_crash_hangs_the_at_ports_up_and_they_come_back(daemon: None) -> None:
    """As on the MBIM port (docs/at-ports.md §2): a blocked reader gets EIO, a poller
    POLLHUP|POLLERR; once the modem runs again a new open answers."""
    clients = [PortClient("reader", str(AT0)).start(blocked_reader),
               PortClient("poller", str(AT1)).start(poller)]
    time.sleep(0.5)
    os.kill(status()["modem"]["pid"], signal.SIGKILL)
    until(lambda: all(c.returned() for c in clients), 60,
          lambda: f"clients still blocked: {[c.name for c in clients if not c.returned()]}")
    assert {c.name: c.ended for c in clients} == {"reader": "EIO", "poller": "POLLERR|POLLHUP"}
    seen: list[dict[str, Any]] = []

    def running_again() -> bool:
        seen.append(status())
        return bool(seen[-1]["modem"]["restarts"] >= 1
                    and seen[-1]["modem"]["ipc_state"] == "RUNNING")

    until(running_again, 90, lambda: seen[-1]["modem"], poll=2.0)
    assert [p["gone"] for p in seen[-1]["at_ports"]] == [None, None], seen[-1]["at_ports"]
    fd = os.open(AT0, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"AT+CGMI\r")
        assert read_answer(fd) == b"AT+CGMI\r\r\nIntel\r\n\r\nOK\r\n"  # a new model: echo on
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def debug_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    if shutil.which("ModemManager") is None and not Path("/usr/sbin/ModemManager").exists():
        pytest.skip("modemmanager is not installed (./dev TEST_PACKAGES)")
    with services_running(tmp_path_factory.mktemp("services"), "--debug") as svc:
        yield svc


def test_modemmanager_groups_the_at_ports_and_runs_a_command(debug_services: Services
                                                             ) -> None:
    proc = guest_up.start("--device", "sim", "--transport", "cuse",
                          ready="MBIM port /dev/wwan0mbim0 (cuse)")
    try:
        modem, _took = wait_listed(LISTED_WITHIN, debug_services)
        m = modem.rsplit("/", 1)[1]

        def ports() -> str:
            info = keyvalues("-m", m)
            return " ".join(v for k, v in info.items() if k.startswith("modem.generic.ports"))

        listed: list[str] = []

        def all_ports() -> bool:
            listed[:] = [ports()]
            return all(p in listed[0] for p in (
                "wwan0mbim0 (mbim)", "wwan0at0 (at)", "wwan0at1 (at)", "wwan0 (net)"))

        until(all_ports, LISTED_WITHIN, lambda: f"ports: {listed}; ModemManager: "
              f"{debug_services.log('ModemManager')}", poll=1.0)
        res = run("mmcli", "-m", m, "--command=ATI", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Intel" in res.stdout and "XMM7560 (simulated)" in res.stdout, res.stdout
        res = run("mmcli", "-m", m, "--command=AT+CGSN", timeout=120)
        assert "356938035643809" in res.stdout, res.stdout + res.stderr
    finally:
        guest_up.stop(proc)
    until(lambda: modems() == [], 30, "the modem dropped with all its ports", poll=0.5)
    assert not AT0.exists()
