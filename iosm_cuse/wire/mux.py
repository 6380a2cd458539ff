"""MUX Lite and MUX Aggregation wire structures, declared once, as data (docs/iosm-protocol.md §4).

Both the host MUX (`hw/mux/host.py`) and the modem model's MUX (`sim/mux.py`) use these tables.
The record layouts are `iosm_cuse.wire.record` tables; for the hot path each layout's `record`
Struct packs the declared fields in offset order (reserved bytes are pad and always zero).

Every decoder takes untrusted bytes and either returns a value or raises `MuxDecodeError`
whose `reason` is a short, stable kind (used as a counter name) and whose message says more.
Nothing here reads outside the buffer it was given.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from iosm_cuse.wire.channels import MuxMode, mux_mode_from_caps
from iosm_cuse.wire.ipc import CAP_UL_FLOW_CREDIT, CP_VERSION_MIN, F, Record

Buffer = bytes | bytearray | memoryview

MAX_SESSIONS = 8  # if_id 0..7


class MuxDecodeError(ValueError):
    """Untrusted MUX bytes that cannot be accepted; `reason` is the counter kind."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _sig(ascii4: bytes) -> int:
    return int.from_bytes(ascii4, "little")


class Sig(enum.IntEnum):
    """Structure signatures (u32 LE, ASCII in memory order)."""

    ADGH = _sig(b"ADGH")  # 0x48474441
    CMDH = _sig(b"CMDH")  # 0x48444D43
    QLTH = _sig(b"QLTH")  # 0x48544C51
    FCTH = _sig(b"FCTH")  # 0x48544346
    ACBH = _sig(b"ACBH")  # 0x48424341
    ADBH = _sig(b"ADBH")  # 0x48424441
    ADTH = _sig(b"ADTH")  # 0x48544441


SIGNATURES = frozenset(int(s) for s in Sig)

# ---- the layouts -------------------------------------------------------------------------------

ADGH = Record("adgh", 16, [
    F("signature", 0, "I"), F("length", 4, "H"), F("if_id", 6, "B"), F("ip_hint", 7, "B"),
    F("service_class", 8, "B"), F("next_count", 9, "B"),
])
LITE_CMDH = Record("lite_cmdh", 16, [
    F("signature", 0, "I"), F("cmd_len", 4, "H"), F("if_id", 6, "B"),
    F("command_type", 8, "I"), F("transaction_id", 12, "I"),
])
# Lite generic table: QLTH (UL, value = packets queued) and FCTH (DL, value = credit bytes)
LITE_TABLE = Record("lite_table", 20, [
    F("signature", 0, "I"), F("length", 4, "H"), F("if_id", 6, "B"), F("vfl_length", 7, "B"),
    F("value", 16, "I"),
])
ACBH = Record("acbh", 16, [
    F("signature", 0, "I"), F("sequence_nr", 6, "H"), F("block_length", 8, "I"),
    F("first_cmd_index", 12, "I"),
])
AGGR_CMDH = Record("aggr_cmdh", 20, [
    F("signature", 0, "I"), F("cmd_len", 4, "H"), F("if_id", 6, "B"),
    F("next_cmd_index", 8, "I"), F("command_type", 12, "I"), F("transaction_id", 16, "I"),
])
ADBH = Record("adbh", 16, [
    F("signature", 0, "I"), F("sequence_nr", 6, "H"), F("block_length", 8, "I"),
    F("first_table_index", 12, "I"),
])
ADTH = Record("adth", 16, [
    F("signature", 0, "I"), F("table_length", 4, "H"), F("if_id", 6, "B"), F("ip_hint", 7, "B"),
    F("next_table_index", 8, "I"),
])
ADTH_ENTRY = Record("adth_entry", 8, [
    F("datagram_index", 0, "I"), F("datagram_length", 4, "H"), F("service_class", 6, "B"),
])
AGGR_QLTH = Record("aggr_qlth", 20, [
    F("signature", 0, "I"), F("table_length", 4, "H"), F("if_id", 6, "B"),
    F("next_table_index", 8, "I"), F("queue_level", 16, "I"),
])

LAYOUTS = (ADGH, LITE_CMDH, LITE_TABLE, ACBH, AGGR_CMDH, ADBH, ADTH, ADTH_ENTRY, AGGR_QLTH)


