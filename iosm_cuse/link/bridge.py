"""One link's data path: its TUN fd <-> one MUX session.

Uplink (the kernel transmits on the link): the TUN fd becomes readable; packets are read into one
preallocated buffer until EAGAIN (bounded per wake-up so one busy session cannot starve the
others), checked (size for the MUX mode, IP version nibble) and handed to `mux.transmit`.
While the MUX says a session is flow-controlled, its fd is not read at all: the kernel's qdisc
(txqueuelen) holds the packets, as the kernel driver's stopped netdev queue does.

Downlink: `deliver(pkt)` writes one packet to the TUN fd.

No per-packet logging: every drop is counted by reason and logged as one line per reason
(`wire.rejects`, rate-limited with the running count).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from iosm_cuse.wire.rejects import PACKET_LOG_EVERY, Rejects, merged

log = logging.getLogger(__name__)

READ_BUDGET = 256           # packets per wake-up before yielding to the other sessions
BUFFER_SIZE = 65536         # a whole TUN frame, so an oversized packet is seen, not truncated

Transmit = Callable[[int, bytes], bool]


DROPS = ("tx_dropped_too_big", "tx_dropped_not_ip", "tx_dropped_mux", "rx_dropped_not_ip",
         "rx_dropped_write")
# The order `status` shows a link's counters in.
COUNTERS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", *DROPS, "flow_stops")


@dataclass
class Counters:
    """Per link, in the kernel's netdev sense: tx = uplink (to the modem), rx = downlink.
    Plain traffic counters, bumped per packet; the drops are counted by `SessionBridge.drops`."""

    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    flow_stops: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class SessionBridge:
    def __init__(self, link_id: int, fd: int, name: str, transmit: Transmit,
                 max_ip_packet: int) -> None:
        self.link_id = link_id
        self.fd = fd
        self.name = name
        self.counters = Counters()
        self.drops = Rejects(log, PACKET_LOG_EVERY, name, kinds=DROPS)
        self._transmit = transmit
        self._max = max_ip_packet
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._bufs = [self._buf]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self.running = False        # session open: uplink is read
        self.stopped = False        # flow-controlled by the modem
        self.on_dead: Callable[[SessionBridge], None] | None = None

    def snapshot(self) -> dict[str, int]:
        """Every counter of the link, drops included, in `COUNTERS` order (for `status`)."""
        return merged(self.counters.as_dict(), self.drops, COUNTERS)

    # -- control

    def start(self) -> None:
        """The session is open: read uplink packets."""
        self._loop = asyncio.get_running_loop()
        self.running = True
        self._update_reader()

    def stop(self) -> None:
        self.running = False
        self._update_reader()

    def set_flow(self, stopped: bool) -> None:
        if stopped and not self.stopped:
            self.counters.flow_stops += 1
        self.stopped = stopped
        self._update_reader()

    def _update_reader(self) -> None:
        want = self.running and not self.stopped and self.fd >= 0
        if want == self._reading or self._loop is None:
            return
        if want:
            self._loop.add_reader(self.fd, self._on_readable)
        else:
            self._loop.remove_reader(self.fd)
        self._reading = want

    # -- uplink: TUN -> MUX

    def _on_readable(self) -> None:
        fd, bufs, buf, view = self.fd, self._bufs, self._buf, self._view
        transmit, link_id, limit = self._transmit, self.link_id, self._max
        drops = self.drops
        packets = nbytes = 0
        for _ in range(READ_BUDGET):
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                # EBADFD: the device is gone (e.g. its namespace was deleted).
                self._dead(f"TUN read failed: {exc}")
                break
            if n == 0:
                self._dead("end of file on the TUN fd")
                break
            if n > limit:
                drops("tx_dropped_too_big", "dropped an uplink packet of %d bytes: the MUX "
                      "carries at most %d", n, limit)
                continue
            version = buf[0] >> 4 if n else 0
            if version != 4 and version != 6:
                drops("tx_dropped_not_ip", "dropped a non-IP uplink packet (version nibble "
                      "%d)", version)
                continue
            if transmit(link_id, bytes(view[:n])):
                packets += 1
                nbytes += n
            else:
                drops.count("tx_dropped_mux")   # the MUX counts and reports its own reason
            if self.stopped or not self.running:
                break           # on_flow/close ran inside transmit
        c = self.counters
        c.tx_packets += packets
        c.tx_bytes += nbytes

    def _dead(self, why: str) -> None:
        """Stop reading a fd that will never work again (the level-triggered reader would spin)
        and tell the owner, who removes the link."""
        log.warning("%s: %s", self.name, why)   # once: the fd is not read again
        self.running = False
        self._update_reader()
        if self.on_dead is not None:
            self.on_dead(self)

    # -- downlink: MUX -> TUN

    def deliver(self, pkt: bytes) -> None:
        if not pkt or (pkt[0] >> 4) not in (4, 6):
            self.drops("rx_dropped_not_ip", "dropped a non-IP downlink packet")
            return
        try:
            os.write(self.fd, pkt)
        except OSError as exc:
            self.drops("rx_dropped_write", "TUN write failed: %s", exc)
            return
        self.counters.rx_packets += 1
        self.counters.rx_bytes += len(pkt)

    def close(self) -> None:
        self.running = False
        self._update_reader()
        self.fd = -1
