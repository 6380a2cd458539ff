"""Live control's action table (sim/control.py) and scenarios (scenario.py), sans-IO: actions
applied to a real MBIM function, checked by the indications it queues for an open host."""

from __future__ import annotations

import asyncio
import errno
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse import control
from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import BasicConnect, RadioState, ReadyState, RegisterState
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.message import (
    Command,
    CommandDone,
    IndicateStatus,
    Open,
    decode_message,
    encode_message,
)
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.scenario import ScenarioError, parse, play
from iosm_cuse.sim import control as model_control
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.control import ACTIONS, ActionError, CrashStage, apply, state_of
from iosm_cuse.sim.gateway import Gateway
from iosm_cuse.sim.mbim import MbimFunction

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scenarios"


class Model:
    """What the actions apply to, as sim.assembly.Assembly offers it: a real MBIM function and
    gateway; a crash is recorded (the device model's crash is tested with the engine)."""

    def __init__(self, config: ModemConfig | None = None) -> None:
        self.config = config or ModemConfig()
        self.mbim: MbimFunction | None = MbimFunction(self.config)
        self.gateway = Gateway(self.config, "echo")
        self.crashed: list[CrashStage] = []
        self.tid = 0
        assert self.mbim is not None
        self.mbim.receive(encode_message(Open(self._tid(), 4096)))

    def crash(self, stage: CrashStage) -> None:
        self.crashed.append(stage)

    def _tid(self) -> int:
        self.tid += 1
        return self.tid

    def indications(self) -> list[tuple[str, dict[str, Any]]]:
        assert self.mbim is not None
        out = []
        for data in self.mbim.pending_indications():
            msg = decode_message(data)
            assert isinstance(msg, IndicateStatus)
            spec = cids.lookup(Service.BASIC_CONNECT, msg.cid)
            assert spec is not None and spec.notification is not None
            out.append((spec.name, infobuf.decode(spec.notification, msg.info)))
        return out

    def command(self, cid: BasicConnect, ct: CommandType, values: dict[str, Any]
                ) -> tuple[int, dict[str, Any] | None]:
        assert self.mbim is not None
        spec = cids.lookup(Service.BASIC_CONNECT, cid)
        assert spec is not None and spec.response is not None
        layout = spec.request(ct)
        info = infobuf.encode(layout, values) if layout is not None else b""
        (data,) = self.mbim.receive(encode_message(
            Command(self._tid(), Service.BASIC_CONNECT.value, cid, ct, info)))
        done = decode_message(data)
        assert isinstance(done, CommandDone)
        return done.status, infobuf.decode(spec.response, done.info) if done.info else None


def test_every_action_is_a_control_operation() -> None:
    for action, spec in ACTIONS.items():
        assert control.OPS[f"modem.{action}"] == spec
    req = control.decode_request(b'{"id": 3, "op": "modem.register", '
                                 b'"args": {"state": "denied", "cause": 7}}')
    assert req.args == {"state": "denied", "operator": None, "name": None, "cause": 7}
    with pytest.raises(control.ControlError) as info:
        control.decode_request(b'{"id": 3, "op": "modem.register", "args": {"state": "up"}}')
    assert info.value.errno == errno.EINVAL
    assert "must be one of home|roaming|searching|denied|off" in info.value.message


def test_register_changes_and_their_indications() -> None:
    m = Model()
    # The modem attached by itself when it registered (auto_attach): refused by the network,
    # it loses packet service too; registered again, it attaches again.
    res = apply(m, "register", {"state": "denied"})
    assert res == {"action": "register", "indications": ["REGISTER_STATE", "PACKET_SERVICE"]}
    (name, reg), (_, ps) = m.indications()
    assert (name, reg["RegisterState"], reg["NwError"]) == (
        "REGISTER_STATE", RegisterState.DENIED, 11)
    assert ps["PacketServiceState"] == cids.PacketServiceState.DETACHED
    # ModemManager applies the state only to the domains these name
    assert reg["AvailableDataClasses"] == m.config.data_class_mask
    apply(m, "register", {"state": "roaming"})
    (_, reg), (_, ps) = m.indications()
    assert (reg["RegisterState"], reg["ProviderId"], reg["ProviderName"]) == (
        RegisterState.ROAMING, "00102", "iosm-other")
    assert ps["PacketServiceState"] == cids.PacketServiceState.ATTACHED
    apply(m, "register", {"state": "home", "operator": "310260", "name": "Home Two"})
    ((_, reg),) = m.indications()
    assert (reg["RegisterState"], reg["ProviderId"], reg["ProviderName"]) == (
        RegisterState.HOME, "310260", "Home Two")


def test_manual_mode_without_a_network_is_deregistered_not_denied() -> None:
    m = Model(ModemConfig(register_automatic=False))
    assert m.mbim is not None
    reg = m.mbim.modem.register_values()
    assert (reg["RegisterState"], reg["NwError"]) == (RegisterState.DEREGISTERED, 0)
    apply(m, "register", {"state": "denied", "cause": 7})
    ((_, reg),) = m.indications()
    assert (reg["RegisterState"], reg["NwError"]) == (RegisterState.DENIED, 7)