ADGH_S = ADGH.record  # signature, length, if_id, ip_hint, service_class, next_count
LITE_CMDH_S = LITE_CMDH.record  # signature, cmd_len, if_id, command_type, transaction_id
LITE_TABLE_S = LITE_TABLE.record  # signature, length, if_id, vfl_length, value
ACBH_S = ACBH.record  # signature, sequence_nr, block_length, first_cmd_index
AGGR_CMDH_S = AGGR_CMDH.record  # signature, cmd_len, if_id, next, command_type, tid
ADBH_S = ADBH.record  # signature, sequence_nr, block_length, first_table_index
ADTH_S = ADTH.record  # signature, table_length, if_id, ip_hint, next_table_index
ENTRY_S = ADTH_ENTRY.record  # datagram_index, datagram_length, service_class
AGGR_QLTH_S = AGGR_QLTH.record  # signature, table_length, if_id, next, queue_level
_U32 = struct.Struct("<I")

MUX_HEADER_SIZE = 16  # ADGH, Lite CMDH, ACBH, ADBH, ADTH (without entries)
AGGR_CMD_HEADER = AGGR_CMDH.size  # 20
TABLE_SIZE = LITE_TABLE.size  # 20
QLTH_SIZE = AGGR_QLTH.size  # 20
ENTRY_SIZE = ADTH_ENTRY.size  # 8
DL_HEAD_PAD = 16  # the host asks for it in OPEN_SESSION; Aggregation DL datagrams carry it
VFL_LENGTH = 4

# ---- capabilities and sizes --------------------------------------------------------------------

LITE_BUF = 2048  # Lite UL/DL buffers
AGGR_BUF = 16 * 1024  # Aggregation ADB buffers
LITE_MAX_IP = LITE_BUF - MUX_HEADER_SIZE  # 2032
# an ADB holding one datagram: ADBH + 16 pad + ADTH(1 entry) + QLTH (UL only)
AGGR_MAX_IP = AGGR_BUF - MUX_HEADER_SIZE - DL_HEAD_PAD - (MUX_HEADER_SIZE + ENTRY_SIZE) - QLTH_SIZE


def ul_credit_from_caps(cp_version: int, caps: int) -> bool:
    """UL flow on credits (bit 21), honoured only from CP version 0x0100 on
    (docs/iosm-protocol.md §1.2, §4.4)."""
    return cp_version >= CP_VERSION_MIN and bool(caps & CAP_UL_FLOW_CREDIT)


def max_ip_packet(mode: MuxMode) -> int:
    return LITE_MAX_IP if mode is MuxMode.LITE else AGGR_MAX_IP


def ul_pad(mode: MuxMode, ul_head_pad_len: int) -> int:
    """The UL head pad the host puts before each datagram (docs/iosm-protocol.md §4.2/§4.3:
    note the asymmetry)."""
    if ul_head_pad_len > MUX_HEADER_SIZE:
        return ul_head_pad_len - MUX_HEADER_SIZE
    return 0 if mode is MuxMode.LITE else ul_head_pad_len


def align4(n: int) -> int:
    return (n + 3) & ~3


# ---- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Commands:
    """The command codes of one MUX mode."""

    open_session: int
    open_session_resp: int
    close_session: int
    close_session_resp: int
    flow_ctl_enable: int  # Lite: FLOW_CTL (the mask says stop/allow)
    flow_ctl_disable: int | None  # Lite has none
    flow_ctl_ack: int
    link_status: int
    link_status_resp: int


COMMANDS: dict[MuxMode, Commands] = {
    MuxMode.LITE: Commands(1, 2, 3, 4, 5, None, 6, 7, 8),
    MuxMode.AGGREGATION: Commands(1, 2, 3, 4, 5, 6, 7, 8, 9),
}
CMD_INVALID = 255
RESP_SUCCESS = 0
FLOW_MASK_STOP = 0xFFFFFFFF

PARAMS: dict[str, Record] = {
    "open_session": Record("open_session", 8, [
        F("flow_ctrl", 0, "B"), F("ipv4v6_hints", 1, "B"), F("dl_head_pad_len", 4, "I")]),
    "open_session_resp": Record("open_session_resp", 12, [
        F("response", 0, "I"), F("flow_ctrl", 4, "B"), F("ipv4v6_hints", 5, "B"),
        F("ul_head_pad_len", 8, "I")]),
    "close_session_resp": Record("close_session_resp", 4, [F("response", 0, "I")]),
    "flow_ctl": Record("flow_ctl", 4, [F("mask", 0, "I")]),
    "link_status": Record("link_status", 1, [F("payload", 0, "B")]),
    "link_status_resp": Record("link_status_resp", 4, [F("response", 0, "I")]),
}


