"""The services besides BASIC_CONNECT that ModemManager uses, per CID, through the function's
bytes: SMS, USSD, ATDS SIGNAL, MS Basic Connect Extensions, PROVISIONED_CONTEXTS, Intel
MODEM_REBOOT; and SIGNAL_STATE reporting honouring the host's interval and thresholds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import (
    Atds,
    IntelFirmwareUpdate,
    LteAttachState,
    MsBasicConnectExtensions,
    Sms,
    SmsFlag,
    SmsFormat,
    SmsStatus,
    SmsStatusFlag,
    Ussd,
    UssdAction,
    UssdResponse,
)
from iosm_cuse.mbim.cids import BasicConnect as B
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.message import (
    Command,
    CommandDone,
    IndicateStatus,
    Open,
    decode_message,
    encode_message,
)
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.mbim import MbimFunction
from iosm_cuse.sim.mbim.sms_pdu import (
    decode_pdu,
    decode_ussd,
    encode_submit,
    encode_ussd,
    pack_septets,
)

Q, S = CommandType.QUERY, CommandType.SET
T0 = 1_700_000_000.0   # the wall clock of these tests: 2023-11-14 22:13:20 UTC


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Host:
    """A host talking to the function in MBIM bytes, decoding answers by their layouts."""

    def __init__(self, config: ModemConfig | None = None) -> None:
        self.clock = Clock()
        self.fn = MbimFunction(config, clock=self.clock, wallclock=lambda: T0)
        self.tid = 0
        self.reboots = 0
        self.fn.reboot_hook = self._rebooted
        self.fn.receive(encode_message(Open(self.next_tid(), 4096)))

    def _rebooted(self) -> None:
        self.reboots += 1

    def next_tid(self) -> int:
        self.tid += 1
        return self.tid

    def raw(self, service: Service, cid: int, ct: CommandType, info: bytes = b""
            ) -> CommandDone:
        (done,) = [decode_message(t) for t in self.fn.receive(
            encode_message(Command(self.next_tid(), service.value, cid, ct, info)))]
        assert isinstance(done, CommandDone)
        return done

    def command(self, service: Service, cid: int, ct: CommandType,
                values: dict[str, Any] | None = None) -> tuple[Status, dict[str, Any] | None]:
        spec = cids.lookup(service, cid)
        assert spec is not None
        layout = spec.request(ct)
        assert layout is not None and spec.response is not None
        done = self.raw(service, cid, ct, infobuf.encode(layout, values or {}))
        if done.status != Status.NONE and not done.info:
            return Status(done.status), None
        return Status(done.status), infobuf.decode(spec.response, done.info)

    def indications(self) -> list[tuple[UUID, int, dict[str, Any]]]:
        out = []
        for t in self.fn.pending_indications():
            msg = decode_message(t)
            assert isinstance(msg, IndicateStatus)
            service = Service.lookup(msg.service)
            assert service is not None
            spec = cids.lookup(service, msg.cid)
            assert spec is not None and spec.notification is not None
            out.append((msg.service, msg.cid, infobuf.decode(spec.notification, msg.info)))
        return out

    def attach(self) -> None:
        status, _ = self.command(Service.BASIC_CONNECT, B.PACKET_SERVICE, S,
                                 {"PacketServiceAction": cids.PacketServiceAction.ATTACH})
        assert status is Status.NONE
        self.indications()


@pytest.fixture
def host() -> Host:
    return Host()


def send_record(pdu: bytes) -> bytes:
    """SMS SEND's information buffer as libmbim writes it: the record inline after Format,
    its offset counted from the record's start."""
    record = infobuf.encode(cids.SMS_PDU_SEND_RECORD, {"PduData": pdu})
    return infobuf.encode(cids.SMS_SEND_SET, {"Format": SmsFormat.PDU, "Record": record})


# ---------------------------------------------------------------------------------- SMS


def test_device_caps_offer_pdu_messaging(host: Host) -> None:
    _, caps = host.command(Service.BASIC_CONNECT, B.DEVICE_CAPS, Q)
    assert caps is not None
    assert caps["SmsCaps"] == cids.SmsCaps.PDU_RECEIVE | cids.SmsCaps.PDU_SEND


