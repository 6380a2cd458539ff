"""MUX codecs: every structure round-trips (both modes), decoders reject untrusted bytes with
MuxDecodeError and a reason, and a fuzz of >= 100,000 device-side buffers reaches the host
decoders (and the host MUX's DL dispatcher) without any other exception."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.hw.mux.host import MuxHost
from iosm_cuse.wire import mux as c
from iosm_cuse.wire.channels import MuxMode
from iosm_cuse.wire.ipc import Record
from iosm_cuse.wire.mux import (
    COMMANDS,
    PARAM_OF,
    PARAMS,
    AdbBuilder,
    Command,
    MuxDecodeError,
    Sig,
)

if_ids = st.integers(0, 7)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def _field_values(layout: Record) -> st.SearchStrategy[dict[str, Any]]:
    fields = {}
    for f in layout.fields:
        if f.fmt.endswith("s"):
            fields[f.name] = st.binary(min_size=f.size, max_size=f.size)
        else:
            fields[f.name] = st.integers(0, (1 << (8 * f.size)) - 1)
    return st.fixed_dictionaries(fields)


# ---- declarations ------------------------------------------------------------------------------


def test_signatures_and_sizes_are_the_documented_ones() -> None:
    assert Sig.ADGH == 0x48474441 and Sig.CMDH == 0x48444D43 and Sig.QLTH == 0x48544C51
    assert Sig.FCTH == 0x48544346 and Sig.ACBH == 0x48424341 and Sig.ADBH == 0x48424441
    assert Sig.ADTH == 0x48544441
    sizes = {"adgh": 16, "lite_cmdh": 16, "lite_table": 20, "acbh": 16, "aggr_cmdh": 20,
             "adbh": 16, "adth": 16, "adth_entry": 8, "aggr_qlth": 20}
    assert {layout.name: layout.size for layout in c.LAYOUTS} == sizes
    assert {n: p.size for n, p in PARAMS.items()} == {
        "open_session": 8, "open_session_resp": 12, "close_session_resp": 4, "flow_ctl": 4,
        "link_status": 1, "link_status_resp": 4}
    assert c.LITE_MAX_IP == 2032
    # the hot-path record structs and the tables agree on every offset
    for layout in c.LAYOUTS:
        assert layout.record.size == layout.size


def test_command_codes_of_both_modes() -> None:
    lite, aggr = COMMANDS[MuxMode.LITE], COMMANDS[MuxMode.AGGREGATION]
    assert (lite.open_session, lite.open_session_resp, lite.close_session,
            lite.close_session_resp) == (1, 2, 3, 4)
    assert (lite.flow_ctl_enable, lite.flow_ctl_ack, lite.link_status,
            lite.link_status_resp, lite.flow_ctl_disable) == (5, 6, 7, 8, None)
    assert (aggr.flow_ctl_enable, aggr.flow_ctl_disable, aggr.flow_ctl_ack, aggr.link_status,
            aggr.link_status_resp) == (5, 6, 7, 8, 9)


@pytest.mark.parametrize(("version", "caps", "want"), [
    (0x100, 0x300, (MuxMode.AGGREGATION, False)),
    (0x100, 0x200, (MuxMode.LITE, False)),  # both aggregation bits are needed
    (0x100, 0x100, (MuxMode.LITE, False)),
    (0x100, 1 << 21, (MuxMode.LITE, True)),
    (0x100, 0x300 | 1 << 21, (MuxMode.AGGREGATION, True)),
    (0xFF, 0x300 | 1 << 21, (MuxMode.LITE, False)),  # capabilities ignored below 0x0100
    (0x100, 0xC00000, (MuxMode.LITE, False)),  # pre-fix bits 23/22 are not aggregation
])
def test_mode_and_credit_from_capabilities(version: int, caps: int,
                                           want: tuple[MuxMode, bool]) -> None:
    assert c.mux_mode(version, caps) == want


@pytest.mark.parametrize("layout", c.LAYOUTS + tuple(PARAMS.values()), ids=lambda x: x.name)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_every_layout_round_trips(layout: Record, data: st.DataObject) -> None:
    values = data.draw(_field_values(layout))
    raw = layout.pack(**values)
    assert len(raw) == layout.size and layout.unpack(raw) == values
    if layout in c.LAYOUTS:
        s = layout.record
        names = [f.name for f in sorted(layout.fields, key=lambda f: f.offset)]
        assert s.pack(*(values[n] for n in names)) == raw


# ---- round trips of the structures -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(if_id=if_ids, pkt=st.binary(min_size=1, max_size=2032), sc=u8, nxt=u8,
       pad=st.integers(0, 16))
def test_adgh_round_trip(if_id: int, pkt: bytes, sc: int, nxt: int, pad: int) -> None:
    raw = c.encode_adgh(if_id, pkt, pad, sc, nxt)
    assert len(raw) == 16 + pad + len(pkt)
    assert c.decode_adgh(raw, pad) == (if_id, pkt, sc)
    assert c.ADGH.unpack(raw)["next_count"] == nxt


@settings(max_examples=100, deadline=None)
@given(sig=st.sampled_from([Sig.QLTH, Sig.FCTH]), if_id=if_ids, value=u32)
def test_lite_table_round_trip(sig: Sig, if_id: int, value: int) -> None:
    raw = c.encode_table(sig, if_id, value)
    assert len(raw) == 20 and c.decode_table(raw, sig) == (if_id, value)


def commands(mode: MuxMode) -> st.SearchStrategy[Command]:
    @st.composite
    def one(draw: st.DrawFn) -> Command:
        code = draw(st.sampled_from(sorted(PARAM_OF[mode])))
        name = PARAM_OF[mode][code]
        params = draw(_field_values(PARAMS[name])) if name else {}
        size = PARAMS[name].size if name else 0
        return Command(code, draw(if_ids), draw(u32), params, size)

    return one()


@settings(max_examples=200, deadline=None)
@given(cmd=commands(MuxMode.LITE))
def test_lite_command_round_trip(cmd: Command) -> None:
    raw = c.encode_lite_cmd(cmd)
    assert len(raw) == 16 + cmd.param_len
    assert c.decode_lite_cmd(raw) == cmd


@settings(max_examples=200, deadline=None)
@given(cmds=st.lists(commands(MuxMode.AGGREGATION), min_size=1, max_size=6), seq=u16)
def test_acb_round_trip(cmds: list[Command], seq: int) -> None:
    raw = c.encode_acb(cmds, seq)
    head = c.ACBH.unpack(raw)
    assert head["block_length"] == len(raw) and head["first_cmd_index"] == 16
    assert head["sequence_nr"] == seq
    assert c.decode_acb(raw) == cmds
    assert c.decode_acb(raw, use_block_length=False) == cmds


def test_acb_host_quirk_block_length_16_is_decoded_by_td_size() -> None:
    raw = bytearray(c.encode_acb([Command(1, 2, 3, {"dl_head_pad_len": 16}, 8)]))
    struct.pack_into("<I", raw, 8, 16)  # what the kernel host writes
    assert c.decode_acb(bytes(raw), use_block_length=False)[0].params["dl_head_pad_len"] == 16
    with pytest.raises(MuxDecodeError):
        c.decode_acb(bytes(raw))  # by block_length there is no room for the command


datagrams = st.lists(st.tuples(if_ids, st.binary(min_size=1, max_size=1500)), min_size=1,
                     max_size=40)


@settings(max_examples=150, deadline=None)
@given(dgs=datagrams, pad=st.sampled_from([0, 16]), qlth=st.booleans(), seq=u16,
       levels=st.dictionaries(if_ids, u32))
def test_adb_round_trip(dgs: list[tuple[int, bytes]], pad: int, qlth: bool, seq: int,
                        levels: dict[int, int]) -> None:
    b = AdbBuilder(16 * 1024, pad=pad, qlth=qlth)
    taken = [(i, p) for i, p in dgs if b.add(i, p)]
    assert taken, "the first datagram always fits"
    raw = b.finish(seq, levels)
    assert len(raw) <= 16 * 1024 and b.empty
    head = c.ADBH.unpack(raw)
    assert head["block_length"] == len(raw) and head["sequence_nr"] == seq
    out = c.decode_adb(raw, pad, allow_qlth=qlth)
    assert out.stopped is None
    got: dict[int, list[bytes]] = {}
    for if_id, start, end, _sc in out.datagrams:
        assert start % 4 == pad % 4 and start - pad >= 16 and end <= len(raw)
        got.setdefault(if_id, []).append(raw[start:end])
    want: dict[int, list[bytes]] = {}
    for i, p in taken:
        want.setdefault(i, []).append(p)
    assert got == want
    if qlth:
        assert out.queue_levels == {i: levels.get(i, 0) for i in want}


def test_adb_builder_refuses_what_does_not_fit_and_limits_per_session() -> None:
    b = AdbBuilder(16 * 1024, pad=16, qlth=False)
    n = 0
    while b.add(0, bytes(1500)):
        n += 1
    assert n == 10  # 10 x (16 + 1500, aligned) + ADTH(10) fits 16 KiB, an 11th does not
    assert len(b.finish()) <= 16 * 1024
    b = AdbBuilder(16 * 1024, max_per_session=3, qlth=True)
    assert [b.add(1, b"x") for _ in range(4)] == [True, True, True, False]
    assert b.add(2, b"y")
    assert c.max_ip_packet(MuxMode.AGGREGATION) == c.AGGR_MAX_IP
    big = AdbBuilder(16 * 1024, pad=16)
    assert big.add(0, bytes(c.AGGR_MAX_IP))
    ub = AdbBuilder(16 * 1024, pad=0, qlth=True)
    assert ub.add(0, bytes(c.AGGR_MAX_IP))


# ---- rejects with reasons ----------------------------------------------------------------------


def _adb(dgs: list[tuple[int, bytes]], pad: int = 16) -> bytearray:
    b = AdbBuilder(16 * 1024, pad=pad)
    for i, p in dgs:
        assert b.add(i, p)
    return bytearray(b.finish())


def reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(MuxDecodeError) as ei:
        fn(*args, **kw)
    return ei.value.reason


def test_adb_rejects() -> None:
    good = _adb([(1, b"a" * 20), (2, b"b" * 30)])
    first = c.ADBH.get(good, 0, "first_table_index")
    assert reason(c.decode_adb, good[:10], 16) == "short"
    assert reason(c.decode_adb, b"XXXX" + good[4:], 16) == "signature"
    raw = bytearray(good)
    c.ADBH.set(raw, 0, "block_length", len(raw) + 1)
    assert reason(c.decode_adb, raw, 16) == "block_length"
    raw = bytearray(good)
    c.ADBH.set(raw, 0, "first_table_index", 0)
    assert reason(c.decode_adb, raw, 16) == "empty"
    raw = bytearray(good)
    c.ADBH.set(raw, 0, "first_table_index", len(raw) - 8)
    assert reason(c.decode_adb, raw, 16) == "index"
    raw = bytearray(good)
    c.ADBH.set(raw, 0, "first_table_index", 4)  # inside the ADBH
    assert reason(c.decode_adb, raw, 16) == "index"
    raw = bytearray(good)
    c.ADTH.set(raw, first, "next_table_index", first)  # a loop
    assert reason(c.decode_adb, raw, 16) == "chain_loop"
    raw = bytearray(good)
    c.ADTH_ENTRY.set(raw, first + 16, "datagram_index", 8)
    assert reason(c.decode_adb, raw, 16) == "datagram_index"
    raw = bytearray(good)
    c.ADTH_ENTRY.set(raw, first + 16, "datagram_length", 0xFFFF)
    assert reason(c.decode_adb, raw, 16) == "datagram"
    raw = bytearray(good)
    c.ADTH_ENTRY.set(raw, first + 16, "datagram_length", 16)  # only the head pad
    assert reason(c.decode_adb, raw, 16) == "datagram"
    raw = bytearray(good)
    c.ADTH.set(raw, first, "table_length", 17)
    assert reason(c.decode_adb, raw, 16) == "table_length"
    raw = bytearray(good)
    c.ADTH.set(raw, first, "if_id", 8)
    assert reason(c.decode_adb, raw, 16) == "if_id"


def test_adb_chain_stops_at_a_non_adth_table_keeping_what_came_before() -> None:
    raw = _adb([(1, b"a" * 20), (2, b"b" * 30)])
    first = c.ADBH.get(raw, 0, "first_table_index")
    second = c.ADTH.get(raw, first, "next_table_index")
    struct.pack_into("<I", raw, second, Sig.QLTH)
    out = c.decode_adb(bytes(raw), 16)
    assert [(i, bytes(raw[s:e])) for i, s, e, _ in out.datagrams] == [(1, b"a" * 20)]
    assert out.stopped is not None and "not an ADTH" in out.stopped


def test_lite_and_acb_rejects() -> None:
    adgh = c.encode_adgh(1, b"x" * 10)
    assert reason(c.decode_adgh, adgh[:15]) == "short"
    assert reason(c.decode_adgh, adgh[:-1]) == "length"
    assert reason(c.decode_adgh, c.encode_adgh(8, b"x")) == "if_id"
    assert reason(c.decode_adgh, b"ADBH" + adgh[4:]) == "signature"
    assert reason(c.decode_adgh, c.ADGH.pack(signature=Sig.ADGH, length=16)) == "length"
    cmd = c.encode_lite_cmd(Command(2, 0, 0, {"response": 0}, 12))
    assert reason(c.decode_lite_cmd, cmd[:-1]) == "cmd_len"
    raw = bytearray(cmd)
    c.LITE_CMDH.set(raw, 0, "cmd_len", 15)
    assert reason(c.decode_lite_cmd, raw) == "cmd_len"
    table = bytearray(c.encode_table(Sig.FCTH, 1, 100))
    table[7] = 8
    assert reason(c.decode_table, table, Sig.FCTH) == "vfl_length"
    assert reason(c.decode_table, c.encode_table(Sig.QLTH, 1, 1), Sig.FCTH) == "signature"
    acb = bytearray(c.encode_acb([Command(5, 1, 1, {"mask": 1}, 4), Command(8, 1, 2,
                                                                        {"payload": 1}, 1)]))
    second = c.AGGR_CMDH.get(acb, 16, "next_cmd_index")
    c.AGGR_CMDH.set(acb, second, "next_cmd_index", 16)
    assert reason(c.decode_acb, acb) == "chain_loop"
    acb2 = bytearray(c.encode_acb([Command(5, 1, 1, {"mask": 1}, 4)]))
    c.AGGR_CMDH.set(acb2, 16, "cmd_len", 200)
    assert reason(c.decode_acb, acb2) == "cmd_len"
    c.ACBH.set(acb2, 0, "first_cmd_index", 0)
    assert reason(c.decode_acb, acb2) == "empty"


def test_short_flow_ctl_parameters_are_reported_as_missing() -> None:
    """cmd_len without the mask: the decoder says so (the host then implies the mask)."""
    raw = bytearray(c.encode_lite_cmd(Command(5, 3, 9, {"mask": 0}, 4)))
    c.LITE_CMDH.set(raw, 0, "cmd_len", 16)
    cmd = c.decode_lite_cmd(bytes(raw))
    assert cmd.param_len == 0 and "mask" not in cmd.params


# ---- the fuzz ----------------------------------------------------------------------------------

FUZZ_N = 100_000


def _corpus() -> list[bytes]:
    lite, aggr = COMMANDS[MuxMode.LITE], COMMANDS[MuxMode.AGGREGATION]
    out = [
        c.encode_adgh(0, b"E" * 60), c.encode_adgh(7, b"`" * 1400, 0, 3, 2),
        c.encode_table(Sig.FCTH, 2, 5000),
        c.encode_lite_cmd(Command(lite.open_session_resp, 1, 0, {"response": 0,
                                                                 "ul_head_pad_len": 0}, 12)),
        c.encode_lite_cmd(Command(lite.flow_ctl_enable, 2, 1, {"mask": 0xFFFFFFFF}, 4)),
        c.encode_lite_cmd(Command(lite.link_status, 2, 1, {"payload": 1}, 1)),
        c.encode_acb([Command(aggr.flow_ctl_enable, 1, 1, {"mask": 0xFFFFFFFF}, 4),
                      Command(aggr.link_status, 3, 2, {"payload": 1}, 1),
                      Command(aggr.close_session_resp, 3, 2, {"response": 0}, 4)]),
        bytes(_adb([(1, b"a" * 100), (2, b"b" * 7), (1, b"c" * 1500), (5, b"d")])),
        bytes(_adb([(i, bytes([i]) * (50 + 30 * i)) for i in range(8)])),
    ]
    return out


_INTERESTING = [0, 1, 4, 15, 16, 17, 19, 20, 24, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF]


def _mutate(rng: random.Random, base: bytes) -> bytes:
    raw = bytearray(base)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.35 and raw:
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif op < 0.7 and len(raw) >= 4:
            at = rng.randrange(0, len(raw) - 3) & ~3 if rng.random() < 0.8 else \
                rng.randrange(0, len(raw) - 3)
            val = rng.choice([*_INTERESTING, len(raw), len(raw) - 1, at,
                              rng.randrange(len(raw))])
            width = rng.choice((1, 2, 4))
            raw[at:at + width] = (val & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op < 0.85:
            raw = raw[:rng.randrange(len(raw) + 1)]
        else:
            raw += rng.randbytes(rng.randrange(1, 64))
    return bytes(raw)


def _decode_any(raw: bytes) -> None:
    """The host's decoders, as the DL dispatcher picks them; checks what they return."""
    sig = c.signature_of(raw)
    if sig == Sig.ADGH:
        if_id, pkt, _ = c.decode_adgh(raw)
        assert 0 <= if_id < 8 and 0 < len(pkt) <= len(raw) - 16
    elif sig == Sig.ADBH:
        out = c.decode_adb(raw, 16)
        block = c.ADBH.get(raw, 0, "block_length")
        for if_id, start, end, _ in out.datagrams:
            assert 0 <= if_id < 8 and 32 <= start < end <= block <= len(raw)
    elif sig == Sig.CMDH:
        c.decode_lite_cmd(raw)
    elif sig == Sig.ACBH:
        for cmd in c.decode_acb(raw):
            assert cmd.param_len <= len(raw)
    elif sig == Sig.FCTH:
        c.decode_table(raw, Sig.FCTH)