def _param_table(c: Commands) -> dict[int, str | None]:
    table: dict[int, str | None] = {
        c.open_session: "open_session", c.open_session_resp: "open_session_resp",
        c.close_session: None, c.close_session_resp: "close_session_resp",
        c.flow_ctl_enable: "flow_ctl", c.flow_ctl_ack: None,
        c.link_status: "link_status", c.link_status_resp: "link_status_resp",
    }
    if c.flow_ctl_disable is not None:
        table[c.flow_ctl_disable] = "flow_ctl"
    return table


# command code -> parameter layout name (None: no parameters), per mode
PARAM_OF: dict[MuxMode, dict[int, str | None]] = {m: _param_table(c) for m, c in COMMANDS.items()}


@dataclass
class Command:
    """One decoded (or to-be-encoded) command. `params` holds the parameter fields that lie
    inside cmd_len; `param_len` is how many parameter bytes cmd_len announced."""

    code: int
    if_id: int
    transaction_id: int
    params: dict[str, int] = field(default_factory=dict)
    param_len: int = 0


def encode_params(mode: MuxMode, code: int, params: dict[str, int]) -> bytes:
    name = PARAM_OF[mode].get(code)
    if name is None:
        if params:
            raise ValueError(f"command {code} takes no parameters")
        return b""
    return PARAMS[name].pack(**params)


def _decode_params(mode: MuxMode, cmd: Command, raw: Buffer) -> None:
    name = PARAM_OF[mode].get(cmd.code)
    cmd.param_len = len(raw)
    if name is None:
        return
    layout = PARAMS[name]
    for f in layout.fields:  # each field that lies inside cmd_len
        if f.offset + f.size <= len(raw):
            cmd.params[f.name] = layout.get(raw, 0, f.name)


def encode_lite_cmd(cmd: Command) -> bytes:
    params = encode_params(MuxMode.LITE, cmd.code, cmd.params)
    head = LITE_CMDH_S.pack(Sig.CMDH, MUX_HEADER_SIZE + len(params), cmd.if_id, cmd.code,
                            cmd.transaction_id)
    return head + params


def decode_lite_cmd(buf: Buffer) -> Command:
    n = len(buf)
    if n < MUX_HEADER_SIZE:
        raise MuxDecodeError("short", f"CMDH of {n} bytes")
    sig, cmd_len, if_id, code, tid = LITE_CMDH_S.unpack_from(buf, 0)
    if sig != Sig.CMDH:
        raise MuxDecodeError("signature", f"{sig:#010x} where CMDH was expected")
    if not MUX_HEADER_SIZE <= cmd_len <= n:
        raise MuxDecodeError("cmd_len", f"CMDH cmd_len {cmd_len} in a buffer of {n}")
    cmd = Command(code, if_id, tid)
    _decode_params(MuxMode.LITE, cmd, memoryview(buf)[MUX_HEADER_SIZE:cmd_len])
    return cmd


def encode_acb(cmds: list[Command], sequence_nr: int = 0) -> bytes:
    """ACBH + a chain of aggregated CMDHs (each 4-byte aligned); block_length = the total."""
    parts: list[bytes] = []
    pos = MUX_HEADER_SIZE
    for i, cmd in enumerate(cmds):
        params = encode_params(MuxMode.AGGREGATION, cmd.code, cmd.params)
        length = AGGR_CMD_HEADER + len(params)
        nxt = align4(pos + length) if i + 1 < len(cmds) else 0
        body = AGGR_CMDH_S.pack(Sig.CMDH, length, cmd.if_id, nxt, cmd.code,
                                cmd.transaction_id) + params
        parts.append(body + bytes((nxt - pos - length) if nxt else 0))
        pos = nxt
    total = MUX_HEADER_SIZE + sum(len(p) for p in parts)
    first = MUX_HEADER_SIZE if cmds else 0
    return ACBH_S.pack(Sig.ACBH, sequence_nr & 0xFFFF, total, first) + b"".join(parts)


