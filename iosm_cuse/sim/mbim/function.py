"""The modem's MBIM function: framing and dispatch, sans-IO, apart from the modem's state.

``MbimFunction.receive(transfer)`` takes one host transfer and returns the device's answers,
each at most the negotiated MaxControlTransfer (larger answers are fragmented). Indications
wait in ``pending_indications()``. What this module owns is the conversation: OPEN/CLOSE, the
fragment collector and its timeout (a deadline as data: ``next_timer()``/``handle_timer()``),
the subscribe list, and dispatching a command to the handler its service registered
(``basic_connect.py``, ``proxy_control.py``). The state the handlers answer from lives in
``ModemState`` (``modem.py``), which outlives an OPEN: a re-OPEN negotiates the transfer size and
resets the subscribe list and the fragment collector; CLOSE only stops the conversation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from uuid import UUID

from iosm_cuse.mbim import cids
from iosm_cuse.mbim.constants import ProtocolError, Status
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
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.mbim import basic_connect, proxy_control, services
from iosm_cuse.sim.mbim.handlers import Handler, ServiceHandlers
from iosm_cuse.sim.mbim.modem import (
    Indication,
    ModemState,
    PacketStatistics,
    SessionListener,
    SessionState,
)
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger(__name__)

MIN_CONTROL_TRANSFER = 64          # MBIM's smallest wMaxControlMessage
MAX_QUEUED_INDICATIONS = 256       # nobody reading: keep the newest ones only
SERVICES: tuple[ServiceHandlers, ...] = (
    basic_connect.HANDLERS, *services.TABLES, proxy_control.HANDLERS)


class MbimFunction:
    """The MBIM function of the simulated modem (sans-IO)."""

    def __init__(self, config: ModemConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 fragment_timeout: float = 1.25,
                 wallclock: Callable[[], float] = time.time) -> None:
        self.modem = ModemState(config, clock=clock, wallclock=wallclock)
        self.config = self.modem.config
        self.clock = clock
        # MODEM_REBOOT: called after the answer is queued; the adapter makes the device drop
        # off the bus and come back (sim/assembly.py). None: only the state is reset.
        self.reboot_hook: Callable[[], None] | None = None
        self.fragment_timeout = fragment_timeout
        # Called when an indication is queued outside receive() (e.g. set_signal()).
        self.wakeup: Callable[[], None] | None = None
        self.internal_errors = 0           # handler bugs caught and answered with FAILURE
        # Host input thrown away or refused: counted by kind, one log line per kind at most
        # every 10 s, so a hostile client cannot flood the log.
        self.rejects = Rejects(log, what="MBIM function: rejected host input")
        self.opened = False
        self.max_transfer = self.config.max_control_transfer
        self._collector = FragmentCollector()
        self._indications: list[bytes] = []
        self._in_receive = False
        # None: every CID of every service (MBIM's default before a subscribe-list set).
        self._subscriptions: dict[UUID, frozenset[int]] | None = None
        self._handlers: dict[tuple[Service, int], Handler] = {
            (table.service, cid): handler for table in SERVICES for cid, handler in table}

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
        """Clock time at which handle_timer() has something to do, None if nothing pending:
        a fragment deadline, or a SIGNAL_STATE indication held back by the host's interval."""
        started = self._collector.started
        due = [t for t in (None if started is None else started + self.fragment_timeout,
                           self.modem.next_timer()) if t is not None]
        return min(due) if due else None

    def handle_timer(self, now: float | None = None) -> list[bytes]:
        """FUNCTION_ERROR TIMEOUT_FRAGMENT for a host message whose fragments stopped coming;
        a held-back indication whose interval passed goes to pending_indications()."""
        now = self.clock() if now is None else now
        self.indicate(self.modem.handle_timer(now))
        err = self._collector.expire(now, self.fragment_timeout)
        if err is None:
            return []
        self.rejects("fragment_timeout", "%s", err)
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
        if frag.type is CommandDone.TYPE or frag.type is IndicateStatus.TYPE:
            return self._function_error(frag.tid, ProtocolError.UNKNOWN)
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

    def _dispatch(self, msg: Message) -> list[bytes]:
        if isinstance(msg, Open):
            return self._open(msg)
        if isinstance(msg, Close):
            self.opened = False
            self._collector.reset()
            return [encode_message(CloseDone(msg.tid, Status.NONE))]
        if isinstance(msg, HostError):
            self.rejects("host_error", "the host reports error %d for TID %d", msg.error,
                         msg.tid)
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
            self.rejects("open_max_control_transfer", "OPEN with MaxControlTransfer %d refused",
                         msg.max_control_transfer)
            return [encode_message(OpenDone(msg.tid, Status.INVALID_PARAMETERS))]
        # A second OPEN is a re-open: it succeeds and keeps the modem state (see module doc).
        self.opened = True
        self.max_transfer = min(msg.max_control_transfer, self.config.max_control_transfer)
        self._collector.reset()
        self._subscriptions = None
        return [encode_message(OpenDone(msg.tid, Status.NONE))]

    def _message_error(self, e: MessageError) -> list[bytes]:
        self.rejects(f"transfer_{e.error.name.lower()}", "%s", e)
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
            # The one place a request is checked against its layout, enum values included.
            request = decode(layout, cmd.info)
        except InfoBufferError as e:
            self.rejects("information_buffer", "%s: %s", spec.name, e)
            return Status.INVALID_PARAMETERS, b""
        try:
            answer = handler(self, cmd.command_type, request)
            self.indicate(answer.indications)
            values = answer.values
            return answer.status, encode(spec.response, values) if values is not None else b""
        except Exception:  # a bug here must not take the modem down with it
            self.internal_errors += 1
            log.exception("MBIM: internal error in %s", spec.name)
            return Status.FAILURE, b""

    # ----------------------------------------------------------------- indications and lists

    def indicate(self, indications: Iterable[Indication]) -> None:
        """Queue what a state change caused, for a host that is open and subscribed to it."""
        queued = False
        for ind in indications:
            if not self.opened or not self._subscribed(ind.service, ind.cid):
                continue
            msg = IndicateStatus(0, ind.service.value, ind.cid, ind.info())
            self._indications.extend(fragment(encode_message(msg), self.max_transfer))
            del self._indications[:-MAX_QUEUED_INDICATIONS]
            queued = True
        # Woken also when nothing was queued but an indication waits for its interval: the
        # adapter then arms its timer (a change made through ModemState directly, e.g. by
        # the live control, goes through here too).
        held = self.modem.next_timer() is not None
        if (queued or held) and not self._in_receive and self.wakeup is not None:
            self.wakeup()

    def subscribe(self, events: dict[UUID, frozenset[int]]) -> None:
        """Replace the subscribe list (an empty CID set: every CID of that service)."""
        self._subscriptions = dict(events)

    def _subscribed(self, service: Service, cid: int) -> bool:
        if self._subscriptions is None:
            return True
        wanted = self._subscriptions.get(service.value)
        return wanted is not None and (not wanted or cid in wanted)

    def supported_cids(self) -> dict[Service, list[int]]:
        """What DEVICE_SERVICES lists: every CID with a handler, private services left out."""
        out: dict[Service, list[int]] = {}
        for table in SERVICES:
            if table.listed:
                for cid, _ in table:
                    out.setdefault(table.service, []).append(cid)
        return out

    # ------------------------------------------ the modem's state, as its users reach it

    def set_signal(self, rssi: int, error_rate: int | None = None, *, rsrp: int | None = None,
                   rsrq: int | None = None, snr: int | None = None) -> None:
        """The radio conditions changed: update, and indicate SIGNAL_STATE as the host asked
        (ModemState.set_signal); a held-back indication arms the adapter's timer."""
        self.indicate(self.modem.set_signal(rssi, error_rate, rsrp=rsrp, rsrq=rsrq, snr=snr))

    def deliver_sms(self, sender: str, text: str) -> None:
        """An SMS arrives (ModemState.deliver_sms), indicated to a subscribed host."""
        self.indicate(self.modem.deliver_sms(sender, text))

    def ussd_notify(self, text: str) -> None:
        """A network-initiated USSD message (ModemState.ussd_notify)."""
        self.indicate(self.modem.ussd_notify(text))

    def request_reboot(self) -> None:
        """MODEM_REBOOT: the state as at power-on; the device drops off the bus (reboot_hook)."""
        self.modem.reboot()
        if self.reboot_hook is not None:
            self.reboot_hook()

    def add_traffic(self, *, in_octets: int = 0, in_packets: int = 0, out_octets: int = 0,
                    out_packets: int = 0, in_discards: int = 0, out_discards: int = 0) -> None:
        """Count data-plane traffic for PACKET_STATISTICS ("in" = towards the host)."""
        self.modem.add_traffic(in_octets=in_octets, in_packets=in_packets,
                               out_octets=out_octets, out_packets=out_packets,
                               in_discards=in_discards, out_discards=out_discards)

    @property
    def session_listener(self) -> SessionListener | None:
        """Told of every session that comes up (its SessionState) or goes down (None)."""
        return self.modem.session_listener

    @session_listener.setter
    def session_listener(self, listener: SessionListener | None) -> None:
        self.modem.session_listener = listener

    @property
    def statistics_source(self) -> Callable[[], PacketStatistics] | None:
        """Where PACKET_STATISTICS reads its counters; None: those fed via add_traffic()."""
        return self.modem.statistics_source

    @statistics_source.setter
    def statistics_source(self, source: Callable[[], PacketStatistics] | None) -> None:
        self.modem.statistics_source = source

    @property
    def sessions(self) -> dict[int, SessionState]:
        return self.modem.sessions

    @property
    def attached(self) -> bool:
        return self.modem.attached

    @property
    def radio_on(self) -> bool:
        return self.modem.radio_on

    @property
    def sim_ready(self) -> bool:
        return self.modem.sim_ready

    @property
    def registered_provider(self) -> str | None:
        return self.modem.registered_provider

    @property
    def pin_retries(self) -> int:
        return self.modem.pin_retries
