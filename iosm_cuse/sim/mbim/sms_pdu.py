"""SMS PDUs as MBIM carries them: a 3GPP TS 23.040 TPDU preceded by the SMSC address
(TS 27.005 PDU mode), and the TS 23.038 alphabets they and USSD strings are written in.

Pure functions. ``decode_pdu`` reads untrusted bytes (what a client sends with SMS SEND): every
length is checked against the buffer and anything it cannot read raises ``PduError``; it never
reads past the end. Only what the model needs is understood: SMS-SUBMIT and SMS-DELIVER, single
part (a user data header is skipped), GSM 7-bit, 8-bit and UCS2 data coding
(docs/modemmanager.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

# TS 23.038 section 6.2.1, the GSM 7-bit default alphabet (index = septet value).
GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table, reached through the escape septet 0x1B.
GSM7_EXTENSION = {0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\", 0x3C: "[",
                  0x3D: "~", 0x3E: "]", 0x40: "|", 0x65: "€"}
_ESC = 0x1B
_TO_BASIC = {ch: i for i, ch in enumerate(GSM7_BASIC) if i != _ESC}
_TO_EXTENSION = {ch: code for code, ch in GSM7_EXTENSION.items()}
assert len(GSM7_BASIC) == 128

MAX_GSM7_SEPTETS = 160     # one SMS
MAX_UCS2_OCTETS = 140

DCS_GSM7 = 0x00
DCS_8BIT = 0x04
DCS_UCS2 = 0x08
TOA_INTERNATIONAL = 0x91
TOA_UNKNOWN = 0x81
TOA_ALPHANUMERIC = 0xD0


class PduError(ValueError):
    """A PDU (or coded string) that cannot be read."""


@dataclass(frozen=True)
class Pdu:
    """What the model reads of an SMS TPDU."""

    kind: str                  # "submit" or "deliver"
    smsc: str
    address: str               # TP-DA of a submit, TP-OA of a deliver
    text: str
    reference: int = 0         # TP-MR of a submit
    timestamp: datetime | None = None  # TP-SCTS of a deliver


# ------------------------------------------------------------------------------- alphabets


def gsm7_septets(text: str) -> list[int] | None:
    """The text as default-alphabet septets, None if a character has no GSM 7-bit code."""
    out: list[int] = []
    for ch in text:
        code = _TO_BASIC.get(ch)
        if code is not None:
            out.append(code)
            continue
        ext = _TO_EXTENSION.get(ch)
        if ext is None:
            return None
        out += [_ESC, ext]
    return out


def gsm7_text(septets: list[int]) -> str:
    """Septets back to text; an escape before a code the extension table lacks reads as a
    space (TS 23.038 section 6.2.1.1), a trailing escape is dropped."""
    out = []
    i = 0
    while i < len(septets):
        s = septets[i] & 0x7F
        if s == _ESC:
            if i + 1 < len(septets):
                out.append(GSM7_EXTENSION.get(septets[i + 1] & 0x7F, " "))
            i += 2
            continue
        out.append(GSM7_BASIC[s])
        i += 1
    return "".join(out)


def pack_septets(septets: list[int], fill_bits: int = 0) -> bytes:
    """Pack septets LSB first, after ``fill_bits`` zero bits (to align after a header)."""
    acc = 0
    nbits = fill_bits
    for s in septets:
        acc |= (s & 0x7F) << nbits
        nbits += 7
    return acc.to_bytes((nbits + 7) // 8, "little") if nbits else b""


def unpack_septets(data: bytes, count: int, fill_bits: int = 0) -> list[int]:
    """``count`` septets packed in ``data`` after ``fill_bits`` bits; PduError if they do not
    fit."""
    if count < 0 or fill_bits + 7 * count > 8 * len(data):
        raise PduError(f"{count} septets do not fit in {len(data)} octets")
    acc = int.from_bytes(data, "little") >> fill_bits
    return [(acc >> (7 * i)) & 0x7F for i in range(count)]


# --------------------------------------------------------------------------------- addresses


def _bcd(digits: str) -> bytes:
    nibbles = [int(d) for d in digits]
    if len(nibbles) % 2:
        nibbles.append(0xF)
    return bytes(nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, len(nibbles), 2))


_BCD_DIGITS = "0123456789*#abc"


def _unbcd(data: bytes, ndigits: int) -> str:
    out = []
    for i in range(ndigits):
        nib = (data[i // 2] >> (4 * (i % 2))) & 0xF
        if nib == 0xF:
            raise PduError("filler inside an address")
        out.append(_BCD_DIGITS[nib])
    return "".join(out)


def _split_number(number: str) -> tuple[int, str]:
    toa = TOA_INTERNATIONAL if number.startswith("+") else TOA_UNKNOWN
    digits = number[1:] if number.startswith("+") else number
    if not digits or not digits.isascii() or not digits.isdigit() or len(digits) > 20:
        raise ValueError(f"not a phone number: {number!r}")
    return toa, digits


def encode_address(number: str) -> bytes:
    """TP-OA/TP-DA: digit count, type of address, BCD digits."""
    toa, digits = _split_number(number)
    return bytes([len(digits), toa]) + _bcd(digits)


def encode_smsc(number: str) -> bytes:
    """The SMSC prefix: octet count (0: none), type of address, BCD digits."""
    if not number:
        return b"\x00"
    toa, digits = _split_number(number)
    body = bytes([toa]) + _bcd(digits)
    return bytes([len(body)]) + body


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PduError(f"{what}: needs {n} octets at {self.pos} of {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def octet(self, what: str) -> int:
        return self.take(1, what)[0]


def _number(toa: int, digits: str) -> str:
    return ("+" + digits) if (toa & 0x70) == 0x10 else digits


def _read_address(r: _Reader) -> str:
    ndigits = r.octet("address length")
    toa = r.octet("type of address")
    raw = r.take((ndigits + 1) // 2, "address")
    if (toa & 0x70) == 0x50:          # alphanumeric: GSM 7-bit packed, ndigits semi-octets
        return gsm7_text(unpack_septets(raw, ndigits * 4 // 7))
    return _number(toa, _unbcd(raw, ndigits))


def _read_smsc(r: _Reader) -> str:
    n = r.octet("SMSC length")
    if n == 0:
        return ""
    toa = r.octet("SMSC type of address")
    raw = r.take(n - 1, "SMSC address")
    digits = []
    for b in raw:
        for nib in (b & 0xF, b >> 4):
            if nib == 0xF:
                continue
            digits.append(_BCD_DIGITS[nib])
    return _number(toa, "".join(digits))


# ------------------------------------------------------------------------------ timestamps


def _semi(v: int) -> int:
    return (v % 10) << 4 | (v // 10)


def _unsemi(b: int) -> int:
    return (b & 0xF) * 10 + (b >> 4)


def encode_timestamp(when: datetime) -> bytes:
    """TP-SCTS: year..second as swapped BCD, then the zone in quarter hours."""
    offset = when.utcoffset() or timedelta(0)
    quarters = int(offset.total_seconds() // 900)
    tz = _semi(abs(quarters)) | (0x08 if quarters < 0 else 0)
    return bytes([_semi(when.year % 100), _semi(when.month), _semi(when.day),
                  _semi(when.hour), _semi(when.minute), _semi(when.second), tz])


def _decode_timestamp(raw: bytes) -> datetime:
    try:
        quarters = _unsemi(raw[6] & 0xF7) * (-1 if raw[6] & 0x08 else 1)
        return datetime(2000 + _unsemi(raw[0]), _unsemi(raw[1]), _unsemi(raw[2]),
                         _unsemi(raw[3]), _unsemi(raw[4]), _unsemi(raw[5]),
                         tzinfo=timezone(timedelta(minutes=15 * quarters)))
    except ValueError as e:
        raise PduError(f"bad timestamp: {e}") from None


# ---------------------------------------------------------------------------- user data


def _user_data(text: str) -> tuple[int, int, bytes]:
    """(DCS, TP-UDL, TP-UD) for one message: GSM 7-bit when every character has a code,
    else UCS2; ValueError if it does not fit one SMS."""
    septets = gsm7_septets(text)
    if septets is not None:
        if len(septets) > MAX_GSM7_SEPTETS:
            raise ValueError(f"text needs {len(septets)} septets; one SMS holds 160")
        return DCS_GSM7, len(septets), pack_septets(septets)
    data = text.encode("utf-16-be")
    if len(data) > MAX_UCS2_OCTETS:
        raise ValueError(f"text needs {len(data)} octets in UCS2; one SMS holds 140")
    return DCS_UCS2, len(data), data


def _alphabet(dcs: int) -> str:
    """TS 23.038 section 4: "gsm7", "8bit" or "ucs2"; PduError for groups the model does not
    read."""
    group = dcs >> 4
    if group <= 0x7:                  # general data coding (compressed text refused)
        if dcs & 0x20:
            raise PduError("compressed user data")
        return ("gsm7", "8bit", "ucs2", "gsm7")[(dcs >> 2) & 0x3]
    if group in (0xC, 0xD):
        return "gsm7"
    if group == 0xE:
        return "ucs2"
    if group == 0xF:
        return "8bit" if dcs & 0x04 else "gsm7"
    raise PduError(f"data coding scheme 0x{dcs:02x} is reserved")


def _read_user_data(r: _Reader, dcs: int, udhi: bool) -> str:
    alphabet = _alphabet(dcs)
    udl = r.octet("TP-UDL")
    rest = r.data[r.pos:]
    if alphabet == "gsm7":
        nbytes = (udl * 7 + 7) // 8
        if nbytes > len(rest):
            raise PduError(f"{udl} septets do not fit in {len(rest)} octets")
        data = r.take(nbytes, "TP-UD")
        skip = 0
        if udhi:
            if not data:
                raise PduError("user data header announced but absent")
            header_bits = (data[0] + 1) * 8
            skip = (header_bits + 6) // 7
            if skip > udl:
                raise PduError("user data header longer than the user data")
        septets = unpack_septets(data, udl)
        return gsm7_text(septets[skip:])
    data = r.take(udl, "TP-UD")
    if udhi:
        if not data or data[0] + 1 > len(data):
            raise PduError("user data header longer than the user data")
        data = data[data[0] + 1:]
    if alphabet == "ucs2":
        if len(data) % 2:
            raise PduError("odd UCS2 length")
        return data.decode("utf-16-be", errors="replace")
    return data.decode("latin-1")


# ---------------------------------------------------------------------------------- PDUs


def encode_deliver(sender: str, text: str, when: datetime, smsc: str = "") -> bytes:
    """An SMS-DELIVER as a network hands it to the modem, with the SMSC prefix; ValueError
    for a sender that is not a number or a text longer than one SMS."""
    dcs, udl, ud = _user_data(text)
    first = 0x04                       # MTI deliver, more-messages-to-send: no
    return (encode_smsc(smsc) + bytes([first]) + encode_address(sender)
            + bytes([0x00, dcs]) + encode_timestamp(when) + bytes([udl]) + ud)


def encode_submit(to: str, text: str, reference: int = 0, smsc: str = "") -> bytes:
    """An SMS-SUBMIT as a client sends it (no validity period), with the SMSC prefix."""
    dcs, udl, ud = _user_data(text)
    return (encode_smsc(smsc) + bytes([0x01, reference & 0xFF]) + encode_address(to)
            + bytes([0x00, dcs, udl]) + ud)


_VP_SIZE = {0: 0, 2: 1, 1: 7, 3: 7}    # TP-VPF -> octets of TP-VP


def decode_pdu(data: bytes) -> Pdu:
    """Read an SMS-SUBMIT or SMS-DELIVER with its SMSC prefix; PduError for anything else
    or anything malformed."""
    r = _Reader(bytes(data))
    smsc = _read_smsc(r)
    first = r.octet("first octet")
    mti = first & 0x03
    udhi = bool(first & 0x40)
    if mti == 0x01:
        reference = r.octet("TP-MR")
        address = _read_address(r)
        r.octet("TP-PID")
        dcs = r.octet("TP-DCS")
        r.take(_VP_SIZE[(first >> 3) & 0x03], "TP-VP")
        text = _read_user_data(r, dcs, udhi)
        return Pdu("submit", smsc, address, text, reference=reference)
    if mti == 0x00:
        address = _read_address(r)
        r.octet("TP-PID")
        dcs = r.octet("TP-DCS")
        when = _decode_timestamp(r.take(7, "TP-SCTS"))
        text = _read_user_data(r, dcs, udhi)
        return Pdu("deliver", smsc, address, text, timestamp=when)
    raise PduError(f"message type {mti} is neither SMS-SUBMIT nor SMS-DELIVER")


# ------------------------------------------------------------------------------------ USSD

USSD_DCS_GSM7 = 0x0F           # TS 23.038 section 5: GSM 7-bit, language unspecified
USSD_DCS_UCS2 = 0x48


def encode_ussd(text: str) -> tuple[int, bytes]:
    """(data coding scheme, packed payload) of a USSD string; at most 160 octets
    (ValueError beyond)."""
    septets = gsm7_septets(text)
    if septets is not None:
        if len(septets) % 8 == 7:      # 7 spare bits would read '@': CR (TS 23.038 6.1.2.3.1)
            septets.append(0x0D)
        payload = pack_septets(septets)
        dcs = USSD_DCS_GSM7
    else:
        payload = text.encode("utf-16-be")
        dcs = USSD_DCS_UCS2
    if len(payload) > 160:
        raise ValueError(f"USSD string needs {len(payload)} octets; at most 160")
    return dcs, payload


def decode_ussd(dcs: int, payload: bytes) -> str:
    """A USSD string in the cell broadcast data coding scheme (TS 23.038 section 5); PduError for a
    scheme the model does not read."""
    group = dcs >> 4
    if group in (0x0, 0x2, 0x3) or (group == 0x1 and dcs == 0x10):
        alphabet = "gsm7"
    elif dcs == 0x11:
        alphabet = "ucs2"
    elif group in (0x4, 0x5, 0x6, 0x7, 0x9):
        if dcs & 0x20:
            raise PduError("compressed USSD string")
        alphabet = ("gsm7", "8bit", "ucs2", "gsm7")[(dcs >> 2) & 0x3]
    elif group == 0xF:
        alphabet = "8bit" if dcs & 0x04 else "gsm7"
    else:
        raise PduError(f"USSD data coding scheme 0x{dcs:02x} not understood")
    if alphabet == "gsm7":
        septets = unpack_septets(payload, len(payload) * 8 // 7)
        if septets and len(payload) * 8 % 7 == 0 and septets[-1] in (0x0D, 0x00):
            septets.pop()              # the padding of 7 spare bits
        return gsm7_text(septets).rstrip("\r")
    if alphabet == "ucs2":
        if len(payload) % 2:
            raise PduError("odd UCS2 length")
        return payload.decode("utf-16-be", errors="replace")
    return payload.decode("latin-1")
