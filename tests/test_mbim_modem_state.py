"""The modem's state without MBIM framing: changes return the indications they cause.

What the state object returns is what a subscribed host receives, byte for byte, once the
function frames it; the live control of later issues drives the state the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import BasicConnect as B
from iosm_cuse.mbim.cids import IpType, PinOperation, PinType, RegisterAction, RegisterState
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.message import Command, IndicateStatus, Open, decode_message, encode_message
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.config import ConfigError, ModemConfig
from iosm_cuse.sim.mbim import Indication, MbimFunction, ModemState, SessionState
from iosm_cuse.sim.mbim.handlers import Answer, ServiceHandlers

BC = Service.BASIC_CONNECT


def cids_of(indications: list[Indication] | tuple[Indication, ...]) -> list[int]:
    return [ind.cid for ind in indications]


def test_registration_without_framing_gives_the_bytes_a_subscribed_host_gets() -> None:
    modem = ModemState()
    change = modem.register(RegisterAction.MANUAL, "00102")
    assert change.status is Status.NONE
    assert cids_of(change.indications) == [B.REGISTER_STATE]
    (ind,) = change.indications
    values = infobuf.decode(cids.REGISTER_STATE, ind.info())
    assert values["RegisterState"] is RegisterState.ROAMING and values["ProviderId"] == "00102"

    # The same change through the function: a host subscribed to REGISTER_STATE only.
    fn = MbimFunction()
    fn.receive(encode_message(Open(1, 4096)))
    subscribe = infobuf.encode(cids.DEVICE_SERVICE_SUBSCRIBE_LIST, {"Events": [
        {"DeviceServiceId": BC.value, "Cids": [B.REGISTER_STATE]}]})
    fn.receive(encode_message(Command(2, BC.value, B.DEVICE_SERVICE_SUBSCRIBE_LIST,
                                      CommandType.SET, subscribe)))
    register = infobuf.encode(cids.REGISTER_STATE_SET, {
        "ProviderId": "00102", "RegisterAction": RegisterAction.MANUAL, "DataClass": 0})
    fn.receive(encode_message(Command(3, BC.value, B.REGISTER_STATE, CommandType.SET, register)))
    (sent,) = [decode_message(t) for t in fn.pending_indications()]
    assert sent == IndicateStatus(0, BC.value, B.REGISTER_STATE, ind.info())


def test_indications_go_out_only_to_an_open_subscribed_host() -> None:
    fn = MbimFunction()
    changed = fn.modem.set_signal(fn.config.rssi + 1)
    fn.indicate(changed)                       # not opened: nobody to tell
    assert fn.pending_indications() == []
    fn.receive(encode_message(Open(1, 4096)))
    fn.indicate(changed)
    (sent,) = [decode_message(t) for t in fn.pending_indications()]
    assert isinstance(sent, IndicateStatus) and sent.cid == B.SIGNAL_STATE
    fn.subscribe({BC.value: frozenset({B.CONNECT})})
    fn.indicate(changed)
    assert fn.pending_indications() == []


def attached_with_sessions(*sids: int) -> tuple[ModemState, list[tuple[int, Any]]]:
    modem = ModemState()
    events: list[tuple[int, SessionState | None]] = []
    modem.session_listener = lambda sid, state: events.append((sid, state))
    assert modem.attach().status is Status.NONE
    for sid in sids:
        assert modem.activate(sid, "internet", IpType.IPV4V6).status is Status.NONE
    events.clear()
    return modem, events


def test_radio_off_takes_sessions_registration_and_attach_down_in_order() -> None:
    modem, events = attached_with_sessions(0, 2)
    out = modem.set_radio(False)
    assert cids_of(out) == [B.CONNECT, B.CONNECT, B.REGISTER_STATE, B.PACKET_SERVICE,
                            B.RADIO_STATE]
    assert [ind.values["SessionId"] for ind in out[:2]] == [0, 2]
    assert events == [(0, None), (2, None)]
    assert modem.sessions == {} and not modem.attached and modem.registered_provider is None
    assert modem.set_radio(False) == []        # no change, nothing to say


def test_detach_and_deactivate_are_live_controls() -> None:
    modem, events = attached_with_sessions(1, 3)
    assert cids_of(modem.deactivate(3)) == [B.CONNECT]
    assert modem.deactivate(3) == []           # already down
    assert cids_of(modem.detach()) == [B.CONNECT, B.PACKET_SERVICE]
    assert events == [(3, None), (1, None)]


def test_refusals_change_nothing() -> None:
    modem = ModemState(ModemConfig(pin_required=True))
    assert modem.attach().status is Status.PIN_REQUIRED
    assert modem.activate(0, "internet", IpType.IPV4).status is Status.PIN_REQUIRED
    assert modem.register(RegisterAction.MANUAL, "00102").status is Status.PIN_REQUIRED
    wrong = modem.pin_operation(PinType.PIN1, PinOperation.ENTER, "9999", "")
    assert (wrong.status, wrong.indications) == (Status.FAILURE, ())
    right = modem.pin_operation(PinType.PIN1, PinOperation.ENTER, modem.config.pin, "")
    assert right.status is Status.NONE
    # unlocked: registered, and attached by itself (auto_attach, the default)
    assert cids_of(right.indications) == [B.SUBSCRIBER_READY_STATUS, B.REGISTER_STATE,
                                          B.PACKET_SERVICE]
    assert modem.attached


def test_an_unknown_apn_is_refused_with_its_network_cause() -> None:
    modem = ModemState(ModemConfig(apns=["good"]))
    modem.attach()
    change = modem.activate(0, "bad", IpType.IPV4)
    assert (change.status, change.nw_error) == (Status.INVALID_ACCESS_STRING, 27)
    assert modem.sessions == {}


def test_a_handler_is_registered_once_for_a_declared_cid() -> None:
    table = ServiceHandlers(BC)

    def answer(fn: Any, ct: int, req: dict[str, Any]) -> Answer:
        return Answer(Status.NONE, {})
    table.handles(B.DEVICE_CAPS)(answer)
    with pytest.raises(ValueError, match="second handler"):
        table.handles(B.DEVICE_CAPS)(answer)
    with pytest.raises(ValueError, match="no declared response"):
        table.handles(12345)
    assert [cid for cid, _ in table] == [B.DEVICE_CAPS]


def test_device_services_lists_every_registered_basic_connect_cid() -> None:
    from iosm_cuse.sim.mbim import basic_connect
    listed = MbimFunction().supported_cids()
    assert sorted(listed[BC]) == sorted(cid for cid, _ in basic_connect.HANDLERS)
    assert Service.PROXY_CONTROL not in listed


def test_attached_by_itself_once_registered() -> None:
    """auto_attach (the default): attached from the start, CONNECT needs no ATTACH first."""
    modem = ModemState()
    assert modem.attached and modem.connect_refusal() is None
    assert modem.activate(0, "internet", IpType.IPV4).status is Status.NONE


def test_auto_attach_off_waits_for_the_host() -> None:
    modem = ModemState(ModemConfig(auto_attach=False))
    assert not modem.attached
    assert modem.activate(0, "internet", IpType.IPV4).status is Status.PACKET_SERVICE_DETACHED
    assert cids_of(modem.set_radio(False) + modem.set_radio(True)) == [
        B.REGISTER_STATE, B.RADIO_STATE, B.REGISTER_STATE, B.RADIO_STATE]
    assert not modem.attached           # registering again attaches nothing either


def test_an_explicit_detach_holds_until_the_modem_registers_anew() -> None:
    modem = ModemState()
    assert cids_of(modem.detach()) == [B.PACKET_SERVICE] and not modem.attached
    # a manual registration while registered is no new registration: still detached
    assert cids_of(modem.register(RegisterAction.MANUAL, "00102").indications) == [
        B.REGISTER_STATE]
    assert not modem.attached
    assert modem.activate(0, "internet", IpType.IPV4).status is Status.PACKET_SERVICE_DETACHED
    # radio off and on: deregistered, then registered anew, and attached by itself again
    out = modem.set_radio(False) + modem.set_radio(True)
    assert cids_of(out) == [B.REGISTER_STATE, B.RADIO_STATE, B.REGISTER_STATE,
                            B.PACKET_SERVICE, B.RADIO_STATE]
    assert modem.attached


def test_auto_attach_is_read_from_a_config_file(tmp_path: Path) -> None:
    f = tmp_path / "modem.toml"
    f.write_text("auto_attach = false\n")
    assert not ModemState(ModemConfig.load(f)).attached
    f.write_text('auto_attach = "no"\n')
    with pytest.raises(ConfigError):
        ModemConfig.load(f)
