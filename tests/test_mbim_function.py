"""The modem's MBIM function as a sans-IO state machine, and its ChannelFunction adapter."""

from __future__ import annotations

import asyncio
import struct
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import BasicConnect as B
from iosm_cuse.mbim.cids import IpType, ReadyState, RegisterState
from iosm_cuse.mbim.constants import CommandType, ProtocolError, Status
from iosm_cuse.mbim.message import (
    Close,
    CloseDone,
    Command,
    CommandDone,
    Fragment,
    FragmentCollector,
    FunctionError,
    IndicateStatus,
    Open,
    OpenDone,
    decode_message,
    decode_transfer,
    encode_message,
    fragment,
)
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.mbim import (
    MbimChannelFunction,
    MbimFunction,
    PacketStatistics,
    SessionState,
)

BC = Service.BASIC_CONNECT.value
Q, S = CommandType.QUERY, CommandType.SET


class Host:
    """A minimal host: builds commands from the CID tables and decodes the answers."""

    def __init__(self, fn: MbimFunction, max_transfer: int = 4096) -> None:
        self.fn = fn
        self.tid = 100
        self.events: list[tuple[int, SessionState | None]] = []
        fn.session_listener = lambda sid, st: self.events.append((sid, st))
        (done,) = self.send(encode_message(Open(self.next_tid(), max_transfer)))
        assert done == OpenDone(self.tid, Status.NONE)

    def next_tid(self) -> int:
        self.tid += 1
        return self.tid

    def send(self, data: bytes) -> list[Any]:
        return [decode_message(t) for t in self.fn.receive(data)]

    def command(self, cid: int, ct: int, values: dict[str, Any] | None = None,
                service: Any = BC) -> tuple[int, dict[str, Any] | None]:
        spec = cids.lookup(Service.BASIC_CONNECT, cid)
        layout = spec.request(ct) if spec else None
        info = infobuf.encode(layout, values or {}) if layout is not None else b""
        tid = self.next_tid()
        (done,) = self.send(encode_message(Command(tid, service, cid, ct, info)))
        assert isinstance(done, CommandDone) and done.tid == tid and done.cid == cid
        if not done.info:
            return done.status, None
        assert spec is not None and spec.response is not None
        return done.status, infobuf.decode(spec.response, done.info)

    def indications(self) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for t in self.fn.pending_indications():
            ind = decode_message(t)
            assert isinstance(ind, IndicateStatus) and ind.tid == 0
            spec = cids.lookup(Service.BASIC_CONNECT, ind.cid)
            assert spec is not None and spec.notification is not None
            out.append((ind.cid, infobuf.decode(spec.notification, ind.info)))
        return out

    def connect(self, sid: int = 0, apn: str = "internet", ip_type: int = IpType.IPV4V6,
                command: int = 1, context: Any = ContextType.INTERNET.value
                ) -> tuple[int, dict[str, Any] | None]:
        return self.command(B.CONNECT, S, {
            "SessionId": sid, "ActivationCommand": command, "AccessString": apn,
            "UserName": "", "Password": "", "Compression": 0, "AuthProtocol": 0,
            "IpType": ip_type, "ContextType": context})

    def attach(self, action: int = 0) -> tuple[int, dict[str, Any] | None]:
        return self.command(B.PACKET_SERVICE, S, {"PacketServiceAction": action})

    def ip_config(self, sid: int) -> tuple[int, dict[str, Any] | None]:
        return self.command(B.IP_CONFIGURATION, Q, {
            "SessionId": sid, "IPv4ConfigurationAvailable": 0, "IPv6ConfigurationAvailable": 0,
            "IPv4Address": [], "IPv6Address": [], "IPv4Gateway": None, "IPv6Gateway": None,
            "IPv4DnsServer": [], "IPv6DnsServer": [], "IPv4Mtu": 0, "IPv6Mtu": 0})

    def pin(self, pin: str, new_pin: str = "", ptype: int = 2, op: int = 0
            ) -> tuple[int, dict[str, Any] | None]:
        return self.command(B.PIN, S, {"PinType": ptype, "PinOperation": op, "Pin": pin,
                                       "NewPin": new_pin})