def test_sms_configuration_query_and_set(host: Host) -> None:
    status, conf = host.command(Service.SMS, Sms.CONFIGURATION, Q)
    assert status is Status.NONE and conf is not None
    assert (conf["Format"], conf["SmsStorageState"], conf["MaxMessages"]) == (
        SmsFormat.PDU, cids.SmsStorageState.INITIALIZED, 30)
    assert conf["ScAddress"] == host.fn.config.smsc
    status, conf = host.command(Service.SMS, Sms.CONFIGURATION, S,
                                {"Format": SmsFormat.PDU, "ScAddress": "+4912345"})
    assert status is Status.NONE and conf is not None and conf["ScAddress"] == "+4912345"
    cdma = {"Format": SmsFormat.CDMA, "ScAddress": ""}
    assert host.command(Service.SMS, Sms.CONFIGURATION, S, cdma)[0] is Status.INVALID_PARAMETERS
    _, after = host.command(Service.SMS, Sms.CONFIGURATION, Q)
    assert after is not None and after["ScAddress"] == "+4912345"


def test_delivered_sms_is_indicated_stored_and_read_by_index(host: Host) -> None:
    host.fn.deliver_sms("+15551234", "Hello from the network")
    (read, store) = host.indications()
    assert read[:2] == (Service.SMS.value, Sms.READ)
    (record,) = read[2]["PduMessages"]
    assert record["MessageStatus"] is SmsStatus.NEW and record["MessageIndex"] == 1
    pdu = decode_pdu(record["PduData"])
    assert (pdu.kind, pdu.address) == ("deliver", "+15551234")
    assert pdu.text == "Hello from the network"
    assert pdu.smsc == host.fn.config.smsc
    assert pdu.timestamp == datetime.fromtimestamp(T0, UTC)
    assert store[1] == Sms.MESSAGE_STORE_STATUS
    assert store[2] == {"Flag": SmsStatusFlag.NEW_MESSAGE, "MessageIndex": 1}
    # what ModemManager does next: read the index it was told
    status, got = host.command(Service.SMS, Sms.READ, Q,
                               {"Format": SmsFormat.PDU, "Flag": SmsFlag.INDEX, "MessageIndex": 1})
    assert status is Status.NONE and got is not None
    assert [m["PduData"] for m in got["PduMessages"]] == [record["PduData"]]
    # read once, it is old; the store status no longer flags a new message
    _, again = host.command(Service.SMS, Sms.READ, Q,
                            {"Format": SmsFormat.PDU, "Flag": SmsFlag.NEW, "MessageIndex": 0})
    assert again is not None and again["PduMessages"] == []
    _, st = host.command(Service.SMS, Sms.MESSAGE_STORE_STATUS, Q)
    assert st == {"Flag": SmsStatusFlag.NONE, "MessageIndex": 0}


def test_read_all_delete_and_unknown_index(host: Host) -> None:
    for n in range(3):
        host.fn.modem.deliver_sms(f"+1555000{n}", f"message {n}")
    _, got = host.command(Service.SMS, Sms.READ, Q,
                          {"Format": SmsFormat.PDU, "Flag": SmsFlag.ALL, "MessageIndex": 0})
    assert got is not None
    assert [decode_pdu(m["PduData"]).text for m in got["PduMessages"]] == [
        "message 0", "message 1", "message 2"]
    assert [m["MessageIndex"] for m in got["PduMessages"]] == [1, 2, 3]
    assert host.command(Service.SMS, Sms.DELETE, S,
                        {"Flag": SmsFlag.INDEX, "MessageIndex": 2}) == (Status.NONE, {})
    assert host.command(Service.SMS, Sms.DELETE, S, {"Flag": SmsFlag.INDEX, "MessageIndex": 2}
                        )[0] is Status.INVALID_PARAMETERS
    read2 = {"Format": SmsFormat.PDU, "Flag": SmsFlag.INDEX, "MessageIndex": 2}
    assert host.command(Service.SMS, Sms.READ, Q, read2)[0] is Status.INVALID_PARAMETERS
    host.fn.modem.deliver_sms("+15550009", "reuses the free index")
    assert 2 in host.fn.modem.sms.messages
    assert host.command(Service.SMS, Sms.DELETE, S,
                        {"Flag": SmsFlag.ALL, "MessageIndex": 0}) == (Status.NONE, {})
    assert host.fn.modem.sms.messages == {}


