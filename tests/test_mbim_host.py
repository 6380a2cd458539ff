"""The real mbimcli / mbim-network against MbimFunction behind a raw-mode PTY (tier 2).

The fixture here is a minimal stand-in for the PTY transport: a thread that reads whole MBIM
messages from the PTY master and writes each answer with its own write(), like the kernel's
wwan port delivers one message per read.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import struct
import subprocess
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from iosm_cuse.mbim.cids import BasicConnect
from iosm_cuse.mbim.message import decode_message
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.mbim import MbimFunction, SessionState

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(shutil.which("mbimcli") is None, reason="mbimcli (libmbim-utils) missing"),
]

TIMEOUT = 30


class PtyModem:
    """MbimFunction on the master side of a PTY; mbimcli opens the slave (or a symlink)."""

    def __init__(self, config: ModemConfig, link: Path) -> None:
        self.fn = MbimFunction(config)
        self.lock = threading.Lock()
        self.events: list[tuple[int, SessionState | None]] = []
        self.fn.session_listener = lambda sid, st: self.events.append((sid, st))
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)   # bytes pass untouched; we keep the slave open so it stays raw
        self.path = os.ttyname(self.slave)
        self.link = link
        link.symlink_to(self.path)
        self.host_messages: list[bytes] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        while True:
            ready, _, _ = select.select([self.master, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                buf += os.read(self.master, 65536)
            except OSError:
                continue
            while len(buf) >= 12:
                (length,) = struct.unpack_from("<I", buf, 4)
                if length < 12:
                    buf = b""     # garbage: resynchronise on the next write
                    break
                if len(buf) < length:
                    break
                msg, buf = buf[:length], buf[length:]
                with self.lock:
                    self.host_messages.append(msg)
                    out = self.fn.receive(msg) + self.fn.pending_indications()
                for transfer in out:
                    os.write(self.master, transfer)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self.master, self.slave, self._stop_r, self._stop_w):
            os.close(fd)
        self.link.unlink(missing_ok=True)


@pytest.fixture
def make_modem(tmp_path: Path) -> Iterator[object]:
    modems: list[PtyModem] = []

    def make(config: ModemConfig | None = None) -> PtyModem:
        m = PtyModem(config or ModemConfig(), tmp_path / f"mbimtest{os.getpid()}-{len(modems)}")
        modems.append(m)
        return m

    yield make
    for m in modems:
        m.close()


def mbimcli(modem: PtyModem, *args: str) -> str:
    proc = subprocess.run(["mbimcli", "-d", str(modem.link), *args], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def field(output: str, name: str) -> str:
    m = re.search(rf"{re.escape(name)}:\s*'([^']*)'", output)
    assert m, (name, output)
    return m.group(1)


def test_device_caps_and_subscriber(make_modem) -> None:  # type: ignore[no-untyped-def]
    config = ModemConfig(device_id="356938035643817", firmware="fw-test-1", imsi="001019999999999")
    modem = make_modem(config)
    out = mbimcli(modem, "--query-device-caps")
    assert field(out, "Device ID") == "356938035643817"
    assert field(out, "Firmware info") == "fw-test-1"
    assert field(out, "Hardware info") == config.hardware
    assert field(out, "Max sessions") == "8"
    assert "lte" in field(out, "Data class")
    out = mbimcli(modem, "--query-subscriber-ready-status")
    assert field(out, "Ready state") == "initialized"
    assert field(out, "Subscriber ID") == "001019999999999"
    assert field(out, "SIM ICCID") == config.iccid
    out = mbimcli(modem, "--query-radio-state")
    assert field(out, "Software radio state") == "on"
    out = mbimcli(modem, "--query-registration-state")
    assert field(out, "Register state") == "home"
    assert field(out, "Provider ID") == "00101"
    assert field(out, "Provider name") == "iosm-sim"
    out = mbimcli(modem, "--query-signal-state")
    assert field(out, "RSSI [0-31,99]") == str(config.rssi)


def test_attach_connect_ip_disconnect(make_modem) -> None:  # type: ignore[no-untyped-def]
    modem = make_modem()
    out = mbimcli(modem, "--attach-packet-service")
    assert field(out, "Packet service state") == "attached"
    out = mbimcli(modem, "--connect=apn=internet")
    assert field(out, "Activation state") == "activated"
    # mbimcli's --connect queries IP configuration right after a successful connect
    assert "10.99.0.2/24" in out and "10.99.0.1" in out
    out = mbimcli(modem, "--connect=session-id=3,apn=internet,ip-type=ipv4v6")
    assert "10.99.3.2/24" in out and "fd99:3::2/64" in out
    out = mbimcli(modem, "--query-ip-configuration=3")
    assert "fd99:3::1" in out and "1500" in out
    out = mbimcli(modem, "--query-connection-state=3")
    assert field(out, "Activation state") == "activated"
    assert field(out, "IP type") == "ipv4v6"
    assert sorted(modem.fn.sessions) == [0, 3]
    out = mbimcli(modem, "--disconnect=3")
    assert field(out, "Activation state") == "deactivated"
    out = mbimcli(modem, "--query-connection-state=3")
    assert field(out, "Activation state") == "deactivated"
    assert sorted(modem.fn.sessions) == [0]
    assert [(sid, st is not None) for sid, st in modem.events] == [(0, True), (3, True),
                                                                   (3, False)]
    out = mbimcli(modem, "--query-packet-statistics")
    assert field(out, "Octets (in)") == "0"


def test_packet_statistics_counts(make_modem) -> None:  # type: ignore[no-untyped-def]
    modem = make_modem()
    with modem.lock:
        modem.fn.add_traffic(in_octets=123456, in_packets=100, out_octets=4321, out_packets=7)
    out = mbimcli(modem, "--query-packet-statistics")
    assert field(out, "Octets (in)") == "123456"
    assert field(out, "Packets (out)") == "7"


def test_connect_refused_when_detached(make_modem) -> None:  # type: ignore[no-untyped-def]
    modem = make_modem(ModemConfig(auto_attach=False))      # attached only on request
    proc = subprocess.run(["mbimcli", "-d", str(modem.link), "--connect=apn=internet"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "detached" in (proc.stdout + proc.stderr).lower()


def test_connect_without_attach_by_default(make_modem) -> None:  # type: ignore[no-untyped-def]
    """The modem attached by itself once registered (auto_attach): CONNECT alone works; after
    an explicit detach it is refused again."""
    modem = make_modem()
    out = mbimcli(modem, "--connect=apn=internet")
    assert field(out, "Activation state") == "activated"
    mbimcli(modem, "--disconnect")
    assert field(mbimcli(modem, "--detach-packet-service"), "Packet service state") == "detached"
    proc = subprocess.run(["mbimcli", "-d", str(modem.link), "--connect=apn=internet"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0 and "detached" in (proc.stdout + proc.stderr).lower()


def test_enter_pin(make_modem) -> None:  # type: ignore[no-untyped-def]
    modem = make_modem(ModemConfig(pin="4321", pin_required=True))
    out = mbimcli(modem, "--query-subscriber-ready-status")
    assert field(out, "Ready state") == "device-locked"
    out = mbimcli(modem, "--query-pin-state")
    assert field(out, "PIN type") == "pin1"
    assert field(out, "PIN state") == "locked"
    proc = subprocess.run(["mbimcli", "-d", str(modem.link), "--enter-pin=1111"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert modem.fn.pin_retries == 2
    out = mbimcli(modem, "--enter-pin=4321")
    assert field(out, "PIN state") == "unlocked"
    out = mbimcli(modem, "--query-subscriber-ready-status")
    assert field(out, "Ready state") == "initialized"
    out = mbimcli(modem, "--query-registration-state")
    assert field(out, "Register state") == "home"


def test_mbim_network_start_stop(make_modem, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("mbim-network") is None:
        pytest.skip("mbim-network missing")
    modem = make_modem(ModemConfig(apns=["iosm.test"]))
    profile = tmp_path / "mbim-network.conf"
    profile.write_text("APN=iosm.test\n")
    state_file = Path(f"/tmp/mbim-network-state-{modem.link.name}")
    try:
        start = subprocess.run(["mbim-network", f"--profile={profile}", str(modem.link), "start"],
                               capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        assert modem.fn.attached and 0 in modem.fn.sessions
        assert modem.fn.sessions[0].apn == "iosm.test"
        assert state_file.exists()
        # the whole run was one MBIM session: one OPEN, no CLOSE
        types = [decode_message(m).TYPE.name for m in modem.host_messages]
        assert types.count("OPEN") == 1 and "CLOSE" not in types, types
        stop = subprocess.run(["mbim-network", f"--profile={profile}", str(modem.link), "stop"],
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert modem.fn.sessions == {}
        assert not state_file.exists()
        cids = [decode_message(m) for m in modem.host_messages]
        assert any(getattr(c, "cid", None) == BasicConnect.CONNECT for c in cids)
        assert [e[0] for e in modem.events] == [0, 0]
    finally:
        state_file.unlink(missing_ok=True)


def test_fragmented_response_and_mbimex_open(make_modem) -> None:  # type: ignore[no-untyped-def]
    # 2500 UTF-16 characters: a DEVICE_CAPS response above the 4096 bytes mbimcli negotiates
    modem = make_modem(ModemConfig(firmware="F" * 2500))
    out = mbimcli(modem, "--query-device-caps")
    assert field(out, "Firmware info") == "F" * 2500
    # ModemManager's open: MBIMEx v3 requested; DEVICE_SERVICES tells libmbim to stay at 1.0
    out = mbimcli(modem, "--device-open-ms-mbimex-v3", "--query-device-caps")
    assert field(out, "Device ID") == modem.fn.config.device_id


def test_no_open_no_close_chain(make_modem) -> None:  # type: ignore[no-untyped-def]
    modem = make_modem()
    out = mbimcli(modem, "--attach-packet-service", "--no-close")
    trid = field(out, "TRID")
    out = mbimcli(modem, "--no-open=" + trid, "--connect=session-id=2,apn=internet", "--no-close")
    assert "10.99.2.2/24" in out
    trid = field(out, "TRID")
    out = mbimcli(modem, "--no-open=" + trid, "--query-connection-state=2")
    assert field(out, "Activation state") == "activated"
    types = [decode_message(m).TYPE.name for m in modem.host_messages]
    assert types.count("OPEN") == 1 and types[-1] == "CLOSE"


@pytest.mark.skipif(shutil.which("unshare") is None or not os.path.exists(
    "/usr/libexec/mbim-proxy"), reason="needs unshare and libmbim's mbim-proxy")
def test_through_the_real_mbim_proxy(make_modem) -> None:  # type: ignore[no-untyped-def]
    """ModemManager's protocol path: mbimcli -p spawns mbim-proxy, which opens our port.

    The proxy's abstract socket lives in a network namespace of its own and the proxy in a PID
    namespace of its own, so it cannot meet a host proxy and dies with the namespace.
    """
    modem = make_modem()
    dev = str(modem.link)
    script = (f"mbimcli -p -d {dev} --query-device-caps && "
              f"mbimcli -p -d {dev} --attach-packet-service && "
              f"mbimcli -p -d {dev} --connect=session-id=1,access-string=internet")
    proc = subprocess.run(["unshare", "--net", "--pid", "--fork", "sh", "-c", script],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert field(proc.stdout, "Device ID") == modem.fn.config.device_id
    assert "10.99.1.2/24" in proc.stdout
    # one OPEN from the proxy for all three clients; their OPEN/CLOSE stay in the proxy
    types = [decode_message(m).TYPE.name for m in modem.host_messages]
    assert types.count("OPEN") == 1, types
    assert sorted(modem.fn.sessions) == [1]