@pytest.fixture
def host() -> Host:
    return Host(MbimFunction())


def test_command_before_open_is_not_opened() -> None:
    fn = MbimFunction()
    (err,) = [decode_message(t) for t in fn.receive(encode_message(Command(77, BC, 1, Q)))]
    assert err == FunctionError(77, ProtocolError.NOT_OPENED)


def test_open_close_and_state_survive_reopen(host: Host) -> None:
    assert host.attach()[0] == Status.NONE
    assert host.connect()[0] == Status.NONE
    assert host.send(encode_message(Close(555))) == [CloseDone(555, Status.NONE)]
    (err,) = host.send(encode_message(Command(556, BC, 1, Q)))
    assert err == FunctionError(556, ProtocolError.NOT_OPENED)
    # a second OPEN while opened succeeds too; neither resets attach or sessions
    assert host.send(encode_message(Open(1, 4096))) == [OpenDone(1, Status.NONE)]
    assert host.send(encode_message(Open(2, 4096))) == [OpenDone(2, Status.NONE)]
    status, conn = host.command(B.CONNECT, Q, {
        "SessionId": 0, "ActivationState": 0, "VoiceCallState": 0, "IpType": 0,
        "ContextType": ContextType.NONE.value, "NwError": 0})
    assert status == Status.NONE and conn and conn["ActivationState"] == 1
    assert host.fn.attached


def test_open_with_tiny_transfer_is_refused() -> None:
    fn = MbimFunction()
    (done,) = [decode_message(t) for t in fn.receive(encode_message(Open(1, 32)))]
    assert done == OpenDone(1, Status.INVALID_PARAMETERS) and not fn.opened


@pytest.mark.parametrize("tid", [1, 2, 0x7FFFFFFF, 0xFFFFFFFF])
def test_transaction_id_is_echoed(host: Host, tid: int) -> None:
    (done,) = host.send(encode_message(Command(tid, BC, B.DEVICE_CAPS, Q)))
    assert isinstance(done, CommandDone) and done.tid == tid and done.status == Status.NONE


def test_device_caps_from_config() -> None:
    config = ModemConfig(device_id="350000000000001", firmware="fw9", max_sessions=4,
                         data_classes=["umts", "lte"])
    h = Host(MbimFunction(config))
    status, caps = h.command(B.DEVICE_CAPS, Q)
    assert status == Status.NONE and caps is not None
    assert (caps["DeviceId"], caps["FirmwareInfo"], caps["MaxSessions"]) == ("350000000000001",
                                                                          "fw9", 4)
    assert caps["DataClass"] == cids.DataClass.UMTS | cids.DataClass.LTE
    assert caps["CellularClass"] == cids.CellularClass.GSM


def test_status_codes_for_what_is_not_supported(host: Host) -> None:
    phonebook = Service.PHONEBOOK.value  # a service the model does not implement
    assert host.command(1, Q, service=phonebook) == (Status.NO_DEVICE_SUPPORT, None)
    unknown = Service.BASIC_CONNECT.value.__class__(int=12345)
    assert host.command(1, Q, service=unknown) == (Status.NO_DEVICE_SUPPORT, None)
    assert host.command(B.EMERGENCY_MODE, Q) == (Status.NO_DEVICE_SUPPORT, None)
    assert host.command(99, Q) == (Status.NO_DEVICE_SUPPORT, None)
    # a CID we answer, asked with a command type it does not have
    assert host.command(B.DEVICE_CAPS, S) == (Status.INVALID_DEVICE_SERVICE_OPERATION, None)
    (done,) = host.send(encode_message(Command(5, BC, B.DEVICE_CAPS, 7)))
    assert isinstance(done, CommandDone)
    assert done.status == Status.INVALID_DEVICE_SERVICE_OPERATION


