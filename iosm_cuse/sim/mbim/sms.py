"""The modem's SMS store and outbox, sans-IO: what MBIM's SMS service reads, deletes and sends.

Messages live at indexes 1..``max_messages`` (MBIM's index 0 means "none") as PDUs with the
SMSC prefix, each with its MBIM status. A delivery stores an SMS-DELIVER and returns the values
of the indications a real modem sends: SMS READ (the message) and MESSAGE_STORE_STATUS with
NEW_MESSAGE and its index, which ModemManager answers by reading that index. What clients send
goes to the outbox, decoded (docs/modemmanager.md §7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from iosm_cuse.mbim.cids import SmsFlag, SmsFormat, SmsStatus, SmsStatusFlag, SmsStorageState
from iosm_cuse.sim.mbim.sms_pdu import PduError, decode_pdu, encode_deliver

Values = dict[str, Any]

OUTBOX_LIMIT = 1000        # the oldest sent messages are forgotten beyond this


class SmsError(Exception):
    """A request the store refuses; ``reason`` says which MBIM status fits."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason   # "invalid" (the request), "full" (the store)


@dataclass
class StoredSms:
    index: int
    status: SmsStatus
    pdu: bytes


@dataclass
class SmsStore:
    """Stored messages, the outbox, and the SMS configuration (format PDU, the SMSC)."""

    max_messages: int
    smsc: str
    wallclock: Callable[[], float]
    messages: dict[int, StoredSms] = field(default_factory=dict)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    _sent: int = 0
    _reference: int = 0

    # ------------------------------------------------------------------------ reports

    def configuration_values(self) -> Values:
        return {"SmsStorageState": SmsStorageState.INITIALIZED, "Format": SmsFormat.PDU,
                "MaxMessages": self.max_messages, "CdmaShortMessageSize": 0,
                "ScAddress": self.smsc}

    def store_status_values(self, new_index: int = 0) -> Values:
        flag = SmsStatusFlag.NONE
        if len(self.messages) >= self.max_messages:
            flag |= SmsStatusFlag.MESSAGE_STORE_FULL
        news = [i for i, m in sorted(self.messages.items()) if m.status is SmsStatus.NEW]
        if news:
            flag |= SmsStatusFlag.NEW_MESSAGE
        return {"Flag": flag, "MessageIndex": new_index or (news[-1] if news else 0)}

    @staticmethod
    def read_values(records: list[StoredSms]) -> Values:
        return {"Format": SmsFormat.PDU, "PduMessages": [
            {"MessageIndex": m.index, "MessageStatus": m.status, "PduData": m.pdu}
            for m in records]}

    # ---------------------------------------------------------------------- operations

    def deliver(self, sender: str, text: str) -> StoredSms:
        """Store an SMS-DELIVER from ``sender``; ValueError for a bad sender or text (too
        long for one SMS), SmsError("full") when every index is taken."""
        when = datetime.fromtimestamp(self.wallclock(), UTC)
        pdu = encode_deliver(sender, text, when, self.smsc)
        index = self._free_index()
        msg = StoredSms(index, SmsStatus.NEW, pdu)
        self.messages[index] = msg
        return msg

    def read(self, flag: SmsFlag, index: int) -> list[StoredSms]:
        """The messages a READ selects; reading marks new ones old, as a modem does."""
        if flag is SmsFlag.INDEX:
            msg = self.messages.get(index)
            if msg is None:
                raise SmsError("invalid", f"no message at index {index}")
            chosen = [msg]
        else:
            chosen = [m for _, m in sorted(self.messages.items()) if _selected(flag, m)]
        out = [StoredSms(m.index, m.status, m.pdu) for m in chosen]
        for m in chosen:
            if m.status is SmsStatus.NEW:
                m.status = SmsStatus.OLD
        return out

    def delete(self, flag: SmsFlag, index: int) -> None:
        if flag is SmsFlag.INDEX:
            if self.messages.pop(index, None) is None:
                raise SmsError("invalid", f"no message at index {index}")
            return
        for i in [i for i, m in self.messages.items() if _selected(flag, m)]:
            del self.messages[i]

    def send(self, pdu: bytes) -> int:
        """Decode what a client sends, keep it in the outbox; the message reference.
        SmsError("invalid") for a PDU that is not a readable SMS-SUBMIT."""
        try:
            sub = decode_pdu(pdu)
        except PduError as e:
            raise SmsError("invalid", f"SMS SEND: {e}") from None
        if sub.kind != "submit":
            raise SmsError("invalid", "SMS SEND: not an SMS-SUBMIT")
        self._sent += 1
        self._reference = (self._reference + 1) & 0xFF
        self.outbox.append({"index": self._sent, "to": sub.address, "text": sub.text,
                            "time": self.wallclock(), "reference": self._reference,
                            "smsc": sub.smsc})
        del self.outbox[:-OUTBOX_LIMIT]
        return self._reference

    def _free_index(self) -> int:
        for i in range(1, self.max_messages + 1):
            if i not in self.messages:
                return i
        raise SmsError("full", "the message store is full")


def _selected(flag: SmsFlag, m: StoredSms) -> bool:
    if flag is SmsFlag.ALL:
        return True
    wanted = {SmsFlag.NEW: SmsStatus.NEW, SmsFlag.OLD: SmsStatus.OLD,
              SmsFlag.SENT: SmsStatus.SENT, SmsFlag.DRAFT: SmsStatus.DRAFT}
    return wanted.get(flag) is m.status
