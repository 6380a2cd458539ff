"""The SMS PDU and USSD codec (iosm_cuse/sim/mbim/sms_pdu.py): known vectors, round trips,
and Hypothesis fuzz of the decoders, which read what a client sends."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import Sms, SmsFormat
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.message import Command, CommandDone, Open, decode_message, encode_message
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim import MbimFunction
from iosm_cuse.sim.mbim.sms_pdu import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    PduError,
    decode_pdu,
    decode_ussd,
    encode_deliver,
    encode_submit,
    encode_ussd,
    gsm7_septets,
    gsm7_text,
    pack_septets,
    unpack_septets,
)

GSM7_CHARS = st.sampled_from([c for i, c in enumerate(GSM7_BASIC) if i != 0x1B]
                             + list(GSM7_EXTENSION.values()))
NUMBERS = st.from_regex(r"\+?[0-9]{1,20}", fullmatch=True)


def test_a_textbook_sms_submit() -> None:
    # the SMS-SUBMIT of countless PDU-mode tutorials: "hellohello" to +46708251358,
    # relative validity period, no SMSC given
    pdu = decode_pdu(bytes.fromhex("0011000B916407281553F80000AA0AE8329BFD4697D9EC37"))
    assert (pdu.kind, pdu.smsc, pdu.address, pdu.text) == ("submit", "", "+46708251358",
                                                           "hellohello")


def test_ucs2_and_user_data_header_are_read() -> None:
    # UCS2 with a concatenation header (UDHI), as a client sends part 1 of 2
    udh = bytes([5, 0x00, 0x03, 0x2A, 0x02, 0x01])
    body = "Привет".encode("utf-16-be")
    raw = bytes([0x00, 0x41, 0x00, 0x03, 0x81, 0x21, 0xF3, 0x00, 0x08, len(udh) + len(body)])
    assert decode_pdu(raw + udh + body).text == "Привет"
    # GSM 7-bit after a 6-octet header: 7 septets skipped (one of fill)
    septets = gsm7_septets("part one")
    assert septets is not None
    packed = pack_septets(septets, fill_bits=1)
    ud = udh + packed
    raw7 = bytes([0x00, 0x41, 0x00, 0x03, 0x81, 0x21, 0xF3, 0x00, 0x00, 7 + len(septets)])
    assert decode_pdu(raw7 + ud).text == "part one"


@given(st.text(GSM7_CHARS, max_size=80), NUMBERS, st.integers(0, 255))
def test_submit_round_trip_gsm7(text: str, to: str, ref: int) -> None:
    septets = gsm7_septets(text)
    assert septets is not None
    if len(septets) > 160:
        return
    pdu = decode_pdu(encode_submit(to, text, ref, smsc="+123456"))
    assert (pdu.address, pdu.text, pdu.reference, pdu.smsc) == (to, text, ref, "+123456")


@given(st.text(st.characters(codec="utf-16", exclude_categories=("Cs",)), min_size=1,
               max_size=60), NUMBERS,
       st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31)),
       st.integers(-48, 56))
def test_deliver_round_trip_any_text(text: str, sender: str, when: datetime,
                                     quarters: int) -> None:
    stamp = when.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=15 * quarters)))
    try:
        raw = encode_deliver(sender, text, stamp, smsc="+99")
    except ValueError:          # more than one SMS carries
        assert len(text.encode("utf-16-be")) > 140
        return
    pdu = decode_pdu(raw)
    assert (pdu.kind, pdu.address, pdu.text, pdu.timestamp) == ("deliver", sender, text, stamp)


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_decode_pdu_takes_any_bytes(data: bytes) -> None:
    with contextlib.suppress(PduError):
        decode_pdu(data)


@settings(max_examples=500)
@given(st.integers(0, 255), st.binary(max_size=200))
def test_decode_ussd_takes_any_bytes(dcs: int, data: bytes) -> None:
    with contextlib.suppress(PduError):
        decode_ussd(dcs, data)


@given(st.text(GSM7_CHARS, max_size=90))
def test_ussd_round_trip(text: str) -> None:
    dcs, payload = encode_ussd(text)
    assert decode_ussd(dcs, payload) == text.rstrip("\r") or text.endswith("@")


@given(st.lists(st.integers(0, 127), max_size=50), st.integers(0, 6))
def test_septets_pack_and_unpack(septets: list[int], fill: int) -> None:
    assert unpack_septets(pack_septets(septets, fill), len(septets), fill) == septets


def test_gsm7_escape_without_a_known_code_reads_as_space() -> None:
    assert gsm7_text([0x41, 0x1B, 0x41, 0x42]) == "A B" and gsm7_text([0x41, 0x1B]) == "A"
    with pytest.raises(PduError):
        unpack_septets(b"\x00", 2)


def send_info(record: bytes) -> bytes:
    return infobuf.encode(cids.SMS_SEND_SET, {"Format": SmsFormat.PDU, "Record": record})


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_sms_send_with_any_record_is_answered(record: bytes, wrap: bool) -> None:
    """Hostile SEND payloads: a valid status, never an internal error, the outbox only fed
    by readable SMS-SUBMITs."""
    fn = MbimFunction()
    fn.receive(encode_message(Open(1, 4096)))
    if wrap:
        record = infobuf.encode(cids.SMS_PDU_SEND_RECORD, {"PduData": record})
    (done,) = [decode_message(t) for t in fn.receive(encode_message(Command(
        2, Service.SMS.value, Sms.SEND, CommandType.SET, send_info(record))))]
    assert isinstance(done, CommandDone)
    assert done.status in (Status.NONE, Status.INVALID_PARAMETERS)
    assert fn.internal_errors == 0
    assert len(fn.modem.sms_outbox()) == (1 if done.status == Status.NONE else 0)