def test_malformed_info_buffer_is_invalid_parameters(host: Host) -> None:
    bad_string = struct.pack("<IIIIII", 0, 1, 0x1000, 8, 0, 0) + struct.pack("<III", 3, 0, 0)
    bad_string += ContextType.INTERNET.value.bytes
    (done,) = host.send(encode_message(Command(9, BC, B.CONNECT, S, bad_string)))
    assert isinstance(done, CommandDone) and done.status == Status.INVALID_PARAMETERS
    (done,) = host.send(encode_message(Command(10, BC, B.RADIO_STATE, S, b"\x01")))
    assert isinstance(done, CommandDone) and done.status == Status.INVALID_PARAMETERS
    assert host.command(B.RADIO_STATE, S, {"RadioState": 7}) == (Status.INVALID_PARAMETERS, None)


def test_connect_flow_and_ip_configuration() -> None:
    host = Host(MbimFunction(ModemConfig(auto_attach=False)))   # attach only on request
    assert host.connect(sid=3)[0] == Status.PACKET_SERVICE_DETACHED
    status, ps = host.attach()
    assert status == Status.NONE and ps and ps["PacketServiceState"] == 2
    status, conn = host.connect(sid=3)
    assert status == Status.NONE and conn is not None
    assert (conn["SessionId"], conn["ActivationState"], conn["IpType"]) == (3, 1, IpType.IPV4V6)
    assert conn["ContextType"] == ContextType.INTERNET.value
    status, ip = host.ip_config(3)
    assert status == Status.NONE and ip is not None
    assert ip["IPv4Address"] == [{"OnLinkPrefixLength": 24,
                                  "IPv4Address": IPv4Address("10.99.3.2")}]
    assert str(ip["IPv6Address"][0]["IPv6Address"]) == "fd99:3::2"
    assert ip["IPv4Gateway"] == IPv4Address("10.99.3.1") and ip["IPv4Mtu"] == 1500
    assert host.ip_config(2) == (Status.CONTEXT_NOT_ACTIVATED, None)
    assert host.ip_config(8) == (Status.INVALID_PARAMETERS, None)
    sid, state = host.events[-1]
    assert sid == 3 and state is not None
    assert state.ipv4 == IPv4Interface("10.99.3.2/24") and state.apn == "internet"
    status, conn = host.connect(sid=3, command=0)
    assert status == Status.NONE and conn and conn["ActivationState"] == 3
    assert host.events[-1] == (3, None)
    assert host.ip_config(3) == (Status.CONTEXT_NOT_ACTIVATED, None)


def test_connect_refusals() -> None:
    h = Host(MbimFunction(ModemConfig(apns=["good.apn"], max_sessions=2)))
    h.attach()
    status, conn = h.connect(apn="bad.apn")
    assert status == Status.INVALID_ACCESS_STRING and conn and conn["NwError"] == 27
    assert h.connect(sid=2, apn="good.apn") == (Status.INVALID_PARAMETERS, None)
    assert h.connect(apn="good.apn", ip_type=9) == (Status.INVALID_PARAMETERS, None)
    assert h.connect(apn="good.apn", command=5) == (Status.INVALID_PARAMETERS, None)
    assert h.connect(apn="x" * 101) == (Status.INVALID_PARAMETERS, None)
    assert h.connect(apn="good.apn", context=ContextType.IMS.value)[0] \
        == Status.CONTEXT_NOT_SUPPORTED
    assert h.command(B.RADIO_STATE, S, {"RadioState": 0})[0] == Status.NONE
    assert h.connect(apn="good.apn")[0] == Status.RADIO_POWER_OFF
    assert h.attach()[0] == Status.RADIO_POWER_OFF
    assert h.events == []