def decode_acb(buf: Buffer, *, use_block_length: bool = True) -> list[Command]:
    """The command chain of an ACB. The host-built ACB leaves block_length at 16 (a kernel
    quirk), so the device side decodes with use_block_length=False: the TD size bounds it."""
    n = len(buf)
    if n < MUX_HEADER_SIZE:
        raise MuxDecodeError("short", f"ACBH of {n} bytes")
    sig, _seq, block_length, first = ACBH_S.unpack_from(buf, 0)
    if sig != Sig.ACBH:
        raise MuxDecodeError("signature", f"{sig:#010x} where ACBH was expected")
    end = n
    if use_block_length:
        if not MUX_HEADER_SIZE <= block_length <= n:
            raise MuxDecodeError("block_length", f"ACB block_length {block_length} of {n}")
        end = block_length
    if first == 0:
        raise MuxDecodeError("empty", "ACB without commands")
    cmds: list[Command] = []
    seen: set[int] = set()
    idx = first
    view = memoryview(buf)
    while idx:
        if idx in seen:
            raise MuxDecodeError("chain_loop", f"ACB command chain revisits {idx}")
        seen.add(idx)
        if idx < MUX_HEADER_SIZE or idx + AGGR_CMD_HEADER > end:
            raise MuxDecodeError("index", f"CMDH at {idx} outside the block of {end}")
        sig, cmd_len, if_id, nxt, code, tid = AGGR_CMDH_S.unpack_from(buf, idx)
        if sig != Sig.CMDH:
            raise MuxDecodeError("signature", f"{sig:#010x} at {idx} where CMDH was expected")
        if cmd_len < AGGR_CMD_HEADER or idx + cmd_len > end:
            raise MuxDecodeError("cmd_len", f"CMDH at {idx}: cmd_len {cmd_len} of {end}")
        cmd = Command(code, if_id, tid)
        _decode_params(MuxMode.AGGREGATION, cmd, view[idx + AGGR_CMD_HEADER:idx + cmd_len])
        cmds.append(cmd)
        idx = nxt
    return cmds


# ---- Lite datagrams and tables -----------------------------------------------------------------


def encode_adgh(if_id: int, packet: Buffer, pad: int = 0, service_class: int = 0,
                next_count: int = 0) -> bytes:
    length = MUX_HEADER_SIZE + pad + len(packet)
    head = ADGH_S.pack(Sig.ADGH, length, if_id, 0, service_class, next_count)
    return head + bytes(pad) + packet if pad else head + packet


def decode_adgh(buf: Buffer, pad: int = 0) -> tuple[int, bytes, int]:
    """(if_id, IP packet, service_class); the packet lies at 16 + pad, up to `length`."""
    n = len(buf)
    if n < MUX_HEADER_SIZE:
        raise MuxDecodeError("short", f"ADGH of {n} bytes")
    sig, length, if_id, _hint, service_class, _next = ADGH_S.unpack_from(buf, 0)
    if sig != Sig.ADGH:
        raise MuxDecodeError("signature", f"{sig:#010x} where ADGH was expected")
    start = MUX_HEADER_SIZE + pad
    if not start < length <= n:
        raise MuxDecodeError("length", f"ADGH length {length} in a buffer of {n}")
    if if_id >= MAX_SESSIONS:
        raise MuxDecodeError("if_id", f"ADGH for if_id {if_id}")
    return if_id, bytes(buf[start:length]), service_class


def encode_table(sig: Sig, if_id: int, value: int) -> bytes:
    """A Lite generic table: QLTH (UL) or FCTH (DL)."""
    return LITE_TABLE_S.pack(sig, TABLE_SIZE, if_id, VFL_LENGTH, value)


def decode_table(buf: Buffer, want: Sig) -> tuple[int, int]:
    """(if_id, value) of a Lite QLTH/FCTH."""
    n = len(buf)
    if n < TABLE_SIZE:
        raise MuxDecodeError("short", f"{want.name} of {n} bytes")
    sig, length, if_id, vfl, value = LITE_TABLE_S.unpack_from(buf, 0)
    if sig != want:
        raise MuxDecodeError("signature", f"{sig:#010x} where {want.name} was expected")
    if not TABLE_SIZE <= length <= n:
        raise MuxDecodeError("length", f"{want.name} length {length} in a buffer of {n}")
    if vfl != VFL_LENGTH:
        raise MuxDecodeError("vfl_length", f"{want.name} value field length {vfl}")
    if if_id >= MAX_SESSIONS:
        raise MuxDecodeError("if_id", f"{want.name} for if_id {if_id}")
    return if_id, value


# ---- Aggregation data blocks -------------------------------------------------------------------


