"""The modem model's packet gateway: where session packets leave the modem and come back.

    gateway = Gateway(config, "echo" | "tun" | "netns:NAME")
    mbim_function.session_listener = gateway.session_changed
    gateway.downlink = mux_device.downlink          # towards the host
    mux_device -> gateway.uplink(if_id, pkt)        # from the host
    await gateway.start(); ...; await gateway.close()

Uplink packets are accepted only from a connected session and only with that session's source
address (IPv4: its address; IPv6: its /64 prefix, as a network delegates a prefix to a UE).
In "echo" mode the gateway answers ICMP/ICMPv6 echo requests itself (a self-contained demo:
`ping 10.99.N.1` through wwan0-N). In "tun"/"netns:NAME" mode packets leave through a gateway
TUN device (`iosmgw0` by default), which holds the gateway addresses 10.99.N.1/24 and
fd99:N::1/64 of every session; "netns:NAME" moves it into that network namespace (created if
missing, and then removed again by `close`). Downlink packets read from that TUN go to the
connected session that owns their destination address.

The packet functions (`parse_addresses`, `echo_reply`, `fragment_v4`, `fragment_v6`) and the
`Reassembler` are pure and take untrusted bytes. In echo mode IP fragments are reassembled
before the request is answered (`ping -s 3000` through a 1500-byte link), and a reply larger
than the session MTU goes down in fragments (IPv4 as a router would; IPv6 with a Fragment
header, as the replying host would). An IPv6 Fragment header is followed only when it is the
first extension header (as ping's are).

Shaping (`set_shape`, `clear_shape`, `shapes`): per session, the packets towards the host
(downlink: echo replies and what the gateway TUN routes to the session) are delayed, dropped
at random or held to a rate, as netem does on the egress queue of a link; the decisions are
sim/shaper.py's, this class holds the packets and runs their timers. Only the downlink is
shaped: a ping's round trip grows by the delay once, its loss is the reply's, and the rate caps
what the host receives. Each session's loss is drawn from an RNG seeded by its id, so a run
with the same packets drops the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

from iosm_cuse.net.gso import VNET_HDR_LEN, Coalescer, checksum, segment
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.shaper import Shaper, ShapeSpec
from iosm_cuse.wire.rejects import PACKET_LOG_EVERY, Rejects, merged

log = logging.getLogger(__name__)

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
IPPROTO_FRAGMENT = 44     # IPv6 Fragment extension header
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
REPLY_HOP_LIMIT = 64
READ_BUDGET = 256
DEFAULT_TUN_NAME = "iosmgw0"
GRO_FLUSH_AFTER = 0.001   # s an open TCP run may wait for more segments (gro_flush_timeout)

# ---- pure packet functions --------------------------------------------------------------------


def parse_addresses(pkt: bytes) -> tuple[int, bytes, bytes] | None:
    """(version, source, destination) of an IPv4/IPv6 packet, or None if it is not one whose
    header fits in `pkt`."""
    if len(pkt) < 20:
        return None
    version = pkt[0] >> 4
    if version == 4:
        return 4, pkt[12:16], pkt[16:20]
    if version == 6 and len(pkt) >= 40:
        return 6, pkt[8:24], pkt[24:40]
    return None


def echo_reply(pkt: bytes) -> bytes | None:
    """The echo reply to an ICMP or ICMPv6 echo request, or None if `pkt` is not a well-formed,
    unfragmented one. Addresses are swapped and both checksums recomputed."""
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4:
        return _echo_reply_v4(pkt)
    if version == 6:
        return _echo_reply_v6(pkt)
    return None


def _echo_reply_v4(pkt: bytes) -> bytes | None:
    if len(pkt) < 20:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    frag = struct.unpack_from("!H", pkt, 6)[0]
    if ihl < 20 or total < ihl + 8 or total > len(pkt) or pkt[9] != IPPROTO_ICMP:
        return None
    if frag & 0x3FFF:                 # MF set or an offset: a fragment, not answered
        return None
    if checksum(pkt[:ihl]) != 0:
        return None
    icmp = bytearray(pkt[ihl:total])
    if icmp[0] != ICMP_ECHO_REQUEST or icmp[1] != 0 or checksum(icmp) != 0:
        return None
    icmp[0] = ICMP_ECHO_REPLY
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(icmp))
    hdr = bytearray(pkt[:ihl])
    hdr[12:16], hdr[16:20] = pkt[16:20], pkt[12:16]
    hdr[8] = REPLY_HOP_LIMIT
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", checksum(hdr))
    return bytes(hdr + icmp)


def _echo_reply_v6(pkt: bytes) -> bytes | None:
    if len(pkt) < 48:
        return None
    plen = struct.unpack_from("!H", pkt, 4)[0]
    if pkt[6] != IPPROTO_ICMPV6 or plen < 8 or 40 + plen > len(pkt):
        return None                    # extension headers are not followed: not answered
    src, dst = pkt[8:24], pkt[24:40]
    icmp = bytearray(pkt[40:40 + plen])
    if icmp[0] != ICMPV6_ECHO_REQUEST or icmp[1] != 0:
        return None
    if checksum(_pseudo6(src, dst, plen) + icmp) != 0:
        return None
    icmp[0] = ICMPV6_ECHO_REPLY
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(_pseudo6(dst, src, plen) + icmp))
    hdr = bytearray(pkt[:40])
    hdr[8:24], hdr[24:40] = dst, src
    hdr[7] = REPLY_HOP_LIMIT
    return bytes(hdr + icmp)


def _pseudo6(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!I3xB", length, IPPROTO_ICMPV6)


# ---- IP fragments (echo mode) -----------------------------------------------------------------

IP_MF, IP_DF, IP_OFFSET = 0x2000, 0x4000, 0x1FFF
FRAG_TIMEOUT = 30.0        # s a partly received datagram is kept (RFC 791's upper bound: 15 s+)
FRAG_MAX_DATAGRAMS = 16    # partly received datagrams kept at once; the oldest goes first
IP_MAX = 65535


class FragmentError(ValueError):
    """A fragment that cannot be part of a datagram: its datagram is dropped."""


def is_fragment_v4(pkt: bytes) -> bool:
    return len(pkt) >= 20 and pkt[0] >> 4 == 4 and \
        struct.unpack_from("!H", pkt, 6)[0] & (IP_MF | IP_OFFSET) != 0


def is_fragment(pkt: bytes) -> bool:
    """An IPv4 fragment, or an IPv6 packet whose first extension header is a Fragment header."""
    return is_fragment_v4(pkt) or (len(pkt) >= 40 and pkt[0] >> 4 == 6 and
                                   pkt[6] == IPPROTO_FRAGMENT)


@dataclass
class _Partial:
    first_seen: float
    header: bytes | None = None                     # the offset-0 fragment's header
    end: int | None = None                          # payload length, known from the last one
    pieces: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """IP reassembly for the echo gateway: IPv4 fragments keyed by (source, destination, id,
    protocol), IPv6 ones by (source, destination, identification). Overlapping fragments, a
    second differing end, a payload beyond 65535 bytes or a non-final fragment not a multiple
    of 8 bytes drop the datagram (FragmentError, as RFC 5722 asks for IPv6); at most
    `max_datagrams` partial ones are kept, each for `timeout` seconds."""

    def __init__(self, max_datagrams: int = FRAG_MAX_DATAGRAMS,
                 timeout: float = FRAG_TIMEOUT) -> None:
        self.max_datagrams = max_datagrams
        self.timeout = timeout
        self._partial: dict[bytes, _Partial] = {}

    def __len__(self) -> int:
        return len(self._partial)

    def push(self, pkt: bytes, now: float) -> bytes | None:
        """The whole datagram once `pkt` (an IPv4 fragment, or an IPv6 packet whose first
        extension header is a Fragment header) completes it, None while parts are missing."""
        self._expire(now)
        if pkt and pkt[0] >> 4 == 6:
            return self._push6(pkt, now)
        ihl = (pkt[0] & 0x0F) * 4 if pkt else 0
        if len(pkt) < 20 or pkt[0] >> 4 != 4 or ihl < 20:
            raise FragmentError("not an IPv4 header")
        total, frag = struct.unpack_from("!H", pkt, 2)[0], struct.unpack_from("!H", pkt, 6)[0]
        if total <= ihl or total > len(pkt) or checksum(pkt[:ihl]) != 0:
            raise FragmentError("bad length or header checksum")
        offset, more = (frag & IP_OFFSET) * 8, bool(frag & IP_MF)
        whole = self._piece(pkt[12:20] + pkt[4:6] + pkt[9:10], offset, pkt[ihl:total], more,
                            pkt[:ihl], IP_MAX - ihl, now)
        if whole is None:
            return None
        header, payload = whole
        hdr = bytearray(header)
        struct.pack_into("!H", hdr, 2, len(hdr) + len(payload))
        struct.pack_into("!H", hdr, 6, 0)
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", checksum(hdr))
        return bytes(hdr) + payload

    def _push6(self, pkt: bytes, now: float) -> bytes | None:
        if len(pkt) < 48 or pkt[6] != IPPROTO_FRAGMENT:
            raise FragmentError("not an IPv6 packet with a Fragment header first")
        plen = struct.unpack_from("!H", pkt, 4)[0]
        if plen < 8 or 40 + plen > len(pkt):
            raise FragmentError("bad payload length")
        next_header, _, off_flags, ident = struct.unpack_from("!BBHI", pkt, 40)
        offset, more = off_flags & ~7, bool(off_flags & 1)
        # the fixed header of the reassembled packet: the Fragment header's next header
        header = pkt[:6] + bytes([next_header]) + pkt[7:40]
        whole = self._piece(pkt[8:40] + struct.pack("!I", ident), offset, pkt[48:40 + plen],
                            more, header, IP_MAX, now)
        if whole is None:
            return None
        header, payload = whole
        hdr = bytearray(header)
        struct.pack_into("!H", hdr, 4, len(payload))
        return bytes(hdr) + payload

    def _piece(self, key: bytes, offset: int, data: bytes, more: bool, header: bytes,
               limit: int, now: float) -> tuple[bytes, bytes] | None:
        """Add one fragment; (first fragment's header, payload) once the datagram is whole."""
        if (more and len(data) % 8) or offset + len(data) > limit:
            self._partial.pop(key, None)
            raise FragmentError("fragment length")
        part = self._partial.get(key)
        if part is None:
            if len(self._partial) >= self.max_datagrams:
                oldest = min(self._partial, key=lambda k: self._partial[k].first_seen)
                del self._partial[oldest]
            part = self._partial[key] = _Partial(now)
        try:
            self._add(part, offset, data, more, header)
        except FragmentError:
            del self._partial[key]
            raise
        if part.end is None or part.header is None or \
                sum(len(d) for d in part.pieces.values()) != part.end:
            return None
        del self._partial[key]
        return part.header, b"".join(part.pieces[o] for o in sorted(part.pieces))

    @staticmethod
    def _add(part: _Partial, offset: int, data: bytes, more: bool, header: bytes) -> None:
        if part.pieces.get(offset) == data:
            return                                      # a duplicate
        stop = offset + len(data)
        for o, d in part.pieces.items():
            if offset < o + len(d) and o < stop:
                raise FragmentError("overlapping fragments")
        if not more:
            if part.end is not None and part.end != stop:
                raise FragmentError("two different ends")
            part.end = stop
        if part.end is not None and any(o + len(d) > part.end for o, d in
                                        [*part.pieces.items(), (offset, data)]):
            raise FragmentError("a fragment beyond the end")
        part.pieces[offset] = data
        if offset == 0:
            part.header = header

    def _expire(self, now: float) -> None:
        old = [k for k, p in self._partial.items() if now - p.first_seen > self.timeout]
        for k in old:
            del self._partial[k]


def fragment_v6(pkt: bytes, mtu: int, ident: int) -> list[bytes]:
    """`pkt` in fragments of at most `mtu` bytes with Fragment headers of identification
    `ident`, as its source sends it on (IPv6 routers never fragment); unchanged when it fits
    or is not IPv6."""
    if len(pkt) <= mtu or len(pkt) < 40 or pkt[0] >> 4 != 6:
        return [pkt]
    payload, next_header = pkt[40:], pkt[6]
    chunk = (mtu - 48) // 8 * 8
    if chunk <= 0:
        return [pkt]
    out = []
    for off in range(0, len(payload), chunk):
        piece = payload[off:off + chunk]
        more = off + chunk < len(payload)
        hdr = bytearray(pkt[:40])
        struct.pack_into("!H", hdr, 4, 8 + len(piece))
        hdr[6] = IPPROTO_FRAGMENT
        out.append(bytes(hdr) + struct.pack("!BBHI", next_header, 0, off | int(more),
                                            ident & 0xFFFFFFFF) + piece)
    return out


def fragment_v4(pkt: bytes, mtu: int) -> list[bytes]:
    """`pkt` in fragments of at most `mtu` bytes, as a router sends it on; unchanged when it
    fits, is not IPv4 or has DF set."""
    if len(pkt) <= mtu or len(pkt) < 20 or pkt[0] >> 4 != 4:
        return [pkt]
    ihl = (pkt[0] & 0x0F) * 4
    frag = struct.unpack_from("!H", pkt, 6)[0]
    chunk = (mtu - ihl) // 8 * 8
    if frag & IP_DF or chunk <= 0:
        return [pkt]
    payload, base = pkt[ihl:], (frag & IP_OFFSET) * 8
    out = []
    for off in range(0, len(payload), chunk):
        piece = payload[off:off + chunk]
        more = off + chunk < len(payload) or bool(frag & IP_MF)
        hdr = bytearray(pkt[:ihl])
        struct.pack_into("!H", hdr, 2, ihl + len(piece))
        struct.pack_into("!H", hdr, 6, ((base + off) // 8) | (IP_MF if more else 0))
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", checksum(hdr))
        out.append(bytes(hdr) + piece)
    return out


# ---- the sessions' addresses ------------------------------------------------------------------


@dataclass(frozen=True)
class SessionAddresses:
    """What the gateway checks and routes by, for one connected session. The keys are the
    bytes compared per packet: the IPv4 address, and the IPv6 /64 prefix (a network delegates
    a prefix to a UE: any address in it is the session's) or, for another prefix length, the
    exact address."""

    session_id: int
    ipv4: IPv4Interface | None
    ipv6: IPv6Interface | None
    v4_key: bytes | None = field(init=False)
    v6_key: bytes | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "v4_key", self.ipv4.ip.packed if self.ipv4 else None)
        v6 = None
        if self.ipv6 is not None:
            v6 = self.ipv6.ip.packed[:8] if self.ipv6.network.prefixlen == 64 \
                else self.ipv6.ip.packed
        object.__setattr__(self, "v6_key", v6)


DROPS = ("drop_not_connected", "drop_source", "drop_link_local", "drop_malformed",
         "drop_not_echo", "drop_fragment", "drop_no_session", "drop_downlink",
         "drop_tun_write", "drop_shaped_loss", "drop_shaped_queue")
SHAPE_SEED = 0x105C  # + the session id: each session's loss sequence, the same every run
# A held packet due within this is sent with the one the timer fired for: one wake-up per
# batch at high rates, never sooner than the clock's own resolution would allow anyway.
SHAPE_SLACK = 0.0002
TRAFFIC = ("ul_packets", "ul_bytes", "dl_packets", "dl_bytes", "ul_gso_frames",
           "dl_gso_frames", "echo_replies", "ul_fragments")
COUNTERS = (*TRAFFIC, *DROPS)  # what `counters` shows, in this order


# ---- the gateway ------------------------------------------------------------------------------


class Gateway:
    def __init__(self, config: ModemConfig, mode: str = "echo", *,
                 tun_name: str = DEFAULT_TUN_NAME) -> None:
        self.config = config
        self.mode, self.netns = _parse_mode(mode)
        self.tun_name = tun_name
        self.downlink: Callable[[int, bytes], bool] | None = None
        self.sessions: dict[int, SessionAddresses] = {}
        self._by_v4: dict[bytes, int] = {}
        self._by_v6: dict[bytes, int] = {}
        # Counters are plain attributes: they are bumped once or twice per packet.
        self.ul_packets = self.ul_bytes = self.dl_packets = self.dl_bytes = 0
        # TCP super-packets written to (coalesced) and read from (segmented) the gateway TUN
        self.ul_gso_frames = self.dl_gso_frames = 0
        self.echo_replies = 0
        self.ul_fragments = 0                   # IP fragments received in echo mode
        self._frags = Reassembler()
        self._frag_id = 0                       # IPv6 Fragment header identification
        self.drops = Rejects(log, PACKET_LOG_EVERY, "gateway", kinds=DROPS)
        self._fd = -1
        self._buf = bytearray(VNET_HDR_LEN + 65536)
        self._pending: list[bytes] = []
        self._gro = Coalescer()
        self._gro_timer: asyncio.TimerHandle | None = None
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._created_netns = False
        # shaping, per session: the decisions, the packets held (leave time, packet), the
        # timer of the first held one
        self._shapers: dict[int, Shaper] = {}
        self._held: dict[int, deque[tuple[float, bytes]]] = {}
        self._shape_timers: dict[int, asyncio.TimerHandle] = {}

    @property
    def counters(self) -> dict[str, int]:
        return merged({name: getattr(self, name) for name in TRAFFIC}, self.drops, COUNTERS)

    # -- sessions (the MBIM function's session_listener)

    def session_changed(self, session_id: int, state: Any | None) -> None:
        """`state` is the MBIM function's SessionState (ipv4/ipv6 interfaces as granted), or
        None when the session is deactivated."""
        old = self.sessions.pop(session_id, None)
        if old is not None:
            self._unindex(old)
        if state is None:
            log.info("gateway: session %d disconnected", session_id)
            return
        addrs = SessionAddresses(session_id, getattr(state, "ipv4", None),
                                 getattr(state, "ipv6", None))
        self.sessions[session_id] = addrs
        if addrs.v4_key is not None:
            self._by_v4[addrs.v4_key] = session_id
        if addrs.v6_key is not None:
            self._by_v6[addrs.v6_key] = session_id
        log.info("gateway: session %d connected (%s, %s)", session_id, addrs.ipv4, addrs.ipv6)

    def _unindex(self, addrs: SessionAddresses) -> None:
        for table, key in ((self._by_v4, addrs.v4_key), (self._by_v6, addrs.v6_key)):
            if key is not None and table.get(key) == addrs.session_id:
                del table[key]

    # -- uplink: from the host through the device MUX (once per packet: kept flat)

    def uplink(self, if_id: int, pkt: bytes) -> None:
        addrs = self.sessions.get(if_id)
        if addrs is None:
            self.drops("drop_not_connected", "dropped packets of session %d: not connected",
                       if_id, per=if_id)
            return
        n = len(pkt)
        version = pkt[0] >> 4 if n else 0
        if version == 4 and n >= 20:
            ok = pkt[12:16] == addrs.v4_key
        elif version == 6 and n >= 40:
            k6 = addrs.v6_key
            ok = k6 is not None and (pkt[8:16] == k6 or pkt[8:24] == k6)
        else:
            self.drops("drop_malformed", "dropped a malformed packet from session %d", if_id)
            return
        if not ok:
            self._drop_source(if_id, pkt)
            return
        self.ul_packets += 1
        self.ul_bytes += n
        if self._fd < 0:
            self._echo(if_id, pkt)
            return
        # Written once per loop pass, coalesced: the receiving stack then sees one TCP
        # super-packet per run of segments (GRO), and acknowledges it once.
        if not self._pending and self._loop is not None:
            self._loop.call_soon(self._write_pending)
        self._pending.append(pkt)

    def _write_pending(self) -> None:
        pending, self._pending = self._pending, []
        if self._fd < 0:
            return
        self._write(self._gro.push(pending))
        # Runs still open wait for more segments, a bounded time: with 8 sessions the MUX
        # interleaves them, and runs cut at every pass would be ~10 segments, each acked.
        if self._gro.held and self._gro_timer is None and self._loop is not None:
            self._gro_timer = self._loop.call_later(GRO_FLUSH_AFTER, self._flush_gro)

    def _flush_gro(self) -> None:
        self._gro_timer = None
        if self._fd >= 0:
            self._write(self._gro.flush())

    def _write(self, frames: list[bytes]) -> None:
        fd = self._fd
        for frame in frames:
            self.ul_gso_frames += frame[1] != 0        # virtio_net_hdr gso_type
            try:
                os.write(fd, frame)
            except OSError as exc:
                self.drops("drop_tun_write", "TUN write failed: %s", exc)

    def _drop_source(self, if_id: int, pkt: bytes) -> None:
        """A packet whose source is not the session's. IPv6 link-local ones (router and
        neighbour solicitations, MLD reports of a link with IPv6 on) are counted apart: the
        model's network sends no router advertisements, and they are no spoofing."""
        if pkt[0] >> 4 == 6 and pkt[8] == 0xFE and pkt[9] & 0xC0 == 0x80:
            self.drops("drop_link_local", "dropped IPv6 link-local packets of session %d (the "
                       "model sends no router advertisements)", if_id, per=if_id)
            return
        self.drops("drop_source", "dropped packets of session %d with a source address not "
                   "the session's", if_id, per=if_id)

    def _echo(self, if_id: int, pkt: bytes) -> None:
        if is_fragment(pkt):
            self.ul_fragments += 1
            try:
                whole = self._frags.push(pkt, time.monotonic())
            except FragmentError as exc:
                self.drops("drop_fragment", "(echo mode) dropped an IPv4 datagram's fragments: "
                           "%s", exc)
                return
            if whole is None:
                return                                  # more fragments to come
            pkt = whole
        reply = echo_reply(pkt)
        if reply is None:
            self.drops("drop_not_echo", "(echo mode) dropped a packet that is not an echo "
                       "request")
            return
        self.echo_replies += 1
        mtu = self.config.session_ip(if_id).mtu
        if reply[0] >> 4 == 6:
            self._frag_id += 1
            parts = fragment_v6(reply, mtu, self._frag_id)
        else:
            parts = fragment_v4(reply, mtu)
        shaped = bool(self._shapers) and if_id in self._shapers
        for part in parts:
            if shaped:
                self._shape_down(if_id, part)
            else:
                self._send_down(if_id, part)

    def _send_down(self, if_id: int, pkt: bytes) -> None:
        if self.downlink is not None and self.downlink(if_id, pkt):
            self.dl_packets += 1
            self.dl_bytes += len(pkt)
        else:
            self.drops("drop_downlink", "the MUX refused a downlink packet for session %d",
                       if_id)

    # -- downlink: from the gateway TUN towards the sessions

    def route(self, pkt: bytes) -> int | None:
        """The connected session that owns the destination of `pkt` (the IPv4 address, or the
        IPv6 /64 prefix or else the whole address); None for none or a packet too short.
        Once per downlink packet: the headers are sliced here, not parsed."""
        n = len(pkt)
        version = pkt[0] >> 4 if n else 0
        if version == 4 and n >= 20:
            return self._by_v4.get(pkt[16:20])
        if version == 6 and n >= 40:
            sid = self._by_v6.get(pkt[24:32])
            return self._by_v6.get(pkt[24:40]) if sid is None else sid
        return None

    def _on_readable(self) -> None:
        fd, bufs, view = self._fd, [self._buf], self._view
        for _ in range(READ_BUDGET):
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                break
            except OSError as exc:
                # Counted apart from the packet drops `counters` shows; logged as they are.
                self.drops("tun_read_errors", "TUN read failed: %s", exc)
                break
            packets = segment(view[:n])
            if packets is None:
                self.drops("drop_malformed", "dropped a TUN frame that does not parse")
                continue
            self.dl_gso_frames += len(packets) > 1
            for pkt in packets:
                self._route_down(pkt)

    def _route_down(self, pkt: bytes) -> None:
        n = len(pkt)
        sid = self.route(pkt)
        if sid is None:
            self.drops("drop_no_session", "dropped downlink packets for an address of no "
                       "connected session")
            return
        if self._shapers and sid in self._shapers:
            self._shape_down(sid, pkt)
            return
        downlink = self.downlink
        if downlink is not None and downlink(sid, pkt):
            self.dl_packets += 1
            self.dl_bytes += n
        else:
            self.drops("drop_downlink", "the MUX refused a downlink packet for session %d", sid)

    # -- shaping (the decisions are sim/shaper.py's; here the packets wait for them)

    def set_shape(self, session_id: int, *, delay_ms: float = 0.0, loss_percent: float = 0.0,
                  rate_mbit: float | None = None) -> None:
        """Shape what session `session_id` receives from now on (replacing its shaping so far;
        packets already held leave when they were due). ValueError for a session the modem
        does not have or a value out of range. Called from the running loop."""
        self._check_session(session_id)
        spec = ShapeSpec(delay_ms, loss_percent, rate_mbit)
        self._loop = self._loop or asyncio.get_running_loop()
        self._shapers[session_id] = Shaper(spec, random.Random(SHAPE_SEED + session_id))
        log.info("gateway: session %d shaped: delay %g ms, loss %g %%, rate %s", session_id,
                 spec.delay_ms, spec.loss_percent,
                 "unlimited" if spec.rate_mbit is None else f"{spec.rate_mbit:g} Mbit/s")

    def clear_shape(self, session_id: int) -> None:
        """No shaping of the session any more; packets it holds are sent now, in order."""
        self._check_session(session_id)
        if self._shapers.pop(session_id, None) is not None:
            log.info("gateway: session %d no longer shaped", session_id)
        timer = self._shape_timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        for _, pkt in self._held.pop(session_id, ()):
            self._send_down(session_id, pkt)

    def shapes(self) -> dict[int, dict[str, float | None]]:
        """session id -> its shaping as set (delay_ms, loss_percent, rate_mbit)."""
        return {sid: shaper.spec.as_dict() for sid, shaper in sorted(self._shapers.items())}

    def shape_counters(self) -> dict[int, dict[str, int]]:
        """session id -> packets its shaper passed, lost and dropped from a full queue."""
        return {sid: {"passed": s.passed, "lost": s.lost, "overflowed": s.overflowed}
                for sid, s in sorted(self._shapers.items())}

    def _check_session(self, session_id: int) -> None:
        if isinstance(session_id, bool) or not isinstance(session_id, int) \
                or not 0 <= session_id < self.config.max_sessions:
            raise ValueError(f"session {session_id!r}: the modem has sessions "
                             f"0..{self.config.max_sessions - 1}")

    def _shape_down(self, sid: int, pkt: bytes) -> None:
        loop = self._loop
        assert loop is not None  # set_shape set it
        now = loop.time()
        shaper = self._shapers[sid]
        overflowed = shaper.overflowed
        leave = shaper.admit(now, len(pkt))
        if leave is None:  # dropped as set: counted, never logged
            self.drops.count("drop_shaped_queue" if shaper.overflowed != overflowed
                             else "drop_shaped_loss")
            return
        held = self._held.get(sid)
        if not held and leave <= now:
            self._send_down(sid, pkt)
            return
        if held is None:
            held = self._held[sid] = deque()
        if held and held[-1][0] > leave:  # never overtake (a shape changed while held)
            leave = held[-1][0]
        held.append((leave, pkt))
        if len(held) == 1:
            self._shape_timers[sid] = loop.call_at(leave, self._release, sid)

    def _release(self, sid: int) -> None:
        self._shape_timers.pop(sid, None)
        held = self._held.get(sid)
        if not held or self._loop is None:
            return
        due = self._loop.time() + SHAPE_SLACK
        while held and held[0][0] <= due:
            self._send_down(sid, held.popleft()[1])
        if held:
            self._shape_timers[sid] = self._loop.call_at(held[0][0], self._release, sid)

    # -- the gateway TUN

    async def start(self) -> None:
        if self.mode == "echo":
            return
        from iosm_cuse.net.tun import Tun

        self._loop = asyncio.get_running_loop()
        tun = Tun.create(self.tun_name, mtu=self.config.mtu, txqueuelen=1000, offload=True)
        self._fd = tun.fd
        try:
            await asyncio.to_thread(self._configure)
        except BaseException:
            self._close_fd()
            raise
        self._loop.add_reader(self._fd, self._on_readable)
        log.info("gateway: %s up%s", self.tun_name,
                 f" in netns {self.netns}" if self.netns else "")

    def _configure(self) -> None:
        """Move the TUN, give it every session's gateway addresses, bring it up. pyroute2's
        sync API runs in a worker thread: never inside the running loop (pyroute2#1342)."""
        from pyroute2 import IPRoute, netns

        if self.netns is not None:
            if self.netns not in netns.listnetns():
                netns.create(self.netns)
                self._created_netns = True
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.tun_name)[0]
                ipr.link("set", index=idx, net_ns_fd=self.netns)
        with IPRoute(netns=self.netns) if self.netns else IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.tun_name)[0]
            for n in range(self.config.max_sessions):
                ip = self.config.session_ip(n)
                ipr.addr("add", index=idx, address=str(ip.ipv4_gateway),
                         prefixlen=ip.ipv4.network.prefixlen)
                ipr.addr("add", index=idx, address=str(ip.ipv6_gateway),
                         prefixlen=ip.ipv6.network.prefixlen, flags=0x02)  # IFA_F_NODAD
            ipr.link("set", index=idx, state="up")
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.link("set", index=lo[0], state="up")

    async def close(self) -> None:
        self._close_fd()
        if self._created_netns and self.netns is not None:
            from pyroute2 import netns

            with contextlib.suppress(OSError):
                await asyncio.to_thread(netns.remove, self.netns)
            self._created_netns = False

    def _close_fd(self) -> None:
        for timer in self._shape_timers.values():
            timer.cancel()
        self._shape_timers.clear()
        self._held.clear()
        if self._gro_timer is not None:
            self._gro_timer.cancel()
            self._gro_timer = None
        if self._fd >= 0:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._fd)
            os.close(self._fd)       # the non-persistent TUN goes with its fd
            self._fd = -1

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "netns": self.netns, "tun": self.tun_name
                if self.mode != "echo" else None, "sessions": sorted(self.sessions),
                "shapes": self.shapes(), "counters": self.counters}


def _parse_mode(mode: str) -> tuple[str, str | None]:
    """"echo" | "tun" | "netns:NAME" (the daemon's --gateway option)."""
    if mode in ("echo", "tun"):
        return mode, None
    if mode.startswith("netns:") and len(mode) > 6 and "/" not in mode:
        return "tun", mode[6:]
    raise ValueError(f"gateway mode {mode!r}: use echo, tun or netns:NAME")