def test_ip_type_fallbacks() -> None:
    h = Host(MbimFunction(ModemConfig(network_ip_types=["ipv4"])))
    h.attach()
    status, conn = h.connect(sid=1, ip_type=IpType.IPV4V6)
    assert status == Status.NONE and conn and conn["IpType"] == IpType.IPV4
    _, ip = h.ip_config(1)
    assert ip and ip["IPv6Address"] == [] and ip["IPv6ConfigurationAvailable"] == 0
    status, conn = h.connect(sid=2, ip_type=IpType.IPV6)
    assert status == Status.FAILURE and conn and conn["NwError"] == 50
    h6 = Host(MbimFunction(ModemConfig(network_ip_types=["ipv6"])))
    h6.attach()
    status, conn = h6.connect(ip_type=IpType.DEFAULT)
    assert status == Status.NONE and conn and conn["IpType"] == IpType.IPV6
    assert h6.events[-1][1] is not None and h6.events[-1][1].ipv4 is None


def test_radio_off_tears_everything_down_with_indications(host: Host) -> None:
    host.attach()
    host.connect(sid=0)
    host.connect(sid=5)
    host.indications()
    status, radio = host.command(B.RADIO_STATE, S, {"RadioState": 0})
    assert status == Status.NONE and radio == {"HwRadioState": 1, "SwRadioState": 0}
    got = host.indications()
    assert [cid for cid, _ in got] == [B.CONNECT, B.CONNECT, B.REGISTER_STATE,
                                       B.PACKET_SERVICE, B.RADIO_STATE]
    assert got[2][1]["RegisterState"] == RegisterState.DEREGISTERED
    assert sorted(host.events[-2:], key=lambda e: e[0]) == [(0, None), (5, None)]
    _, sig = host.command(B.SIGNAL_STATE, Q)
    assert sig and sig["Rssi"] == 99
    assert host.command(B.VISIBLE_PROVIDERS, Q, {"Action": 0}) == (Status.RADIO_POWER_OFF, None)
    host.command(B.RADIO_STATE, S, {"RadioState": 1})
    _, reg = host.command(B.REGISTER_STATE, Q)
    assert reg and reg["RegisterState"] == RegisterState.HOME and reg["ProviderId"] == "00101"


def test_subscribe_list_governs_indications(host: Host) -> None:
    host.attach(action=1)             # attached by itself (auto_attach): detach first
    assert [cid for cid, _ in host.indications()] == [B.PACKET_SERVICE]   # default: all
    events = [{"DeviceServiceId": BC, "Cids": [B.CONNECT]}]
    status, echo = host.command(B.DEVICE_SERVICE_SUBSCRIBE_LIST, S, {"Events": events})
    assert status == Status.NONE and echo == {"Events": events}
    host.attach(action=1)
    host.attach()
    host.connect()
    assert [cid for cid, _ in host.indications()] == [B.CONNECT]
    host.command(B.DEVICE_SERVICE_SUBSCRIBE_LIST, S, {"Events": []})
    host.connect(command=0)
    host.fn.set_signal(10)
    assert host.indications() == []
    host.command(B.DEVICE_SERVICE_SUBSCRIBE_LIST, S,
                 {"Events": [{"DeviceServiceId": BC, "Cids": []}]})   # no CIDs: all of them
    host.fn.set_signal(11)
    assert [v["Rssi"] for _, v in host.indications()] == [11]


def test_no_indications_when_closed(host: Host) -> None:
    host.send(encode_message(Close(1)))
    host.fn.set_signal(3)
    assert host.fn.pending_indications() == []


