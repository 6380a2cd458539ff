"""BASIC_CONNECT's handlers: each CID's answer, registered where it is written.

The state they read and change is the ``ModemState``; the function frames the ``Answer``.
Requests arrive decoded by ``iosm_cuse/mbim/cids.py``, which has already rejected enum values
outside their enums with INVALID_PARAMETERS.
"""

from __future__ import annotations

from uuid import UUID

from iosm_cuse.mbim import cids
from iosm_cuse.mbim.cids import (
    ActivationCommand,
    BasicConnect,
    CellularClass,
    ControlCaps,
    DeviceType,
    IpConfigAvailable,
    PacketServiceAction,
    PinFormat,
    PinMode,
    ProviderState,
    RadioState,
    SimClass,
    SmsCaps,
    VoiceClass,
)
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.mbim.handlers import Answer, FunctionContext, ServiceHandlers, Values
from iosm_cuse.sim.mbim.modem import NW_REGULAR_DEACTIVATION, ModemState, SessionState

MAX_ACCESS_STRING = 100            # characters, MBIM 1.0
MAX_USER_OR_PASSWORD = 255
_U32_MASK = 0xFFFFFFFF              # counters wrap as the wire fields do
_U64_MASK = 0xFFFFFFFFFFFFFFFF
_CONTEXTS = (ContextType.INTERNET.value, ContextType.NONE.value)

HANDLERS = ServiceHandlers(Service.BASIC_CONNECT)
B = BasicConnect
SET, QUERY = CommandType.SET, CommandType.QUERY


@HANDLERS.handles(B.DEVICE_CAPS)
def device_caps(fn: FunctionContext, ct: int, req: Values) -> Answer:
    c = fn.modem.config
    return Answer(Status.NONE, {
        "DeviceType": DeviceType.EMBEDDED, "CellularClass": CellularClass.GSM,
        "VoiceClass": VoiceClass.NO_VOICE, "SimClass": SimClass.REMOVABLE,
        "DataClass": c.data_class_mask, "SmsCaps": SmsCaps.PDU_RECEIVE | SmsCaps.PDU_SEND,
        "ControlCaps": ControlCaps.REG_MANUAL, "MaxSessions": c.max_sessions,
        "CustomDataClass": "", "DeviceId": c.device_id, "FirmwareInfo": c.firmware,
        "HardwareInfo": c.hardware,
    })


@HANDLERS.handles(B.SUBSCRIBER_READY_STATUS)
def subscriber_ready_status(fn: FunctionContext, ct: int, req: Values) -> Answer:
    return Answer(Status.NONE, fn.modem.ready_status_values())