def test_full_store_says_so_and_keeps_nothing() -> None:
    host = Host(ModemConfig(sms_max_messages=2))
    host.fn.deliver_sms("+1", "a")
    host.fn.deliver_sms("+2", "b")
    host.indications()
    host.fn.deliver_sms("+3", "c")
    ((_, cid, values),) = host.indications()
    assert cid == Sms.MESSAGE_STORE_STATUS and values["Flag"] & SmsStatusFlag.MESSAGE_STORE_FULL
    assert len(host.fn.modem.sms.messages) == 2


def test_deliver_rejects_what_one_sms_cannot_carry(host: Host) -> None:
    with pytest.raises(ValueError):
        host.fn.modem.deliver_sms("not a number", "x")
    with pytest.raises(ValueError):
        host.fn.modem.deliver_sms("+1", "x" * 161)
    assert host.fn.modem.sms.messages == {}


@pytest.mark.parametrize("text", ["Hi there, 5 € [ok]", "Привет, мир ✓"])
def test_sent_sms_reaches_the_outbox_decoded(host: Host, text: str) -> None:
    pdu = encode_submit("+4915112345678", text, reference=7, smsc="")
    done = host.raw(Service.SMS, Sms.SEND, S, send_record(pdu))
    assert done.status == Status.NONE
    ref = infobuf.decode(cids.SMS_SEND, done.info)["MessageReference"]
    (out,) = host.fn.modem.sms_outbox()
    assert out["to"] == "+4915112345678" and out["text"] == text
    assert out["index"] == 1 and out["time"] == T0 and out["reference"] == ref


def test_send_refused_when_unregistered_or_malformed(host: Host) -> None:
    pdu = encode_submit("+4915112345678", "x")
    host.fn.modem.set_radio(False)
    assert host.raw(Service.SMS, Sms.SEND, S, send_record(pdu)).status == Status.RADIO_POWER_OFF
    host.fn.modem.set_radio(True)
    for bad in (b"", b"\x00", b"\x00\x01\x00\x50\x91", pdu[:-1] + b"", b"\x00\x02" + pdu[2:]):
        assert host.raw(Service.SMS, Sms.SEND, S, send_record(bad)).status == \
            Status.INVALID_PARAMETERS, bad.hex()
    # a record whose offset points outside it
    broken = infobuf.encode(cids.SMS_SEND_SET, {"Format": SmsFormat.PDU,
                                                "Record": b"\x40\x00\x00\x00\x10\x00\x00\x00"})
    assert host.raw(Service.SMS, Sms.SEND, S, broken).status == Status.INVALID_PARAMETERS
    assert host.fn.modem.sms_outbox() == []


def test_stored_sms_from_config_are_there_at_power_on() -> None:
    host = Host(ModemConfig(stored_sms=[{"from": "+3312", "text": "welcome"}]))
    _, got = host.command(Service.SMS, Sms.READ, Q,
                          {"Format": SmsFormat.PDU, "Flag": SmsFlag.ALL, "MessageIndex": 0})
    assert got is not None
    assert [decode_pdu(m["PduData"]).text for m in got["PduMessages"]] == ["welcome"]


# --------------------------------------------------------------------------------- USSD


def ussd_set(action: UssdAction, text: str) -> dict[str, Any]:
    dcs, payload = encode_ussd(text)
    return {"Action": action, "DataCodingScheme": dcs, "Payload": payload}


def test_ussd_initiate_is_answered_from_the_config(host: Host) -> None:
    status, ans = host.command(Service.USSD, Ussd.USSD, S, ussd_set(UssdAction.INITIATE, "*100#"))
    assert status is Status.NONE and ans is not None
    assert ans["Response"] is UssdResponse.NO_ACTION_REQUIRED
    assert decode_ussd(ans["DataCodingScheme"], ans["Payload"]) == "Your balance is 42.00 EUR"
    _, other = host.command(Service.USSD, Ussd.USSD, S, ussd_set(UssdAction.INITIATE, "*123#"))
    assert other is not None
    assert decode_ussd(other["DataCodingScheme"], other["Payload"]) == \
        "iosm-sim: no service for *123#"
    _, cancel = host.command(Service.USSD, Ussd.USSD, S, ussd_set(UssdAction.CANCEL, ""))
    assert cancel is not None and cancel["Response"] is UssdResponse.TERMINATED_BY_NETWORK