def test_pin_countdown_puk_and_blocked_sim() -> None:
    h = Host(MbimFunction(ModemConfig(pin="2468", pin_required=True, pin_retries=3,
                                      puk="11223344", puk_retries=2)))
    _, ready = h.command(B.SUBSCRIBER_READY_STATUS, Q)
    assert ready and ready["ReadyState"] == ReadyState.DEVICE_LOCKED
    assert ready["SubscriberId"] == "" and ready["SimIccId"] == h.fn.config.iccid
    assert h.command(B.PACKET_SERVICE, S, {"PacketServiceAction": 0})[0] == Status.PIN_REQUIRED
    assert h.pin("0000") == (Status.FAILURE, {"PinType": 2, "PinState": 1,
                                              "RemainingAttempts": 2})
    assert h.pin("0000")[1] == {"PinType": 2, "PinState": 1, "RemainingAttempts": 1}
    assert h.pin("0000")[1] == {"PinType": 11, "PinState": 1, "RemainingAttempts": 2}
    assert h.pin("2468")[0] == Status.FAILURE       # the right PIN no longer helps
    assert h.pin("99999999", new_pin="1357", ptype=11)[1] == {
        "PinType": 11, "PinState": 1, "RemainingAttempts": 1}
    h.indications()
    status, info = h.pin("11223344", new_pin="1357", ptype=11)
    assert status == Status.NONE and info and info["PinState"] == 0
    got = h.indications()
    # registered once unlocked, and attached by itself (auto_attach)
    assert [cid for cid, _ in got] == [B.SUBSCRIBER_READY_STATUS, B.REGISTER_STATE,
                                       B.PACKET_SERVICE]
    assert got[0][1]["ReadyState"] == ReadyState.INITIALIZED
    assert got[1][1]["RegisterState"] == RegisterState.HOME
    _, ready = h.command(B.SUBSCRIBER_READY_STATUS, Q)
    assert ready and ready["ReadyState"] == ReadyState.INITIALIZED
    assert ready["TelephoneNumbers"] == h.fn.config.own_numbers
    assert h.pin("1357", op=2)[0] == Status.NONE          # disable
    _, pins = h.command(B.PIN_LIST, Q)
    assert pins and pins["PinDescPin1"]["PinMode"] == cids.PinMode.DISABLED
    # exhaust the PUK: the SIM is blocked for good
    h2 = Host(MbimFunction(ModemConfig(pin_required=True, pin_retries=1, puk_retries=1)))
    h2.pin("9999")
    h2.pin("00000000", new_pin="1234", ptype=11)
    assert h2.command(B.SUBSCRIBER_READY_STATUS, Q)[1]["ReadyState"] == ReadyState.BAD_SIM  # type: ignore[index]
    assert h2.pin("0000") == (Status.BAD_SIM, None)


def test_providers_and_manual_registration(host: Host) -> None:
    _, home = host.command(B.HOME_PROVIDER, Q)
    assert home and home["Provider"]["ProviderId"] == "00101"
    assert home["Provider"]["ProviderName"] == "iosm-sim"
    _, pref = host.command(B.PREFERRED_PROVIDERS, Q)
    assert pref and [p["ProviderId"] for p in pref["Providers"]] == ["00101"]
    _, vis = host.command(B.VISIBLE_PROVIDERS, Q, {"Action": 0})
    assert vis and [p["ProviderId"] for p in vis["Providers"]] == ["00101", "00102"]
    assert host.command(B.REGISTER_STATE, S, {"ProviderId": "99999", "RegisterAction": 1,
                                              "DataClass": 0}) \
        == (Status.PROVIDER_NOT_VISIBLE, None)
    status, reg = host.command(B.REGISTER_STATE, S, {"ProviderId": "00102", "RegisterAction": 1,
                                                     "DataClass": 0})
    assert status == Status.NONE and reg and reg["RegisterState"] == RegisterState.ROAMING
    assert reg["ProviderName"] == "iosm-other" and reg["RegisterMode"] == 2
    status, reg = host.command(B.REGISTER_STATE, S, {"ProviderId": "", "RegisterAction": 0,
                                                     "DataClass": 0})
    assert reg and reg["RegisterState"] == RegisterState.HOME


def test_device_services_lists_what_is_answered(host: Host) -> None:
    _, ds = host.command(B.DEVICE_SERVICES, Q)
    assert ds is not None
    listed = {s["DeviceServiceId"]: s["Cids"] for s in ds["DeviceServices"]}
    assert set(listed) == {BC, Service.SMS.value, Service.USSD.value, Service.ATDS.value,
                           Service.MS_BASIC_CONNECT_EXTENSIONS.value,
                           Service.INTEL_FIRMWARE_UPDATE.value}
    bc = {"Cids": listed[BC]}
    for service, cid_list in listed.items():
        for cid in cid_list:   # every listed CID gets an answer other than NO_DEVICE_SUPPORT
            if (service, cid) == (Service.INTEL_FIRMWARE_UPDATE.value, 1):
                continue       # a reboot: tests/test_mbim_services.py
            for ct in (Q, S):
                (done,) = host.send(encode_message(Command(host.next_tid(), service, cid, ct)))
                assert isinstance(done, CommandDone) and done.status != Status.NO_DEVICE_SUPPORT
    assert B.CONNECT in bc["Cids"] and B.EMERGENCY_MODE not in bc["Cids"]


