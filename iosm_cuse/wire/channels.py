"""The static channel table (docs/iosm-protocol.md §3): index = channel id.

Channel 0 (IP MUX) depends on the MUX mode chosen from the CP capabilities; `channel_config`
resolves it. UL buffers are sized like the channel's DL buffers: the largest transfer a pipe
carries in either direction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

KIB = 1024


class MuxMode(enum.StrEnum):
    LITE = "lite"  # XMM7560: ADGH
    AGGREGATION = "aggregation"  # XMM7360: ADB/ADTH

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ChannelConfig:
    channel: int
    name: str
    ul_pipe: int
    dl_pipe: int
    ul_tds: int
    dl_tds: int
    dl_buf_size: int
    backoff_us: int = 0  # accumulation backoff sent in OPEN_PIPE
    hpda_id: int = 9  # identifier rung after posting DL buffers (9 port open, 8 net init)

    @property
    def ul_buf_size(self) -> int:
        return self.dl_buf_size

    @property
    def is_ip_mux(self) -> bool:
        return self.channel == IP_MUX_CHANNEL


IP_MUX_CHANNEL = 0
MBIM_CHANNEL = 6
# The AT ports the kernel creates, wwan<N>at0 and wwan<N>at1, in this order (docs/at-ports.md).
AT_CHANNELS = (2, 4)

_IP_MUX = {
    MuxMode.LITE: ChannelConfig(0, "ip-mux", 0, 1, 800, 1200, 2 * KIB, 1000, 8),
    MuxMode.AGGREGATION: ChannelConfig(0, "ip-mux", 0, 1, 60, 60, 16 * KIB, 1000, 8),
}

CHANNELS: dict[int, ChannelConfig] = {
    1: ChannelConfig(1, "rpc", 2, 3, 4, 4, 32 * KIB),
    2: ChannelConfig(2, "at0", 4, 5, 4, 4, 2 * KIB),
    3: ChannelConfig(3, "trace", 6, 7, 32, 32, 8 * KIB),
    4: ChannelConfig(4, "at1", 8, 9, 4, 4, 2 * KIB),
    5: ChannelConfig(5, "loopback", 10, 11, 11, 11, 1024 * KIB),
    6: ChannelConfig(6, "mbim", 12, 13, 4, 4, 32 * KIB),
}


def channel_config(channel: int, mux_mode: MuxMode = MuxMode.LITE) -> ChannelConfig:
    """The table row for `channel`; KeyError for unknown ids (7, flash, is BOOT-stage only)."""
    if channel == IP_MUX_CHANNEL:
        return _IP_MUX[mux_mode]
    return CHANNELS[channel]


def dma_bytes_needed(channels: tuple[int, ...] = (0, 6), mux_mode: MuxMode = MuxMode.LITE,
                     align: int = 64) -> int:
    """DMA memory the engine allocates for the AP shared area plus `channels` open at once
    (TD rings and one buffer slot per TD, both directions): what a shared region must offer.
    Lite channel 0 alone takes about 4.1 MB."""
    from iosm_cuse.wire.ipc import AP_SHARED, TD_SIZE

    def up(n: int) -> int:
        return -(-n // align) * align

    total = up(AP_SHARED.size)
    for ch in channels:
        c = channel_config(ch, mux_mode)
        total += up(c.ul_tds * TD_SIZE) + up(c.ul_tds * c.ul_buf_size)
        total += up(c.dl_tds * TD_SIZE) + up(c.dl_tds * c.dl_buf_size)
    return total


def channel_of_pipe(pipe: int) -> int | None:
    """The RUN-stage channel using `pipe` (device side: which function a pipe feeds)."""
    if pipe in (0, 1):
        return IP_MUX_CHANNEL
    for cfg in CHANNELS.values():
        if pipe in (cfg.ul_pipe, cfg.dl_pipe):
            return cfg.channel
    return None


def mux_mode_from_caps(cp_version: int, caps: int) -> MuxMode:
    """Aggregation only when the CP announces both UL and DL aggregation (bits 8/9)."""
    from iosm_cuse.wire.ipc import CAP_DL_AGGR, CAP_UL_AGGR, CP_VERSION_MIN

    if cp_version >= CP_VERSION_MIN and caps & CAP_UL_AGGR and caps & CAP_DL_AGGR:
        return MuxMode.AGGREGATION
    return MuxMode.LITE