def test_ussd_as_modemmanager_packs_it_and_refusals(host: Host) -> None:
    # MM packs GSM 7-bit with zero fill: "*100#" is 5 septets in 5 octets
    from iosm_cuse.sim.mbim.sms_pdu import gsm7_septets
    septets = gsm7_septets("*100#")
    assert septets is not None
    req = {"Action": UssdAction.INITIATE, "DataCodingScheme": 0x0F,
           "Payload": pack_septets(septets)}
    host.fn.modem.set_radio(False)
    assert host.command(Service.USSD, Ussd.USSD, S, req)[0] is Status.RADIO_POWER_OFF
    host.fn.modem.set_radio(True)
    assert host.command(Service.USSD, Ussd.USSD, S, req)[0] is Status.NONE
    bad = dict(req, DataCodingScheme=0xA0)
    assert host.command(Service.USSD, Ussd.USSD, S, bad)[0] is Status.INVALID_PARAMETERS
    assert host.command(Service.USSD, Ussd.USSD, S, {**req, "Action": 3})[0] \
        is Status.INVALID_PARAMETERS


def test_network_initiated_ussd_is_indicated(host: Host) -> None:
    host.fn.ussd_notify("Bonus: 100 MB free ✓")
    ((service, cid, values),) = host.indications()
    assert (service, cid) == (Service.USSD.value, Ussd.USSD)
    assert values["Response"] is UssdResponse.NO_ACTION_REQUIRED
    assert decode_ussd(values["DataCodingScheme"], values["Payload"]) == "Bonus: 100 MB free ✓"


# ------------------------------------------------------------------------------- signal


def signal_set(host: Host, interval: int, rssi_threshold: int, er_threshold: int = 0) -> None:
    status, _ = host.command(Service.BASIC_CONNECT, B.SIGNAL_STATE, S, {
        "SignalStrengthInterval": interval, "RssiThreshold": rssi_threshold,
        "ErrorRateThreshold": er_threshold})
    assert status is Status.NONE


def rssis(host: Host) -> list[int]:
    return [v["Rssi"] for _, cid, v in host.indications() if cid == B.SIGNAL_STATE]


def test_signal_threshold_suppresses_small_moves(host: Host) -> None:
    signal_set(host, 0, 3)
    host.fn.set_signal(21)      # from 20: a move of 1
    host.fn.set_signal(22)      # 2 from the last report
    assert rssis(host) == []
    host.fn.set_signal(23)      # 3: reported
    assert rssis(host) == [23]
    host.fn.set_signal(21)      # 2 back: not reported
    host.fn.set_signal(26)      # 3 from 23
    assert rssis(host) == [26]


def test_signal_interval_holds_back_and_the_timer_sends_the_latest(host: Host) -> None:
    signal_set(host, 5, 1)
    host.fn.set_signal(10)
    assert rssis(host) == [10]
    host.clock.now += 1
    host.fn.set_signal(12)
    host.fn.set_signal(14)
    assert rssis(host) == []
    due = host.fn.next_timer()
    assert due == 105.0         # 5 s after the last report
    host.clock.now = 104.9
    host.fn.handle_timer()
    assert rssis(host) == []
    host.clock.now = 105.0
    host.fn.handle_timer()
    assert rssis(host) == [14]
    assert host.fn.next_timer() is None
    host.clock.now = 111.0      # an interval later, a move goes out at once
    host.fn.set_signal(16)
    assert rssis(host) == [16]


def test_signal_threshold_off_and_back_where_reported(host: Host) -> None:
    signal_set(host, 5, 0xFFFFFFFF)
    host.fn.set_signal(3)
    assert rssis(host) == []
    signal_set(host, 5, 1)
    host.fn.set_signal(10)
    host.clock.now += 1
    host.fn.set_signal(12)
    host.fn.set_signal(10)      # back where reported before the interval passed
    host.clock.now += 10
    host.fn.handle_timer()
    assert rssis(host) == [10]


def test_signal_values_out_of_range_change_nothing(host: Host) -> None:
    for kwargs in ({"rssi": 32}, {"rssi": 5, "error_rate": 8}, {"rssi": 5, "rsrp": -30},
                   {"rssi": 5, "rsrq": -25}, {"rssi": 5, "snr": 31}):
        with pytest.raises(ValueError):
            host.fn.modem.set_signal(**kwargs)
    assert host.fn.modem.rssi == host.fn.config.rssi