class _Sink:
    pending = 0

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def send_many(self, transfers: list[bytes]) -> None:
        self.sent.extend(transfers)

    async def close(self) -> None:
        pass


def test_fuzz_host_decoders_with_100k_device_buffers() -> None:
    rng = random.Random(20261123)
    corpus = _corpus()
    for raw in corpus:
        _decode_any(raw)  # the seeds themselves are valid

    async def main() -> tuple[int, int]:
        sink = _Sink()

        async def open_channel(_ch: int, _rx: Any) -> _Sink:
            return sink

        hosts = []
        for mode in (MuxMode.LITE, MuxMode.AGGREGATION):
            h = MuxHost(open_channel, mode, ul_credit=True)
            h._channel = sink  # sessions 0..7 open without a handshake: DL reaches on_receive
            h._loop = asyncio.get_running_loop()
            for i in range(8):
                await _open_fake(h, i)
            h.on_receive = lambda i, p: None
            hosts.append(h)
        ok = errors = 0
        for n in range(FUZZ_N):
            if n % 10 == 0:
                raw = rng.randbytes(rng.randrange(0, 80))
                if rng.random() < 0.5 and len(raw) >= 4:
                    raw = rng.choice(list(Sig)).to_bytes(4, "little") + raw[4:]
            else:
                raw = _mutate(rng, rng.choice(corpus))
            try:
                _decode_any(raw)
                ok += 1
            except MuxDecodeError:
                errors += 1
            hosts[n & 1]._on_dl(raw)  # the dispatcher: never raises
        return ok, errors

    ok, errors = asyncio.run(main())
    assert ok + errors == FUZZ_N
    assert ok > 10_000 and errors > 10_000  # the mutations reach both outcomes


