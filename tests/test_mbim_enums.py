"""CID fields tied to their enums: rejected once, centrally; decoded as members.

The function answers a SET/QUERY carrying a value outside a field's enum with
INVALID_PARAMETERS before any handler runs, so the modem's state cannot change. Values a real
client sends (mbimcli, ModemManager: libmbim's enums) stay accepted.
"""

from __future__ import annotations

import contextlib
import copy
import struct
from enum import IntEnum, IntFlag
from ipaddress import IPv4Address, IPv6Address
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import BasicConnect as B
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.infobuf import Field, InfoBufferError, InfoLayout, Kind
from iosm_cuse.mbim.message import Command, CommandDone, Open, decode_message, encode_message
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.mbim import MbimFunction

Q, S = CommandType.QUERY, CommandType.SET
BC = Service.BASIC_CONNECT

# A request each CID accepts, to be spoiled one enum field at a time.
VALID_REQUESTS: dict[tuple[int, CommandType], dict[str, Any]] = {
    (B.RADIO_STATE, S): {"RadioState": cids.RadioState.ON},
    (B.PIN, S): {"PinType": cids.PinType.PIN1, "PinOperation": cids.PinOperation.ENTER,
                 "Pin": "0000", "NewPin": ""},
    (B.VISIBLE_PROVIDERS, Q): {"Action": cids.VisibleProvidersAction.FULL_SCAN},
    (B.REGISTER_STATE, S): {"ProviderId": "", "RegisterAction": cids.RegisterAction.AUTOMATIC,
                            "DataClass": 0},
    (B.PACKET_SERVICE, S): {"PacketServiceAction": cids.PacketServiceAction.ATTACH},
    (B.CONNECT, S): {"SessionId": 1, "ActivationCommand": cids.ActivationCommand.ACTIVATE,
                     "AccessString": "internet", "UserName": "", "Password": "",
                     "Compression": cids.Compression.NONE, "AuthProtocol": cids.AuthProtocol.NONE,
                     "IpType": cids.IpType.IPV4V6, "ContextType": ContextType.INTERNET.value},
    (B.PROVISIONED_CONTEXTS, S): {
        "ContextId": 0xFFFFFFFF, "ContextType": ContextType.INTERNET.value,
        "AccessString": "apn2", "UserName": "", "Password": "",
        "Compression": cids.Compression.NONE, "AuthProtocol": cids.AuthProtocol.NONE,
        "ProviderId": ""},
    (B.CONNECT, Q): {"SessionId": 0, "ActivationState": 0, "VoiceCallState": 0, "IpType": 0,
                     "ContextType": ContextType.NONE.value, "NwError": 0},
}

# Each enum-tied field of a request the function answers, with a value outside its enum.
OUT_OF_RANGE = [
    (B.RADIO_STATE, S, "RadioState", 7),
    (B.PIN, S, "PinType", 99),
    (B.PIN, S, "PinOperation", 4),
    (B.VISIBLE_PROVIDERS, Q, "Action", 2),
    (B.REGISTER_STATE, S, "RegisterAction", 2),
    (B.PACKET_SERVICE, S, "PacketServiceAction", 2),
    (B.CONNECT, S, "ActivationCommand", 5),
    (B.CONNECT, S, "Compression", 2),
    (B.CONNECT, S, "AuthProtocol", 4),
    (B.CONNECT, S, "IpType", 5),
    (B.CONNECT, S, "IpType", 0xFFFFFFFF),
    (B.CONNECT, Q, "ActivationState", 5),
    (B.CONNECT, Q, "VoiceCallState", 3),
    (B.CONNECT, Q, "IpType", 9),
    (B.PROVISIONED_CONTEXTS, S, "Compression", 2),
    (B.PROVISIONED_CONTEXTS, S, "AuthProtocol", 4),
]


def rejecting_fields(layout: InfoLayout) -> set[str]:
    """Top-level fields whose enum rejects unknown values (flags keep unknown bits)."""
    return {f.name for f in layout.fields
            if f.enum is not None and not issubclass(f.enum, IntFlag)}