def test_atds_signal_carries_the_lte_values_set(host: Host) -> None:
    host.fn.set_signal(25, 1, rsrp=-87, rsrq=-9, snr=17)
    status, sig = host.command(Service.ATDS, Atds.SIGNAL, Q)
    assert status is Status.NONE and sig is not None
    # ModemManager: rsrp = code - 140, rsrq = code / 2 - 19.5, snr = code - 5, rssi = 2 code - 113
    assert sig["Rsrp"] - 140 == -87 and sig["Rsrq"] / 2 - 19.5 == -9 and sig["Rssnr"] - 5 == 17
    assert (sig["Rssi"], sig["ErrorRate"], sig["Rscp"], sig["Ecno"]) == (25, 1, 0xFF, 0xFF)
    host.fn.modem.set_radio(False)
    _, off = host.command(Service.ATDS, Atds.SIGNAL, Q)
    assert off is not None and off["Rssi"] == 99 and off["Rsrp"] == 0xFF


# ------------------------------------------------------- contexts, LTE attach, capabilities


def test_provisioned_contexts_add_replace_delete(host: Host) -> None:
    _, ctx = host.command(Service.BASIC_CONNECT, B.PROVISIONED_CONTEXTS, Q)
    assert ctx is not None and [c["AccessString"] for c in ctx["ProvisionedContexts"]] == [
        "internet"]
    new = {"ContextId": 0xFFFFFFFF, "ContextType": ContextType.INTERNET.value,
           "AccessString": "work", "UserName": "u", "Password": "p",
           "Compression": cids.Compression.NONE, "AuthProtocol": cids.AuthProtocol.PAP,
           "ProviderId": "00101"}
    status, ctx = host.command(Service.BASIC_CONNECT, B.PROVISIONED_CONTEXTS, S, new)
    assert status is Status.NONE and ctx is not None
    assert [(c["ContextId"], c["AccessString"]) for c in ctx["ProvisionedContexts"]] == [
        (1, "internet"), (2, "work")]
    ((_, cid, ind),) = host.indications()
    assert cid == B.PROVISIONED_CONTEXTS and ind == ctx
    gone = dict(new, ContextId=2, ContextType=ContextType.NONE.value, AccessString="")
    _, ctx = host.command(Service.BASIC_CONNECT, B.PROVISIONED_CONTEXTS, S, gone)
    assert ctx is not None and len(ctx["ProvisionedContexts"]) == 1
    assert host.command(Service.BASIC_CONNECT, B.PROVISIONED_CONTEXTS, S, gone)[0] \
        is Status.INVALID_PARAMETERS


def test_lte_attach_configuration_and_info(host: Host) -> None:
    X = MsBasicConnectExtensions
    svc = Service.MS_BASIC_CONNECT_EXTENSIONS
    # registered, the modem attached by itself (auto_attach); detached, LTE attach says so
    _, info = host.command(svc, X.LTE_ATTACH_INFO, Q)
    assert info is not None and info["LteAttachState"] is LteAttachState.ATTACHED
    host.command(Service.BASIC_CONNECT, B.PACKET_SERVICE, S,
                 {"PacketServiceAction": cids.PacketServiceAction.DETACH})
    _, info = host.command(svc, X.LTE_ATTACH_INFO, Q)
    assert info is not None and info["LteAttachState"] is LteAttachState.DETACHED
    host.attach()
    _, info = host.command(svc, X.LTE_ATTACH_INFO, Q)
    assert info is not None and info["LteAttachState"] is LteAttachState.ATTACHED
    _, conf = host.command(svc, X.LTE_ATTACH_CONFIGURATION, Q)
    assert conf is not None and len(conf["Configurations"]) == 3
    home = dict(conf["Configurations"][0], AccessString="ims")
    status, conf = host.command(svc, X.LTE_ATTACH_CONFIGURATION, S, {
        "Operation": cids.LteAttachOperation.DEFAULT, "Configurations": [home]})
    assert status is Status.NONE and conf is not None
    assert [c["AccessString"] for c in conf["Configurations"]] == ["ims"]
    _, info = host.command(svc, X.LTE_ATTACH_INFO, Q)
    assert info is not None and info["AccessString"] == "ims"
    _, conf = host.command(svc, X.LTE_ATTACH_CONFIGURATION, S, {
        "Operation": cids.LteAttachOperation.RESTORE_FACTORY, "Configurations": []})
    assert conf is not None and len(conf["Configurations"]) == 3