class AdbBuilder:
    """Packs datagrams into one ADB: ADBH, the datagrams (4-byte aligned, each after `pad`
    bytes of head pad), then per session one ADTH (+ a QLTH on the uplink), chained from
    first_table_index. `add` says False when the datagram does not fit."""

    def __init__(self, capacity: int = AGGR_BUF, pad: int = 0, qlth: bool = False,
                 max_per_session: int = 0xFFFF) -> None:
        self.capacity = capacity
        self.pad = pad
        self.qlth = qlth
        self.max_per_session = max_per_session
        self._buf = bytearray(capacity)
        self._reset()

    def _reset(self) -> None:
        self._offset = MUX_HEADER_SIZE
        self._entries: dict[int, list[tuple[int, int, int]]] = {}
        self._tables = 0  # bytes the tables will take at finish
        self.count = 0

    @property
    def empty(self) -> bool:
        return self.count == 0

    def session_count(self, if_id: int) -> int:
        e = self._entries.get(if_id)
        return len(e) if e else 0

    def add(self, if_id: int, packet: Buffer, service_class: int = 0,
            pad: int | None = None) -> bool:
        """Append one datagram (after `pad` bytes of head pad, default the builder's)."""
        if pad is None:
            pad = self.pad
        entries = self._entries.get(if_id)
        extra = ENTRY_SIZE
        if entries is None:
            extra += MUX_HEADER_SIZE + (QLTH_SIZE if self.qlth else 0)
        elif len(entries) >= self.max_per_session:
            return False
        length = pad + len(packet)
        at = self._offset
        end = align4(at + length)
        if end + self._tables + extra > self.capacity or length > 0xFFFF:
            return False
        if pad:
            self._buf[at:at + pad] = bytes(pad)
        self._buf[at + pad:at + length] = packet
        if entries is None:
            entries = self._entries[if_id] = []
        entries.append((at, length, service_class))
        self._offset = end
        self._tables += extra
        self.count += 1
        return True

    def finish(self, sequence_nr: int = 0, queue_levels: dict[int, int] | None = None) -> bytes:
        """The block, and a fresh builder state. Tables go in if_id order."""
        buf, pos = self._buf, self._offset
        first = pos if self._entries else 0
        link_at = -1  # where the previous table's next_table_index lives
        for if_id in sorted(self._entries):
            entries = self._entries[if_id]
            if link_at >= 0:
                _U32.pack_into(buf, link_at, pos)
            size = MUX_HEADER_SIZE + ENTRY_SIZE * len(entries)
            ADTH_S.pack_into(buf, pos, Sig.ADTH, size, if_id, 0, 0)
            link_at = pos + 8
            p = pos + MUX_HEADER_SIZE
            for at, length, sc in entries:
                ENTRY_S.pack_into(buf, p, at, length, sc)
                p += ENTRY_SIZE
            pos = p
            if self.qlth:
                _U32.pack_into(buf, link_at, pos)
                level = (queue_levels or {}).get(if_id, 0)
                AGGR_QLTH_S.pack_into(buf, pos, Sig.QLTH, QLTH_SIZE, if_id, 0, level)
                link_at = pos + 8
                pos += QLTH_SIZE
        ADBH_S.pack_into(buf, 0, Sig.ADBH, sequence_nr & 0xFFFF, pos, first)
        out = bytes(buf[:pos])
        self._reset()
        return out


@dataclass
class AdbContent:
    """What an ADB carries: datagrams as (if_id, start, end, service_class) inside the buffer,
    UL queue levels by if_id, and why parsing stopped early (None: the chain ended)."""

    datagrams: list[tuple[int, int, int, int]]
    queue_levels: dict[int, int]
    stopped: str | None = None