class Host:
    def __init__(self) -> None:
        self.fn = MbimFunction()
        self.tid = 0
        self.fn.receive(encode_message(Open(self.next_tid(), 4096)))

    def next_tid(self) -> int:
        self.tid += 1
        return self.tid

    def command(self, cid: int, ct: CommandType, values: dict[str, Any]) -> CommandDone:
        spec = cids.lookup(BC, cid)
        assert spec is not None
        layout = spec.request(ct)
        assert layout is not None
        info = infobuf.encode(layout, values)
        (done,) = [decode_message(t) for t in self.fn.receive(
            encode_message(Command(self.next_tid(), BC.value, cid, ct, info)))]
        assert isinstance(done, CommandDone)
        return done


@pytest.fixture
def connected() -> Host:
    """A host with packet service attached and session 0 up: every change would show."""
    h = Host()
    assert h.command(B.PACKET_SERVICE, S, VALID_REQUESTS[B.PACKET_SERVICE, S]).status == 0
    connect = dict(VALID_REQUESTS[B.CONNECT, S], SessionId=0)
    assert h.command(B.CONNECT, S, connect).status == Status.NONE
    h.fn.pending_indications()
    return h


def test_the_table_covers_every_enum_tied_request_field() -> None:
    tied = set()
    for spec in cids.CIDS:
        for ct in (Q, S):
            layout = spec.request(ct)
            if spec.service is BC and layout is not None and (spec.cid, ct) in VALID_REQUESTS:
                tied |= {(spec.cid, ct, name) for name in rejecting_fields(layout)}
    assert tied == {(cid, ct, name) for cid, ct, name, _ in OUT_OF_RANGE}
    # and every BASIC_CONNECT request with such a field has a valid request above
    handled = MbimFunction().supported_cids()[BC]
    for spec in cids.CIDS:
        for ct in (Q, S):
            layout = spec.request(ct)
            if (spec.service is BC and spec.cid in handled and layout is not None
                    and rejecting_fields(layout)):
                assert (spec.cid, ct) in VALID_REQUESTS, (spec.name, ct)


@pytest.mark.parametrize("cid, ct, name, value", OUT_OF_RANGE,
                         ids=[f"{B(c).name}-{n}-{v}" for c, _, n, v in OUT_OF_RANGE])
def test_out_of_range_enum_is_invalid_parameters_and_changes_nothing(
        connected: Host, cid: int, ct: CommandType, name: str, value: int) -> None:
    modem = connected.fn.modem
    before = copy.deepcopy(vars(modem))
    done = connected.command(cid, ct, dict(VALID_REQUESTS[cid, ct], **{name: value}))
    assert (done.status, done.info) == (Status.INVALID_PARAMETERS, b"")
    assert vars(modem) == before
    assert connected.fn.pending_indications() == []
    assert connected.fn.internal_errors == 0


@pytest.mark.parametrize("cid, ct", list(VALID_REQUESTS),
                         ids=[f"{B(c).name}-{ct.name}" for c, ct in VALID_REQUESTS])
def test_the_valid_requests_are_not_rejected(connected: Host, cid: int, ct: CommandType) -> None:
    assert connected.command(cid, ct, VALID_REQUESTS[cid, ct]).status != Status.INVALID_PARAMETERS


def test_a_member_the_model_does_not_support_is_still_answered_as_before(host: Host) -> None:
    # PIN2 is a PinType: not rejected centrally; the model does not support it.
    done = host.command(B.PIN, S, dict(VALID_REQUESTS[B.PIN, S], PinType=cids.PinType.PIN2))
    assert done.status == Status.NO_DEVICE_SUPPORT


@pytest.fixture
def host() -> Host:
    return Host()