async def _open_fake(h: MuxHost, if_id: int) -> None:
    from iosm_cuse.hw.mux.scheduler import Session

    s = Session(if_id)
    s.open = True
    h._sessions[if_id] = s


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=200), sig=st.sampled_from(list(Sig)))
def test_hypothesis_fuzz_of_the_decoders(raw: bytes, sig: Sig) -> None:
    data = sig.to_bytes(4, "little") + raw
    try:
        _decode_any(data)
    except MuxDecodeError as exc:
        assert exc.reason and str(exc)


def _ul_corpus() -> list[bytes]:
    lite, aggr = COMMANDS[MuxMode.LITE], COMMANDS[MuxMode.AGGREGATION]
    b = AdbBuilder(16 * 1024, pad=0, qlth=True)
    for i, n in ((1, 100), (2, 7), (1, 1500), (5, 1)):
        assert b.add(i, bytes([0x45]) * n)
    return [
        c.encode_adgh(1, b"E" * 60), c.encode_table(Sig.QLTH, 1, 3),
        c.encode_lite_cmd(Command(lite.open_session, 1, 0, {"dl_head_pad_len": 16}, 8)),
        c.encode_lite_cmd(Command(lite.flow_ctl_ack, 1, 0)),
        c.encode_acb([Command(aggr.open_session, 2, 0, {"dl_head_pad_len": 16}, 8),
                      Command(aggr.close_session, 2, 1)]),
        c.encode_acb([Command(aggr.link_status_resp, 2, 0, {"response": 0}, 4)]),
        b.finish(3, {1: 2, 2: 0, 5: 9}),
    ]


