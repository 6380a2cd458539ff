"""The modem's MBIM function: a sans-IO state machine behind channel 6.

``MbimFunction.receive(transfer)`` takes one host transfer and returns the device's answers,
each at most the negotiated MaxControlTransfer (larger answers are fragmented). Indications
caused by state changes wait in ``pending_indications()``. ``MbimChannelFunction`` adapts it to
the device model's ChannelFunction contract (``opened(send)``, ``receive(bytes)``, ``closed()``).

State (SIM, radio, registration, packet service, sessions) lives as long as the function, not
as long as an MBIM OPEN: ``mbim-network`` runs separate mbimcli processes with ``--no-open`` /
``--no-close`` and expects the modem to remember. OPEN negotiates the transfer size and resets
the subscribe list and the fragment collector; CLOSE only stops the conversation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any
from uuid import UUID

from iosm_cuse.mbim import cids
from iosm_cuse.mbim.cids import (
    ActivationCommand,
    ActivationState,
    AuthProtocol,
    BasicConnect,
    CellularClass,
    ControlCaps,
    DeviceType,
    IpConfigAvailable,
    IpType,
    PacketServiceAction,
    PacketServiceState,
    PinFormat,
    PinMode,
    PinOperation,
    PinState,
    PinType,
    ProviderState,
    ProxyControl,
    RadioState,
    ReadyState,
    RegisterAction,
    RegisterMode,
    RegisterState,
    SimClass,
    VoiceCallState,
    VoiceClass,
)
from iosm_cuse.mbim.constants import CommandType, ProtocolError, Status
from iosm_cuse.mbim.infobuf import InfoBufferError, decode, encode
from iosm_cuse.mbim.message import (
    Close,
    CloseDone,
    Command,
    CommandDone,
    Fragment,
    FragmentCollector,
    FunctionError,
    HostError,
    IndicateStatus,
    Message,
    MessageError,
    Open,
    OpenDone,
    decode_message,
    decode_transfer,
    encode_message,
    fragment,
)
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.config import ModemConfig, SessionIp

log = logging.getLogger(__name__)

Values = dict[str, Any]
Reply = tuple[Status, Values | None]
Handler = Callable[[int, Values], Reply]

MIN_CONTROL_TRANSFER = 64          # MBIM's smallest wMaxControlMessage
NW_MISSING_OR_UNKNOWN_APN = 27     # 3GPP cause carried in NwError
NW_IPV4_ONLY_ALLOWED = 50
NW_IPV6_ONLY_ALLOWED = 51
MAX_ACCESS_STRING = 100            # characters, MBIM 1.0
MAX_USER_OR_PASSWORD = 255
MAX_QUEUED_INDICATIONS = 256       # nobody reading: keep the newest ones only
BC = Service.BASIC_CONNECT
_U64_MASK = 0xFFFFFFFFFFFFFFFF      # counters wrap as the wire fields do
_PIN_OPERATIONS = frozenset(int(v) for v in PinOperation)
_AUTH_PROTOCOLS = frozenset(int(v) for v in AuthProtocol)
_IP_TYPES = frozenset(int(v) for v in IpType)


@dataclass(frozen=True)
class SessionState:
    """An activated data session, as the packet gateway needs it."""

    session_id: int
    apn: str
    ip_type: IpType                     # granted: IPV4, IPV6 or IPV4V6
    ipv4: IPv4Interface | None
    ipv4_gateway: IPv4Address | None
    ipv4_dns: tuple[IPv4Address, ...]
    ipv6: IPv6Interface | None
    ipv6_gateway: IPv6Address | None
    ipv6_dns: tuple[IPv6Address, ...]
    mtu: int

    @classmethod
    def build(cls, session_id: int, apn: str, ip_type: IpType, ip: SessionIp) -> SessionState:
        v4 = ip_type in (IpType.IPV4, IpType.IPV4V6)
        v6 = ip_type in (IpType.IPV6, IpType.IPV4V6)
        return cls(session_id, apn, ip_type,
                   ip.ipv4 if v4 else None, ip.ipv4_gateway if v4 else None,
                   ip.ipv4_dns if v4 else (),
                   ip.ipv6 if v6 else None, ip.ipv6_gateway if v6 else None,
                   ip.ipv6_dns if v6 else (), ip.mtu)


@dataclass
class PacketStatistics:
    """Counters for PACKET_STATISTICS; "in" is towards the host (downlink)."""

    in_discards: int = 0
    in_errors: int = 0
    in_octets: int = 0
    in_packets: int = 0
    out_octets: int = 0
    out_packets: int = 0
    out_errors: int = 0
    out_discards: int = 0


class MbimFunction:
    """The MBIM function of the simulated modem (sans-IO)."""

    def __init__(self, config: ModemConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 fragment_timeout: float = 1.25) -> None:
        self.config = config if config is not None else ModemConfig()
        self.clock = clock
        self.fragment_timeout = fragment_timeout
        self.session_listener: Callable[[int, SessionState | None], None] | None = None
        # Called when an indication is queued outside receive() (e.g. set_signal()).
        self.wakeup: Callable[[], None] | None = None
        # Where PACKET_STATISTICS reads its counters (e.g. the packet gateway's); when None,
        # the counters fed through add_traffic().
        self.statistics_source: Callable[[], PacketStatistics] | None = None
        self.internal_errors = 0           # handler bugs caught and answered with FAILURE
        self.opened = False
        self.max_transfer = self.config.max_control_transfer
        self._collector = FragmentCollector()
        self._indications: list[bytes] = []
        self._in_receive = False
        # None: every CID of every service (MBIM's default before a subscribe-list set).
        self._subscriptions: dict[UUID, frozenset[int]] | None = None
        c = self.config
        self.radio_on = c.radio_on
        self.pin = c.pin
        self.pin_enabled = c.pin_required
        self.pin_locked = c.pin_required
        self.pin_retries = c.pin_retries
        self.puk_locked = False
        self.puk_retries = c.puk_retries
        self.sim_blocked = False
        self.register_mode = RegisterMode.AUTOMATIC if c.register_automatic else RegisterMode.MANUAL
        self.manual_provider: str | None = None
        self.attached = False
        self.rssi = c.rssi
        self.error_rate = c.error_rate
        self.signal_interval = 0
        self.rssi_threshold = 0
        self.error_rate_threshold = 0
        self.sessions: dict[int, SessionState] = {}
        self.stats = PacketStatistics()
        self._handlers: dict[tuple[Service, int], Handler] = {
            (BC, BasicConnect.DEVICE_CAPS): self._device_caps,
            (BC, BasicConnect.SUBSCRIBER_READY_STATUS): self._subscriber_ready_status,
            (BC, BasicConnect.RADIO_STATE): self._radio_state,
            (BC, BasicConnect.PIN): self._pin,
            (BC, BasicConnect.PIN_LIST): self._pin_list,
            (BC, BasicConnect.HOME_PROVIDER): self._home_provider,
            (BC, BasicConnect.PREFERRED_PROVIDERS): self._preferred_providers,
            (BC, BasicConnect.VISIBLE_PROVIDERS): self._visible_providers,
            (BC, BasicConnect.REGISTER_STATE): self._register_state,
            (BC, BasicConnect.PACKET_SERVICE): self._packet_service,
            (BC, BasicConnect.SIGNAL_STATE): self._signal_state,
            (BC, BasicConnect.CONNECT): self._connect,
            (BC, BasicConnect.IP_CONFIGURATION): self._ip_configuration,
            (BC, BasicConnect.DEVICE_SERVICES): self._device_services,
            (BC, BasicConnect.DEVICE_SERVICE_SUBSCRIBE_LIST): self._subscribe_list,
            (BC, BasicConnect.PACKET_STATISTICS): self._packet_statistics,
            (Service.PROXY_CONTROL, ProxyControl.CONFIGURATION): self._proxy_configuration,
        }

    # ------------------------------------------------------------------------ transfers in

    def receive(self, data: bytes) -> list[bytes]:
        """One host transfer in; the transfers to send back (possibly none)."""
        self._in_receive = True
        try:
            out = self.handle_timer()
            out += self._receive(bytes(data))
            return out
        finally:
            self._in_receive = False

    def pending_indications(self) -> list[bytes]:
        """Indication transfers queued since the last call (TID 0, fragmented as needed)."""
        out, self._indications = self._indications, []
        return out

    def next_timer(self) -> float | None:
        """Clock time at which handle_timer() has something to do, None if nothing pending."""
        started = self._collector.started
        return None if started is None else started + self.fragment_timeout

    def handle_timer(self, now: float | None = None) -> list[bytes]:
        """FUNCTION_ERROR TIMEOUT_FRAGMENT for a host message whose fragments stopped coming."""
        err = self._collector.expire(self.clock() if now is None else now, self.fragment_timeout)
        if err is None:
            return []
        log.info("MBIM: %s", err)
        assert err.tid is not None
        return self._function_error(err.tid, err.error)

    def host_detached(self) -> None:
        """The channel to the host went away: drop half-received messages and queued events."""
        self._collector.reset()
        self._indications.clear()

    def _receive(self, data: bytes) -> list[bytes]:
        try:
            item = decode_transfer(data)
        except MessageError as e:
            return self._message_error(e)
        if isinstance(item, Fragment):
            return self._fragment(item)
        return self._dispatch(item)

    def _fragment(self, frag: Fragment) -> list[bytes]:
        if frag.type is not CommandDone.TYPE and frag.type is not IndicateStatus.TYPE:
            if not self.opened:
                return self._function_error(frag.tid, ProtocolError.NOT_OPENED)
            result = self._collector.feed(frag, self.clock())
            out = [b for e in result.errors for b in self._message_error(e)]
            if result.message is not None:
                try:
                    out += self._dispatch(decode_message(result.message))
                except MessageError as e:
                    out += self._message_error(e)
            return out
        return self._function_error(frag.tid, ProtocolError.UNKNOWN)

    def _dispatch(self, msg: Message) -> list[bytes]:
        if isinstance(msg, Open):
            return self._open(msg)
        if isinstance(msg, Close):
            self.opened = False
            self._collector.reset()
            return [encode_message(CloseDone(msg.tid, Status.NONE))]
        if isinstance(msg, HostError):
            log.info("MBIM: host reports error %d for TID %d", msg.error, msg.tid)
            self._collector.reset()
            return []
        if isinstance(msg, Command):
            if not self.opened:
                return self._function_error(msg.tid, ProtocolError.NOT_OPENED)
            return self._command(msg)
        # A device-to-host message type sent by the host.
        return self._function_error(msg.tid, ProtocolError.UNKNOWN)

    def _open(self, msg: Open) -> list[bytes]:
        if msg.max_control_transfer < MIN_CONTROL_TRANSFER:
            log.info("MBIM: OPEN with MaxControlTransfer %d refused", msg.max_control_transfer)
            return [encode_message(OpenDone(msg.tid, Status.INVALID_PARAMETERS))]
        # A second OPEN is a re-open: it succeeds and keeps the modem state (see module doc).
        self.opened = True
        self.max_transfer = min(msg.max_control_transfer, self.config.max_control_transfer)
        self._collector.reset()
        self._subscriptions = None
        return [encode_message(OpenDone(msg.tid, Status.NONE))]

    def _message_error(self, e: MessageError) -> list[bytes]:
        log.info("MBIM: rejected transfer: %s", e)
        if e.tid is None:
            return []
        return self._function_error(e.tid, e.error)

    def _function_error(self, tid: int, error: ProtocolError) -> list[bytes]:
        return [encode_message(FunctionError(tid, error))]

    # ---------------------------------------------------------------------------- commands

    def _command(self, cmd: Command) -> list[bytes]:
        status, info = self._run(cmd)
        done = CommandDone(cmd.tid, cmd.service, cmd.cid, status, info)
        return fragment(encode_message(done), self.max_transfer)

    def _run(self, cmd: Command) -> tuple[Status, bytes]:
        service = Service.lookup(cmd.service)
        spec = cids.lookup(service, cmd.cid) if service is not None else None
        handler = self._handlers.get((service, cmd.cid)) if service is not None else None
        if spec is None or handler is None or spec.response is None:
            return Status.NO_DEVICE_SUPPORT, b""
        layout = spec.request(cmd.command_type)
        if layout is None:
            return Status.INVALID_DEVICE_SERVICE_OPERATION, b""
        try:
            request = decode(layout, cmd.info)
        except InfoBufferError as e:
            log.info("MBIM: %s: %s", spec.name, e)
            return Status.INVALID_PARAMETERS, b""
        try:
            status, reply = handler(cmd.command_type, request)
            return status, encode(spec.response, reply) if reply is not None else b""
        except Exception:  # a bug here must not take the modem down with it
            self.internal_errors += 1
            log.exception("MBIM: internal error in %s", spec.name)
            return Status.FAILURE, b""

    # ------------------------------------------------------------------------- indications

    def _notify(self, cid: int, values: Values, service: Service = BC) -> None:
        if not self.opened or not self._subscribed(service, cid):
            return
        spec = cids.lookup(service, cid)
        assert spec is not None and spec.notification is not None
        msg = IndicateStatus(0, service.value, cid, encode(spec.notification, values))
        self._indications.extend(fragment(encode_message(msg), self.max_transfer))
        del self._indications[:-MAX_QUEUED_INDICATIONS]
        if not self._in_receive and self.wakeup is not None:
            self.wakeup()

    def _subscribed(self, service: Service, cid: int) -> bool:
        if self._subscriptions is None:
            return True
        wanted = self._subscriptions.get(service.value)
        return wanted is not None and (not wanted or cid in wanted)

    # ------------------------------------------------------------------- derived state

    @property
    def ready_state(self) -> ReadyState:
        if not self.config.sim_present:
            return ReadyState.SIM_NOT_INSERTED
        if self.sim_blocked:
            return ReadyState.BAD_SIM
        if self.pin_locked or self.puk_locked:
            return ReadyState.DEVICE_LOCKED
        return ReadyState.INITIALIZED

    @property
    def sim_ready(self) -> bool:
        return self.ready_state is ReadyState.INITIALIZED

    @property
    def registered_provider(self) -> str | None:
        """MCCMNC of the network the modem is registered on, None when not registered."""
        if not (self.radio_on and self.sim_ready):
            return None
        if self.register_mode is RegisterMode.AUTOMATIC:
            return self.config.home_provider.id
        return self.manual_provider

    def _sim_status(self) -> Status | None:
        """The status that refuses network operations for the SIM's state, None if ready."""
        rs = self.ready_state
        if rs is ReadyState.SIM_NOT_INSERTED:
            return Status.SIM_NOT_INSERTED
        if rs is ReadyState.BAD_SIM:
            return Status.BAD_SIM
        if rs is ReadyState.DEVICE_LOCKED:
            return Status.PIN_REQUIRED
        return None

    def _provider_name(self, provider_id: str) -> str:
        for p in [self.config.home_provider, *self.config.visible_providers]:
            if p.id == provider_id:
                return p.name
        return ""

    # ---------------------------------------------------------------------- handlers

    def _device_caps(self, ct: int, req: Values) -> Reply:
        c = self.config
        return Status.NONE, {
            "DeviceType": DeviceType.EMBEDDED, "CellularClass": CellularClass.GSM,
            "VoiceClass": VoiceClass.NO_VOICE, "SimClass": SimClass.REMOVABLE,
            "DataClass": c.data_class_mask, "SmsCaps": 0,
            "ControlCaps": ControlCaps.REG_MANUAL, "MaxSessions": c.max_sessions,
            "CustomDataClass": "", "DeviceId": c.device_id, "FirmwareInfo": c.firmware,
            "HardwareInfo": c.hardware,
        }

    def _ready_status_values(self) -> Values:
        ready = self.sim_ready
        return {
            "ReadyState": self.ready_state,
            "SubscriberId": self.config.imsi if ready else "",
            "SimIccId": self.config.iccid if self.config.sim_present else "",
            "ReadyInfo": 0,
            "TelephoneNumbers": list(self.config.own_numbers) if ready else [],
        }

    def _subscriber_ready_status(self, ct: int, req: Values) -> Reply:
        return Status.NONE, self._ready_status_values()

    def _radio_values(self) -> Values:
        return {"HwRadioState": RadioState.ON,
                "SwRadioState": RadioState.ON if self.radio_on else RadioState.OFF}

    def _radio_state(self, ct: int, req: Values) -> Reply:
        if ct == CommandType.SET:
            wanted = req["RadioState"]
            if wanted not in (RadioState.OFF, RadioState.ON):
                return Status.INVALID_PARAMETERS, None
            if bool(wanted) != self.radio_on:
                self._network_change(lambda: setattr(self, "radio_on", bool(wanted)))
                self._notify(BasicConnect.RADIO_STATE, self._radio_values())
        return Status.NONE, self._radio_values()

    def _network_change(self, change: Callable[[], None]) -> None:
        """Apply a change and announce what it did to registration, attach and sessions."""
        before = (self.registered_provider, self.attached)
        change()
        if self.registered_provider is None:
            self.attached = False
        if not self.attached:
            for sid in sorted(self.sessions):
                self._deactivate(sid)
        if self.registered_provider != before[0]:
            self._notify(BasicConnect.REGISTER_STATE, self._register_values())
        if self.attached != before[1]:
            self._notify(BasicConnect.PACKET_SERVICE, self._packet_values())

    # PIN ------------------------------------------------------------------------------

    def _pin_values(self) -> Values:
        if self.puk_locked:
            return {"PinType": PinType.PUK1, "PinState": PinState.LOCKED,
                    "RemainingAttempts": self.puk_retries}
        if self.pin_locked:
            return {"PinType": PinType.PIN1, "PinState": PinState.LOCKED,
                    "RemainingAttempts": self.pin_retries}
        return {"PinType": PinType.UNKNOWN, "PinState": PinState.UNLOCKED,
                "RemainingAttempts": self.pin_retries}

    def _pin(self, ct: int, req: Values) -> Reply:
        if not self.config.sim_present:
            return Status.SIM_NOT_INSERTED, None
        if self.sim_blocked:
            return Status.BAD_SIM, None
        if ct == CommandType.QUERY:
            return Status.NONE, self._pin_values()
        before = self.ready_state
        status = Status.FAILURE

        def operate() -> None:
            # Unlocking registers the modem, blocking the SIM deregisters it: the ready-status
            # indication goes first, then what _network_change announces.
            nonlocal status
            status = self._pin_operation(req)
            if self.ready_state != before:
                self._notify(BasicConnect.SUBSCRIBER_READY_STATUS, self._ready_status_values())
        self._network_change(operate)
        if status in (Status.NONE, Status.FAILURE):
            return status, self._pin_values()
        return status, None

    def _pin_operation(self, req: Values) -> Status:
        ptype, op = req["PinType"], req["PinOperation"]
        pin, new_pin = req["Pin"], req["NewPin"]
        if op not in _PIN_OPERATIONS:
            return Status.INVALID_PARAMETERS
        if ptype == PinType.PUK1:
            if op != PinOperation.ENTER or not self.puk_locked:
                return Status.OPERATION_NOT_ALLOWED
            if not _valid_pin(new_pin):
                return Status.INVALID_PARAMETERS
            return self._enter_puk(pin, new_pin)
        if ptype != PinType.PIN1:
            return Status.NO_DEVICE_SUPPORT
        if self.puk_locked:
            return Status.FAILURE            # only the PUK helps now; the reply says PUK1
        if op == PinOperation.CHANGE and not _valid_pin(new_pin):
            return Status.INVALID_PARAMETERS
        if op == PinOperation.DISABLE and not self.pin_enabled:
            return Status.PIN_DISABLED
        if op == PinOperation.CHANGE and not self.pin_enabled:
            return Status.PIN_DISABLED
        if not self._check_pin(pin):
            return Status.FAILURE
        if op == PinOperation.ENTER:
            self.pin_locked = False
        elif op == PinOperation.ENABLE:
            self.pin_enabled = True
        elif op == PinOperation.DISABLE:
            self.pin_enabled = False
        else:
            self.pin = new_pin
        return Status.NONE

    def _check_pin(self, pin: str) -> bool:
        if pin == self.pin:
            self.pin_retries = self.config.pin_retries
            return True
        self.pin_retries -= 1
        if self.pin_retries <= 0:
            self.pin_retries = 0
            self.puk_locked = True
        return False

    def _enter_puk(self, puk: str, new_pin: str) -> Status:
        if puk == self.config.puk:
            self.puk_locked = self.pin_locked = False
            self.pin = new_pin
            self.pin_retries = self.config.pin_retries
            self.puk_retries = self.config.puk_retries
            return Status.NONE
        self.puk_retries -= 1
        if self.puk_retries <= 0:
            self.puk_retries = 0
            self.sim_blocked = True
        return Status.FAILURE

    def _pin_list(self, ct: int, req: Values) -> Reply:
        unsupported = {"PinMode": PinMode.NOT_SUPPORTED, "PinFormat": PinFormat.UNKNOWN,
                       "PinLengthMin": 0, "PinLengthMax": 0}
        values = {name: dict(unsupported) for name in cids.PIN_DESC_NAMES}
        values["PinDescPin1"] = {
            "PinMode": PinMode.ENABLED if self.pin_enabled else PinMode.DISABLED,
            "PinFormat": PinFormat.NUMERIC, "PinLengthMin": 4, "PinLengthMax": 8}
        return Status.NONE, values

    # providers and registration -----------------------------------------------------------

    def _provider(self, provider_id: str, name: str, state: int) -> Values:
        if provider_id == self.registered_provider:
            state |= ProviderState.REGISTERED
        return {"ProviderId": provider_id, "ProviderState": state, "ProviderName": name,
                "CellularClass": CellularClass.GSM,
                "Rssi": self.rssi if self.registered_provider else 99,
                "ErrorRate": self.error_rate if self.registered_provider else 99}

    def _home_provider(self, ct: int, req: Values) -> Reply:
        if ct == CommandType.SET:
            return Status.NO_DEVICE_SUPPORT, None
        if not self.sim_ready:
            return self._sim_status() or Status.FAILURE, None
        home = self.config.home_provider
        return Status.NONE, {"Provider": self._provider(home.id, home.name, ProviderState.HOME)}

    def _preferred_providers(self, ct: int, req: Values) -> Reply:
        if ct == CommandType.SET:
            return Status.NO_DEVICE_SUPPORT, None
        if not self.sim_ready:
            return self._sim_status() or Status.FAILURE, None
        home = self.config.home_provider
        state = ProviderState.HOME | ProviderState.PREFERRED
        return Status.NONE, {"Providers": [self._provider(home.id, home.name, state)]}

    def _visible_providers(self, ct: int, req: Values) -> Reply:
        if req["Action"] not in (0, 1):
            return Status.INVALID_PARAMETERS, None
        if not self.radio_on:
            return Status.RADIO_POWER_OFF, None
        home = self.config.home_provider.id
        providers = []
        for p in self.config.visible_providers:
            state = ProviderState.VISIBLE | (ProviderState.HOME if p.id == home else 0)
            providers.append(self._provider(p.id, p.name, state))
        return Status.NONE, {"Providers": providers}

    def _register_values(self) -> Values:
        provider = self.registered_provider
        home = self.config.home_provider.id
        if provider is None:
            state = RegisterState.DEREGISTERED
        else:
            state = RegisterState.HOME if provider == home else RegisterState.ROAMING
        return {
            "NwError": 0, "RegisterState": state, "RegisterMode": self.register_mode,
            "AvailableDataClasses": self.config.data_class_mask if provider else 0,
            "CurrentCellularClass": CellularClass.GSM,
            "ProviderId": provider or "", "ProviderName": self._provider_name(provider or ""),
            "RoamingText": "", "RegistrationFlag": 0,
        }

    def _register_state(self, ct: int, req: Values) -> Reply:
        if ct == CommandType.SET:
            status = self._register_set(req)
            if status is not Status.NONE:
                return status, None
        return Status.NONE, self._register_values()

    def _register_set(self, req: Values) -> Status:
        action, provider = req["RegisterAction"], req["ProviderId"]
        if action not in (RegisterAction.AUTOMATIC, RegisterAction.MANUAL):
            return Status.INVALID_PARAMETERS
        refused = self._sim_status()
        if refused is not None:
            return refused
        if not self.radio_on:
            return Status.RADIO_POWER_OFF
        if action == RegisterAction.MANUAL:
            if provider not in {p.id for p in self.config.visible_providers}:
                return Status.PROVIDER_NOT_VISIBLE

            def manual() -> None:
                self.register_mode, self.manual_provider = RegisterMode.MANUAL, provider
            self._network_change(manual)
        else:
            self._network_change(lambda: setattr(self, "register_mode", RegisterMode.AUTOMATIC))
        return Status.NONE

    # packet service and signal --------------------------------------------------------

    def _packet_values(self) -> Values:
        if not self.attached:
            return {"NwError": 0, "PacketServiceState": PacketServiceState.DETACHED,
                    "HighestAvailableDataClass": 0, "UplinkSpeed": 0, "DownlinkSpeed": 0}
        mask = self.config.data_class_mask
        return {"NwError": 0, "PacketServiceState": PacketServiceState.ATTACHED,
                "HighestAvailableDataClass": 1 << (mask.bit_length() - 1) if mask else 0,
                "UplinkSpeed": self.config.uplink_speed,
                "DownlinkSpeed": self.config.downlink_speed}

    def _packet_service(self, ct: int, req: Values) -> Reply:
        if ct == CommandType.SET:
            action = req["PacketServiceAction"]
            if action == PacketServiceAction.ATTACH:
                refused = self._sim_status() or (
                    Status.RADIO_POWER_OFF if not self.radio_on else
                    Status.NOT_REGISTERED if self.registered_provider is None else None)
                if refused is not None:
                    return refused, self._packet_values()
                self._network_change(lambda: setattr(self, "attached", True))
            elif action == PacketServiceAction.DETACH:
                self._network_change(lambda: setattr(self, "attached", False))
            else:
                return Status.INVALID_PARAMETERS, None
        return Status.NONE, self._packet_values()

    def _signal_values(self) -> Values:
        registered = self.registered_provider is not None
        return {"Rssi": self.rssi if registered else 99,
                "ErrorRate": self.error_rate if registered else 99,
                "SignalStrengthInterval": self.signal_interval,
                "RssiThreshold": self.rssi_threshold,
                "ErrorRateThreshold": self.error_rate_threshold}

    def _signal_state(self, ct: int, req: Values) -> Reply:
        if ct == CommandType.SET:
            self.signal_interval = req["SignalStrengthInterval"]
            self.rssi_threshold = req["RssiThreshold"]
            self.error_rate_threshold = req["ErrorRateThreshold"]
        return Status.NONE, self._signal_values()

    # connect ----------------------------------------------------------------------------

    def _connect_values(self, session_id: int, nw_error: int = 0) -> Values:
        s = self.sessions.get(session_id)
        return {"SessionId": session_id,
                "ActivationState": ActivationState.ACTIVATED if s else ActivationState.DEACTIVATED,
                "VoiceCallState": VoiceCallState.NONE,
                "IpType": s.ip_type if s else IpType.DEFAULT,
                "ContextType": (ContextType.INTERNET if s else ContextType.NONE).value,
                "NwError": nw_error}

    def _connect(self, ct: int, req: Values) -> Reply:
        sid = req["SessionId"]
        if sid >= self.config.max_sessions:
            return Status.INVALID_PARAMETERS, None
        if ct == CommandType.QUERY:
            return Status.NONE, self._connect_values(sid)
        command = req["ActivationCommand"]
        if command == ActivationCommand.DEACTIVATE:
            if sid in self.sessions:
                self._deactivate(sid)
            return Status.NONE, self._connect_values(sid)
        if command != ActivationCommand.ACTIVATE:
            return Status.INVALID_PARAMETERS, None
        return self._activate(sid, req)

    def _activate(self, sid: int, req: Values) -> Reply:
        if sid in self.sessions:          # already up: report it, as real modems do
            return Status.NONE, self._connect_values(sid)
        refused = self._sim_status() or (
            Status.RADIO_POWER_OFF if not self.radio_on else
            Status.NOT_REGISTERED if self.registered_provider is None else
            Status.PACKET_SERVICE_DETACHED if not self.attached else None)
        if refused is not None:
            return refused, self._connect_values(sid)
        apn, user, password = req["AccessString"], req["UserName"], req["Password"]
        if (len(apn) > MAX_ACCESS_STRING or len(user) > MAX_USER_OR_PASSWORD
                or len(password) > MAX_USER_OR_PASSWORD
                or req["AuthProtocol"] not in _AUTH_PROTOCOLS
                or req["Compression"] > 1 or req["IpType"] not in _IP_TYPES):
            return Status.INVALID_PARAMETERS, None
        if req["ContextType"] not in (ContextType.INTERNET.value, ContextType.NONE.value):
            return Status.CONTEXT_NOT_SUPPORTED, self._connect_values(sid)
        if self.config.apns is not None and apn not in self.config.apns:
            return Status.INVALID_ACCESS_STRING, self._connect_values(sid,
                                                                      NW_MISSING_OR_UNKNOWN_APN)
        granted, nw_error = self._grant_ip_type(IpType(req["IpType"]))
        if granted is None:
            return Status.FAILURE, self._connect_values(sid, nw_error)
        state = SessionState.build(sid, apn, granted, self.config.session_ip(sid))
        self.sessions[sid] = state
        self._announce(sid, state)
        self._notify(BasicConnect.CONNECT, self._connect_values(sid))
        return Status.NONE, self._connect_values(sid)

    def _grant_ip_type(self, wanted: IpType) -> tuple[IpType | None, int]:
        """The IP type the network grants, with the fallbacks of 3GPP PDN types."""
        offered = set(self.config.network_ip_types)
        if wanted in (IpType.DEFAULT, IpType.IPV4V6, IpType.IPV4_AND_IPV6):
            for candidate, name in ((IpType.IPV4V6, "ipv4v6"), (IpType.IPV4, "ipv4"),
                                    (IpType.IPV6, "ipv6")):
                if name in offered:
                    return candidate, 0
            return None, NW_MISSING_OR_UNKNOWN_APN
        if wanted is IpType.IPV4:
            if "ipv4" in offered or "ipv4v6" in offered:
                return IpType.IPV4, 0
            return None, NW_IPV6_ONLY_ALLOWED
        if "ipv6" in offered or "ipv4v6" in offered:
            return IpType.IPV6, 0
        return None, NW_IPV4_ONLY_ALLOWED

    def _deactivate(self, sid: int) -> None:
        del self.sessions[sid]
        self._announce(sid, None)
        self._notify(BasicConnect.CONNECT, self._connect_values(sid))

    def _announce(self, sid: int, state: SessionState | None) -> None:
        if self.session_listener is not None:
            try:
                self.session_listener(sid, state)
            except Exception:  # the listener's failure is not the host's problem
                log.exception("MBIM: session listener failed for session %d", sid)

    def _ip_configuration(self, ct: int, req: Values) -> Reply:
        sid = req["SessionId"]
        if sid >= self.config.max_sessions:
            return Status.INVALID_PARAMETERS, None
        s = self.sessions.get(sid)
        if s is None:
            return Status.CONTEXT_NOT_ACTIVATED, None
        return Status.NONE, _ip_values(s)

    # services, subscriptions, statistics -------------------------------------------------

    def supported_cids(self) -> dict[Service, list[int]]:
        """What DEVICE_SERVICES lists: every CID with a handler (PROXY_CONTROL is private)."""
        out: dict[Service, list[int]] = {}
        for service, cid in self._handlers:
            if service is not Service.PROXY_CONTROL:
                out.setdefault(service, []).append(cid)
        return out

    def _device_services(self, ct: int, req: Values) -> Reply:
        services = [{"DeviceServiceId": service.value, "DssPayload": 0, "MaxDssInstances": 0,
                     "Cids": sorted(cid_list)}
                    for service, cid_list in self.supported_cids().items()]
        return Status.NONE, {"MaxDssSessions": 0, "DeviceServices": services}

    def _subscribe_list(self, ct: int, req: Values) -> Reply:
        subs: dict[UUID, frozenset[int]] = {}
        for event in req["Events"]:
            subs[event["DeviceServiceId"]] = frozenset(event["Cids"])
        self._subscriptions = subs
        return Status.NONE, {"Events": [{"DeviceServiceId": k, "Cids": sorted(v)}
                                        for k, v in subs.items()]}

    def _packet_statistics(self, ct: int, req: Values) -> Reply:
        s = self.statistics_source() if self.statistics_source is not None else self.stats
        return Status.NONE, {
            "InDiscards": s.in_discards & 0xFFFFFFFF, "InErrors": s.in_errors & 0xFFFFFFFF,
            "InOctets": s.in_octets & _U64_MASK, "InPackets": s.in_packets & _U64_MASK,
            "OutOctets": s.out_octets & _U64_MASK, "OutPackets": s.out_packets & _U64_MASK,
            "OutErrors": s.out_errors & 0xFFFFFFFF, "OutDiscards": s.out_discards & 0xFFFFFFFF}

    def _proxy_configuration(self, ct: int, req: Values) -> Reply:
        # Answered so that this function can sit behind a stand-in for mbim-proxy.
        return Status.NONE, {}

    # ------------------------------------------------------------- the rest of the model

    def set_signal(self, rssi: int, error_rate: int | None = None) -> None:
        """The radio conditions changed: update and indicate SIGNAL_STATE."""
        self.rssi = rssi
        if error_rate is not None:
            self.error_rate = error_rate
        self._notify(BasicConnect.SIGNAL_STATE, self._signal_values())

    def add_traffic(self, *, in_octets: int = 0, in_packets: int = 0, out_octets: int = 0,
                    out_packets: int = 0, in_discards: int = 0, out_discards: int = 0) -> None:
        """Count data-plane traffic for PACKET_STATISTICS ("in" = towards the host)."""
        s = self.stats
        s.in_octets += in_octets
        s.in_packets += in_packets
        s.out_octets += out_octets
        s.out_packets += out_packets
        s.in_discards += in_discards
        s.out_discards += out_discards


def _valid_pin(pin: str) -> bool:
    return pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 8


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


class MbimChannelFunction:
    """ChannelFunction adapter (Contract 3): attach to channel 6 of the device model."""

    def __init__(self, function: MbimFunction) -> None:
        self.function = function
        self._send: Callable[[bytes], None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self.function.wakeup = self.flush

    def receive(self, ul_transfer: bytes) -> None:
        self._emit(self.function.receive(ul_transfer))
        self.flush()
        self._arm_timer()

    def closed(self) -> None:
        self._send = None
        self.function.wakeup = None
        self.function.host_detached()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        """Send the indications that are waiting."""
        self._emit(self.function.pending_indications())

    def _emit(self, transfers: list[bytes]) -> None:
        if self._send is None:
            return
        for t in transfers:
            self._send(t)

    def _arm_timer(self) -> None:
        # The fragment timeout only needs a timer when a loop runs us; without one, the next
        # receive() reports the timeout.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.function.next_timer()
        if due is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.0, due - self.function.clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._emit(self.function.handle_timer())