def test_signal_and_statistics(host: Host) -> None:
    status, sig = host.command(B.SIGNAL_STATE, S, {"SignalStrengthInterval": 5,
                                                   "RssiThreshold": 2, "ErrorRateThreshold": 0})
    assert status == Status.NONE and sig and sig["SignalStrengthInterval"] == 5
    assert sig["Rssi"] == host.fn.config.rssi
    host.fn.add_traffic(in_octets=1000, in_packets=2, out_octets=3000, out_packets=4)
    _, st = host.command(B.PACKET_STATISTICS, Q)
    assert st and (st["InOctets"], st["InPackets"], st["OutOctets"], st["OutPackets"]) == (
        1000, 2, 3000, 4)


def test_proxy_configuration_is_accepted(host: Host) -> None:
    info = infobuf.encode(cids.PROXY_CONFIGURATION, {"DevicePath": "/dev/null", "Timeout": 30})
    (done,) = host.send(encode_message(Command(3, Service.PROXY_CONTROL.value, 1, S, info)))
    assert isinstance(done, CommandDone) and done.status == Status.NONE


# ---------------------------------------------------------------------------- fragments


def test_responses_are_fragmented_to_max_control_transfer() -> None:
    h = Host(MbimFunction(ModemConfig(firmware="f" * 300)), max_transfer=64)
    tid = h.next_tid()
    transfers = h.fn.receive(encode_message(Command(tid, BC, B.DEVICE_CAPS, Q)))
    assert len(transfers) > 5 and all(len(t) <= 64 for t in transfers)
    collector = FragmentCollector()
    whole = None
    for t in transfers:
        item = decode_transfer(t)
        assert isinstance(item, Fragment) and item.tid == tid
        whole = collector.feed(item).message or whole
    assert whole is not None
    done = decode_message(whole)
    assert isinstance(done, CommandDone)
    assert infobuf.decode(cids.DEVICE_CAPS, done.info)["FirmwareInfo"] == "f" * 300


def _connect_fragments(tid: int, max_transfer: int) -> list[bytes]:
    info = infobuf.encode(cids.CONNECT_SET, {
        "SessionId": 0, "ActivationCommand": 1, "AccessString": "a" * 60, "UserName": "u" * 40,
        "Password": "p" * 40, "Compression": 0, "AuthProtocol": 1, "IpType": 1,
        "ContextType": ContextType.INTERNET.value})
    return fragment(encode_message(Command(tid, BC, B.CONNECT, S, info)), max_transfer)


def test_fragmented_host_command_is_reassembled(host: Host) -> None:
    host.attach()
    parts = _connect_fragments(40, 64)
    assert len(parts) > 3
    for p in parts[:-1]:
        assert host.fn.receive(p) == []
    (done,) = host.send(parts[-1])
    assert isinstance(done, CommandDone) and done.tid == 40 and done.status == Status.NONE
    assert host.fn.sessions[0].apn == "a" * 60


def test_out_of_sequence_fragment_is_a_function_error(host: Host) -> None:
    parts = _connect_fragments(41, 64)
    host.fn.receive(parts[0])
    assert host.send(parts[2]) == [FunctionError(41, ProtocolError.FRAGMENT_OUT_OF_SEQUENCE)]
    # the next whole command still works
    assert host.command(B.DEVICE_CAPS, Q)[0] == Status.NONE


