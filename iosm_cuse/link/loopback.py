"""An in-memory stand-in for the IPC engine + both MUXes: Contract 2 on the host side, wired
straight to a packet gateway's `uplink` and taking its `downlink`.

It keeps the MUX's observable rules (sessions must be open to carry packets, `max_ip_packet`,
a per-session queue limit answered by `transmit() -> False`) so the link layer can be tested and
benchmarked without shared memory; the real engine and model replace it when present.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from iosm_cuse.wire.rejects import Rejects

LITE_MAX_IP = 2032


class LoopbackMux:
    def __init__(self, uplink: Callable[[int, bytes], None] | None = None,
                 max_ip_packet: int = LITE_MAX_IP, fail_open: set[int] | None = None,
                 hang_close: bool = False) -> None:
        self.on_receive: Callable[[int, bytes], None] | None = None
        self.on_flow: Callable[[int, bool], None] | None = None
        self.max_ip_packet = max_ip_packet
        self.uplink = uplink
        self.sessions: set[int] = set()
        self.channel_open = False
        self.fail_open = fail_open or set()
        self.hang_close = hang_close          # a modem that never answers CLOSE_SESSION
        self.opens: list[int] = []
        self.closes: list[int] = []
        # Refused packets, counted as the MUX counts them; the caller is told by the False.
        self.drops = Rejects(what="loopback MUX", kinds=("ul_dropped", "dl_dropped"))

    @property
    def ul_dropped(self) -> int:
        return self.drops["ul_dropped"]

    @property
    def dl_dropped(self) -> int:
        return self.drops["dl_dropped"]

    async def open_session(self, if_id: int) -> None:
        if if_id in self.fail_open:
            raise OSError(errno.ENODEV, f"session {if_id}: no response from the modem")
        self.channel_open = True
        self.sessions.add(if_id)
        self.opens.append(if_id)

    async def close_session(self, if_id: int) -> None:
        if self.hang_close:
            await asyncio.Event().wait()
        self.sessions.discard(if_id)
        self.closes.append(if_id)
        if not self.sessions:
            self.channel_open = False

    def transmit(self, if_id: int, pkt: bytes) -> bool:
        if if_id not in self.sessions or len(pkt) > self.max_ip_packet or self.uplink is None:
            self.drops.count("ul_dropped")
            return False
        self.uplink(if_id, pkt)
        return True

    def downlink(self, if_id: int, pkt: bytes) -> bool:
        """The device MUX's `downlink`: towards the host's on_receive."""
        if if_id not in self.sessions or len(pkt) > self.max_ip_packet or \
                self.on_receive is None:
            self.drops.count("dl_dropped")
            return False
        self.on_receive(if_id, pkt)
        return True

    def flow(self, if_id: int, stopped: bool) -> None:
        """What a device FLOW_CTL command does on the host."""
        if self.on_flow is not None:
            self.on_flow(if_id, stopped)