@pytest.mark.parametrize("mode", [MuxMode.LITE, MuxMode.AGGREGATION])
def test_fuzz_the_device_mux_with_host_buffers(mode: MuxMode) -> None:
    """What the host writes is untrusted for the model too: 20,000 mutated UL transfers, no
    exception escapes `receive`, rejects are counted, and the model still serves its sessions."""
    from iosm_cuse.sim.mux import MuxDevice

    rng = random.Random(7 + len(mode))
    corpus = _ul_corpus()
    got: list[tuple[int, bytes]] = []
    dev = MuxDevice(lambda i, p: got.append((i, p)), mode)
    sent: list[bytes] = []
    dev.opened(lambda d: sent.append(d) or True)
    for i in range(8):
        cmd = Command(1, i, i, {"dl_head_pad_len": 16}, 8)
        dev.receive(c.encode_lite_cmd(cmd) if mode is MuxMode.LITE else c.encode_acb([cmd]))
    assert dev.sessions == set(range(8))
    for n in range(20_000):
        raw = _mutate(rng, rng.choice(corpus)) if n % 10 else rng.randbytes(rng.randrange(80))
        dev.receive(raw)
    assert sum(dev.rejects.counters.values()) > 5_000
    assert all(0 <= i < 8 and 0 < len(p) <= 16 * 1024 for i, p in got)
    assert dev.sessions and all(dev.downlink(i, b"E" * 100) for i in dev.sessions)