def test_fragment_timeout() -> None:
    now = [0.0]
    fn = MbimFunction(clock=lambda: now[0], fragment_timeout=1.25)
    h = Host(fn)
    parts = _connect_fragments(42, 64)
    fn.receive(parts[0])
    assert fn.next_timer() == 1.25
    now[0] = 2.0
    assert [decode_message(t) for t in fn.handle_timer()] == [
        FunctionError(42, ProtocolError.TIMEOUT_FRAGMENT)]
    assert fn.next_timer() is None
    assert h.send(parts[1]) == [FunctionError(42, ProtocolError.FRAGMENT_OUT_OF_SEQUENCE)]


def test_length_mismatch_and_garbage(host: Host) -> None:
    data = encode_message(Command(50, BC, B.DEVICE_CAPS, Q))
    assert host.send(data + b"\0\0\0\0") == [FunctionError(50, ProtocolError.LENGTH_MISMATCH)]
    assert host.send(data[:-1]) == [FunctionError(50, ProtocolError.LENGTH_MISMATCH)]
    assert host.fn.receive(b"\x03\x00") == []
    assert host.send(struct.pack("<III", 0x80000003, 12, 51)) == [
        FunctionError(51, ProtocolError.LENGTH_MISMATCH)]
    assert host.send(encode_message(OpenDone(52, 0))) == [
        FunctionError(52, ProtocolError.UNKNOWN)]


# ------------------------------------------------------------------------------- adapter


def test_channel_function_adapter() -> None:
    fn = MbimFunction(ModemConfig(auto_attach=False))   # the attach below changes the state
    adapter = MbimChannelFunction(fn)
    sent: list[bytes] = []
    adapter.opened(sent.append)
    adapter.receive(encode_message(Open(1, 4096)))
    adapter.receive(encode_message(Command(2, BC, B.PACKET_SERVICE, S, struct.pack("<I", 0))))
    msgs = [decode_message(t) for t in sent]
    assert [type(m).__name__ for m in msgs] == ["OpenDone", "CommandDone", "IndicateStatus"]
    sent.clear()
    fn.set_signal(7)                 # an event from the rest of the model goes out at once
    (ind,) = [decode_message(t) for t in sent]
    assert isinstance(ind, IndicateStatus) and ind.cid == B.SIGNAL_STATE
    adapter.closed()
    sent.clear()
    fn.set_signal(8)
    adapter.receive(encode_message(Command(3, BC, B.DEVICE_CAPS, Q)))
    assert sent == [] and fn.attached   # nothing goes out on a closed channel; state stays


def test_adapter_reports_fragment_timeout_from_the_loop() -> None:
    async def run() -> list[Any]:
        fn = MbimFunction(fragment_timeout=0.05)
        adapter = MbimChannelFunction(fn)
        sent: list[bytes] = []
        adapter.opened(sent.append)
        adapter.receive(encode_message(Open(1, 4096)))
        adapter.receive(_connect_fragments(9, 64)[0])
        await asyncio.sleep(0.2)
        return [decode_message(t) for t in sent]

    msgs = asyncio.run(run())
    assert msgs[-1] == FunctionError(9, ProtocolError.TIMEOUT_FRAGMENT)


# ------------------------------------------------------------------------- invariants

