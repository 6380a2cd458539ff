"""Live control of the model through a running `iosm-cuse up` (PTY port): every `iosm-cuse modem`
action over the control socket, checked by what an MBIM client on the port receives; scenarios
played twice give the same indications; hostile control input changes nothing.
(docs/control.md)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_up import StartUp, Up, ip
from helpers import MbimClient, until

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import (
    ActivationState,
    BasicConnect,
    PacketServiceState,
    PinState,
    PinType,
    RadioState,
    ReadyState,
    RegisterState,
)
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.message import IndicateStatus
from iosm_cuse.mbim.uuids import Service

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for TUN and netns"),
]

B = BasicConnect
ROOT = Path(__file__).resolve().parent.parent


def decoded(ind: IndicateStatus) -> tuple[str, dict[str, Any]]:
    """(CID name, values) of a Basic Connect indication, as its notification layout reads."""
    service = Service.lookup(ind.service)
    assert service is not None, ind.service
    spec = cids.lookup(service, ind.cid)
    assert spec is not None and spec.notification is not None, (service, ind.cid)
    return spec.name, infobuf.decode(spec.notification, ind.info)


class Port:
    """An MBIM client holding the daemon's port: commands, and the indications they cause."""

    def __init__(self, up: Up) -> None:
        self.up = up
        self.fd = os.open(up.port, os.O_RDWR | os.O_NOCTTY)
        self.client = MbimClient(self.fd)
        assert self.client.open() == Status.NONE

    def close(self) -> None:
        os.close(self.fd)

    def modem(self, *args: str) -> dict[str, Any]:
        """`iosm-cuse modem ARGS --json`, which must succeed; its answer."""
        res = self.up.cli("modem", *args, "--json")
        assert res.returncode == 0, res.stderr
        answer: dict[str, Any] = json.loads(res.stdout)
        return answer

    def indications(self) -> list[tuple[str, dict[str, Any]]]:
        return [decoded(i) for i in self.client.collect()]

    def query(self, cid: BasicConnect, values: dict[str, Any] | None = None
              ) -> tuple[int, dict[str, Any] | None]:
        return self.client.command(cid, CommandType.QUERY, values)

    def set(self, cid: BasicConnect, values: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        return self.client.command(cid, CommandType.SET, values)


@pytest.fixture
def port(up: Up) -> Iterator[Port]:
    p = Port(up)
    try:
        yield p
    finally:
        p.close()


def only(inds: list[tuple[str, dict[str, Any]]], name: str) -> dict[str, Any]:
    found = [v for n, v in inds if n == name]
    assert len(found) == 1, (name, inds)
    return found[0]


def names(inds: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [n for n, _ in inds]


# ---- the network ---------------------------------------------------------------------------


def test_register_moves_register_state_and_names_the_cause(port: Port) -> None:
    # the modem attached by itself when it registered (auto_attach): losing the network
    # detaches it, registering again attaches it again
    res = port.modem("register", "searching")
    assert res["indications"] == ["REGISTER_STATE", "PACKET_SERVICE"]
    reg = only(port.indications(), "REGISTER_STATE")
    assert reg["RegisterState"] == RegisterState.SEARCHING and reg["ProviderId"] == ""

    port.modem("register", "denied", "--cause", "13")
    reg = only(port.indications(), "REGISTER_STATE")
    assert (reg["RegisterState"], reg["NwError"]) == (RegisterState.DENIED, 13)

    port.modem("register", "roaming", "--operator", "26201", "--name", "Visited")
    reg = only(port.indications(), "REGISTER_STATE")
    assert (reg["RegisterState"], reg["ProviderId"], reg["ProviderName"]) == (
        RegisterState.ROAMING, "26201", "Visited")
    status, now = port.query(B.REGISTER_STATE)
    assert status == Status.NONE and now is not None and now["ProviderId"] == "26201"

    port.modem("register", "off")
    assert only(port.indications(), "REGISTER_STATE")["RegisterState"] == \
        RegisterState.DEREGISTERED
    port.modem("register", "home")
    reg = only(port.indications(), "REGISTER_STATE")
    assert (reg["RegisterState"], reg["ProviderId"], reg["NwError"]) == (
        RegisterState.HOME, "00101", 0)
    # the same again is no change, and says so
    assert port.modem("register", "home")["indications"] == []
    assert port.indications() == []


def connect(port: Port, session: int = 0) -> None:
    assert port.client.attach() == Status.NONE
    assert port.client.connect(session) == (Status.NONE, ActivationState.ACTIVATED)
    port.indications()  # what the host's own commands caused


def pings(up: Up, address: str) -> bool:
    return up.run("ping", "-c", "1", "-W", "1", address).returncode == 0


def test_deactivate_takes_the_session_down_with_the_cause_and_stops_its_traffic(
        up: Up, port: Port) -> None:
    connect(port)
    ip("-n", up.ns, "addr", "replace", "10.99.0.2/24", "dev", "wwan0")
    ip("-n", up.ns, "link", "set", "wwan0", "up")
    assert pings(up, "10.99.0.1")

    res = port.modem("deactivate", "0", "--cause", "26")
    assert res["indications"] == ["CONNECT"]
    con = only(port.indications(), "CONNECT")
    assert (con["SessionId"], con["ActivationState"], con["NwError"]) == (
        0, ActivationState.DEACTIVATED, 26)
    assert port.client.activation(0) == ActivationState.DEACTIVATED
    assert not pings(up, "10.99.0.1")

    # a session that is not up: a clear error, nothing sent
    res2 = up.cli("modem", "deactivate", "0")
    assert res2.returncode == 2 and "session 0 is not active" in res2.stderr
    assert port.indications() == []


def test_detach_reports_packet_service_and_every_session(port: Port) -> None:
    connect(port, 0)
    assert port.client.connect(3) == (Status.NONE, ActivationState.ACTIVATED)
    port.indications()
    port.modem("detach")
    inds = port.indications()
    assert names(inds) == ["CONNECT", "CONNECT", "PACKET_SERVICE"]
    assert [v["SessionId"] for n, v in inds if n == "CONNECT"] == [0, 3]
    assert only(inds, "PACKET_SERVICE")["PacketServiceState"] == PacketServiceState.DETACHED
    state = port.modem("state")["state"]
    assert state["packet_service"] == "detached" and state["sessions"] == {}


# ---- SIM and radio -------------------------------------------------------------------------


def test_sim_absent_pin_puk_and_ready(port: Port) -> None:
    port.modem("sim", "absent")
    inds = port.indications()
    assert names(inds) == ["SUBSCRIBER_READY_STATUS", "REGISTER_STATE", "PACKET_SERVICE"]
    assert only(inds, "SUBSCRIBER_READY_STATUS")["ReadyState"] == ReadyState.SIM_NOT_INSERTED
    assert only(inds, "REGISTER_STATE")["RegisterState"] == RegisterState.DEREGISTERED
    assert port.query(B.PIN)[0] == Status.SIM_NOT_INSERTED

    port.modem("sim", "pin")
    inds = port.indications()
    assert only(inds, "SUBSCRIBER_READY_STATUS")["ReadyState"] == ReadyState.DEVICE_LOCKED
    status, pin = port.query(B.PIN)
    assert status == Status.NONE and pin is not None
    assert (pin["PinType"], pin["PinState"]) == (PinType.PIN1, PinState.LOCKED)

    port.modem("sim", "puk")
    _, pin = port.query(B.PIN)
    assert pin is not None and (pin["PinType"], pin["PinState"]) == (PinType.PUK1,
                                                                      PinState.LOCKED)
    port.indications()

    port.modem("sim", "ready")
    inds = port.indications()
    assert names(inds) == ["SUBSCRIBER_READY_STATUS", "REGISTER_STATE", "PACKET_SERVICE"]
    assert only(inds, "SUBSCRIBER_READY_STATUS")["ReadyState"] == ReadyState.INITIALIZED
    assert only(inds, "REGISTER_STATE")["RegisterState"] == RegisterState.HOME


def test_hardware_radio_switch(port: Port) -> None:
    connect(port)
    port.modem("radio", "off")
    inds = port.indications()
    assert names(inds) == ["CONNECT", "REGISTER_STATE", "PACKET_SERVICE", "RADIO_STATE"]
    radio = only(inds, "RADIO_STATE")
    assert (radio["HwRadioState"], radio["SwRadioState"]) == (RadioState.OFF, RadioState.ON)
    # the host's own switch cannot bring a network back while the hardware one is off
    assert port.set(B.RADIO_STATE, {"RadioState": RadioState.ON})[0] == Status.NONE
    assert port.client.attach() == Status.RADIO_POWER_OFF
    port.modem("radio", "on")
    inds = port.indications()
    assert names(inds) == ["REGISTER_STATE", "PACKET_SERVICE", "RADIO_STATE"]
    assert only(inds, "RADIO_STATE")["HwRadioState"] == RadioState.ON


def test_signal_indicates_signal_state(up: Up, port: Port) -> None:
    port.modem("signal", "--rssi", "7", "--ber", "2")
    sig = only(port.indications(), "SIGNAL_STATE")
    assert (sig["Rssi"], sig["ErrorRate"]) == (7, 2)
    assert port.modem("state")["state"]["signal"] == {"rssi": 7, "ber": 2}
    for where in (("--instance", "0"), ("--socket", str(up.run_dir / "wwan0.sock"))):
        res = up.cli("modem", "state", "--json", *where)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["state"]["signal"]["rssi"] == 7
    text = up.cli("modem", "state").stdout
    assert "signal: rssi 7, ber 2" in text and "network: home (register state home" in text
    lte = up.cli("modem", "signal", "--rssi", "9", "--rsrp", "-100", "--rsrq", "-10",
                 "--snr", "12")
    assert lte.returncode == 0, lte.stderr
    assert "SIGNAL_STATE" in names(port.indications())
    out_of_range = up.cli("modem", "signal", "--rssi", "9", "--rsrp", "0")
    assert out_of_range.returncode == 2 and "rsrp" in out_of_range.stderr


# ---- FCC lock ------------------------------------------------------------------------------


def test_fcc_locked_radio_stays_off_until_unlocked(start_up: StartUp, tmp_path: Path) -> None:
    config = tmp_path / "fcc.toml"
    config.write_text("fcc_locked = true\n")
    up = start_up("--config", str(config))
    port = Port(up)
    try:
        status, radio = port.query(B.RADIO_STATE)
        assert radio is not None and radio["SwRadioState"] == RadioState.OFF
        # ModemManager's power-up: set ON, and the answer still says OFF
        status, radio = port.set(B.RADIO_STATE, {"RadioState": RadioState.ON})
        assert status == Status.NONE and radio is not None
        assert radio["SwRadioState"] == RadioState.OFF
        assert port.indications() == []
        assert port.modem("state")["state"]["radio"] == {"hw": "on", "sw": "off",
                                                         "fcc_locked": True}

        assert port.modem("fcc", "unlock")["indications"] == []
        status, radio = port.set(B.RADIO_STATE, {"RadioState": RadioState.ON})
        assert radio is not None and radio["SwRadioState"] == RadioState.ON
        inds = port.indications()
        assert names(inds) == ["REGISTER_STATE", "PACKET_SERVICE", "RADIO_STATE"]

        port.modem("fcc", "lock")
        inds = port.indications()
        assert names(inds) == ["REGISTER_STATE", "PACKET_SERVICE", "RADIO_STATE"]
        assert only(inds, "RADIO_STATE")["SwRadioState"] == RadioState.OFF
    finally:
        port.close()


# ---- what other parts of the model provide: SMS, USSD, shaping ---------------------------


def test_sms_ussd_and_shape_reach_the_model(up: Up, port: Port) -> None:
    res = up.cli("modem", "sms", "deliver", "--from", "+15551234", "hello there", "--json")
    assert res.returncode == 0, res.stderr
    assert names(port.indications()) == names(
        [(n, {}) for n in json.loads(res.stdout)["indications"]]) != []
    res = up.cli("modem", "ussd", "notify", "Balance: 5 EUR", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["indications"], res.stderr
    outbox = up.cli("modem", "sms", "outbox", "--json")
    assert outbox.returncode == 0 and json.loads(outbox.stdout)["messages"] == [], outbox
    shaped = up.cli("modem", "shape", "0", "--delay", "50", "--json")
    assert shaped.returncode == 0, shaped.stderr
    assert json.loads(shaped.stdout)["shapes"]["0"]["delay_ms"] == 50.0
    assert up.cli("modem", "shape", "0", "--clear").returncode == 0
    assert port.modem("state")["shapes"] == {}
    too_long = up.cli("modem", "sms", "deliver", "--from", "+15551234", "x" * 200)
    assert too_long.returncode == 2 and "sms deliver" in too_long.stderr
    assert port.modem("state")["state"]["network"] == "home"


# ---- crash -----------------------------------------------------------------------------------


def test_crash_at_either_stage_is_recovered(up: Up) -> None:
    for n, stage in enumerate(("crash", "cd-ready"), 1):
        res = up.cli("modem", "crash", "--stage", stage, "--json")
        assert res.returncode == 0 and json.loads(res.stdout)["stage"] == stage, res.stderr

        def recovered(n: int = n) -> bool:
            modem = up.status()["modem"]
            return bool(modem["restarts"] == n and modem["ipc_state"] == "RUNNING")

        until(recovered, 30, lambda: f"not recovered: {up.status()['modem']}")
    # and it answers control again
    assert up.cli("modem", "state").returncode == 0


# ---- hostile control input -----------------------------------------------------------------


BAD_CLI = [
    (("signal", "--rssi", "50"), "'rssi' must be 0..31 or 99"),
    (("signal", "--rssi", "5", "--ber", "8"), "'ber' must be 0..7 or 99"),
    (("register", "home", "--operator", "12ab5"), "is not an MCCMNC"),
    (("register", "home", "--cause", "3"), "--cause goes with denied"),
    (("register", "denied", "--cause", "300"), "'cause' must be 0..255"),
    (("deactivate", "999"), "'session' must be 0..255"),
    (("sms", "deliver", "--from", "not a number", "hi"), "is not a phone number"),
    (("shape", "0"), "give --delay, --loss or --rate"),
    (("shape", "0", "--loss", "150"), "'loss_percent' must be 0..100"),
]


def test_bad_values_get_a_clear_error_and_change_nothing(up: Up) -> None:
    before = up.cli("modem", "state", "--json").stdout
    for args, text in BAD_CLI:
        res = up.cli("modem", *args)
        assert res.returncode == 2 and text in res.stderr, (args, res.stderr)
    for args in (("register", "nowhere"), ("sim", "maybe"), ("crash", "--stage", "x"),
                 ("radio",), ("signal",)):
        res = up.cli("modem", *args)
        assert res.returncode == 2 and "Usage:" in res.stderr, (args, res.stderr)
    assert up.cli("modem", "state", "--json").stdout == before


def raw_lines(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send every line on one connection, pipelined, and read one answer per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(b"".join(lines))
        buf = b""
        while buf.count(b"\n") < len(lines):
            chunk = sock.recv(1 << 16)
            assert chunk, f"closed after {len(buf.splitlines())} of {len(lines)} answers"
            buf += chunk
    return [json.loads(x) for x in buf.splitlines()]


def test_hostile_requests_and_a_flood_change_nothing(up: Up) -> None:
    sock = up.run_dir / "wwan0.sock"
    before = up.cli("modem", "state", "--json").stdout
    bad: list[dict[str, Any]] = [
        {"op": "modem.reboot"},
        {"op": "modem.register", "args": {"state": "mars"}},
        {"op": "modem.register", "args": {"state": "home", "operator": 26201}},
        {"op": "modem.signal", "args": {"rssi": True}},
        {"op": "modem.signal", "args": {"rssi": 5.5}},
        {"op": "modem.signal", "args": {"rssi": 5, "evil": 1}},
        {"op": "modem.deactivate", "args": {"session": -1}},
        {"op": "modem.shape", "args": {"session": 0, "delay_ms": float("nan")}},
        {"op": "modem.sms.deliver", "args": {"sender": "+1", "text": "x" * 5000}},
        {"op": "modem.ussd.notify", "args": {"text": "bell\x07"}},
        {"op": "modem.state", "args": {"x": 1}},
    ]
    lines = [json.dumps({"id": i + 1, **b}).encode() + b"\n" for i, b in enumerate(bad)]
    answers = raw_lines(sock, lines)
    for req, ans in zip(bad, answers, strict=True):
        assert ans["ok"] is False and ans["error"], (req, ans)
        assert ans["errno"] in (errno.EINVAL, errno.EOPNOTSUPP), (req, ans)
    assert answers[0]["errno"] == errno.EOPNOTSUPP
    # a flood: thousands of bad requests and state queries, pipelined on one connection
    flood = [json.dumps({"id": i, "op": "modem.register", "args": {"state": "x" * (i % 50)}}
                        ).encode() + b"\n" for i in range(1, 3001)]
    flood += [json.dumps({"id": 5000 + i, "op": "modem.state"}).encode() + b"\n"
              for i in range(300)]
    t0 = time.monotonic()
    answers = raw_lines(sock, flood)
    assert time.monotonic() - t0 < 30
    assert all(not a["ok"] and a["errno"] == errno.EINVAL for a in answers[:3000])
    assert all(a["ok"] for a in answers[3000:])
    assert up.cli("modem", "state", "--json").stdout == before
    assert up.status()["modem"]["restarts"] == 0


def test_no_running_stack_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "IOSM_CUSE_RUN_DIR": str(tmp_path)}
    env.pop("IOSM_CUSE_SOCKET", None)
    exe = str(Path(shutil.which("iosm-cuse") or ROOT / ".venv/bin/iosm-cuse"))
    for args in (("state",), ("register", "home"), ("detach", "--instance", "3")):
        res = subprocess.run([exe, "modem", *args], capture_output=True, text=True, env=env,
                             timeout=30)
        assert res.returncode == 1, res
        assert "no iosm-cuse daemon listens on" in res.stderr, res.stderr
    assert "wwan3.sock" in res.stderr
    # the model options and a control command do not mix
    res = subprocess.run([exe, "modem", "--shm", "/tmp/x", "state"], capture_output=True,
                         text=True, env=env, timeout=30)
    assert res.returncode == 2 and "--shm" in res.stderr


# ---- scenarios -----------------------------------------------------------------------------


SCENARIO = textwrap.dedent("""\
    name = "round trip"
    [[step]]
    at = 0.0
    action = "signal"
    args = { rssi = 3, ber = 5 }
    [[step]]
    at = 0.2
    action = "register"
    args = { state = "searching" }
    [[step]]
    at = 0.4
    action = "register"
    args = { state = "roaming", operator = "20801", name = "Visited" }
    [[step]]
    at = 0.4
    action = "sim"
    args = { state = "absent" }
    [[step]]
    at = 0.6
    action = "sim"
    args = { state = "ready" }
    [[step]]
    at = 0.8
    action = "register"
    args = { state = "home" }
    [[step]]
    at = 0.8
    action = "signal"
    args = { rssi = 20, ber = 0 }
    """)


def test_a_scenario_played_twice_gives_the_same_indications(up: Up, port: Port,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "round-trip.toml"
    path.write_text(SCENARIO)
    runs = []
    for _ in range(2):
        res = up.cli("modem", "play", str(path))
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) == 7, res.stdout
        runs.append(port.indications())
    assert runs[0] == runs[1]
    assert names(runs[0]) == [
        "SIGNAL_STATE", "REGISTER_STATE", "PACKET_SERVICE", "REGISTER_STATE", "PACKET_SERVICE",
        "SUBSCRIBER_READY_STATUS", "REGISTER_STATE", "PACKET_SERVICE",
        "SUBSCRIBER_READY_STATUS", "REGISTER_STATE", "PACKET_SERVICE", "REGISTER_STATE",
        "SIGNAL_STATE"]
    assert runs[0][3][1]["ProviderId"] == "20801"


def test_play_reports_a_bad_file_by_step_and_line(up: Up, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SCENARIO.replace('state = "absent"', 'state = "lost"'))
    res = up.cli("modem", "play", str(path))
    assert res.returncode == 1
    assert f"{path}:14: step 4: sim: 'state' must be one of ready|absent|pin|puk" in res.stderr
    assert up.cli("modem", "state", "--json").returncode == 0


def test_up_plays_a_scenario_once_ready(start_up: StartUp, tmp_path: Path) -> None:
    path = tmp_path / "later.toml"
    path.write_text(textwrap.dedent("""\
        [[step]]
        at = 0.5
        action = "register"
        args = { state = "denied", cause = 15 }
        [[step]]
        at = 0.6
        action = "sim"
        args = { state = "pin" }
        """))
    up = start_up("--scenario", str(path))

    def played() -> bool:
        res = up.cli("modem", "state", "--json")
        assert res.returncode == 0, res.stderr
        return bool(json.loads(res.stdout)["state"]["sim"] == "pin")

    until(played, 10, "the scenario did not play")
    state = json.loads(up.cli("modem", "state", "--json").stdout)["state"]
    assert state["network"] == "denied"
    assert state["register_state"] == "deregistered"  # no registration without the PIN


def test_up_refuses_a_bad_scenario(start_up: StartUp, tmp_path: Path, netns: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[step]]\nat = 1\naction = \"explode\"\n")
    res = subprocess.run(
        ["ip", "netns", "exec", netns, str(ROOT / ".venv/bin/iosm-cuse"), "up", "--device",
         "sim", "--transport", "pty", "--scenario", str(path)],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "IOSM_CUSE_RUN_DIR": str(tmp_path / "run")})
    assert res.returncode == 1 and "step 1: unknown action 'explode'" in res.stderr
