"""The modem's AT command interpreter on its AT channels (2 and 4), sans-IO (docs/at-ports.md).

`AtInterpreter.feed(bytes) -> bytes`: the host's bytes in, in chunks of any size (an AT port is
a byte stream with no message boundaries), the modem's answer out: the echo of what arrived
(ATE1, the default, as on real modems) and, for each command line ended by CR, the V.250 /
3GPP TS 27.007 responses in verbose form (`\\r\\n<info>\\r\\n` ... `\\r\\nOK\\r\\n`).

The values come from the same `ModemState` the MBIM function answers from (IMEI, manufacturer,
firmware, SIM, signal, operator, registration, radio), so AT and MBIM agree; `AT+CFUN=` changes
that state, and the MBIM indications it causes go to `on_indications` (the assembly hands them
to the MBIM function, which tells a subscribed host).

Host input is untrusted: a line longer than `MAX_LINE` is thrown away and answered ERROR
(counted and logged through `Rejects`, rate-limited); nothing here raises on any input.

`AtFunction` is the ChannelFunction adapter (docs/architecture.md, Contract 3).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from iosm_cuse.mbim.cids import RegisterAction, RegisterMode, RegisterState
from iosm_cuse.sim.mbim.modem import Indication, ModemState
from iosm_cuse.wire.rejects import Rejects

log = logging.getLogger("iosm_cuse.sim.at")

CR, LF, BS = 0x0D, 0x0A, 0x08  # S3, S4 and S5 of V.250, at their defaults
# V.250 asks for at least 40 characters after "AT"; 3GPP TS 27.007 for at least 556 in a
# command line. Longer is garbage (or hostile), not a command (docs/at-ports.md §4).
MAX_LINE = 560
IndicationSink = Callable[[list[Indication]], None]

# MBIM registration -> 27.007 +CREG <stat> (0 not registered, 1 home, 2 searching, 3 denied,
# 4 unknown, 5 roaming).
CREG_STAT = {RegisterState.DEREGISTERED: 0, RegisterState.HOME: 1, RegisterState.SEARCHING: 2,
             RegisterState.DENIED: 3, RegisterState.UNKNOWN: 4, RegisterState.ROAMING: 5,
             RegisterState.PARTNER: 5}
# +CME ERROR codes of 3GPP TS 27.007 used here
CME_OPERATION_NOT_ALLOWED = 3
CME_SIM_NOT_INSERTED = 10
CME_SIM_FAILURE = 13
# The access technology of +COPS: the best data class the modem offers (7 E-UTRAN, 2 UTRAN,
# 0 GSM).
_ACT_BY_CLASS = (("lte", 7), ("hsdpa", 2), ("hsupa", 2), ("umts", 2))


class AtError(Exception):
    """A command that fails: ERROR, or +CME ERROR: <code> when AT+CMEE=1 asked for codes."""

    def __init__(self, cme: int = 0) -> None:
        super().__init__(cme)
        self.cme = cme


@dataclass
class _Settings:
    echo: bool = True  # ATE
    verbose: bool = True  # ATV
    quiet: bool = False  # ATQ
    cmee: int = 0  # AT+CMEE
    creg: int = 0  # AT+CREG=<n>
    cops_format: int = 0  # AT+COPS=3,<format>: 0 long name, 1 short name, 2 MCCMNC


# One command of a line: a basic one (a letter or &letter, an optional number) or an extended
# one (+NAME with ?, =?, or =args up to the next ';').
_BASIC = re.compile(r"(&?[A-Z])(\d*)(=\d*|\?)?")
_EXTENDED = re.compile(r"([+$%][A-Z0-9]+)(=\?|\?|=[^;]*)?;?")


class AtInterpreter:
    """One AT channel's command interpreter (sans-IO)."""

    def __init__(self, modem: ModemState, *, on_indications: IndicationSink | None = None,
                 max_line: int = MAX_LINE, rejects: Rejects | None = None) -> None:
        self.modem = modem
        self.on_indications = on_indications
        self.max_line = max_line
        self.rejects = rejects if rejects is not None else Rejects(
            log, what="AT: rejected host input", kinds=("overlong",))
        self.settings = _Settings()
        self._line = bytearray()
        self._overlong = False
        self._last = ""  # for A/
        self.commands = 0  # command lines run

    # ------------------------------------------------------------------ bytes in, bytes out

    def feed(self, data: bytes) -> bytes:
        """Host bytes in (any chunk); what the modem sends back (echo and responses)."""
        out = bytearray()
        for b in bytes(data):
            if self.settings.echo:
                out.append(b)
            if b == CR:
                out += self._end_line()
            elif b == LF:
                continue  # S4 follows S3 from most hosts; it ends nothing by itself
            elif b == BS:
                if self._line:
                    self._line.pop()
            elif len(self._line) >= self.max_line:
                if not self._overlong:
                    self.rejects("overlong", "command line longer than %d bytes dropped",
                                 self.max_line)
                self._overlong = True
            else:
                self._line.append(b)
                if self._line[-2:].upper() == b"A/" and len(self._line) == 2:
                    self._line.clear()
                    out += self._run_line(self._last)  # A/ repeats without a CR
        return bytes(out)

    def reset(self) -> None:
        """The channel closed: a half-typed line goes; settings stay, as in the modem."""
        self._line.clear()
        self._overlong = False

    def _end_line(self) -> bytes:
        raw, overlong = bytes(self._line), self._overlong
        self.reset()
        if overlong:
            return self._final(AtError())
        text = raw.decode("ascii", "replace").strip()
        at = text.upper().find("AT")
        if at < 0:
            return b""  # not a command line: what precedes "AT" is ignored (V.250)
        return self._run_line(text[at:])

    # ----------------------------------------------------------------------- command lines

    def _run_line(self, line: str) -> bytes:
        """One command line ("AT..."): its commands in order, then one final result code."""
        if not line:
            return b""
        self._last = line
        self.commands += 1
        body = line[2:]
        upper = body.upper()
        out: list[str] = []
        pos = 0
        try:
            while pos < len(body):
                c = upper[pos]
                if c in " ;":
                    pos += 1
                    continue
                ext = _EXTENDED.match(upper, pos)
                if ext is not None:
                    name, op = ext.group(1), ext.group(2) or ""
                    # arguments keep their case (quoted strings)
                    arg = ""
                    if op.startswith("=") and op != "=?":
                        op, arg = "=", body[ext.start(2) + 1:ext.end(2)]
                    out += self._extended(name, op, arg.strip())
                    pos = ext.end()
                    continue
                basic = _BASIC.match(upper, pos)
                if basic is None:
                    raise AtError()
                out += self._basic(basic.group(1), basic.group(2), basic.group(3) or "")
                pos = basic.end()
        except AtError as err:
            return self._info(out) + self._final(err)
        return self._info(out) + self._final(None)

    def _info(self, lines: Iterable[str]) -> bytes:
        text = "".join(f"\r\n{line}\r\n" for line in lines) if self.settings.verbose else \
            "".join(f"{line}\r\n" for line in lines)
        return text.encode("ascii", "replace")

    def _final(self, err: AtError | None) -> bytes:
        s = self.settings
        if s.quiet:
            return b""
        if err is None:
            text, code = "OK", "0"
        elif err.cme and s.cmee:
            text = code = f"+CME ERROR: {err.cme}"
        else:
            text, code = "ERROR", "4"
        return f"\r\n{text}\r\n".encode() if s.verbose else f"{code}\r".encode()

    # ------------------------------------------------------------------------ basic commands

    def _basic(self, cmd: str, num: str, suffix: str) -> list[str]:
        n = int(num) if num else 0
        s = self.settings
        c = self.modem.config
        if cmd == "S":  # S-registers: accepted and kept at their defaults
            return ["000"] if suffix == "?" else []
        if suffix:
            raise AtError()
        if cmd == "E" and n in (0, 1):
            s.echo = bool(n)
        elif cmd == "V" and n in (0, 1):
            s.verbose = bool(n)
        elif cmd == "Q" and n in (0, 1):
            s.quiet = bool(n)
        elif cmd in ("Z", "&F") and n == 0:
            self.settings = _Settings()
        elif cmd == "I" and n == 0:
            return [c.manufacturer, c.model, f"Revision: {c.firmware}"]
        elif cmd == "I" and n in (1, 2, 3):
            return [[c.model, c.firmware, c.hardware][n - 1]]
        elif cmd in ("X", "&C", "&D"):
            return []  # accepted: nothing in the model they would change
        else:
            raise AtError()
        return []

    # --------------------------------------------------------------------- extended commands

    def _extended(self, name: str, op: str, arg: str) -> list[str]:
        handler = _EXTENDED_HANDLERS.get(name)
        if handler is None:
            raise AtError()
        if op == "=?":
            return []  # a test command: the command exists
        return handler(self, op, arg)

    def _identity(self, op: str, arg: str, value: str) -> list[str]:
        if op or arg:
            raise AtError()
        return [value]

    def _cgmi(self, op: str, arg: str) -> list[str]:
        return self._identity(op, arg, self.modem.config.manufacturer)

    def _cgmm(self, op: str, arg: str) -> list[str]:
        return self._identity(op, arg, self.modem.config.model)

    def _cgmr(self, op: str, arg: str) -> list[str]:
        return self._identity(op, arg, self.modem.config.firmware)

    def _cgsn(self, op: str, arg: str) -> list[str]:
        return self._identity(op, arg, self.modem.config.device_id)

    def _gcap(self, op: str, arg: str) -> list[str]:
        return self._identity(op, arg, "+GCAP: +CGSM")

    def _cimi(self, op: str, arg: str) -> list[str]:
        self._sim_ready()
        return self._identity(op, arg, self.modem.config.imsi)

    def _sim_ready(self) -> None:
        m = self.modem
        if not m.config.sim_present:
            raise AtError(CME_SIM_NOT_INSERTED)
        if m.sim_blocked:
            raise AtError(CME_SIM_FAILURE)
        if m.pin_locked or m.puk_locked:
            raise AtError(CME_OPERATION_NOT_ALLOWED)

    def _cpin(self, op: str, arg: str) -> list[str]:
        if op != "?":
            raise AtError(CME_OPERATION_NOT_ALLOWED)  # PIN entry is MBIM's (PIN set)
        m = self.modem
        if not m.config.sim_present:
            raise AtError(CME_SIM_NOT_INSERTED)
        if m.sim_blocked:
            raise AtError(CME_SIM_FAILURE)
        if m.puk_locked:
            return ["+CPIN: SIM PUK"]
        if m.pin_locked:
            return ["+CPIN: SIM PIN"]
        return ["+CPIN: READY"]

    def _csq(self, op: str, arg: str) -> list[str]:
        if op or arg:
            raise AtError()
        v = self.modem.signal_values()  # 99,99 when not registered, as MBIM's SIGNAL_STATE
        return [f"+CSQ: {v['Rssi']},{v['ErrorRate']}"]

    def _cops(self, op: str, arg: str) -> list[str]:
        if op == "=":
            parts = [p.strip() for p in arg.split(",")]
            if len(parts) == 2 and parts[0] == "3" and parts[1] in ("0", "1", "2"):
                self.settings.cops_format = int(parts[1])
                return []
            if parts == ["0"]:
                change = self.modem.register(RegisterAction.AUTOMATIC)
                if change.status:
                    raise AtError(CME_OPERATION_NOT_ALLOWED)
                self._indicate(list(change.indications))
                return []
            raise AtError(CME_OPERATION_NOT_ALLOWED)
        if op != "?":
            raise AtError()
        m = self.modem
        mode = 0 if m.register_mode is RegisterMode.AUTOMATIC else 1
        provider = m.registered_provider
        if provider is None:
            return [f"+COPS: {mode}"]
        fmt = self.settings.cops_format
        oper = provider if fmt == 2 else m.provider_name(provider)
        return [f'+COPS: {mode},{fmt},"{oper}",{_act(m)}']

    def _creg(self, op: str, arg: str) -> list[str]:
        if op == "=":
            if arg not in ("0", "1", "2"):
                raise AtError(CME_OPERATION_NOT_ALLOWED)
            self.settings.creg = int(arg)
            return []
        if op != "?":
            raise AtError()
        state = self.modem.register_values()["RegisterState"]
        return [f"+CREG: {self.settings.creg},{CREG_STAT.get(state, 4)}"]

    def _cfun(self, op: str, arg: str) -> list[str]:
        if op == "?":
            return [f"+CFUN: {1 if self.modem.radio_on else 4}"]
        if op != "=":
            raise AtError()
        parts = [p.strip() for p in arg.split(",")]
        if len(parts) > 2 or (len(parts) == 2 and parts[1] != "0"):
            raise AtError(CME_OPERATION_NOT_ALLOWED)  # no reset through AT
        fun = parts[0]
        if fun not in ("0", "1", "4"):
            raise AtError(CME_OPERATION_NOT_ALLOWED)
        self._indicate(self.modem.set_radio(fun == "1"))
        return []

    def _cmee(self, op: str, arg: str) -> list[str]:
        if op == "?":
            return [f"+CMEE: {self.settings.cmee}"]
        if op != "=" or arg not in ("0", "1"):
            raise AtError()
        self.settings.cmee = int(arg)
        return []

    def _indicate(self, indications: list[Indication]) -> None:
        if indications and self.on_indications is not None:
            self.on_indications(indications)