ACTIONS = st.one_of(
    st.tuples(st.just("attach"), st.integers(0, 1)),
    st.tuples(st.just("radio"), st.integers(0, 1)),
    st.tuples(st.just("connect"), st.integers(0, 8)),
    st.tuples(st.just("disconnect"), st.integers(0, 8)),
    st.tuples(st.just("pin"), st.sampled_from(["0000", "9999"])),
    st.tuples(st.just("puk"), st.sampled_from(["12345678", "00000000"])),
    st.tuples(st.just("register"), st.sampled_from(["", "00101", "00102", "77777"])),
    st.tuples(st.just("reopen"), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.lists(ACTIONS, max_size=40))
def test_state_machine_invariants(locked: bool, actions: list[tuple[str, Any]]) -> None:
    h = Host(MbimFunction(ModemConfig(pin_required=locked)))
    announced: dict[int, SessionState] = {}
    indicated: dict[int, int] = {}
    for name, arg in actions:
        if name == "attach":
            h.attach(arg)
        elif name == "radio":
            h.command(B.RADIO_STATE, S, {"RadioState": arg})
        elif name == "connect":
            h.connect(sid=arg)
        elif name == "disconnect":
            h.connect(sid=arg, command=0)
        elif name == "pin":
            h.pin(arg)
        elif name == "puk":
            h.pin(arg, new_pin="0000", ptype=11)
        elif name == "register":
            h.command(B.REGISTER_STATE, S, {"ProviderId": arg, "RegisterAction": int(bool(arg)),
                                           "DataClass": 0})
        else:
            h.send(encode_message(Open(h.next_tid(), 4096)))
        for sid, state in h.events:
            if state is None:
                announced.pop(sid, None)
            else:
                announced[sid] = state
        h.events.clear()
        for cid, values in h.indications():
            if cid == B.CONNECT:
                indicated[values["SessionId"]] = values["ActivationState"]
        fn = h.fn
        # the gateway's view (listener) is the function's view
        assert announced == fn.sessions
        # what was indicated last for a session is its state now
        for sid, activation in indicated.items():
            assert (activation == 1) == (sid in fn.sessions)
        if fn.sessions:
            assert fn.attached and fn.radio_on and fn.sim_ready
        if fn.attached:
            assert fn.registered_provider is not None
        assert all(0 <= sid < fn.config.max_sessions for sid in fn.sessions)
        assert fn.internal_errors == 0


def test_without_a_sim() -> None:
    h = Host(MbimFunction(ModemConfig(sim_present=False)))
    _, ready = h.command(B.SUBSCRIBER_READY_STATUS, Q)
    assert ready and ready["ReadyState"] == ReadyState.SIM_NOT_INSERTED
    assert ready["SimIccId"] == "" and ready["SubscriberId"] == ""
    assert h.command(B.PIN, Q) == (Status.SIM_NOT_INSERTED, None)
    _, reg = h.command(B.REGISTER_STATE, Q)
    assert reg and reg["RegisterState"] == RegisterState.DEREGISTERED
    assert h.attach()[0] == Status.SIM_NOT_INSERTED
    assert h.connect()[0] == Status.SIM_NOT_INSERTED
    assert h.command(B.HOME_PROVIDER, Q) == (Status.SIM_NOT_INSERTED, None)


def test_statistics_from_a_source(host: Host) -> None:
    counters = PacketStatistics(in_octets=2**64 + 5, out_packets=9, in_discards=2**32 + 1)
    host.fn.statistics_source = lambda: counters
    _, st = host.command(B.PACKET_STATISTICS, Q)
    assert st and (st["InOctets"], st["OutPackets"], st["InDiscards"]) == (5, 9, 1)
    counters.out_packets = 10
    assert host.command(B.PACKET_STATISTICS, Q)[1]["OutPackets"] == 10  # type: ignore[index]


def test_unlocked_pin_names_pin1_and_its_retries(host: Host) -> None:
    """ModemManager shows "unlock retries: sim-pin (3)" only for a real PinType
    (docs/modemmanager.md §4)."""
    status, pin = host.command(B.PIN, Q)
    assert status == Status.NONE
    assert pin == {"PinType": 2, "PinState": 0, "RemainingAttempts": 3}  # PIN1, unlocked


def test_deactivation_carries_regular_deactivation_cause(host: Host) -> None:
    """A host disconnect reports 3GPP cause #36 (docs/modemmanager.md §4), in the reply and
    in the indication, where ModemManager logs "Unknown error" for 0."""
    host.attach()
    host.connect(sid=0)
    host.indications()
    status, conn = host.connect(sid=0, command=0)
    assert status == Status.NONE and conn and conn["ActivationState"] == 3
    assert conn["NwError"] == 36
    connects = [v for cid, v in host.indications() if cid == B.CONNECT]
    assert [(c["ActivationState"], c["NwError"]) for c in connects] == [(3, 36)]
    # a session that was not up: nothing was deactivated, no cause
    status, conn = host.connect(sid=0, command=0)
    assert conn and conn["NwError"] == 0 and host.indications() == []
