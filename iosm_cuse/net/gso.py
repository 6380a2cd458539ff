"""TCP segmentation and coalescing for TUN devices with IFF_VNET_HDR (sans-IO).

Why: a TUN fd has no recvmmsg/sendmmsg, so without offloads every 1500-byte packet costs one
syscall and one pass of the interpreter on each side of a Python bridge (about 1 Gbit/s: the
README's "Figures"; docs/tun.md §1). With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6) the
kernel hands over up to 64 KiB TCP super-packets and accepts them back, as wireguard-go does
(docs/tun.md §2).

Neither the MUX nor a modem carries super-packets: every MUX datagram must be an IP packet the
link's MTU allows, with complete checksums, exactly what the kernel's software GSO gives a
driver without NETIF_F_TSO (the IOSM netdev has none). So:

- `segment(frame)` turns one frame read from an offloading TUN (virtio_net_hdr + packet) into
  MTU-sized IP packets with correct IP and TCP checksums (or completes the checksum of a
  single packet the kernel left partial);
- `coalesce(packets)` does the reverse for writes (GRO): runs of in-order TCP segments of one
  flow become one super-packet frame. Only segments whose checksums verify are merged, so a
  corrupted segment still reaches the receiving stack as it is, and is dropped there.

Every input is untrusted: a frame that does not parse is reported as `None`, never raised.
The one's-complement sums of many segments are computed at once with numpy (`np.add.reduceat`
over big-endian 16-bit words): about 0.5 µs per 1448-byte segment, where pure Python needs
3 µs or more.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

VNET_HDR_LEN = 10
# struct virtio_net_hdr (legacy: host byte order; little-endian on every host we run on)
VNET = struct.Struct("<BBHHHH")     # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
PLAIN = bytes(VNET_HDR_LEN)         # the header of a packet written as it is
IPPROTO_TCP = 6
MAX_SUPER = 65535                   # IPv4 total length; also what the TUN accepts at once

_H = struct.Struct("!H")
_I = struct.Struct("!I")
_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_PSH, _TCP_ACK, _TCP_URG, _TCP_CWR = 1, 2, 4, 8, 16, 32, 128


def fold(total: int) -> int:
    """The one's-complement sum (16 bits) of an integer sum of 16-bit words; 0xFFFF for any
    nonzero multiple of 0xFFFF (the arithmetic works modulo 0xFFFF)."""
    s = total % 0xFFFF
    return s if s or not total else 0xFFFF


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`, as a big-endian 16-bit value: 0xFFFF for
    all-zero data, whose one's-complement sum is +0."""
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\0"
    return 0xFFFF ^ fold(int.from_bytes(raw, "big"))


def complement(total: int) -> int:
    """The checksum field for a word sum of data that is not all zeros (TCP, IPv4 headers): the
    one's complement of its one's-complement sum, 0x0000 (not the equivalent 0xFFFF) when that
    sum is 0xFFFF, as RFC 1071 and the kernel write it."""
    return (0xFFFF - total % 0xFFFF) % 0xFFFF


def word_sum(data: bytes | bytearray | memoryview) -> int:
    """Sum of the big-endian 16-bit words of `data` (odd length: zero-padded), unfolded but
    reduced modulo 0xFFFF, which keeps the one's-complement value."""
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\0"
    return int.from_bytes(raw, "big") % 0xFFFF


