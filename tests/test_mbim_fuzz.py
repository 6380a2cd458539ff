"""Fuzzing MbimFunction.receive with 100,000+ random and mutated host transfers.

Nothing may escape, no handler may hit an internal error, and every answer must be a
well-formed device message no longer than the negotiated MaxControlTransfer.
"""

from __future__ import annotations

import random
import struct
import time
from ipaddress import IPv4Address, IPv6Address
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.constants import MessageType
from iosm_cuse.mbim.infobuf import InfoLayout, Kind
from iosm_cuse.mbim.message import (
    Close,
    Command,
    Fragment,
    HostError,
    Open,
    decode_transfer,
    encode_message,
    fragment,
)
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.mbim import MbimFunction

DEVICE_TYPES = {MessageType.OPEN_DONE, MessageType.CLOSE_DONE, MessageType.COMMAND_DONE,
                MessageType.FUNCTION_ERROR, MessageType.INDICATE_STATUS}
_CONNECTISH = [spec for spec in cids.CIDS
               if spec.cid in (cids.BasicConnect.CONNECT, cids.BasicConnect.IP_CONFIGURATION)
               and spec.service is Service.BASIC_CONNECT]
WEIGHTED_CIDS = list(cids.CIDS) + _CONNECTISH * 4   # the richest state machine gets more
UUIDS = [s.value for s in Service] + [c.value for c in ContextType]
INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 12, 16, 20, 48, 64, 255, 4096, 0x7FFFFFFF, 0xFFFFFFFF]


def random_values(layout: InfoLayout, rng: random.Random) -> dict[str, Any]:
    return {f.name: _random_field(f, rng) for f in layout.fields
            if f.name not in layout.count_fields}


def _u32(rng: random.Random) -> int:
    roll = rng.random()     # mostly small: enum values are where the state machine branches
    if roll < 0.4:
        return rng.randint(0, 1)
    if roll < 0.65:
        return rng.randint(0, 4)
    return rng.choice(INTERESTING_U32) if roll < 0.9 else rng.getrandbits(32)


def _text(rng: random.Random) -> str:
    return rng.choice(["", "internet", "0000", "1234", "12345678", "00101", "x" * 120,
                       "ümlaut", "a\u4e2db"])


def _random_field(f: infobuf.Field, rng: random.Random) -> Any:
    k, n = f.kind, rng.randint(0, 3)
    if k is Kind.U32:
        return _u32(rng)
    if k is Kind.U64:
        return rng.getrandbits(64)
    if k is Kind.UUID:
        if rng.random() < 0.3:
            return ContextType.INTERNET.value
        return rng.choice([*UUIDS, UUID(int=rng.getrandbits(128))])
    if k in (Kind.IPV4, Kind.REF_IPV4):
        return IPv4Address(rng.getrandbits(32))
    if k in (Kind.IPV6, Kind.REF_IPV6):
        return IPv6Address(rng.getrandbits(128))
    if k is Kind.STRING:
        return _text(rng)
    if k is Kind.BYTE_ARRAY:
        return rng.randbytes(f.size)
    if k in (Kind.REF_BYTE_ARRAY, Kind.UNSIZED_BYTE_ARRAY):
        return rng.randbytes(n * 3)
    if k is Kind.U32_ARRAY:
        return [_u32(rng) for _ in range(n)]
    if k is Kind.STRING_ARRAY:
        return [_text(rng) for _ in range(n)]
    if k is Kind.IPV4_ARRAY:
        return [IPv4Address(rng.getrandbits(32)) for _ in range(n)]
    if k is Kind.IPV6_ARRAY:
        return [IPv6Address(rng.getrandbits(128)) for _ in range(n)]
    assert f.struct is not None
    if k is Kind.STRUCT:
        return random_values(f.struct, rng)
    return [random_values(f.struct, rng) for _ in range(n)]


def valid_transfers(rng: random.Random) -> list[bytes]:
    """One well-formed host message (or the fragments of one)."""
    tid = _u32(rng)
    roll = rng.random()
    if roll < 0.05:
        return [encode_message(Open(tid, rng.choice([64, 100, 512, 4096, _u32(rng)])))]
    if roll < 0.07:
        return [encode_message(Close(tid))]
    if roll < 0.08:
        return [encode_message(HostError(tid, rng.randint(0, 9)))]
    spec = rng.choice(WEIGHTED_CIDS)
    ct = rng.choice([0, 1, 1, 0, rng.getrandbits(32)])
    layout = spec.request(ct) or spec.response or infobuf.EMPTY
    info = infobuf.encode(layout, random_values(layout, rng))
    service = spec.service.value if rng.random() < 0.95 else UUID(int=rng.getrandbits(128))
    cid = spec.cid if rng.random() < 0.95 else _u32(rng)
    data = encode_message(Command(tid, service, cid, ct, info))
    if rng.random() < 0.1:
        return fragment(data, rng.randint(24, 120))
    return [data]