def test_decoded_values_are_enum_members() -> None:
    blob = infobuf.encode(cids.CONNECT_SET, VALID_REQUESTS[B.CONNECT, S])
    values = infobuf.decode(cids.CONNECT_SET, blob)
    assert type(values["ActivationCommand"]) is cids.ActivationCommand
    assert values["IpType"] is cids.IpType.IPV4V6
    assert type(values["AuthProtocol"]) is cids.AuthProtocol
    assert type(values["SessionId"]) is int           # not tied: a plain number
    state = infobuf.decode(cids.REGISTER_STATE_SET, infobuf.encode(
        cids.REGISTER_STATE_SET, {"ProviderId": "", "RegisterAction": 1, "DataClass": 1 << 30}))
    # a flag keeps bits its enum does not name, as libmbim passes masks through
    assert type(state["DataClass"]) is cids.DataClass and state["DataClass"] == 1 << 30


def test_only_guint32_fields_carry_an_enum() -> None:
    with pytest.raises(ValueError, match="only guint32"):
        InfoLayout("Bad", (Field("Name", Kind.STRING, enum=cids.IpType),))


# ------------------------------------------------------------------------ the decoder


def _layouts() -> list[InfoLayout]:
    return sorted({layout for spec in cids.CIDS
                   for layout in (spec.set, spec.query, spec.response, spec.notification)
                   if layout is not None and rejecting_fields(layout)}, key=lambda lay: lay.name)


ENUM_LAYOUTS = _layouts()


def minimal_values(layout: InfoLayout) -> dict[str, Any]:
    """The smallest values the layout carries: zeros, empties, first members."""
    return {f.name: _minimal(f) for f in layout.fields if f.name not in layout.count_fields}


def _minimal(f: Field) -> Any:
    if f.kind is Kind.U32:
        return next(iter(f.enum)) if f.enum is not None and issubclass(f.enum, IntEnum) else 0
    if f.kind is Kind.STRUCT:
        assert f.struct is not None
        return minimal_values(f.struct)
    empty: dict[Kind, Any] = {
        Kind.U64: 0, Kind.UUID: UUID(int=0), Kind.IPV4: IPv4Address(0),
        Kind.IPV6: IPv6Address(0), Kind.STRING: "", Kind.REF_IPV4: None, Kind.REF_IPV6: None,
        Kind.UNSIZED_BYTE_ARRAY: b"", Kind.REF_BYTE_ARRAY: b"", Kind.BYTE_ARRAY: b"\0" * f.size,
    }
    return empty.get(f.kind, [])


def test_every_enum_layout_is_exercised() -> None:
    names = {layout.name for layout in ENUM_LAYOUTS}
    assert {"RadioStateSet", "PinSet", "ConnectSet", "Connect", "PacketServiceSet",
            "RegisterStateSet", "VisibleProvidersQuery"} <= names


@pytest.mark.parametrize("layout", ENUM_LAYOUTS, ids=lambda lay: lay.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_enum_field_decodes_to_its_member_or_is_rejected(layout: InfoLayout,
                                                            data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(rejecting_fields(layout))))
    enum = next(f.enum for f in layout.fields if f.name == name)
    assert enum is not None
    value = data.draw(st.one_of(st.sampled_from([int(m) for m in enum]),
                                st.integers(0, 0xFFFFFFFF)))
    blob = infobuf.encode(layout, dict(minimal_values(layout), **{name: value}))
    if value in {int(m) for m in enum}:
        decoded = infobuf.decode(layout, blob)[name]
        assert type(decoded) is enum and decoded == value
    else:
        with pytest.raises(InfoBufferError, match=name):
            infobuf.decode(layout, blob)


@pytest.mark.parametrize("layout", ENUM_LAYOUTS, ids=lambda lay: lay.name)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_decoder_raises_only_its_own_error(layout: InfoLayout, data: st.DataObject) -> None:
    valid = infobuf.encode(layout, minimal_values(layout))
    blob = data.draw(st.one_of(
        st.binary(max_size=120),
        st.builds(lambda i, v: valid[:i] + struct.pack("<I", v) + valid[i + 4:],
                  st.integers(0, max(len(valid) - 4, 0)), st.integers(0, 0xFFFFFFFF)),
    ))
    with contextlib.suppress(InfoBufferError):
        infobuf.decode(layout, blob)