def segment_sums(payload: bytes | memoryview, size: int) -> list[int]:
    """`word_sum` of each `size`-byte piece of `payload` (the last may be shorter)."""
    n = len(payload)
    if n == 0:
        return []
    if size & 1:                      # odd pieces are not word-aligned: one at a time
        return [word_sum(payload[i:i + size]) for i in range(0, n, size)]
    buf = bytes(payload) + b"\0" if n & 1 else payload
    words = np.frombuffer(buf, dtype="<u2")
    sums = np.add.reduceat(words, np.arange(0, len(words), size // 2), dtype=np.uint32)
    return [int(s) for s in _from_le(sums)]


def _from_le(sums: np.ndarray) -> np.ndarray:
    """Sums of little-endian words to sums of big-endian ones, modulo 0xFFFF: swapping the bytes
    of a one's-complement sum is multiplying it by 256 (RFC 1071 §2(B)), and native-order words
    are summed without a byte swap."""
    return (sums.astype(np.int64) % 0xFFFF * 256) % 0xFFFF


def _pseudo_sum(pkt: bytes | bytearray | memoryview, v6: bool, length: int) -> int:
    """Word sum of the TCP pseudo-header of `pkt` for a TCP length of `length`."""
    addrs = pkt[8:40] if v6 else pkt[12:20]
    return int.from_bytes(addrs, "big") % 0xFFFF + IPPROTO_TCP + length


def _ipv4_header_checksum(hdr: bytearray, ihl: int) -> None:
    hdr[10:12] = b"\0\0"
    _H.pack_into(hdr, 10, complement(word_sum(hdr[:ihl])))


class _Tcp:
    """Where the IP and TCP headers of a TCP/IP packet are, or `ok` False if it is not one this
    module handles (IPv4 without fragmentation; IPv6 with TCP as the first next header)."""

    __slots__ = ("ihl", "ok", "thl", "v6")

    def __init__(self, pkt: bytes | memoryview) -> None:
        self.ok = False
        self.v6 = False
        self.ihl = self.thl = 0
        n = len(pkt)
        if n < 40:
            return
        version = pkt[0] >> 4
        if version == 4:
            ihl = (pkt[0] & 0x0F) * 4
            if ihl < 20 or pkt[9] != IPPROTO_TCP or _H.unpack_from(pkt, 6)[0] & 0x3FFF:
                return
        elif version == 6 and n >= 60 and pkt[6] == IPPROTO_TCP:
            ihl, self.v6 = 40, True
        else:
            return
        if n < ihl + 20:
            return
        thl = (pkt[ihl + 12] >> 4) * 4
        if thl < 20 or n < ihl + thl:
            return
        ip_len = 40 + _H.unpack_from(pkt, 4)[0] if self.v6 else _H.unpack_from(pkt, 2)[0]
        if ip_len != n:
            return                      # trailing bytes or a truncated packet
        self.ihl, self.thl, self.ok = ihl, thl, True


def segment(frame: bytes | memoryview) -> list[bytes] | None:
    """The IP packets one TUN read with a virtio_net_hdr stands for, or None if it is malformed
    or of a GSO kind this module does not offer to the kernel (UDP, or an odd header)."""
    if len(frame) < VNET_HDR_LEN + 1:
        return None
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(frame)
    pkt = memoryview(frame)[VNET_HDR_LEN:]
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if not flags & NEEDS_CSUM:
            return [bytes(pkt)]
        done = _complete_checksum(pkt, csum_start, csum_offset)
        return None if done is None else [done]
    if kind not in (GSO_TCPV4, GSO_TCPV6) or gso_size == 0:
        return None
    return _split_tcp(pkt, gso_size, kind == GSO_TCPV6)


def _complete_checksum(pkt: memoryview, start: int, offset: int) -> bytes | None:
    """Finish a CHECKSUM_PARTIAL packet: the field holds the pseudo-header sum; the checksum
    covers everything from `start` on."""
    at = start + offset
    if start >= len(pkt) or at + 2 > len(pkt):
        return None
    out = bytearray(pkt)
    # a sum of 0xFFFF is written 0xFFFF: UDP's "no checksum" zero must not appear (RFC 768),
    # and for TCP it is the other valid form of the same checksum
    s = 0xFFFF - fold(word_sum(out[start:]))
    _H.pack_into(out, at, s)
    return bytes(out)


def _split_tcp(pkt: memoryview, mss: int, v6: bool) -> list[bytes] | None:
    tcp = _Tcp(pkt)
    if not tcp.ok or tcp.v6 != v6:
        return None
    ihl, thl = tcp.ihl, tcp.thl
    hl = ihl + thl
    payload = pkt[hl:]
    if not mss & 1 and len(payload) > 2 * mss:
        return _split_tcp_vector(pkt, ihl, thl, mss, v6)
    sums = segment_sums(payload, mss)
    hdr = bytearray(pkt[:hl])
    seq0 = _I.unpack_from(hdr, ihl + 4)[0]
    flags0 = hdr[ihl + 13]
    ip_id = 0 if v6 else _H.unpack_from(hdr, 4)[0]
    pseudo_addr = _pseudo_sum(hdr, v6, 0)
    out: list[bytes] = []
    last = len(sums) - 1
    if last < 0:                        # a bare header (a GSO frame should carry data)
        sums, last = [0], 0
    for i, psum in enumerate(sums):
        off = i * mss
        n = min(mss, len(payload) - off)
        # CWR only on the first segment; FIN and PSH only on the last (as tcp_gso_segment)
        f = flags0 if i == 0 else flags0 & ~_TCP_CWR
        hdr[ihl + 13] = f if i == last else f & ~(_TCP_FIN | _TCP_PSH)
        _I.pack_into(hdr, ihl + 4, (seq0 + off) & 0xFFFFFFFF)
        if v6:
            _H.pack_into(hdr, 4, thl + n)
        else:
            _H.pack_into(hdr, 2, hl + n)
            _H.pack_into(hdr, 4, (ip_id + i) & 0xFFFF)
            _ipv4_header_checksum(hdr, ihl)
        hdr[ihl + 16:ihl + 18] = b"\0\0"
        total = pseudo_addr + thl + n + word_sum(hdr[ihl:hl]) + psum
        _H.pack_into(hdr, ihl + 16, complement(total))
        out.append(bytes(hdr) + payload[off:off + n])
    return out


def _be(values: np.ndarray, width: int) -> np.ndarray:
    """Big-endian bytes of each value: shape (n, width)."""
    return values.astype(">u2" if width == 2 else ">u4").view(np.uint8).reshape(-1, width)


def _split_tcp_vector(pkt: memoryview, ihl: int, thl: int, mss: int, v6: bool) -> list[bytes]:
    """`_split_tcp` for many segments at once: every segment is a row of one numpy array, and
    the per-segment fields and checksums are computed as columns (the same arithmetic as the
    loop: sums of the constant header words, plus the words that change)."""
    hl = ihl + thl
    plen = len(pkt) - hl
    nseg = -(-plen // mss)
    width = hl + mss
    rows = np.zeros((nseg, width), np.uint8)
    rows[:, :hl] = np.frombuffer(pkt[:hl], np.uint8)
    payload = np.frombuffer(pkt, np.uint8, offset=hl)
    rows[:-1, hl:] = payload[:(nseg - 1) * mss].reshape(nseg - 1, mss)
    rows[-1, hl:hl + plen - (nseg - 1) * mss] = payload[(nseg - 1) * mss:]
    lens = np.full(nseg, mss, np.int64)
    lens[-1] = plen - (nseg - 1) * mss
    payload_sums = _from_le(rows[:, hl:].view("<u2").sum(axis=1, dtype=np.uint32))
    hdr = bytearray(pkt[:hl])
    seq0 = _I.unpack_from(hdr, ihl + 4)[0]
    flags0 = hdr[ihl + 13]
    hdr[ihl + 4:ihl + 8] = bytes(4)      # seq, flags and checksum are added per segment
    hdr[ihl + 13] = 0
    hdr[ihl + 16:ihl + 18] = b"\0\0"
    seq = (seq0 + np.arange(nseg, dtype=np.int64) * mss) & 0xFFFFFFFF
    flags = np.full(nseg, flags0 & ~(_TCP_CWR | _TCP_FIN | _TCP_PSH), np.int64)
    flags[0] |= flags0 & _TCP_CWR
    flags[-1] |= flags0 & (_TCP_FIN | _TCP_PSH)
    total = (_pseudo_sum(hdr, v6, thl) + word_sum(hdr[ihl:hl]) + lens + (seq >> 16) +
             (seq & 0xFFFF) + flags + payload_sums)
    rows[:, ihl + 4:ihl + 8] = _be(seq, 4)
    rows[:, ihl + 13] = flags
    rows[:, ihl + 16:ihl + 18] = _be((0xFFFF - total % 0xFFFF) % 0xFFFF, 2)
    if v6:
        rows[:, 4:6] = _be(thl + lens, 2)
    else:
        ip_id0 = _H.unpack_from(hdr, 4)[0]
        hdr[2:6] = bytes(4)
        hdr[10:12] = b"\0\0"
        ids = (ip_id0 + np.arange(nseg, dtype=np.int64)) & 0xFFFF
        ip_total = word_sum(hdr[:ihl]) + hl + lens + ids
        rows[:, 2:4] = _be(hl + lens, 2)
        rows[:, 4:6] = _be(ids, 2)
        rows[:, 10:12] = _be((0xFFFF - ip_total % 0xFFFF) % 0xFFFF, 2)
    raw = rows.tobytes()
    return [raw[i * width:i * width + hl + n] for i, n in enumerate(lens.tolist())]


# ---- coalescing (the write side) --------------------------------------------------------------


def _tcp_header_end(pkt: bytes) -> tuple[int, int]:
    """(IP header length, IP + TCP header length) of a TCP segment `coalesce` may merge, or
    (0, 0): IPv4 without options or fragmentation, or IPv6 with TCP right after its header;
    the IP length field matching the packet's length."""
    n = len(pkt)
    if n < 40:
        return 0, 0
    b0 = pkt[0]
    if b0 == 0x45:
        if pkt[9] != IPPROTO_TCP or pkt[6] & 0x3F or pkt[7] or (pkt[2] << 8 | pkt[3]) != n:
            return 0, 0
        ihl = 20
    elif b0 >> 4 == 6 and n >= 60 and pkt[6] == IPPROTO_TCP and (pkt[4] << 8 | pkt[5]) + 40 == n:
        ihl = 40
    else:
        return 0, 0
    hl = ihl + (pkt[ihl + 12] >> 4) * 4
    return (ihl, hl) if ihl + 20 <= hl <= n else (0, 0)


def _same_flow(pkt: bytes, first: bytes, ihl: int, hl: int) -> bool:
    """Whether `pkt`, of `first`'s addresses and ports and header lengths, may merge with it
    as GRO means it: the same IP fields that are not per-packet (v4: TOS, DF, TTL; v6: traffic
    class, flow label, hop limit), the same ack number and flags apart from PSH, and every TCP
    option byte equal."""
    if ihl == 20:
        if pkt[1] != first[1] or pkt[6] != first[6] or pkt[8] != first[8]:
            return False
    elif pkt[7] != first[7] or pkt[0:4] != first[0:4]:
        return False
    return (pkt[ihl + 8:ihl + 13] == first[ihl + 8:ihl + 13] and
            (pkt[ihl + 13] ^ first[ihl + 13]) & ~_TCP_PSH == 0 and
            pkt[ihl + 20:hl] == first[ihl + 20:hl])


_NO_MERGE = _TCP_SYN | _TCP_FIN | _TCP_RST | _TCP_URG


class _Run:
    """In-order segments of one flow waiting to be merged."""

    __slots__ = ("first", "hl", "ihl", "mss", "next_seq", "packets", "size")

    def __init__(self, pkt: bytes, ihl: int, hl: int, seq: int, plen: int) -> None:
        self.packets = [pkt]
        self.first, self.ihl, self.hl, self.mss, self.size = pkt, ihl, hl, plen, plen
        self.next_seq = (seq + plen) & 0xFFFFFFFF


def coalesce(packets: Iterable[bytes]) -> list[bytes]:
    """Frames (virtio_net_hdr + packet) to write for `packets`: a `Coalescer` fed once and
    emptied (see there)."""
    gro = Coalescer()
    return gro.push(packets) + gro.flush()


class Coalescer:
    """GRO for TUN writes. Runs of in-order TCP segments of one flow whose checksums verify
    become one GSO super-packet; anything else is written as it is. Like the kernel's GRO,
    several flows are coalesced at once (the MUX interleaves the sessions' packets): each flow
    keeps its order, different flows may pass each other.

    `push(packets)` returns the frames ready now: packets that cannot merge, and runs that
    ended (a short segment, PSH, a segment that does not continue the run, or no room for
    another segment under 64 KiB). Runs still open are held for the next push, so a run can
    grow across the writer's batches (as the kernel's gro_flush_timeout lets it across NAPI
    polls); `flush()` returns them, in the order they started. The writer bounds how long.

    Each batch is planned first (plain packets, and runs at the place they end), then the
    checksums of every packet of every ended run are verified in one numpy pass, then the
    frames are made."""

    def __init__(self) -> None:
        self._runs: dict[bytes, _Run] = {}     # open runs by flow (addresses and ports)

    @property
    def held(self) -> int:
        """Packets in open runs."""
        return sum(len(run.packets) for run in self._runs.values())

    def flush(self) -> list[bytes]:
        plan: list[bytes | _Run] = list(self._runs.values())
        self._runs.clear()
        return _frames(plan)

    def push(self, packets: Iterable[bytes]) -> list[bytes]:
        plan: list[bytes | _Run] = []
        runs = self._runs
        for pkt in packets:
            ihl, hl = _tcp_header_end(pkt)
            if not ihl:
                plan.append(pkt)
                continue
            flow = pkt[8:44] if ihl == 40 else pkt[12:24]
            run = runs.get(flow)
            plen = len(pkt) - hl
            if plen <= 0 or pkt[ihl + 13] & _NO_MERGE:
                if run is not None:
                    plan.append(runs.pop(flow))
                plan.append(pkt)
                continue
            seq = int.from_bytes(pkt[ihl + 4:ihl + 8], "big")
            if run is not None and seq == run.next_seq and plen <= run.mss and \
                    hl == run.hl and hl + run.size + plen <= MAX_SUPER and \
                    _same_flow(pkt, run.first, ihl, hl):
                run.packets.append(pkt)
                run.size += plen
                run.next_seq = (seq + plen) & 0xFFFFFFFF
            else:
                if run is not None:
                    plan.append(runs.pop(flow))
                run = runs[flow] = _Run(pkt, ihl, hl, seq, plen)
            if plen < run.mss or pkt[ihl + 13] & _TCP_PSH or \
                    hl + run.size + run.mss > MAX_SUPER:
                plan.append(runs.pop(flow))     # the run cannot grow any more
        return _frames(plan)


def _frames(plan: list[bytes | _Run]) -> list[bytes]:
    merging = [item for item in plan if isinstance(item, _Run) and len(item.packets) > 1]
    ok = _verify(merging)
    out: list[bytes] = []
    at = 0
    for item in plan:
        if isinstance(item, bytes):
            out.append(PLAIN + item)
            continue
        pkts = item.packets
        n = len(pkts)
        if n > 1:
            good = ok.index(False, at, at + n) - at if False in ok[at:at + n] else n
            at += n
            if good > 1:
                out.append(_merge(item, good))
                pkts = pkts[good:]
        out.extend([PLAIN + p for p in pkts])
    return out


def _verify(runs: list[_Run]) -> list[bool]:
    """For every packet of `runs`, in order: whether its TCP checksum (and IPv4 header checksum)
    is right. All packets are joined into one buffer and summed in one reduceat, split at each
    packet's start and TCP header. Every packet of a run but the last has the first's width,
    so a run's split points are one range (an odd width pads every packet to a word). The
    sums stay in little-endian word order; the pseudo-header sums are brought to it instead
    (x 256, its own inverse modulo 0xFFFF)."""
    pieces: list[bytes] = []
    starts: list[int] = []
    halves: list[int] = []          # IP header length in words, per packet
    pseudo: list[int] = []
    at = 0
    for run in runs:
        pkts, ihl = run.packets, run.ihl
        k, width, last = len(pkts), len(pkts[0]), len(pkts[-1])
        if width & 1:
            for p in pkts[:-1]:
                pieces += (p, b"\0")
            pieces.append(pkts[-1])
            width += 1
        else:
            pieces += pkts
        if last & 1:
            pieces.append(b"\0")
        starts += range(at, at + k * (width // 2), width // 2)
        halves += [ihl // 2] * k
        addr = _pseudo_sum(run.first, ihl == 40, 0)
        pseudo += [addr + len(pkts[0]) - ihl] * (k - 1)
        pseudo.append(addr + last - ihl)
        at += (k - 1) * (width // 2) + (last + 1) // 2
    if not starts:
        return []
    first = np.array(starts, np.int64)
    header = np.array(halves, np.int64)
    bounds = np.empty(2 * len(starts), np.int64)
    bounds[0::2], bounds[1::2] = first, first + header
    words = np.frombuffer(b"".join(pieces), "<u2")
    sums = np.add.reduceat(words, bounds, dtype=np.uint32).astype(np.int64)
    tcp_ok = (sums[1::2] + np.array(pseudo, np.int64) * 256) % 0xFFFF == 0
    ip_ok = (sums[0::2] % 0xFFFF == 0) | (header == 20)
    result: list[bool] = (tcp_ok & ip_ok).tolist()
    return result


def _merge(run: _Run, good: int) -> bytes:
    """One super-packet of the first `good` segments of `run`: the first one's headers (PSH
    from the last), all their payload; the TCP checksum field holds the pseudo-header sum, as
    CHECKSUM_PARTIAL wants."""
    ihl, hl, first = run.ihl, run.hl, run.first
    body = b"".join([p[hl:] for p in run.packets[:good]])
    v6 = ihl == 40
    thl = hl - ihl
    hdr = bytearray(first[:hl])
    hdr[ihl + 13] |= run.packets[good - 1][ihl + 13] & _TCP_PSH
    if v6:
        _H.pack_into(hdr, 4, thl + len(body))
    else:
        _H.pack_into(hdr, 2, hl + len(body))
        _ipv4_header_checksum(hdr, ihl)
    _H.pack_into(hdr, ihl + 16, fold(_pseudo_sum(hdr, v6, thl + len(body))))
    vnet = VNET.pack(NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hl, run.mss, ihl, 16)
    return vnet + bytes(hdr) + body
