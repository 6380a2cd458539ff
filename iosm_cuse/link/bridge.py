"""One link's data path: its TUN fd <-> one MUX session.

Uplink (the kernel transmits on the link): the TUN fd becomes readable; packets are read into one
preallocated buffer until EAGAIN (bounded per wake-up so one busy session cannot starve the
others), checked (size for the MUX mode, IP version nibble) and handed to `mux.transmit`.
While the MUX says a session is flow-controlled, its fd is not read at all: the kernel's qdisc
(txqueuelen) holds the packets, as the kernel driver's stopped netdev queue does.

Downlink: `deliver(pkt)` writes one packet to the TUN fd.

No per-packet logging: every drop is counted by reason and logged once per reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

READ_BUDGET = 256           # packets per wake-up before yielding to the other sessions
BUFFER_SIZE = 65536         # a whole TUN frame, so an oversized packet is seen, not truncated

Transmit = Callable[[int, bytes], bool]


@dataclass
class Counters:
    """Per link, in the kernel's netdev sense: tx = uplink (to the modem), rx = downlink."""

    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_dropped_too_big: int = 0
    tx_dropped_not_ip: int = 0
    tx_dropped_mux: int = 0
    rx_dropped_not_ip: int = 0
    rx_dropped_write: int = 0
    flow_stops: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class LogOnce:
    """Log a reason the first time it happens only (packet-rate events must not flood logs)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, msg: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning(msg + " (logged once)", *args)


class SessionBridge:
    def __init__(self, link_id: int, fd: int, name: str, transmit: Transmit,
                 max_ip_packet: int, log_once: LogOnce | None = None) -> None:
        self.link_id = link_id
        self.fd = fd
        self.name = name
        self.counters = Counters()
        self._transmit = transmit
        self._max = max_ip_packet
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._bufs = [self._buf]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self.running = False        # session open: uplink is read
        self.stopped = False        # flow-controlled by the modem
        self._log_once = log_once or LogOnce()
        self.on_dead: Callable[[SessionBridge], None] | None = None

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
        c = self.counters
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
                c.tx_dropped_too_big += 1
                self._log_once("big", "%s: dropped an uplink packet of %d bytes: the MUX "
                               "carries at most %d", self.name, n, limit)
                continue
            version = buf[0] >> 4 if n else 0
            if version != 4 and version != 6:
                c.tx_dropped_not_ip += 1
                self._log_once("notip", "%s: dropped a non-IP uplink packet (version nibble "
                               "%d)", self.name, version)
                continue
            if transmit(link_id, bytes(view[:n])):
                packets += 1
                nbytes += n
            else:
                c.tx_dropped_mux += 1
            if self.stopped or not self.running:
                break           # on_flow/close ran inside transmit
        c.tx_packets += packets
        c.tx_bytes += nbytes

    def _dead(self, why: str) -> None:
        """Stop reading a fd that will never work again (the level-triggered reader would spin)
        and tell the owner, who removes the link."""
        self._log_once("read", "%s: %s", self.name, why)
        self.running = False
        self._update_reader()
        if self.on_dead is not None:
            self.on_dead(self)

    # -- downlink: MUX -> TUN

    def deliver(self, pkt: bytes) -> None:
        if not pkt or (pkt[0] >> 4) not in (4, 6):
            self.counters.rx_dropped_not_ip += 1
            self._log_once("dlnotip", "%s: dropped a non-IP downlink packet", self.name)
            return
        try:
            os.write(self.fd, pkt)
        except OSError as exc:
            self.counters.rx_dropped_write += 1
            self._log_once("write", "%s: TUN write failed: %s", self.name, exc)
            return
        self.counters.rx_packets += 1
        self.counters.rx_bytes += len(pkt)

    def close(self) -> None:
        self.running = False
        self._update_reader()
        self.fd = -1
