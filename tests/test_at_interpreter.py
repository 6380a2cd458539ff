"""The model's AT interpreter (iosm_cuse/sim/at.py): line assembly from any chunks, echo, the
commands ModemManager and `mmcli --command` send, agreement with MBIM on one ModemState, and
hostile input (docs/at-ports.md)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import BasicConnect as B
from iosm_cuse.mbim.cids import RadioState, RegisterAction, RegisterState
from iosm_cuse.mbim.constants import CommandType
from iosm_cuse.mbim.message import (
    Command,
    CommandDone,
    IndicateStatus,
    Open,
    decode_message,
    encode_message,
)
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.at import MAX_LINE, AtFunction, AtInterpreter
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.mbim import MbimFunction, ModemState

BC = Service.BASIC_CONNECT.value


def answers(at: AtInterpreter, line: str) -> list[str]:
    """The lines of the answer to one command line (echo off first), final code last."""
    out = at.feed(line.encode() + b"\r").decode()
    return [piece for piece in out.split("\r\n") if piece]


def quiet_echo(modem: ModemState | None = None) -> AtInterpreter:
    at = AtInterpreter(modem or ModemState())
    assert at.feed(b"ATE0\r") == b"ATE0\r\r\nOK\r\n"  # echo is on by default, as on modems
    return at


def test_identity_commands_answer_from_the_config() -> None:
    config = ModemConfig(manufacturer="Acme", model="M1", firmware="fw 9",
                         device_id="490154203237518")
    at = quiet_echo(ModemState(config))
    assert answers(at, "ATI") == ["Acme", "M1", "Revision: fw 9", "OK"]
    assert answers(at, "AT+CGMI") == ["Acme", "OK"]
    assert answers(at, "AT+CGMM") == ["M1", "OK"]
    assert answers(at, "AT+CGMR") == ["fw 9", "OK"]
    assert answers(at, "AT+CGSN") == ["490154203237518", "OK"]
    assert answers(at, "AT") == ["OK"]
    assert answers(at, "at+cgmi;+cgsn") == ["Acme", "490154203237518", "OK"]  # any case
    assert answers(at, "AT+CGMI=?") == ["OK"]


def test_unknown_commands_and_bad_arguments_are_errors() -> None:
    at = quiet_echo()
    for line in ("AT+XYZZY", "ATJ", "AT+CFUN=7", "AT+CGMI=1", "AT+CREG=9", "AT+CSQ=1"):
        assert answers(at, line) == ["ERROR"], line
    # with +CMEE=1, the 27.007 errors come with their codes
    assert answers(at, "AT+CMEE=1") == ["OK"]
    assert answers(at, "AT+CFUN=7") == ["+CME ERROR: 3"]
    assert answers(at, "AT+XYZZY") == ["ERROR"]
    # a failing command ends the line: what came before it is answered, nothing after runs
    assert answers(at, "AT+CGMI;+XYZZY;+CFUN=0") == ["Intel", "ERROR"]
    assert at.modem.radio_on


def test_sim_states_in_cpin() -> None:
    modem = ModemState(ModemConfig(pin_required=True))
    at = quiet_echo(modem)
    assert answers(at, "AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
    assert answers(at, "AT+CREG?") == ["+CREG: 0,0", "OK"]
    assert answers(at, "AT+CSQ") == ["+CSQ: 99,99", "OK"]
    modem.puk_locked = True
    assert answers(at, "AT+CPIN?") == ["+CPIN: SIM PUK", "OK"]
    absent = quiet_echo(ModemState(ModemConfig(sim_present=False)))
    absent.feed(b"AT+CMEE=1\r")
    assert answers(absent, "AT+CPIN?") == ["+CME ERROR: 10"]


class MbimHost:
    """Just enough of an MBIM host to ask the function what AT answered from."""

    def __init__(self, fn: MbimFunction) -> None:
        self.fn = fn
        self.tid = 1
        fn.receive(encode_message(Open(self.tid, 4096)))

    def query(self, cid: int) -> dict[str, Any]:
        self.tid += 1
        (done,) = [decode_message(t) for t in self.fn.receive(encode_message(
            Command(self.tid, BC, cid, CommandType.QUERY, b"")))]
        assert isinstance(done, CommandDone) and done.status == 0
        spec = cids.lookup(Service.BASIC_CONNECT, cid)
        assert spec is not None and spec.response is not None
        return infobuf.decode(spec.response, done.info)

    def indicated(self) -> list[int]:
        out = []
        for t in self.fn.pending_indications():
            ind = decode_message(t)
            assert isinstance(ind, IndicateStatus)
            out.append(ind.cid)
        return out


def test_at_and_mbim_agree_on_one_modem_state() -> None:
    fn = MbimFunction()
    host = MbimHost(fn)
    at = quiet_echo(fn.modem)
    at.on_indications = fn.indicate

    caps = host.query(B.DEVICE_CAPS)
    assert answers(at, "AT+CGSN") == [caps["DeviceId"], "OK"]
    assert answers(at, "AT+CGMR") == [caps["FirmwareInfo"], "OK"]
    signal = host.query(B.SIGNAL_STATE)
    assert answers(at, "AT+CSQ") == [f"+CSQ: {signal['Rssi']},{signal['ErrorRate']}", "OK"]
    reg = host.query(B.REGISTER_STATE)
    assert reg["RegisterState"] is RegisterState.HOME
    assert answers(at, "AT+CREG?") == ["+CREG: 0,1", "OK"]
    assert answers(at, "AT+COPS=3,2;+COPS?") == [f'+COPS: 0,2,"{reg["ProviderId"]}",7', "OK"]
    assert answers(at, "AT+COPS=3,0;+COPS?") == [f'+COPS: 0,0,"{reg["ProviderName"]}",7', "OK"]

    # The radio switched off over AT: MBIM reports it, and its host hears it.
    assert answers(at, "AT+CFUN=0") == ["OK"]
    radio = host.query(B.RADIO_STATE)
    assert radio["SwRadioState"] is RadioState.OFF
    # deregistered, so detached (it had attached by itself, auto_attach), then the radio
    assert host.indicated() == [B.REGISTER_STATE, B.PACKET_SERVICE, B.RADIO_STATE]
    assert answers(at, "AT+CFUN?;+CREG?;+CSQ;+COPS?") == [
        "+CFUN: 4", "+CREG: 0,0", "+CSQ: 99,99", "+COPS: 0", "OK"]

    # ... and back on over MBIM: AT sees it.
    fn.indicate(fn.modem.set_radio(True))
    assert answers(at, "AT+CFUN?;+CREG?") == ["+CFUN: 1", "+CREG: 0,1", "OK"]
    fn.modem.register(RegisterAction.MANUAL, "00102")
    assert answers(at, "AT+CREG?") == ["+CREG: 0,5", "OK"]  # roaming


def test_echo_verbose_and_numeric_result_codes() -> None:
    at = AtInterpreter(ModemState())
    assert at.feed(b"AT\r") == b"AT\r\r\nOK\r\n"
    assert at.feed(b"ATE0\r") == b"ATE0\r\r\nOK\r\n"  # echoed before it takes effect
    assert at.feed(b"ATE1\r") == b"\r\nOK\r\n"
    assert at.feed(b"ATE0V0\r") == b"ATE0V0\r0\r"
    assert at.feed(b"AT+NOPE\r") == b"4\r"
    assert at.feed(b"ATZ\r") == b"\r\nOK\r\n"  # answered with the defaults it restores
    assert at.feed(b"AT\r") == b"AT\r\r\nOK\r\n"


def test_line_editing_repeat_and_noise() -> None:
    at = quiet_echo()
    assert at.feed(b"AT+CGMX\x08I\r") == b"\r\nIntel\r\n\r\nOK\r\n"  # backspace
    assert at.feed(b"A/") == b"\r\nIntel\r\n\r\nOK\r\n"  # repeats without a CR
    assert at.feed(b"hello\r") == b""  # no AT in it: not a command line
    assert at.feed(b"\r\n\r\n") == b""


def test_an_overlong_line_is_dropped_and_answered_error() -> None:
    at = quiet_echo()
    out = at.feed(b"AT+CGMI" + b";+CGMI" * (MAX_LINE // 6 + 10) + b"\r")
    assert out == b"\r\nERROR\r\n"
    assert at.rejects["overlong"] == 1
    assert answers(at, "AT+CGMI") == ["Intel", "OK"]  # and the next line works


SCRIPT = (b"AT\r\nATI\rAT+CGMI;+CGMM\r\nAT+CPIN?\rAT+CSQ\rAT+COPS?\r\nAT+CREG?\rAT+CFUN?\r"
          b"AT+BOGUS\rATE0\rAT+CGSN\r")


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(SCRIPT)), max_size=20))
def test_any_chunking_gives_the_same_answer(cuts: list[int]) -> None:
    whole = AtInterpreter(ModemState()).feed(SCRIPT)
    at = AtInterpreter(ModemState())
    bounds = [0, *sorted(cuts), len(SCRIPT)]
    out = b"".join(at.feed(SCRIPT[a:b]) for a, b in itertools.pairwise(bounds))
    assert out == whole
    assert whole.count(b"\r\nOK\r\n") == 10 and whole.count(b"\r\nERROR\r\n") == 1


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.binary(max_size=200), max_size=12))
def test_hostile_bytes_never_raise_and_stay_bounded(data: list[bytes]) -> None:
    at = AtInterpreter(ModemState(), max_line=64)
    for chunk in data:
        out = at.feed(chunk)
        # what comes back: the echo, and per CR at most a handful of short lines
        assert len(out) <= len(chunk) + chunk.count(b"\r") * 400 + 400
        assert len(at._line) <= 64
    # whatever came before, a fresh line is understood
    at.feed(b"\r")
    assert at.feed(b"ATE0\r").endswith(b"\r\nOK\r\n")
    assert at.feed(b"AT+CGMI\r") == b"\r\nIntel\r\n\r\nOK\r\n"


@settings(max_examples=200, deadline=None)
@given(line=st.text(alphabet="AT+CGMIRSNEZ&=?;,0123456789 \"", max_size=40))
def test_every_command_line_gets_exactly_one_final_result(line: str) -> None:
    at = quiet_echo()
    out = at.feed(f"AT{line}\r".encode()).decode()
    finals = re.findall(r"\r\n(OK|ERROR|\+CME ERROR: \d+)\r\n", out)
    assert len(finals) == 1 and out.endswith(f"\r\n{finals[0]}\r\n"), out


def test_the_channel_function_sends_answers_within_the_dl_buffer() -> None:
    sent: list[bytes] = []
    fn = AtFunction(AtInterpreter(ModemState()), dl_size=8)
    fn.receive(b"ATI\r")  # before the channel opened: nothing goes anywhere
    fn.opened(sent.append)
    fn.receive(b"ATI\r")
    assert all(len(t) <= 8 for t in sent) and len(sent) > 3
    assert b"".join(sent) == b"ATI\r\r\nIntel\r\n\r\nXMM7560 (simulated)\r\n\r\n" \
        b"Revision: iosm-sim 0.1.0\r\n\r\nOK\r\n"
    fn.receive(b"AT+CG")
    fn.closed()  # a half-typed line goes with the channel
    fn.opened(sent.append)
    sent.clear()
    fn.receive(b"MI\r")
    assert b"".join(sent) == b"MI\r"


@pytest.mark.parametrize("line", ["AT+CFUN=1,1", "AT+CFUN=", "AT+COPS=1,2,\"00102\""])
def test_what_the_model_does_not_do_is_refused_and_changes_nothing(line: str) -> None:
    at = quiet_echo()
    assert answers(at, line) == ["ERROR"]
    assert at.modem.radio_on and at.modem.registered_provider == "00101"