def test_sys_caps(host: Host) -> None:
    _, caps = host.command(Service.MS_BASIC_CONNECT_EXTENSIONS,
                           MsBasicConnectExtensions.SYS_CAPS, Q)
    assert caps == {"NumberOfExecutors": 1, "NumberOfSlots": 1, "Concurrency": 1,
                    "ModemId": int(host.fn.config.device_id)}


# ------------------------------------------------------------------------------- reboot


def test_modem_reboot_answers_then_resets_state_and_asks_the_device(host: Host) -> None:
    events: list[tuple[int, object]] = []
    host.fn.session_listener = lambda sid, state: events.append((sid, state))
    host.attach()
    connect = {"SessionId": 0, "ActivationCommand": cids.ActivationCommand.ACTIVATE,
               "AccessString": "internet", "UserName": "", "Password": "",
               "Compression": cids.Compression.NONE, "AuthProtocol": cids.AuthProtocol.NONE,
               "IpType": cids.IpType.IPV4V6, "ContextType": ContextType.INTERNET.value}
    assert host.command(Service.BASIC_CONNECT, B.CONNECT, S, connect)[0] is Status.NONE
    host.fn.deliver_sms("+1", "kept")
    signal_set(host, 5, 3)
    done = host.raw(Service.INTEL_FIRMWARE_UPDATE, IntelFirmwareUpdate.MODEM_REBOOT, S)
    assert done.status == Status.NONE and host.reboots == 1
    modem = host.fn.modem
    assert modem.sessions == {} and not modem.attached and events[-1] == (0, None)
    assert (modem.signal_interval, modem.rssi_threshold) == (0, 0)
    assert len(modem.sms.messages) == 1        # the store survives, as a SIM's would


def test_held_back_signal_goes_out_on_the_adapters_timer() -> None:
    """Through the asyncio adapter: a move within the interval is sent when it ends, also when
    the change came through ModemState directly (as the live control makes it)."""
    import asyncio

    from iosm_cuse.sim.mbim import MbimChannelFunction

    async def main() -> list[int]:
        fn = MbimFunction()
        sent: list[bytes] = []
        ch = MbimChannelFunction(fn)
        ch.opened(sent.append)
        ch.receive(encode_message(Open(1, 4096)))
        info = infobuf.encode(cids.SIGNAL_STATE_SET, {
            "SignalStrengthInterval": 1, "RssiThreshold": 1, "ErrorRateThreshold": 0})
        ch.receive(encode_message(Command(2, Service.BASIC_CONNECT.value, B.SIGNAL_STATE, S,
                                          info)))
        fn.indicate(fn.modem.set_signal(10))     # reported at once
        fn.indicate(fn.modem.set_signal(12))     # held back for up to 1 s
        await asyncio.sleep(1.3)
        out = []
        for t in sent:
            msg = decode_message(t)
            if isinstance(msg, IndicateStatus) and msg.cid == B.SIGNAL_STATE:
                out.append(infobuf.decode(cids.SIGNAL_STATE, msg.info)["Rssi"])
        ch.closed()
        return out

    assert asyncio.run(main()) == [10, 12]


@pytest.mark.parametrize("bad", [
    {"rsrp": -30}, {"rsrq": "x"}, {"snr": 31}, {"sms_max_messages": 0},
    {"stored_sms": [{"from": "+1"}]}, {"stored_sms": [{"from": "nobody", "text": "x"}]},
    {"stored_sms": [{"from": "+1", "text": "x" * 200}]}, {"ussd_replies": {"*1#": 5}},
    {"ussd_replies": {"*1#": "x" * 200}}, {"ussd_default_reply": "€" * 100},
])
def test_config_refuses_bad_service_values(bad: dict[str, Any]) -> None:
    from iosm_cuse.sim.config import ConfigError
    with pytest.raises(ConfigError):
        ModemConfig.from_dict(bad)


def test_ussd_reply_too_long_for_the_network_is_a_failure_not_a_crash(host: Host) -> None:
    septets = "1" * 170     # the default reply quotes the code: beyond 160 octets
    status, _ = host.command(Service.USSD, Ussd.USSD, S, ussd_set(UssdAction.INITIATE, septets))
    assert status is Status.FAILURE and host.fn.internal_errors == 0