def _act(modem: ModemState) -> int:
    classes = modem.config.data_classes
    for name, act in _ACT_BY_CLASS:
        if name in classes:
            return act
    return 0


_Handler = Callable[[AtInterpreter, str, str], list[str]]
_EXTENDED_HANDLERS: dict[str, _Handler] = {
    "+CGMI": AtInterpreter._cgmi, "+GMI": AtInterpreter._cgmi,
    "+CGMM": AtInterpreter._cgmm, "+GMM": AtInterpreter._cgmm,
    "+CGMR": AtInterpreter._cgmr, "+GMR": AtInterpreter._cgmr,
    "+CGSN": AtInterpreter._cgsn, "+GSN": AtInterpreter._cgsn,
    "+GCAP": AtInterpreter._gcap, "+CIMI": AtInterpreter._cimi,
    "+CPIN": AtInterpreter._cpin, "+CSQ": AtInterpreter._csq,
    "+COPS": AtInterpreter._cops, "+CREG": AtInterpreter._creg,
    "+CFUN": AtInterpreter._cfun, "+CMEE": AtInterpreter._cmee,
}


class AtFunction:
    """ChannelFunction adapter (Contract 3): an `AtInterpreter` on one AT channel. Answers go
    out in pieces of at most `dl_size` bytes (the channel's DL buffer: a transfer larger than
    the buffer the host posted would be lost)."""

    def __init__(self, interpreter: AtInterpreter, dl_size: int) -> None:
        self.interpreter = interpreter
        self.dl_size = dl_size
        self._send: Callable[[bytes], object] | None = None

    def opened(self, send: Callable[[bytes], object]) -> None:
        self._send = send

    def receive(self, ul_transfer: bytes) -> None:
        out = self.interpreter.feed(ul_transfer)
        if self._send is None:
            return
        for i in range(0, len(out), self.dl_size):
            self._send(out[i:i + self.dl_size])

    def closed(self) -> None:
        self._send = None
        self.interpreter.reset()
