"""Wire layouts of the IOSM IPC protocol, declared once, as data
(docs/iosm-protocol.md §1-§2).

Each message is an `iosm_cuse.wire.record.Record` (a table of named fields with offsets), so the
host engine and the device model share every offset and neither hand-packs a message.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import Any

from iosm_cuse.wire.record import Buffer as Buffer  # re-exported for users of the IPC layouts
from iosm_cuse.wire.record import Field as Field
from iosm_cuse.wire.record import Record as Record


def F(name: str, offset: int, fmt: str, **kw: Any) -> Field:  # table shorthand
    return Field(name, offset, fmt, **kw)


# ---- scratchpad (BAR2), docs/iosm-protocol.md §1.2 ----------------------------------------------

SCRATCHPAD = Record("scratchpad", 0x100, [
    F("exec_stage", 0x00, "I"),
    F("chip_info", 0x04, "60s"),
    F("rom_exit_code", 0x40, "I"),
    F("psi_address", 0x54, "Q"),
    F("psi_size", 0x5C, "I"),
    F("ipc_status", 0x60, "I"),
    F("context_info_address", 0x64, "Q"),
    F("ap_window_base", 0x6C, "Q"),
    F("ap_window_end", 0x74, "Q"),
    F("cp_version", 0xF0, "I"),
    F("cp_capabilities", 0xF4, "I"),
])
CHIP_INFO_SIZE = 60
CHIP_INFO_SIZE_BYTE = CHIP_INFO_SIZE - 2  # byte 1 of the chip info must hold 58
CP_VERSION_MIN = 0x0100  # capabilities honoured only from this version on
CP_VERSION_INVALID = 0xFFFFFFFF
CAP_UL_AGGR = 1 << 8
CAP_DL_AGGR = 1 << 9
CAP_UL_FLOW_CREDIT = 1 << 21


class ExecStage(enum.IntEnum):
    RUN = 0x600DF00D
    CRASH = 0x8BADF00D
    CD_READY = 0xBADC0DED
    BOOT = 0xFEEDB007
    PSI = 0xFEEDBEEF
    EBL = 0xFEEDCAFE
    INVALID = 0xFFFFFFFF


class IpcState(enum.IntEnum):
    UNINIT = 0
    INIT = 1
    RUNNING = 2
    RECOVERY = 3
    ERROR = 4
    DONT_CARE = 5


class Doorbell(enum.IntEnum):
    """Doorbell numbers (BAR0 + 0x10 + n * 0x20)."""

    HPDA = 0
    IPC = 1
    SLEEP = 2


class Hpda(enum.IntEnum):
    """Identifiers written to the HPDA doorbell: who rang (informational)."""

    MSG_RING = 0
    PM_TRIGGER = 1
    WAKEUP_TIMER = 2
    TD_UPDATE_TIMER_START = 3
    TD_UPDATE_TIMER = 4
    FAST_TD_UPDATE = 5
    UL_WRITE_TD = 6
    DL_PROCESS = 7
    NET_CHANNEL_INIT = 8
    PORT_OPEN = 9


# ---- AP shared area and context info, docs/iosm-protocol.md §2.1/§2.2 ---------------------------

NUM_PIPES = 24
MSG_RING_ENTRIES = 128

CONTEXT_INFO = Record("context_info", 56, [
    F("device_info_address", 0x00, "Q"),
    F("head_array_address", 0x08, "Q"),
    F("tail_array_address", 0x10, "Q"),
    F("msg_head_address", 0x18, "Q"),
    F("msg_tail_address", 0x20, "Q"),
    F("msg_ring_address", 0x28, "Q"),
    F("msg_ring_entries", 0x30, "H"),
    F("msg_irq_vector", 0x32, "B"),
    F("device_info_irq_vector", 0x33, "B"),
])

DEVICE_INFO = Record("device_info", 12, [
    F("exec_stage", 0, "I"),
    F("ipc_status", 4, "I"),
    F("sleep_notification", 8, "I"),
])

AP_SHARED = Record("ap_shared", 0xD10, [
    F("context_info", 0x000, "56s"),
    F("device_info", 0x038, "12s"),
    F("msg_head", 0x044, "I"),
    F("head_array", 0x048, "I", count=NUM_PIPES),
    F("msg_tail", 0x0A8, "I"),
    F("tail_array", 0x0AC, "I", count=NUM_PIPES),
    F("msg_ring", 0x110, "24s", count=MSG_RING_ENTRIES),
])

# ---- message ring, docs/iosm-protocol.md §2.3 ---------------------------------------------------

MSG_SIZE = 24
MSG_TYPE_OFFSET = 11
MSG_STATUS_OFFSET = 20


class MsgType(enum.IntEnum):
    OPEN_PIPE = 0x01
    CLOSE_PIPE = 0x02
    ABORT_PIPE = 0x03
    SLEEP = 0x04
    FEATURE_SET = 0xF0


class MsgStatus(enum.IntEnum):
    INVALID = 0
    SUCCESS = 1
    ERROR = 2


FEATURE_INBAND_CRASH = 0x80
SLEEP_TARGET_HOST = 0
SLEEP_TARGET_DEVICE = 1
SLEEP_ENTER = 0
SLEEP_EXIT = 1

_TAIL = [F("type", MSG_TYPE_OFFSET, "B"), F("status", MSG_STATUS_OFFSET, "I")]

MESSAGES: Mapping[MsgType, Record] = {
    MsgType.OPEN_PIPE: Record("open_pipe", MSG_SIZE, [
        F("td_ring_address", 0, "Q"), F("td_count", 8, "H"), F("pipe", 10, "B"),
        F("type", MSG_TYPE_OFFSET, "B"), F("irq_vector", 12, "I"), F("backoff_us", 16, "I"),
        F("status", MSG_STATUS_OFFSET, "I")]),
    MsgType.CLOSE_PIPE: Record("close_pipe", MSG_SIZE, [F("pipe", 10, "B"), *_TAIL]),
    MsgType.ABORT_PIPE: Record("abort_pipe", MSG_SIZE, [F("pipe", 10, "B"), *_TAIL]),
    MsgType.SLEEP: Record("sleep", MSG_SIZE, [
        F("target", 8, "B"), F("state", 9, "B"), *_TAIL]),
    MsgType.FEATURE_SET: Record("feature_set", MSG_SIZE, [F("features", 10, "B"), *_TAIL]),
}
MSG_HEADER = Record("msg_header", MSG_SIZE, list(_TAIL))


def encode_ring_message(kind: MsgType, **values: Any) -> bytes:
    """One ring entry of type `kind`; reserved bytes zero, status 0."""
    return MESSAGES[kind].pack(type=int(kind), **values)


def decode_ring_message(raw: Buffer) -> tuple[MsgType, dict[str, Any]]:
    """(type, fields) of a ring entry; ValueError on a short entry or an unknown type."""
    if len(raw) < MSG_SIZE:
        raise ValueError(f"ring entry of {len(raw)} bytes, need {MSG_SIZE}")
    code = raw[MSG_TYPE_OFFSET]
    try:
        kind = MsgType(code)
    except ValueError:
        raise ValueError(f"unknown ring message type {code:#x}") from None
    return kind, MESSAGES[kind].unpack(raw)


# ---- transfer descriptor, docs/iosm-protocol.md §2.5 --------------------------------------------

TD_SIZE = 16
TD_MAX_SIZE = (1 << 24) - 1

TD = Record("td", TD_SIZE, [
    F("address", 0, "Q"),
    F("size", 8, "I", bits=(0, 24)),
    F("status", 8, "I", bits=(24, 8)),
    F("next_count", 12, "B"),
])
# the hot path packs/unpacks TDs with this directly (same offsets as TD above)
TD_STRUCT = struct.Struct("<QI4x")
assert TD_STRUCT.size == TD.size


class TdStatus(enum.IntEnum):
    INVALID = 0
    PARTIAL_TRANSFER = 1
    END_TRANSFER = 2
    OVERFLOW = 3
    ABORT = 4
    ERROR = 5