def decode_adb(buf: Buffer, pad: int, *, allow_qlth: bool = False) -> AdbContent:
    """Walk the table chain of an ADB. The downlink (host side, allow_qlth False) stops at the
    first non-ADTH table, as the kernel does; the uplink (model side) accepts QLTH tables.
    Every offset is checked against block_length, itself inside the buffer."""
    n = len(buf)
    if n < MUX_HEADER_SIZE:
        raise MuxDecodeError("short", f"ADBH of {n} bytes")
    sig, _seq, block_length, idx = ADBH_S.unpack_from(buf, 0)
    if sig != Sig.ADBH:
        raise MuxDecodeError("signature", f"{sig:#010x} where ADBH was expected")
    if not MUX_HEADER_SIZE <= block_length <= n:
        raise MuxDecodeError("block_length", f"ADB block_length {block_length} of {n}")
    if idx == 0:
        raise MuxDecodeError("empty", "ADB without tables (first_table_index 0)")
    out = AdbContent([], {})
    seen: set[int] = set()
    while idx:
        if idx in seen:
            raise MuxDecodeError("chain_loop", f"ADB table chain revisits {idx}")
        seen.add(idx)
        if idx < MUX_HEADER_SIZE or idx + MUX_HEADER_SIZE > block_length:
            raise MuxDecodeError("index", f"table at {idx} outside the block of {block_length}")
        tsig = _U32.unpack_from(buf, idx)[0]
        if tsig == Sig.ADTH:
            idx = _adth(buf, idx, block_length, pad, out)
        elif tsig == Sig.QLTH and allow_qlth:
            idx = _qlth(buf, idx, block_length, out)
        else:
            out.stopped = f"table {tsig:#010x} at {idx} is not an ADTH"
            break
    return out


def _adth(buf: Buffer, idx: int, block_length: int, pad: int, out: AdbContent) -> int:
    _, table_length, if_id, _hint, nxt = ADTH_S.unpack_from(buf, idx)
    entries_length = table_length - MUX_HEADER_SIZE
    if entries_length < ENTRY_SIZE or entries_length % ENTRY_SIZE or \
            idx + table_length > block_length:
        raise MuxDecodeError("table_length", f"ADTH at {idx}: table_length {table_length}")
    if if_id >= MAX_SESSIONS:
        raise MuxDecodeError("if_id", f"ADTH at {idx} for if_id {if_id}")
    dgs = out.datagrams
    for p in range(idx + MUX_HEADER_SIZE, idx + table_length, ENTRY_SIZE):
        at, length, sc = ENTRY_S.unpack_from(buf, p)
        if at < MUX_HEADER_SIZE:
            raise MuxDecodeError("datagram_index", f"datagram at {at} inside the ADBH")
        if length <= pad or at + length > block_length:
            raise MuxDecodeError("datagram", f"datagram {at}+{length} (pad {pad}) outside "
                                 f"the block of {block_length}")
        dgs.append((if_id, at + pad, at + length, sc))
    return int(nxt)


def _qlth(buf: Buffer, idx: int, block_length: int, out: AdbContent) -> int:
    if idx + QLTH_SIZE > block_length:
        raise MuxDecodeError("index", f"QLTH at {idx} outside the block of {block_length}")
    _s, table_length, if_id, nxt, level = AGGR_QLTH_S.unpack_from(buf, idx)
    if table_length != QLTH_SIZE or if_id >= MAX_SESSIONS:
        raise MuxDecodeError("table_length", f"QLTH at {idx}: length {table_length}, "
                             f"if_id {if_id}")
    out.queue_levels[if_id] = level
    return int(nxt)


def signature_of(buf: Buffer) -> int:
    """The first u32 of a transfer (0 if shorter): what the dispatchers switch on."""
    return _U32.unpack_from(buf, 0)[0] if len(buf) >= 4 else 0


def mux_mode(cp_version: int, caps: int) -> tuple[MuxMode, bool]:
    """(MUX mode, UL flow on credits) from the CP version and capability registers."""
    return mux_mode_from_caps(cp_version, caps), ul_credit_from_caps(cp_version, caps)


__all__: list[str] = [
    "ACBH",
    "ADBH",
    "ADGH",
    "ADTH",
    "ADTH_ENTRY",
    "AGGR_CMDH",
    "AGGR_MAX_IP",
    "AGGR_QLTH",
    "COMMANDS",
    "LAYOUTS",
    "LITE_CMDH",
    "LITE_MAX_IP",
    "LITE_TABLE",
    "PARAMS",
    "PARAM_OF",
    "AdbBuilder",
    "AdbContent",
    "Command",
    "Commands",
    "MuxDecodeError",
    "MuxMode",
    "Sig",
    "decode_acb",
    "decode_adb",
    "decode_adgh",
    "decode_lite_cmd",
    "decode_table",
    "encode_acb",
    "encode_adgh",
    "encode_lite_cmd",
    "encode_table",
    "max_ip_packet",
    "mux_mode",
    "mux_mode_from_caps",
    "signature_of",
    "ul_credit_from_caps",
    "ul_pad",
]