def seed_transfers() -> list[list[bytes]]:
    """Well-chosen messages, like a fuzzer's seed corpus: they move the state machine."""
    bc, b = Service.BASIC_CONNECT.value, cids.BasicConnect
    seeds = [encode_message(Command(7, bc, b.PACKET_SERVICE, 1, struct.pack("<I", 0))),
             encode_message(Command(7, bc, b.RADIO_STATE, 1, struct.pack("<I", 1))),
             encode_message(Command(7, bc, b.PIN, 1, infobuf.encode(cids.PIN_SET, {
                 "PinType": 2, "PinOperation": 0, "Pin": "0000", "NewPin": ""})))]
    for sid in range(9):
        info = infobuf.encode(cids.CONNECT_SET, {
            "SessionId": sid, "ActivationCommand": 1, "AccessString": "internet",
            "UserName": "", "Password": "", "Compression": 0, "AuthProtocol": 0,
            "IpType": sid % 5, "ContextType": ContextType.INTERNET.value})
        seeds.append(encode_message(Command(sid, bc, b.CONNECT, 1, info)))
    return [[s] for s in seeds]


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.3 and b:
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        elif op < 0.55 and len(b) >= 4:
            i = rng.randrange(len(b) - 3)
            b[i:i + 4] = struct.pack("<I", _u32(rng))
        elif op < 0.7:
            del b[rng.randrange(len(b) + 1):]
        elif op < 0.8:
            b += rng.randbytes(rng.randint(1, 16))
        else:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
    if len(b) >= 8 and rng.random() < 0.6:
        b[4:8] = struct.pack("<I", len(b))     # keep MessageLength honest to get past framing
    return bytes(b)


def check_answer(transfer: bytes, fn: MbimFunction) -> MessageType:
    assert len(transfer) <= max(fn.max_transfer, 16)
    item = decode_transfer(transfer)     # raises if malformed
    mtype = item.type if isinstance(item, Fragment) else item.TYPE
    assert mtype in DEVICE_TYPES
    return mtype


@pytest.mark.timeout(120)
def test_fuzz_receive_100k() -> None:
    rng = random.Random(0x10517560)
    fn = MbimFunction()
    sent = answers = 0
    commands_done = 0
    sessions_seen: set[int] = set()
    # Encoding random values is slower than the function itself: build a corpus once and
    # draw (and mutate) from it.
    corpus = [valid_transfers(rng) for _ in range(5000)] + seed_transfers() * 20
    start = time.perf_counter()
    while sent < 100_000:
        if sent % 5000 == 0:      # a fresh modem now and then, so PIN/PUK states all show up
            fn = MbimFunction(ModemConfig(pin_required=rng.random() < 0.3))
            fn.receive(encode_message(Open(1, 4096)))
            fn.receive(encode_message(Command(2, Service.BASIC_CONNECT.value,
                                              cids.BasicConnect.PACKET_SERVICE, 1, bytes(4))))
            sessions_seen |= set(fn.sessions)
        if not fn.opened and rng.random() < 0.3:
            fn.receive(encode_message(Open(1, rng.choice([64, 200, 4096]))))
        for transfer in rng.choice(corpus):
            roll = rng.random()
            if roll < 0.5:
                data = transfer
            elif roll < 0.95:
                data = mutate(transfer, rng)
            else:
                data = rng.randbytes(rng.randint(0, 80))
            was_open = fn.opened
            out = fn.receive(data) + fn.pending_indications()
            sent += 1
            if roll < 0.5 and len(data) > 20 and struct.unpack_from("<II", data, 12) == (1, 0):
                # an intact single-fragment message is always answered, first, with its TID
                (tid,) = struct.unpack_from("<I", data, 8)
                assert out and struct.unpack_from("<I", out[0], 8)[0] == tid
                if was_open and data[:4] == b"\x03\0\0\0":
                    assert struct.unpack_from("<I", out[0])[0] in (
                        MessageType.COMMAND_DONE, MessageType.FUNCTION_ERROR)
            for t in out:
                answers += 1
                commands_done += check_answer(t, fn) is MessageType.COMMAND_DONE
            sessions_seen |= set(fn.sessions)
    elapsed = time.perf_counter() - start
    assert fn.internal_errors == 0
    # the run reached the handlers, not only the framing checks
    assert commands_done > 10_000, commands_done
    assert len(sessions_seen) >= 3, sessions_seen   # connects got through, too
    print(f"\nfuzz: {sent} transfers, {answers} answers, {commands_done} COMMAND_DONE "
          f"in {elapsed:.1f} s")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=6), st.integers(64, 4096))
def test_fuzz_hypothesis_byte_sequences(transfers: list[bytes], max_transfer: int) -> None:
    fn = MbimFunction()
    fn.receive(encode_message(Open(1, max_transfer)))
    for data in transfers:
        for t in fn.receive(data) + fn.pending_indications():
            check_answer(t, fn)
    assert fn.internal_errors == 0