@HANDLERS.handles(B.RADIO_STATE)
def radio_state(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    indications = modem.set_radio(req["RadioState"] == RadioState.ON) if ct == SET else []
    return Answer(Status.NONE, modem.radio_values(), indications)


@HANDLERS.handles(B.PIN)
def pin(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    refused = modem.pin_refusal()
    if refused is not None:
        return Answer(refused)
    if ct == QUERY:
        return Answer(Status.NONE, modem.pin_values())
    change = modem.pin_operation(req["PinType"], req["PinOperation"], req["Pin"], req["NewPin"])
    # A wrong PIN still reports the attempts left; other refusals carry no payload.
    shown = change.status in (Status.NONE, Status.FAILURE)
    return Answer(change.status, modem.pin_values() if shown else None, change.indications)


@HANDLERS.handles(B.PIN_LIST)
def pin_list(fn: FunctionContext, ct: int, req: Values) -> Answer:
    unsupported = {"PinMode": PinMode.NOT_SUPPORTED, "PinFormat": PinFormat.UNKNOWN,
                   "PinLengthMin": 0, "PinLengthMax": 0}
    values: Values = {name: dict(unsupported) for name in cids.PIN_DESC_NAMES}
    values["PinDescPin1"] = {
        "PinMode": PinMode.ENABLED if fn.modem.pin_enabled else PinMode.DISABLED,
        "PinFormat": PinFormat.NUMERIC, "PinLengthMin": 4, "PinLengthMax": 8}
    return Answer(Status.NONE, values)


# providers and registration ------------------------------------------------------------


def _sim_not_ready(modem: ModemState) -> Answer | None:
    if modem.sim_ready:
        return None
    return Answer(modem.sim_refusal() or Status.FAILURE)


@HANDLERS.handles(B.HOME_PROVIDER)
def home_provider(fn: FunctionContext, ct: int, req: Values) -> Answer:
    if ct == SET:
        return Answer(Status.NO_DEVICE_SUPPORT)
    modem = fn.modem
    home = modem.config.home_provider
    return _sim_not_ready(modem) or Answer(Status.NONE, {
        "Provider": modem.provider_values(home.id, home.name, ProviderState.HOME)})


@HANDLERS.handles(B.PREFERRED_PROVIDERS)
def preferred_providers(fn: FunctionContext, ct: int, req: Values) -> Answer:
    if ct == SET:
        return Answer(Status.NO_DEVICE_SUPPORT)
    modem = fn.modem
    home = modem.config.home_provider
    state = ProviderState.HOME | ProviderState.PREFERRED
    return _sim_not_ready(modem) or Answer(Status.NONE, {
        "Providers": [modem.provider_values(home.id, home.name, state)]})


@HANDLERS.handles(B.VISIBLE_PROVIDERS)
def visible_providers(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    if not modem.radio_active:
        return Answer(Status.RADIO_POWER_OFF)
    home = modem.config.home_provider.id
    providers = []
    for p in modem.config.visible_providers:
        state = ProviderState.VISIBLE | (ProviderState.HOME if p.id == home else 0)
        providers.append(modem.provider_values(p.id, p.name, state))
    return Answer(Status.NONE, {"Providers": providers})


@HANDLERS.handles(B.REGISTER_STATE)
def register_state(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    if ct == QUERY:
        return Answer(Status.NONE, modem.register_values())
    change = modem.register(req["RegisterAction"], req["ProviderId"])
    if change.status is not Status.NONE:
        return Answer(change.status)
    return Answer(Status.NONE, modem.register_values(), change.indications)


# packet service and signal ----------------------------------------------------------------


@HANDLERS.handles(B.PACKET_SERVICE)
def packet_service(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    if ct == QUERY:
        return Answer(Status.NONE, modem.packet_values())
    if req["PacketServiceAction"] == PacketServiceAction.ATTACH:
        change = modem.attach()
        return Answer(change.status, modem.packet_values(), change.indications)
    detached = modem.detach()          # first: the answer reports the state after it
    return Answer(Status.NONE, modem.packet_values(), detached)


@HANDLERS.handles(B.SIGNAL_STATE)
def signal_state(fn: FunctionContext, ct: int, req: Values) -> Answer:
    if ct == SET:
        fn.modem.set_signal_reporting(req["SignalStrengthInterval"], req["RssiThreshold"],
                                      req["ErrorRateThreshold"])
    return Answer(Status.NONE, fn.modem.signal_values())


@HANDLERS.handles(B.PROVISIONED_CONTEXTS)
def provisioned_contexts(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    if ct == QUERY:
        return Answer(Status.NONE, modem.provisioned_contexts_values())
    if (len(req["AccessString"]) > MAX_ACCESS_STRING or len(req["UserName"]) > MAX_USER_OR_PASSWORD
            or len(req["Password"]) > MAX_USER_OR_PASSWORD):
        return Answer(Status.INVALID_PARAMETERS)
    change = modem.provision_context(req)
    if change.status is not Status.NONE:
        return Answer(change.status)
    return Answer(Status.NONE, modem.provisioned_contexts_values(), change.indications)


# connect -----------------------------------------------------------------------------------


@HANDLERS.handles(B.CONNECT)
def connect(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    sid = req["SessionId"]
    if sid >= modem.config.max_sessions:
        return Answer(Status.INVALID_PARAMETERS)
    if ct == QUERY:
        return Answer(Status.NONE, modem.connect_values(sid))
    if req["ActivationCommand"] == ActivationCommand.DEACTIVATE:
        indications = modem.deactivate(sid)
        cause = NW_REGULAR_DEACTIVATION if indications else 0
        return Answer(Status.NONE, modem.connect_values(sid, cause), indications)
    return _activate(modem, sid, req)


def _activate(modem: ModemState, sid: int, req: Values) -> Answer:
    # The request's own faults count only once the modem could connect at all: a session
    # that is up, or a modem that refuses, answers the same whatever was asked.
    if sid not in modem.sessions and modem.connect_refusal() is None:
        if (len(req["AccessString"]) > MAX_ACCESS_STRING
                or len(req["UserName"]) > MAX_USER_OR_PASSWORD
                or len(req["Password"]) > MAX_USER_OR_PASSWORD):
            return Answer(Status.INVALID_PARAMETERS)
        if req["ContextType"] not in _CONTEXTS:
            return Answer(Status.CONTEXT_NOT_SUPPORTED, modem.connect_values(sid))
    change = modem.activate(sid, req["AccessString"], req["IpType"])
    return Answer(change.status, modem.connect_values(sid, change.nw_error), change.indications)


@HANDLERS.handles(B.IP_CONFIGURATION)
def ip_configuration(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    sid = req["SessionId"]
    if sid >= modem.config.max_sessions:
        return Answer(Status.INVALID_PARAMETERS)
    s = modem.sessions.get(sid)
    if s is None:
        return Answer(Status.CONTEXT_NOT_ACTIVATED)
    return Answer(Status.NONE, _ip_values(s))


def _ip_values(s: SessionState) -> Values:
    full = (IpConfigAvailable.ADDRESS | IpConfigAvailable.GATEWAY | IpConfigAvailable.DNS
            | IpConfigAvailable.MTU)
    v4, v6 = s.ipv4 is not None, s.ipv6 is not None
    return {
        "SessionId": s.session_id,
        "IPv4ConfigurationAvailable": full if v4 else 0,
        "IPv6ConfigurationAvailable": full if v6 else 0,
        "IPv4Address": [{"OnLinkPrefixLength": s.ipv4.network.prefixlen,
                         "IPv4Address": s.ipv4.ip}] if s.ipv4 else [],
        "IPv6Address": [{"OnLinkPrefixLength": s.ipv6.network.prefixlen,
                         "IPv6Address": s.ipv6.ip}] if s.ipv6 else [],
        "IPv4Gateway": s.ipv4_gateway, "IPv6Gateway": s.ipv6_gateway,
        "IPv4DnsServer": list(s.ipv4_dns), "IPv6DnsServer": list(s.ipv6_dns),
        "IPv4Mtu": s.mtu if v4 else 0, "IPv6Mtu": s.mtu if v6 else 0,
    }


# services, subscriptions, statistics ------------------------------------------------------


@HANDLERS.handles(B.DEVICE_SERVICES)
def device_services(fn: FunctionContext, ct: int, req: Values) -> Answer:
    services = [{"DeviceServiceId": service.value, "DssPayload": 0, "MaxDssInstances": 0,
                 "Cids": sorted(cid_list)}
                for service, cid_list in fn.supported_cids().items()]
    return Answer(Status.NONE, {"MaxDssSessions": 0, "DeviceServices": services})


@HANDLERS.handles(B.DEVICE_SERVICE_SUBSCRIBE_LIST)
def device_service_subscribe_list(fn: FunctionContext, ct: int, req: Values) -> Answer:
    events: dict[UUID, frozenset[int]] = {}
    for event in req["Events"]:
        events[event["DeviceServiceId"]] = frozenset(event["Cids"])
    fn.subscribe(events)
    return Answer(Status.NONE, {"Events": [{"DeviceServiceId": k, "Cids": sorted(v)}
                                           for k, v in events.items()]})


@HANDLERS.handles(B.PACKET_STATISTICS)
def packet_statistics(fn: FunctionContext, ct: int, req: Values) -> Answer:
    s = fn.modem.statistics()
    return Answer(Status.NONE, {
        "InDiscards": s.in_discards & _U32_MASK, "InErrors": s.in_errors & _U32_MASK,
        "InOctets": s.in_octets & _U64_MASK, "InPackets": s.in_packets & _U64_MASK,
        "OutOctets": s.out_octets & _U64_MASK, "OutPackets": s.out_packets & _U64_MASK,
        "OutErrors": s.out_errors & _U32_MASK, "OutDiscards": s.out_discards & _U32_MASK})