def test_network_loss_takes_sessions_down_first() -> None:
    m = Model()
    assert m.mbim is not None
    m.mbim.modem.attach()
    m.mbim.modem.activate(2, "internet", cids.IpType.IPV4)
    apply(m, "register", {"state": "searching"})
    assert [n for n, _ in m.indications()] == ["CONNECT", "REGISTER_STATE", "PACKET_SERVICE"]
    assert state_of(m.mbim.modem)["register_state"] == "searching"


def test_sim_states() -> None:
    m = Model()
    apply(m, "sim", {"state": "puk"})
    inds = m.indications()
    assert inds[0][1]["ReadyState"] == ReadyState.DEVICE_LOCKED
    assert m.command(BasicConnect.PACKET_SERVICE, CommandType.SET,
                     {"PacketServiceAction": 0})[0] == Status.PIN_REQUIRED
    assert m.mbim is not None and state_of(m.mbim.modem)["sim"] == "puk"
    apply(m, "sim", {"state": "ready"})
    assert [n for n, _ in m.indications()] == ["SUBSCRIBER_READY_STATUS", "REGISTER_STATE",
                                                "PACKET_SERVICE"]
    assert apply(m, "sim", {"state": "ready"})["indications"] == []


def test_fcc_lock_answers_radio_on_with_off() -> None:
    m = Model(ModemConfig(fcc_locked=True))
    status, radio = m.command(BasicConnect.RADIO_STATE, CommandType.SET, {"RadioState": 1})
    assert status == Status.NONE and radio is not None
    assert radio["SwRadioState"] == RadioState.OFF
    apply(m, "fcc", {"state": "unlock"})
    _, radio = m.command(BasicConnect.RADIO_STATE, CommandType.SET, {"RadioState": 1})
    assert radio is not None and radio["SwRadioState"] == RadioState.ON
    m.indications()
    apply(m, "fcc", {"state": "lock"})
    assert [n for n, _ in m.indications()] == ["REGISTER_STATE", "PACKET_SERVICE",
                                                "RADIO_STATE"]


def test_deactivate_with_a_cause_and_errors() -> None:
    m = Model()
    assert m.mbim is not None
    m.mbim.modem.attach()
    m.mbim.modem.activate(0, "internet", cids.IpType.IPV4)
    m.indications()
    with pytest.raises(ActionError) as info:
        apply(m, "deactivate", {"session": 1})
    assert info.value.errno == errno.ENOENT
    apply(m, "deactivate", {"session": 0, "cause": 8})
    ((name, con),) = m.indications()
    assert (name, con["NwError"], con["ActivationState"]) == (
        "CONNECT", 8, cids.ActivationState.DEACTIVATED)


def test_crash_goes_to_the_model() -> None:
    m = Model()
    assert apply(m, "crash", {})["stage"] == "crash"
    assert apply(m, "crash", {"stage": "cd-ready"})["stage"] == "cd-ready"
    assert m.crashed == [CrashStage.CRASH, CrashStage.CD_READY]


def test_a_model_without_mbim_or_a_service_says_so() -> None:
    m = Model()
    m.mbim = None
    with pytest.raises(ActionError) as info:
        apply(m, "register", {"state": "home"})
    assert info.value.errno == errno.EOPNOTSUPP


BAD = [
    ("register", {"state": "mars"}, "must be one of"),
    ("register", {"state": "home", "operator": "1234"}, "is not an MCCMNC"),
    ("register", {"state": "searching", "name": "x"}, "go with home or roaming"),
    ("register", {"state": "home", "cause": 3}, "--cause goes with denied"),
    ("signal", {"rssi": 32}, "must be 0..31 or 99"),
    ("signal", {}, "missing argument 'rssi'"),
    ("signal", {"rssi": 5, "rsrp": 0}, "'rsrp' must be -140..-43"),
    ("sms.deliver", {"sender": "+1", "text": "x" * 200}, "sms deliver: "),
    ("sim", {"state": "READY"}, "must be one of"),
    ("deactivate", {"session": "0"}, "must be int"),
    ("radio", {"state": True}, "must be str"),
    ("shape", {"session": 0, "clear": True, "delay_ms": 5}, "--clear takes no"),
    ("shape", {"session": 0, "delay_ms": float("inf")}, "finite"),
    ("sms.deliver", {"sender": "+1", "text": "a\x00b"}, "control characters"),
    ("nope", {}, "unknown action"),
]


@pytest.mark.parametrize(("action", "args", "text"), BAD)
def test_bad_actions_change_nothing(action: str, args: dict[str, Any], text: str) -> None:
    m = Model()
    assert m.mbim is not None
    before = state_of(m.mbim.modem)
    with pytest.raises(ActionError) as info:
        apply(m, action, args)
    assert text in info.value.message
    assert state_of(m.mbim.modem) == before and m.indications() == [] and m.crashed == []


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                               st.text(max_size=8)),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                         max_size=3),
                     max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([*ACTIONS, "x"]),
       st.dictionaries(st.sampled_from(["state", "rssi", "ber", "session", "cause", "text",
                                        "sender", "operator", "delay_ms", "clear", "zz"]),
                       _json, max_size=4))
def test_any_arguments_apply_or_are_refused(action: str, args: dict[str, Any]) -> None:
    m = Model()
    assert m.mbim is not None
    before = state_of(m.mbim.modem)
    try:
        res = apply(m, action, args)
    except ActionError as exc:
        assert exc.message and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT)
        assert state_of(m.mbim.modem) == before and m.indications() == []
        return
    json.dumps(res)
    assert len(m.indications()) == len(res["indications"])


# ---- scenarios ---------------------------------------------------------------------------


GOOD = """\
name = "two"
[[step]]
at = 0
action = "register"
args = { state = "searching" }

[[step]]
at = 0.05
action = "sms.deliver"
args = { sender = "+4915550", text = "hi" }
"""


def test_parse_a_scenario() -> None:
    s = parse(GOOD, "two.toml")
    assert s.name == "two" and [(x.at, x.action, x.line) for x in s.steps] == [
        (0.0, "register", 2), (0.05, "sms.deliver", 7)]
    assert s.steps[0].args == {"state": "searching", "operator": None, "name": None,
                               "cause": None}


@pytest.mark.parametrize(("text", "error"), [
    ("[[step]\n", "f.toml: not TOML"),
    ("", "f.toml: no [[step]]"),
    ("color = 1\n", "unknown key 'color'"),
    ("step = 3\n", "steps are [[step]] tables"),
    ('[[step]]\nat = -1\naction = "detach"\n', "f.toml:1: step 1: 'at' must be seconds"),
    ('[[step]]\nat = "soon"\naction = "detach"\n', "'at' must be seconds"),
    ('[[step]]\nat = 1\naction = "detach"\n[[step]]\nat = 0.5\naction = "detach"\n',
     "f.toml:4: step 2: at = 0.5 is before the previous step's 1.0"),
    ('[[step]]\nat = 1\naction = "fly"\n', "f.toml:1: step 1: unknown action 'fly'"),
    ('[[step]]\nat = 1\naction = "detach"\nwhen = 2\n', "unknown key 'when'"),
    ('[[step]]\nat = 1\naction = "sim"\nargs = 3\n', "'args' must be a table"),
    ('\n\n[[step]]\nat = 1\naction = "signal"\nargs = { rssi = 40 }\n',
     "f.toml:3: step 1: signal: 'rssi' must be 0..31 or 99, not 40"),
])
def test_bad_scenarios_name_the_step_and_line(text: str, error: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse(text, "f.toml")
    assert error in str(info.value)


def test_too_many_steps() -> None:
    text = '[[step]]\nat = 0\naction = "detach"\n' * 10_001
    with pytest.raises(ScenarioError, match="at most 10000"):
        parse(text, "big.toml")


def test_play_keeps_order_and_times() -> None:
    s = parse(GOOD, "two.toml")
    sent: list[tuple[float, str, dict[str, Any]]] = []
    t0 = time.monotonic()

    async def send(action: str, args: dict[str, Any]) -> dict[str, Any]:
        sent.append((time.monotonic() - t0, action, args))
        return {"indications": []}

    assert asyncio.run(play(s, send)) == 0
    assert [(a, args) for _, a, args in sent] == [
        ("register", {"state": "searching"}), ("sms.deliver", {"sender": "+4915550",
                                                               "text": "hi"})]
    assert sent[1][0] >= 0.05


def test_play_retries_a_restarting_modem_then_stops_on_other_errors() -> None:
    s = parse(GOOD, "two.toml")
    calls: list[str] = []

    async def send(action: str, args: dict[str, Any]) -> dict[str, Any]:
        calls.append(action)
        if len(calls) == 1:
            raise control.ControlError(errno.EAGAIN, "restarting")
        if action == "sms.deliver":
            raise control.ControlError(errno.EOPNOTSUPP, "no SMS")
        return {}

    with pytest.raises(control.ControlError, match="no SMS"):
        asyncio.run(play(s, send))
    assert calls == ["register", "register", "sms.deliver"]
    calls.clear()
    failures: list[str] = []
    assert asyncio.run(play(s, send, lambda st_, r, e: failures.append(str(e)) if e else None,
                            stop_on_error=False)) == 1
    assert failures == ["no SMS"]


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_examples_parse(example: Path) -> None:
    scenario = parse(example.read_text(), str(example))
    assert scenario.name and scenario.description and scenario.steps


def test_the_examples_cover_the_issue() -> None:
    assert {p.stem for p in EXAMPLES.glob("*.toml")} >= {
        "flaky-coverage", "roaming", "sim-pin", "sms-burst", "crash-recovery",
        "fcc-locked-radio"}


def test_action_enums_are_what_the_cli_offers() -> None:
    from click.testing import CliRunner

    from iosm_cuse.cli import main

    out = CliRunner().invoke(main, ["modem", "register", "--help"]).output
    assert "{" + "|".join(m.value for m in model_control.Network) + "}" in out
