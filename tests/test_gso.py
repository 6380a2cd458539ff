"""Property and fuzz tests of iosm_cuse.net.gso (TUN virtio_net_hdr segmentation/coalescing).

Every expectation comes from reference code written here, independent of gso's helpers: an
RFC 1071 checksum over array('H') words, packets built and parsed with struct, a reference
segmenter that does what Linux's tcp_gso_segment does (CWR only on the first segment, FIN and
PSH only on the last, seq advancing by payload, IPv4 id +1 per segment, fresh IPv4 header and
TCP checksums), and a reference coalescer that applies the contract of `coalesce` literally:
multi-flow GRO, one pending run per flow (addresses and ports), each flow in its order, the
exact output frames and their order compared byte for byte (`ref_plan`, `ref_coalesce`).
"""

from __future__ import annotations

import random
import struct
import sys
from array import array
from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iosm_cuse.net.gso import (
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    PLAIN,
    VNET,
    VNET_HDR_LEN,
    Coalescer,
    coalesce,
    segment,
)
from iosm_cuse.net.gso import checksum as gso_checksum

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
TS_OPT = b"\x01\x01\x08\x0a" + struct.pack("!II", 0x01020304, 0xA0B0C0D0)   # NOP NOP TS
SACK_OPT = b"\x01\x01\x05\x0a" + struct.pack("!II", 5000, 6000)             # NOP NOP SACK
TCP_OPTS = [b"", TS_OPT, TS_OPT + SACK_OPT, b"\x02\x04\x05\xb4"]
MAX_IP = 65535



def cfg(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- reference arithmetic (RFC 1071) ----------------------------------------------------------


def ones_sum(data: bytes) -> int:
    """The folded one's-complement sum of the big-endian 16-bit words of `data` (RFC 1071)."""
    if len(data) & 1:
        data += b"\0"
    words = array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    s = sum(words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


# ---- reference packet building and parsing ----------------------------------------------------


def ipv4(src: bytes, dst: bytes, proto: int, body: bytes, *, ident: int = 0, ttl: int = 64,
         tos: int = 0, df: bool = True, frag: int = 0, opts: bytes = b"") -> bytes:
    ihl = 20 + len(opts)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + len(body), ident,
                      (0x4000 if df else 0) | frag, ttl, proto, 0, src, dst) + opts
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + body


def ipv6(src: bytes, dst: bytes, nh: int, body: bytes, *, hop: int = 64, flow: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000 | flow, len(body), nh, hop, src, dst) + body


def tcp_seg(src: bytes, dst: bytes, *, sport: int = 40000, dport: int = 443, seq: int = 0,
            ack: int = 0, flags: int = ACK, payload: bytes = b"", opts: bytes = b"",
            window: int = 5000, urg: int = 0, csum: int | None = None) -> bytes:
    thl = 20 + len(opts)
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, window, 0,
                      urg) + opts
    seg = hdr + payload
    if csum is None:
        csum = checksum(pseudo(src, dst, TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def udp_dgram(src: bytes, dst: bytes, payload: bytes, *, csum: int | None = None) -> bytes:
    d = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    if csum is None:
        csum = checksum(pseudo(src, dst, UDP, len(d)) + d) or 0xFFFF
    return d[:6] + struct.pack("!H", csum) + d[8:]


@dataclass(frozen=True)
class Addr:
    v6: bool
    src: bytes
    dst: bytes


A4 = Addr(False, bytes([192, 168, 7, 2]), bytes([93, 184, 216, 34]))
B4 = Addr(False, bytes([10, 1, 2, 3]), bytes([10, 9, 8, 7]))
A6 = Addr(True, bytes.fromhex("20010db8000000000000000000000001"),
          bytes.fromhex("2a001450400100000000000000000abc"))


def tcp_packet(a: Addr, *, ident: int = 0, ip_opts: bytes = b"", tos: int = 0, hop: int = 64,
               **kw: object) -> bytes:
    seg = tcp_seg(a.src, a.dst, **kw)  # type: ignore[arg-type]
    if a.v6:
        return ipv6(a.src, a.dst, TCP, seg, hop=hop)
    return ipv4(a.src, a.dst, TCP, seg, ident=ident, opts=ip_opts, tos=tos, ttl=hop)


@dataclass
class Tcp:
    v6: bool
    ihl: int
    thl: int
    src: bytes
    dst: bytes
    ip_hdr: bytes
    tcp_hdr: bytes
    payload: bytes
    seq: int
    ack: int
    flags: int
    ident: int

    @property
    def hl(self) -> int:
        return self.ihl + self.thl


def parse_tcp(pkt: bytes) -> Tcp | None:
    """A well-formed TCP/IP packet (IPv4 unfragmented, IPv6 with TCP as next header, lengths
    matching), or None."""
    if len(pkt) < 20:
        return None
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        if (ihl < 20 or len(pkt) < ihl or pkt[9] != TCP
                or struct.unpack_from("!H", pkt, 2)[0] != len(pkt)
                or struct.unpack_from("!H", pkt, 6)[0] & 0x3FFF):
            return None
        src, dst, ident = pkt[12:16], pkt[16:20], struct.unpack_from("!H", pkt, 4)[0]
        v6 = False
    elif pkt[0] >> 4 == 6:
        ihl = 40
        if len(pkt) < 40 or pkt[6] != TCP or struct.unpack_from("!H", pkt, 4)[0] + 40 != len(pkt):
            return None
        src, dst, ident, v6 = pkt[8:24], pkt[24:40], 0, True
    else:
        return None
    if len(pkt) < ihl + 20:
        return None
    thl = (pkt[ihl + 12] >> 4) * 4
    if thl < 20 or len(pkt) < ihl + thl:
        return None
    seq, ack = struct.unpack_from("!II", pkt, ihl + 4)
    return Tcp(v6, ihl, thl, src, dst, pkt[:ihl], pkt[ihl:ihl + thl], pkt[ihl + thl:], seq, ack,
               pkt[ihl + 13], ident)


def tcp_verifies(pkt: bytes) -> bool:
    """IPv4 header checksum (if v4) and TCP checksum both correct."""
    p = parse_tcp(pkt)
    assert p is not None
    if not p.v6 and ones_sum(p.ip_hdr) != 0xFFFF:
        return False
    seg = pkt[p.ihl:]
    return ones_sum(pseudo(p.src, p.dst, TCP, len(seg)) + seg) == 0xFFFF


def ref_segment(pkt: bytes, mss: int) -> list[bytes]:
    """What Linux's tcp_gso_segment (with inet/ipv6 gso_segment) makes of `pkt` for `mss`."""
    p = parse_tcp(pkt)
    assert p is not None
    n = max(1, -(-len(p.payload) // mss))
    out = []
    for i in range(n):
        chunk = p.payload[i * mss:(i + 1) * mss]
        flags = p.flags
        if i > 0:
            flags &= ~CWR
        if i < n - 1:
            flags &= ~(FIN | PSH)
        th = bytearray(p.tcp_hdr)
        struct.pack_into("!I", th, 4, (p.seq + i * mss) & 0xFFFFFFFF)
        th[13] = flags
        th[16:18] = b"\0\0"
        struct.pack_into("!H", th, 16, checksum(
            pseudo(p.src, p.dst, TCP, len(th) + len(chunk)) + bytes(th) + chunk))
        ip = bytearray(p.ip_hdr)
        if p.v6:
            struct.pack_into("!H", ip, 4, len(th) + len(chunk))
        else:
            struct.pack_into("!HH", ip, 2, p.hl + len(chunk), (p.ident + i) & 0xFFFF)
            ip[10:12] = b"\0\0"
            struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
        out.append(bytes(ip) + bytes(th) + chunk)
    return out


def vnet(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def gso_frame(pkt: bytes, mss: int) -> bytes:
    p = parse_tcp(pkt)
    assert p is not None
    return vnet(NEEDS_CSUM, GSO_TCPV6 if p.v6 else GSO_TCPV4, p.hl, mss, p.ihl, 16) + pkt


def check_gso_output(frame: bytes) -> tuple[bytes, int]:
    """Check one GSO frame from `coalesce` against the contract; its packet and gso_size."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from(
        "<BBHHHH", frame)
    pkt = frame[VNET_HDR_LEN:]
    p = parse_tcp(pkt)
    assert p is not None, "a GSO frame must hold a well-formed TCP packet"
    assert flags == NEEDS_CSUM
    assert gso_type == (GSO_TCPV6 if p.v6 else GSO_TCPV4)
    assert (hdr_len, csum_start, csum_offset) == (p.hl, p.ihl, 16)
    assert 0 < gso_size < len(p.payload)
    assert len(pkt) <= MAX_IP
    if not p.v6:
        assert ones_sum(p.ip_hdr) == 0xFFFF, "IPv4 header checksum of a GSO frame"
    # the TCP checksum field holds the folded pseudo-header sum (CHECKSUM_PARTIAL), uncomplemented
    field = struct.unpack_from("!H", pkt, p.ihl + 16)[0]
    assert field == ones_sum(pseudo(p.src, p.dst, TCP, len(pkt) - p.ihl))
    return pkt, gso_size


def expand(frames: list[bytes]) -> list[bytes]:
    """The packets the kernel makes of `frames` written to the TUN (reference segmenter)."""
    out: list[bytes] = []
    for f in frames:
        assert len(f) >= VNET_HDR_LEN
        if f[:VNET_HDR_LEN] == PLAIN:
            out.append(f[VNET_HDR_LEN:])
        else:
            pkt, mss = check_gso_output(f)
            out.extend(ref_segment(pkt, mss))
    return out


# ---- reference coalescer (the multi-flow GRO contract of `coalesce`) ---------------------------


def candidate(pkt: bytes) -> Tcp | None:
    """A packet `coalesce` may merge: IPv4 with IHL 5 (unfragmented, lengths matching) or IPv6
    with TCP as next header; anything else is written plain at once."""
    p = parse_tcp(pkt)
    if p is None or (not p.v6 and p.ihl != 20):
        return None
    return p


def flow_of(pkt: bytes) -> tuple[object, ...] | None:
    """The flow of a merge candidate (addresses and ports); None for all other packets, which
    keep their order among themselves."""
    p = candidate(pkt)
    return None if p is None else (p.v6, p.src, p.dst, p.tcp_hdr[:4])


def per_flow(pkts: list[bytes]) -> dict[object, list[bytes]]:
    out: dict[object, list[bytes]] = {}
    for pkt in pkts:
        out.setdefault(flow_of(pkt), []).append(pkt)
    return out


def flow_attrs(p: Tcp, pkt: bytes) -> tuple[object, ...]:
    """What must equal the run's first packet: v4 TOS, the DF/fragment byte, TTL; v6 version,
    traffic class and flow label, hop limit; the ack number, the data offset byte (with its
    reserved/AE bits), the flags apart from PSH and every TCP option byte."""
    ip = (pkt[0:4], pkt[7]) if p.v6 else (pkt[1], pkt[6], pkt[8])
    return (ip, p.ack, p.tcp_hdr[12], p.flags & ~PSH, p.tcp_hdr[20:])


@dataclass
class RefRun:
    flow: tuple[object, ...]
    attrs: tuple[object, ...]
    hl: int
    mss: int
    size: int
    next_seq: int
    idx: list[int]


def ref_plan(pkts: list[bytes]) -> list[list[int]]:
    """The input indices each output frame of `coalesce` stands for, in output order ([i]: the
    packet written plain; two or more: one GSO frame), by the contract applied literally."""
    plan: list[list[int]] = []
    pending: list[RefRun] = []          # the open runs, in the order they were started

    def end(run: RefRun) -> None:
        pending.remove(run)
        good = 0
        while good < len(run.idx) and tcp_verifies(pkts[run.idx[good]]):
            good += 1
        if good >= 2:
            plan.append(run.idx[:good])
        else:
            good = 0
        plan.extend([i] for i in run.idx[good:])

    for i, pkt in enumerate(pkts):
        p = candidate(pkt)
        if p is None:
            plan.append([i])
            continue
        flow = flow_of(pkt)
        assert flow is not None
        run = next((r for r in pending if r.flow == flow), None)
        if not p.payload or p.flags & (SYN | FIN | RST | URG):
            if run is not None:
                end(run)
            plan.append([i])
            continue
        plen, attrs = len(p.payload), flow_attrs(p, pkt)
        if (run is not None and p.seq == run.next_seq and plen <= run.mss and p.hl == run.hl
                and p.hl + run.size + plen <= MAX_IP and attrs == run.attrs):
            run.idx.append(i)
            run.size += plen
        else:
            if run is not None:
                end(run)
            run = RefRun(flow, attrs, p.hl, plen, plen, 0, [i])
            pending.append(run)
        run.next_seq = (p.seq + plen) & 0xFFFFFFFF
        # a short segment or PSH ends a run, and so does a run with no room for another
        # segment of its size
        if plen < run.mss or p.flags & PSH or p.hl + run.size + run.mss > MAX_IP:
            end(run)
    while pending:
        end(pending[0])
    return plan


def ref_merge(run: list[bytes]) -> bytes:
    """The GSO frame for a run of verified segments: the first's headers with PSH from the last,
    the lengths (and IPv4 header checksum) of the whole, the TCP checksum field holding the
    pseudo-header sum (CHECKSUM_PARTIAL), gso_size the first's payload length."""
    ps = [candidate(s) for s in run]
    p = ps[0]
    assert p is not None and all(q is not None for q in ps)
    body = b"".join(q.payload for q in ps if q is not None)
    ip, th = bytearray(p.ip_hdr), bytearray(p.tcp_hdr)
    th[13] |= ps[-1].flags & PSH  # type: ignore[union-attr]
    struct.pack_into("!H", th, 16, ones_sum(pseudo(p.src, p.dst, TCP, p.thl + len(body))))
    if p.v6:
        struct.pack_into("!H", ip, 4, p.thl + len(body))
    else:
        struct.pack_into("!H", ip, 2, p.hl + len(body))
        ip[10:12] = b"\0\0"
        struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    return vnet(NEEDS_CSUM, GSO_TCPV6 if p.v6 else GSO_TCPV4, p.hl, len(p.payload), p.ihl,
                16) + bytes(ip) + bytes(th) + body


def ref_coalesce(pkts: list[bytes]) -> list[bytes]:
    """Exactly the frames `coalesce(pkts)` must return."""
    return [PLAIN + pkts[g[0]] if len(g) == 1 else ref_merge([pkts[i] for i in g])
            for g in ref_plan(pkts)]


def ref_groups(pkts: list[bytes]) -> list[int]:
    """How many input packets each output frame of `coalesce` stands for (1: written plain)."""
    return [len(g) for g in ref_plan(pkts)]


def check_nothing_lost(inputs: list[bytes], frames: list[bytes]) -> list[list[int]]:
    """Each plain frame is the next input of its flow (non-candidates: the next of those)
    unchanged; each GSO frame stands for the next k >= 2 inputs of its flow, verified, in
    sequence, whose payloads (in order) make its payload; every input is used once. Works for
    any input, even fuzzed. Returns the input indices of each frame (compare: `ref_plan`)."""
    queues: dict[object, deque[int]] = {}
    for i, pkt in enumerate(inputs):
        queues.setdefault(flow_of(pkt), deque()).append(i)
    plan: list[list[int]] = []
    for f in frames:
        assert isinstance(f, bytes) and len(f) >= VNET_HDR_LEN
        if f[:VNET_HDR_LEN] == PLAIN:
            q = queues.get(flow_of(f[VNET_HDR_LEN:]))
            assert q, "a plain frame with no input left in its flow"
            i = q.popleft()
            assert f[VNET_HDR_LEN:] == inputs[i], "plain frame not the next of its flow"
            plan.append([i])
            continue
        pkt, mss = check_gso_output(f)
        p = candidate(pkt)
        assert p is not None, "a GSO frame holds a merge candidate"
        q = queues.get(flow_of(pkt))
        got = b""
        group: list[int] = []
        while len(got) < len(p.payload):
            assert q, "a GSO frame with more payload than its flow's inputs"
            i = q.popleft()
            s = candidate(inputs[i])
            assert s is not None and s.payload and tcp_verifies(inputs[i])
            assert s.seq == (p.seq + len(got)) & 0xFFFFFFFF
            assert (s.ack, s.thl, s.tcp_hdr[20:]) == (p.ack, p.thl, p.tcp_hdr[20:])
            assert len(s.payload) == mss or len(got) + len(s.payload) == len(p.payload)
            got += s.payload
            group.append(i)
        assert len(group) >= 2 and got == p.payload
        plan.append(group)
    assert not any(queues.values()), "inputs lost"
    return plan


def no_ident(pkt: bytes) -> bytes:
    """`pkt` with the IPv4 id and header checksum zeroed (GSO numbers the ids from the first)."""
    p = candidate(pkt)
    if p is None or p.v6:
        return pkt
    return pkt[:4] + b"\0\0" + pkt[6:10] + b"\0\0" + pkt[12:]


def _ip_csum_zero(frame: bytes) -> bytes:
    """`frame`, but an IPv4 GSO frame's header checksum 0xFFFF read as 0x0000. Both are the
    one's-complement zero and verify (check_gso_output), and the kernel recomputes the header
    of every segment it makes of a GSO frame; gso writes 0xFFFF where RFC 1071 gives 0x0000
    (a header summing to a multiple of 0xFFFF: 1 in 65535)."""
    if frame[:VNET_HDR_LEN] != PLAIN and frame[VNET_HDR_LEN:VNET_HDR_LEN + 1] == b"\x45" \
            and frame[VNET_HDR_LEN + 10:VNET_HDR_LEN + 12] == b"\xff\xff":
        return frame[:VNET_HDR_LEN + 10] + b"\0\0" + frame[VNET_HDR_LEN + 12:]
    return frame


def check_coalesce(inputs: list[bytes], *, expanded: bool = True,
                   same_ids: bool = True) -> list[bytes]:
    """`coalesce(inputs)` against the contract: exactly the reference frames, in the reference
    order; nothing lost or duplicated; if `expanded`, each flow's packets, expanded by the
    kernel's segmenter, the same and in the same order (`same_ids`: IPv4 ids too, else those are
    ignored; fuzzed input need not survive the kernel's re-segmentation bit for bit)."""
    frames = coalesce(inputs)
    assert isinstance(frames, list)
    plan = check_nothing_lost(inputs, frames)
    assert plan == ref_plan(inputs)
    assert [_ip_csum_zero(f) for f in frames] == [_ip_csum_zero(f) for f in ref_coalesce(inputs)]
    if not expanded:
        return frames
    out = expand(frames)
    norm = (lambda x: x) if same_ids else no_ident
    assert sorted(map(norm, out)) == sorted(map(norm, inputs))
    got, want = per_flow(out), per_flow(inputs)
    assert got.keys() == want.keys()
    for k in want:
        assert [norm(x) for x in got[k]] == [norm(x) for x in want[k]], f"order of flow {k}"
    return frames


def frame_groups(inputs: list[bytes], frames: list[bytes]) -> list[int]:
    out = []
    for f in frames:
        if f[:VNET_HDR_LEN] == PLAIN:
            out.append(1)
        else:
            pkt, mss = check_gso_output(f)
            out.append(len(ref_segment(pkt, mss)))
    assert sum(out) == len(inputs)
    return out


def check_segments(pkt: bytes, mss: int, segs: list[bytes]) -> None:
    """The properties of a correct segmentation, checked one by one (clearer failures than a
    byte comparison with the reference)."""
    p = parse_tcp(pkt)
    assert p is not None
    assert all(isinstance(s, bytes) for s in segs)
    assert len(segs) == max(1, -(-len(p.payload) // mss))
    parsed = [parse_tcp(s) for s in segs]
    assert all(q is not None for q in parsed), "segment with wrong IP length or headers"
    qs = [q for q in parsed if q is not None]
    assert b"".join(q.payload for q in qs) == p.payload
    off = 0
    for i, (s, q) in enumerate(zip(segs, qs, strict=True)):
        assert len(s) <= p.hl + mss
        assert (q.ihl, q.thl, q.src, q.dst, q.ack) == (p.ihl, p.thl, p.src, p.dst, p.ack)
        assert q.tcp_hdr[20:] == p.tcp_hdr[20:], "TCP options copied"
        assert q.seq == (p.seq + off) & 0xFFFFFFFF
        off += len(q.payload)
        if not p.v6:
            assert q.ident == (p.ident + i) & 0xFFFF
        assert tcp_verifies(s), f"checksum of segment {i}"
        assert bool(q.flags & CWR) == bool(p.flags & CWR and i == 0)
        last = i == len(segs) - 1
        assert q.flags & (FIN | PSH) == (p.flags & (FIN | PSH) if last else 0)
        assert q.flags & ~(CWR | FIN | PSH) == p.flags & ~(CWR | FIN | PSH)


# ---- 1. segment: round trip against the reference ---------------------------------------------


def addr_strategy() -> st.SearchStrategy[Addr]:
    return st.one_of(
        st.tuples(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4)).map(
            lambda t: Addr(False, *t)),
        st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16)).map(
            lambda t: Addr(True, *t)))


def payload_len() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 3000), st.integers(0, 64000))


@cfg(120)
@given(a=addr_strategy(), n=payload_len(), seed=st.integers(0, 2**32 - 1),
       mss=st.integers(536, 1460), opts=st.sampled_from(TCP_OPTS), flags=st.integers(0, 255),
       seq=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 70000, 2**32 - 1)),
       ident=st.one_of(st.integers(0, 0xFFFF), st.just(0xFFFE)),
       in_csum=st.integers(0, 0xFFFF), ip_opts=st.sampled_from([b"", b"\x01\x01\x01\x00"]))
@example(a=A4, n=1460 * 3, seed=1, mss=1460, opts=TS_OPT, flags=ACK | PSH | FIN | CWR,
         seq=2**32 - 2000, ident=0xFFFF, in_csum=0, ip_opts=b"")
@example(a=A6, n=2 * 1001 + 1, seed=2, mss=1001, opts=b"", flags=ACK | PSH, seq=0, ident=0,
         in_csum=0xFFFF, ip_opts=b"")
@example(a=A4, n=1, seed=3, mss=537, opts=b"", flags=ACK, seq=5, ident=1, in_csum=1,
         ip_opts=b"")
@example(a=A6, n=0, seed=4, mss=536, opts=TS_OPT, flags=ACK | FIN, seq=5, ident=1, in_csum=1,
         ip_opts=b"")
def test_segment_matches_reference(a: Addr, n: int, seed: int, mss: int, opts: bytes, flags: int,
                                   seq: int, ident: int, in_csum: int, ip_opts: bytes) -> None:
    payload = random.Random(seed).randbytes(n)
    pkt = tcp_packet(a, ident=ident, ip_opts=ip_opts, seq=seq, ack=seed, flags=flags,
                     payload=payload, opts=opts, csum=in_csum)
    segs = segment(gso_frame(pkt, mss))
    assert segs is not None
    check_segments(pkt, mss, segs)
    assert segs == ref_segment(pkt, mss)


@cfg(30)
@given(a=addr_strategy(), n=st.integers(1, 20000), seed=st.integers(0, 2**32 - 1),
       mss=st.integers(536, 1460), flags=st.integers(0, 255))
def test_segment_accepts_memoryview_and_ecn_bit(a: Addr, n: int, seed: int, mss: int,
                                                flags: int) -> None:
    pkt = tcp_packet(a, seq=seed, flags=flags, payload=random.Random(seed).randbytes(n))
    frame = bytearray(gso_frame(pkt, mss))
    frame[1] |= 0x80                    # VIRTIO_NET_HDR_GSO_ECN: the same segmentation
    assert segment(memoryview(frame)) == ref_segment(pkt, mss)


def test_segment_plain_frame_unchanged() -> None:
    pkt = tcp_packet(A4, payload=b"x" * 100, csum=0x1234)       # even a wrong checksum
    assert segment(PLAIN + pkt) == [pkt]
    garbage = b"\x99" * 7
    assert segment(PLAIN + garbage) == [garbage]


# ---- 2. coalesce(segment(x)) ------------------------------------------------------------------


@cfg(60)
@given(a=addr_strategy(), n=st.integers(1, 64000), seed=st.integers(0, 2**32 - 1),
       mss=st.integers(536, 1460), opts=st.sampled_from(TCP_OPTS),
       extra=st.sets(st.sampled_from([PSH, ECE, CWR, FIN])),
       seq=st.integers(0, 2**32 - 1), ident=st.integers(0, 0xFFFF))
@example(a=A4, n=1460 * 44, seed=0, mss=1460, opts=TS_OPT, extra=set(), seq=7, ident=3)
@example(a=A6, n=1001 * 5 - 1, seed=0, mss=1001, opts=b"", extra={PSH}, seq=7, ident=3)
def test_coalesce_undoes_segment(a: Addr, n: int, seed: int, mss: int, opts: bytes,
                                 extra: set[int], seq: int, ident: int) -> None:
    flags = ACK | sum(extra)
    pkt = tcp_packet(a, ident=ident, seq=seq, ack=99, flags=flags,
                     payload=random.Random(seed).randbytes(n), opts=opts)
    segs = segment(gso_frame(pkt, mss))
    assert segs == ref_segment(pkt, mss)
    frames = check_coalesce(segs)
    assert expand(frames) == segs
    # what must merge: everything but a CWR first and a FIN last segment
    head = 1 if flags & CWR and len(segs) > 1 else 0
    tail = 1 if flags & FIN else 0
    middle = len(segs) - head - tail
    want = [1] * head + ([middle] if middle >= 2 else [1] * middle) + [1] * tail
    assert frame_groups(segs, frames) == want
    if middle >= 2:
        merged = frames[head]
        p = parse_tcp(merged[VNET_HDR_LEN:])
        assert p is not None
        first = parse_tcp(segs[head])
        assert first is not None
        assert VNET.unpack_from(merged)[3] == len(first.payload)
        assert p.seq == first.seq and p.ident == first.ident
        assert p.payload == b"".join(s[first.hl:] for s in segs[head:head + middle])
    if head + tail == 0 and len(segs) >= 2:
        assert len(frames) == 1
        assert parse_tcp(frames[0][VNET_HDR_LEN:]).payload == pkt[-n:]  # type: ignore[union-attr]


def corrupt(seg: bytes, where: str, rng: random.Random) -> bytes:
    p = parse_tcp(seg)
    assert p is not None
    b = bytearray(seg)
    if where == "payload":
        i = p.hl + rng.randrange(len(p.payload))
        b[i] ^= rng.randrange(1, 256)           # one byte: always changes the sum mod 0xFFFF
        return bytes(b)
    at = p.ihl + 16 if where == "tcp_csum" or p.v6 else 10
    old = struct.unpack_from("!H", b, at)[0]
    new = old
    while new == old or {new, old} == {0, 0xFFFF}:    # 0 and 0xFFFF are the same sum
        new = rng.randrange(0x10000)
    struct.pack_into("!H", b, at, new)
    return bytes(b)


@cfg(60)
@given(a=addr_strategy(), nseg=st.integers(1, 12), short=st.integers(0, 535),
       seed=st.integers(0, 2**32 - 1), mss=st.integers(536, 1460), psh=st.booleans(),
       where=st.sampled_from(["payload", "tcp_csum", "ip_csum"]), data=st.data())
def test_coalesce_does_not_merge_a_corrupted_segment(a: Addr, nseg: int, short: int, seed: int,
                                                     mss: int, psh: bool, where: str,
                                                     data: st.DataObject) -> None:
    rng = random.Random(seed)
    n = nseg * mss + short
    pkt = tcp_packet(a, ident=seed & 0xFFFF, seq=seed, ack=1, flags=ACK | (PSH if psh else 0),
                     payload=rng.randbytes(n), opts=TS_OPT)
    segs = ref_segment(pkt, mss)
    k = data.draw(st.integers(0, len(segs) - 1), label="corrupted segment")
    bad = [*segs[:k], corrupt(segs[k], where, rng), *segs[k + 1:]]
    frames = check_coalesce(bad)
    # the verified prefix merges (if two or more); the corrupted one and the rest: plain
    want = ([k] if k >= 2 else [1] * k) + [1] * (len(segs) - k)
    assert frame_groups(bad, frames) == want
    assert frames[-(len(segs) - k):] == [PLAIN + s for s in bad[k:]]
    assert expand(frames) == bad


# ---- 3. mixed traffic -------------------------------------------------------------------------


def _flow_segments(a: Addr, rng: random.Random, sport: int, opts: bytes) -> list[bytes]:
    segs: list[bytes] = []
    seq, ident = rng.randrange(2**32), rng.randrange(0x10000)
    for _ in range(rng.randrange(1, 4)):            # a few bursts, each ends with PSH
        mss = rng.choice([536, 1000, 1001, 1448, 1460])
        n = rng.randrange(1, 6 * mss)
        burst = ref_segment(tcp_packet(a, ident=ident, sport=sport, seq=seq, ack=777,
                                       flags=ACK | PSH, payload=rng.randbytes(n), opts=opts), mss)
        segs += burst
        seq = (seq + n) & 0xFFFFFFFF
        ident = (ident + len(burst)) & 0xFFFF
    return segs


def _others(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    a = rng.choice([A4, B4, A6])
    if kind == 0:
        return tcp_packet(a, sport=1, seq=rng.randrange(2**32), flags=SYN, opts=b"\x02\x04\x05\xb4")
    if kind == 1:
        return tcp_packet(a, seq=rng.randrange(2**32), ack=rng.randrange(2**32), flags=ACK)
    if kind == 2:
        body = udp_dgram(a.src, a.dst, rng.randbytes(rng.randrange(200)))
        return ipv6(a.src, a.dst, UDP, body) if a.v6 else ipv4(a.src, a.dst, UDP, body)
    if kind == 3:
        icmp = b"\x08\x00\x00\x00" + rng.randbytes(60)
        return ipv6(a.src, a.dst, ICMPV6, icmp) if a.v6 else ipv4(a.src, a.dst, ICMP, icmp)
    if kind == 4:       # an IPv4 first fragment of a TCP segment
        seg = tcp_seg(A4.src, A4.dst, seq=5, payload=rng.randbytes(1000))
        return ipv4(A4.src, A4.dst, TCP, seg, frag=0x2000)
    if kind == 5:
        return tcp_packet(a, seq=rng.randrange(2**32), flags=FIN | ACK, payload=b"bye")
    return rng.randbytes(rng.randrange(80))


@cfg(60)
@given(seed=st.integers(0, 2**32 - 1), round_robin=st.booleans())
def test_coalesce_mixed_traffic(seed: int, round_robin: bool) -> None:
    rng = random.Random(seed)
    spec = [(A4, 40001, b""), (A6, 40002, TS_OPT), (B4, 40003, TS_OPT), (A4, 40004, TS_OPT)]
    flows = [_flow_segments(a, rng, sport, opts) for a, sport, opts in spec]
    sent: list[list[bytes]] = [[] for _ in flows]
    inputs: list[bytes] = []
    cur = 0
    while any(flows):
        r = rng.random()
        if r < 0.08:
            inputs.append(_others(rng))
        elif r < 0.12 and any(sent):
            inputs.append(rng.choice(rng.choice([s for s in sent if s])[-3:]))
        elif r < 0.14 and any(sent):        # a pure ACK inside a flow: flushes only that flow
            k = rng.choice([i for i, s in enumerate(sent) if s])
            last = parse_tcp(sent[k][-1])
            assert last is not None
            a, sport, _ = spec[k]
            inputs.append(tcp_packet(a, sport=sport, seq=last.seq + len(last.payload), ack=777,
                                     flags=ACK))
        else:
            if round_robin:
                cur = next(i % len(flows) for i in range(cur + 1, cur + 1 + len(flows))
                           if flows[i % len(flows)])
            elif not flows[cur] or rng.random() < 0.15:
                cur = rng.choice([i for i, f in enumerate(flows) if f])
            pkt = flows[cur].pop(0)
            sent[cur].append(pkt)
            inputs.append(pkt)
    check_coalesce(inputs)


def _super(a: Addr, sport: int, nbytes: int, *, seed: int = 0, seq: int = 1000,
           flags: int = ACK, opts: bytes = TS_OPT, ident: int = 1) -> bytes:
    return tcp_packet(a, sport=sport, seq=seq, ack=5, ident=ident, flags=flags, opts=opts,
                      payload=random.Random(seed).randbytes(nbytes))


def gso_of(pkt: bytes, mss: int) -> bytes:
    """The frame `coalesce` must make of `pkt`'s segments (`ref_segment(pkt, mss)`) when all of
    them merge: `pkt` with its TCP checksum field holding the pseudo-header sum."""
    p = parse_tcp(pkt)
    assert p is not None
    b = bytearray(pkt)
    struct.pack_into("!H", b, p.ihl + 16, ones_sum(pseudo(p.src, p.dst, TCP, len(pkt) - p.ihl)))
    return gso_frame(bytes(b), mss)


def round_robin(*flows: list[bytes]) -> list[bytes]:
    """The flows' packets one by one in turn, as the MUX sends its sessions' packets."""
    return [f[i] for i in range(max(map(len, flows))) for f in flows if i < len(f)]


FLOW_ADDRS = [A4, A6, B4]


@pytest.mark.parametrize("mode", ["psh", "open", "ragged"])
@pytest.mark.parametrize("nflows", [2, 8])
def test_coalesce_merges_interleaved_flows(nflows: int, mode: str) -> None:
    """Segments of several flows alternating one by one give one GSO frame per flow. psh: each
    flow ends with PSH (flushed as it ends); open: no PSH, flushed at the end in the order the
    runs started; ragged: flow k has nflows - k + 1 segments, the last short, so the flows end
    (and come out) in the reverse order."""
    mss = 1000
    supers: list[bytes] = []
    for k in range(nflows):
        n = (nflows - k) * mss + 1 + k if mode == "ragged" else 6 * mss
        supers.append(_super(FLOW_ADDRS[k % 3], 41000 + k, n, seed=k, seq=k * 7919,
                             flags=ACK | (PSH if mode == "psh" else 0),
                             opts=TS_OPT if k % 2 else b"", ident=100 * k))
    flows = [ref_segment(s, mss) for s in supers]
    inputs = round_robin(*flows)
    frames = check_coalesce(inputs)
    want = [gso_of(s, mss) for s in supers]
    assert frames == (want[::-1] if mode == "ragged" else want)
    assert expand(frames) == [s for f in (flows[::-1] if mode == "ragged" else flows) for s in f]


def test_coalesce_retransmission_and_interleaving() -> None:
    rng = random.Random(5)
    a = ref_segment(tcp_packet(A4, seq=1000, flags=ACK | PSH, payload=rng.randbytes(6000)), 1000)
    b = ref_segment(tcp_packet(A6, seq=9, flags=ACK | PSH, payload=rng.randbytes(3000),
                               opts=TS_OPT), 1000)
    syn = tcp_packet(B4, flags=SYN)
    pure_ack = tcp_packet(A4, seq=7000, ack=5, flags=ACK)
    udp = ipv4(B4.src, B4.dst, UDP, udp_dgram(B4.src, B4.dst, b"q" * 30))
    icmp = ipv6(A6.src, A6.dst, ICMPV6, b"\x80\x00\x00\x00" + b"p" * 56)
    inputs = [a[0], a[1], a[2], a[1], a[3], a[4], b[0], syn, b[1], b[2],
              pure_ack, a[5], udp, icmp]
    frames = check_coalesce(inputs)
    # a0-a2 | a1 again (plain: a3 does not follow it) | syn (flow B4, no run) | b0-b2 (b0's
    # run goes on past the syn of another flow) | a3-a4, flushed by A4's pure ACK | a5 (PSH)
    assert check_nothing_lost(inputs, frames) == [
        [0, 1, 2], [3], [7], [6, 8, 9], [4, 5], [10], [11], [12], [13]]
    assert frame_groups(inputs, frames) == [3, 1, 1, 3, 2, 1, 1, 1, 1]
    assert frames[1] == PLAIN + a[1]            # the retransmission, unchanged
    assert frames[2] == PLAIN + syn
    assert frames[-4:] == [PLAIN + pure_ack, PLAIN + a[5], PLAIN + udp, PLAIN + icmp]


def test_coalesce_writes_non_candidates_at_once() -> None:
    """Packets that cannot merge (non-TCP, TCP with IPv4 options even of a pending flow's
    addresses and ports, fragments) are written where they come; pending runs wait."""
    x = _super(A4, 1, 3000, seed=1)
    y = _super(A6, 2, 3000, seed=2)
    xs, ys = ref_segment(x, 1000), ref_segment(y, 1000)
    px = parse_tcp(xs[2])
    assert px is not None
    udp = ipv4(B4.src, B4.dst, UDP, udp_dgram(B4.src, B4.dst, b"q" * 30))
    icmp = ipv6(A6.src, A6.dst, ICMPV6, b"\x80\x00\x00\x00" + b"p" * 56)
    ip_opts = tcp_packet(A4, sport=1, seq=px.seq + 1000, ack=5, ip_opts=b"\x01\x01\x01\x00",
                         payload=b"o" * 1000, opts=TS_OPT)
    frag = ipv4(A4.src, A4.dst, TCP, tcp_seg(A4.src, A4.dst, sport=1, seq=px.seq + 1000, ack=5,
                                             payload=b"f" * 1000, opts=TS_OPT), frag=0x2000)
    inputs = [xs[0], udp, ys[0], xs[1], icmp, ys[1], ip_opts, xs[2], frag, ys[2]]
    frames = check_coalesce(inputs)
    assert frames == [PLAIN + udp, PLAIN + icmp, PLAIN + ip_opts, PLAIN + frag,
                      gso_of(x, 1000), gso_of(y, 1000)]


@pytest.mark.parametrize("kind", ["pure ack", "fin", "rst", "syn", "urg data", "fin data"])
def test_coalesce_control_packet_flushes_only_its_flow(kind: str) -> None:
    x = _super(A4, 1, 4000, seed=1, flags=ACK | PSH)
    y = _super(B4, 2, 2000, seed=2)
    xs, ys = ref_segment(x, 1000), ref_segment(y, 1000)
    flags, payload = {"pure ack": (ACK, b""), "fin": (ACK | FIN, b""), "rst": (RST, b""),
                      "syn": (SYN, b""), "urg data": (ACK | URG, b"u" * 1000),
                      "fin data": (ACK | FIN, b"f" * 1000)}[kind]
    ctl = tcp_packet(B4, sport=2, seq=3000, ack=5, flags=flags, payload=payload, opts=TS_OPT)
    syn = tcp_packet(A6, sport=3, flags=SYN)
    inputs = [xs[0], xs[1], ys[0], ys[1], ctl, xs[2], syn, xs[3]]
    frames = check_coalesce(inputs)
    assert frames == [gso_of(y, 1000), PLAIN + ctl, PLAIN + syn, gso_of(x, 1000)]


def test_coalesce_restarted_run_comes_out_after_older_runs() -> None:
    """A retransmission ends its flow's run and starts a new one, which a later segment
    continues; at the end the open runs come out in the order they started."""
    x = _super(A4, 1, 3000, seed=1)
    y = _super(A6, 2, 2000, seed=2)
    xs, ys = ref_segment(x, 1000), ref_segment(y, 1000)
    inputs = [xs[0], xs[1], ys[0], ys[1], xs[1], xs[2]]
    frames = check_coalesce(inputs)
    assert check_nothing_lost(inputs, frames) == [[0, 1], [2, 3], [4, 5]]
    assert frames[1] == gso_of(y, 1000)


def test_coalesce_payload_size_rules_per_flow() -> None:
    """mss is the first segment's payload: a bigger one starts a new run, a shorter one ends
    its run (merged); the other flow's run goes on meanwhile."""
    sizes = [1000, 1000, 1200, 500, 700]
    seq, xs = 1, []
    for i, n in enumerate(sizes):
        xs.append(tcp_packet(A4, sport=1, seq=seq, ack=5, ident=i, payload=bytes([i]) * n))
        seq += n
    ys = ref_segment(_super(A6, 2, 5000, seed=2), 1000)
    inputs = round_robin(xs, ys)
    frames = check_coalesce(inputs, same_ids=False)
    x_frames = [f for f in frames if flow_of(f[VNET_HDR_LEN:]) == flow_of(xs[0])]
    assert frame_groups(xs, x_frames) == [2, 2, 1]
    assert [VNET.unpack_from(f)[3] for f in x_frames[:2]] == [1000, 1200]
    assert frame_groups(inputs, frames) == [2, 2, 5, 1]       # x's last waits until the end


def _refresh(pkt: bytes) -> bytes:
    """`pkt` with its IPv4 header and TCP checksums made correct again."""
    p = parse_tcp(pkt)
    assert p is not None
    b = bytearray(pkt)
    if not p.v6:
        b[10:12] = b"\0\0"
        struct.pack_into("!H", b, 10, checksum(bytes(b[:p.ihl])))
    b[p.ihl + 16:p.ihl + 18] = b"\0\0"
    struct.pack_into("!H", b, p.ihl + 16,
                     checksum(pseudo(p.src, p.dst, TCP, len(b) - p.ihl) + bytes(b[p.ihl:])))
    return bytes(b)


def _set(at: int, value: int, tcp: bool = False) -> object:
    def mod(b: bytearray, ihl: int) -> None:
        b[ihl + at if tcp else at] = value
    return mod


def _xor(at: int, bits: int, tcp: bool = False) -> object:
    def mod(b: bytearray, ihl: int) -> None:
        b[ihl + at if tcp else at] ^= bits
    return mod


# name: (v6, modification of the 2nd and 3rd segments, whether the three still merge)
ATTR_MODS = {
    "v4 tos": (False, _set(1, 0x10), False),
    "v4 ttl": (False, _set(8, 63), False),
    "v4 df": (False, _xor(6, 0x40), False),
    "v4 reserved bit": (False, _xor(6, 0x80), False),
    "v4 ident": (False, _xor(5, 0x55), True),
    "v6 traffic class": (True, _xor(1, 0x10), False),
    "v6 flow label": (True, _xor(3, 0x01), False),
    "v6 hop limit": (True, _set(7, 63), False),
    "v4 ack": (False, _xor(11, 1, True), False),
    "v6 ack": (True, _xor(8, 0x80, True), False),
    "ece": (False, _xor(13, ECE, True), False),
    "cwr": (True, _xor(13, CWR, True), False),
    "tcp reserved/AE bits": (False, _xor(12, 0x01, True), False),
    "v4 option byte": (False, _xor(29, 0x01, True), False),
    "v6 option byte": (True, _xor(22, 0x10, True), False),
    "v4 window": (False, _xor(14, 0x01, True), True),
    "v6 window": (True, _xor(15, 0x40, True), True),
    "urgent pointer without URG": (False, _set(19, 7, True), True),
}


@pytest.mark.parametrize("name", sorted(ATTR_MODS))
def test_coalesce_flow_attributes(name: str) -> None:
    """A segment whose flow attributes differ from its run's first starts a new run (the old
    one, a single segment, written plain); fields GRO ignores do not matter."""
    v6, mod, merges = ATTR_MODS[name]
    xs = ref_segment(_super(A6 if v6 else A4, 1, 3000, seed=1), 1000)
    ihl = 40 if v6 else 20
    for i in (1, 2):
        b = bytearray(xs[i])
        mod(b, ihl)  # type: ignore[operator]
        xs[i] = _refresh(bytes(b))
    ys = ref_segment(_super(B4, 2, 2000, seed=2), 1000)
    inputs = [xs[0], ys[0], xs[1], ys[1], xs[2]]
    # not expanded: the merged header is the first's, so a later window, urgent pointer or CWR
    # does not come back from the kernel's segmenter (the exact frames are compared instead)
    frames = check_coalesce(inputs, expanded=False)
    want = [[0, 2, 4], [1, 3]] if merges else [[0], [1, 3], [2, 4]]
    assert check_nothing_lost(inputs, frames) == want


def test_coalesce_ipv4_header_summing_to_zero() -> None:
    """The merged IPv4 header whose words sum to a multiple of 0xFFFF: its checksum field is
    0x0000 by RFC 1071 (gso writes 0xFFFF, the other zero); either must verify."""
    segs = [tcp_packet(A4, seq=1 + 100 * i, ident=15491 + i, payload=b"x" * 100) for i in (0, 1)]
    want = ref_coalesce(segs)
    assert len(want) == 1 and want[0][VNET_HDR_LEN + 10:VNET_HDR_LEN + 12] == b"\0\0"
    frames = check_coalesce(segs)
    assert ones_sum(frames[0][VNET_HDR_LEN:VNET_HDR_LEN + 20]) == 0xFFFF


def test_coalesce_limits_super_packet_to_65535() -> None:
    rng = random.Random(6)
    flows = []
    for a in (A4, A6):
        segs: list[bytes] = []
        seq, ident = 1, 1
        for _ in range(4):          # 4 x 60000 bytes, no PSH anywhere until the end
            s = ref_segment(tcp_packet(a, seq=seq, ident=ident, flags=ACK,
                                       payload=rng.randbytes(60000), opts=TS_OPT), 1200)
            segs += s
            seq, ident = seq + 60000, ident + len(s)
        frames = check_coalesce(segs)
        assert len(frames) >= 4
        assert all(len(f) - VNET_HDR_LEN <= MAX_IP for f in frames)
        assert expand(frames) == segs
        flows.append(segs)
    frames = check_coalesce(round_robin(*flows))        # the same, interleaved
    assert len(frames) >= 8
    assert all(len(f) - VNET_HDR_LEN <= MAX_IP for f in frames)


def test_coalesce_different_ack_or_options_split_runs() -> None:
    acks = [1, 1, 2, 2, 2, 2]
    opts = [TS_OPT] * 4 + [TS_OPT[:-1] + b"\x99", TS_OPT]
    p = [tcp_packet(A4, seq=100 * i, ident=i, ack=acks[i], payload=bytes([i]) * 100, opts=opts[i])
         for i in range(6)]
    frames = check_coalesce(p)
    assert frame_groups(p, frames) == [2, 2, 1, 1] == ref_groups(p)
    assert expand(frames) == p


def _traffic(rng: random.Random, nflows: int, count: int, round_robin: bool) -> list[bytes]:
    """Interleaved TCP flows with everything that ends or breaks a run: retransmissions, gaps,
    bigger and shorter segments, PSH, ack changes, one-off TOS/TTL, corrupted checksums,
    control packets, packets that are no merge candidates, and mss up to 16000."""
    state = []
    for k in range(nflows):
        a = rng.choice([A4, B4, A6, Addr(True, A6.dst, A6.src)])
        state.append({"a": a, "sport": 50000 + k % 3, "opts": rng.choice(TCP_OPTS),
                      "seq": rng.choice([rng.randrange(2**32), 2**32 - rng.randrange(1, 20000)]),
                      "ident": rng.randrange(0x10000), "ack": rng.randrange(2**32),
                      "mss": rng.choice([536, 1000, 1001, 1448]), "sent": []})
    out: list[bytes] = []
    cur = 0
    for _ in range(count):
        cur = (cur + 1) % nflows if round_robin or rng.random() < 0.3 else cur
        f = state[cur]
        a, sport = f["a"], f["sport"]
        r = rng.random()
        flags, extra, plen = ACK, {}, f["mss"]
        if r < 0.05 and f["sent"]:
            out.append(rng.choice(f["sent"][-4:]))
            continue
        if r < 0.09:
            out.append(_others(rng))
            continue
        if r < 0.12:
            f["seq"] = (f["seq"] + rng.randrange(1, 3000)) & 0xFFFFFFFF
        elif r < 0.15:
            f["ack"] = (f["ack"] + rng.randrange(1, 3000)) & 0xFFFFFFFF
        elif r < 0.17:
            f["mss"] = rng.choice([536, 1000, 1001, 1448, 9000, 16000])
        elif r < 0.21:
            flags = rng.choice([SYN, ACK | FIN, RST, ACK | URG, ACK])
            plen = rng.choice([0, 0, 10, f["mss"]])
        elif r < 0.25:
            extra = rng.choice([{"tos": 4}, {"hop": 1}]) if not a.v6 else {"hop": 1}
        elif r < 0.29:
            extra = {"csum": rng.randrange(0x10000)}
        elif r < 0.31 and not a.v6:
            extra = {"ip_opts": b"\x01\x01\x01\x00"}
        elif r < 0.36:
            plen = rng.randrange(1, f["mss"])
        elif r < 0.39:
            plen = f["mss"] + rng.randrange(1, 300)
        if rng.random() < 0.08:
            flags |= PSH
        pkt = tcp_packet(a, sport=sport, seq=f["seq"], ack=f["ack"], ident=f["ident"],
                         flags=flags, opts=f["opts"], payload=rng.randbytes(plen),
                         **extra)  # type: ignore[arg-type]
        f["seq"] = (f["seq"] + plen) & 0xFFFFFFFF
        f["ident"] = (f["ident"] + 1) & 0xFFFF
        f["sent"].append(pkt)
        out.append(pkt)
    return out


@cfg(80)
@given(seed=st.integers(0, 2**32 - 1), nflows=st.integers(1, 8), count=st.integers(0, 80),
       round_robin=st.booleans())
def test_coalesce_multi_flow_matches_reference(seed: int, nflows: int, count: int,
                                               round_robin: bool) -> None:
    inputs = _traffic(random.Random(seed), nflows, count, round_robin)
    check_coalesce(inputs, same_ids=False)


# ---- 4. fuzz ----------------------------------------------------------------------------------


def _valid_frames() -> list[bytes]:
    rng = random.Random(7)
    out = []
    for a, opts in ((A4, b""), (A6, TS_OPT), (B4, TS_OPT)):
        pkt = tcp_packet(a, seq=3, flags=ACK | PSH, payload=rng.randbytes(3000), opts=opts)
        out.append(gso_frame(pkt, 1000))
        out.append(gso_frame(pkt, 999))
        udp = udp_dgram(a.src, a.dst, b"u" * 40, csum=ones_sum(pseudo(a.src, a.dst, UDP, 48)))
        ip = ipv6(a.src, a.dst, UDP, udp) if a.v6 else ipv4(a.src, a.dst, UDP, udp)
        out.append(vnet(NEEDS_CSUM, 0, 0, 0, 40 if a.v6 else 20, 6) + ip)
        out.append(PLAIN + ip)
    return out


VALID_FRAMES = _valid_frames()


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(min(len(b), 80))] = rng.randrange(256)       # mostly headers
        elif op == 2:
            del b[rng.randrange(len(b) + 1):]
        else:
            b += rng.randbytes(rng.randrange(1, 5))
    return bytes(b)


def check_segment_result(frame: bytes) -> None:
    res = segment(frame)
    assert res is None or (isinstance(res, list) and all(isinstance(s, bytes) for s in res))
    if res is None or len(frame) < VNET_HDR_LEN:
        return
    flags, gso_type = frame[0], frame[1] & 0x7F
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        # whatever was accepted must come out as complete, correct TCP packets
        for s in res:
            assert parse_tcp(s) is not None and tcp_verifies(s)
    elif gso_type == 0:
        assert len(res) == 1 and len(res[0]) == len(frame) - VNET_HDR_LEN
        if not flags & NEEDS_CSUM:
            assert res[0] == frame[VNET_HDR_LEN:]


@cfg(400)
@given(frame=st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(0, 255), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84]),
              st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 120),
              st.integers(0, 40), st.binary(max_size=150)).map(
        lambda t: vnet(*t[:6]) + t[6]),
    st.tuples(st.sampled_from(VALID_FRAMES), st.randoms(use_true_random=False)).map(
        lambda t: mutate(t[0], t[1]))))
def test_fuzz_segment(frame: bytes) -> None:
    check_segment_result(frame)


_FLOW = ref_segment(tcp_packet(A4, seq=1, flags=ACK | PSH, payload=bytes(range(256)) * 20), 536)
_FLOW6 = ref_segment(tcp_packet(A6, seq=1, flags=ACK, payload=bytes(range(256)) * 12,
                                opts=TS_OPT), 600)
_FLOWB = ref_segment(tcp_packet(B4, sport=2, seq=2**32 - 1500, flags=ACK | PSH, opts=TS_OPT,
                                payload=bytes(range(255, -1, -1)) * 11), 700)
_POOL = _FLOW + _FLOW6 + _FLOWB


@cfg(300)
@given(pkts=st.lists(st.one_of(
    st.binary(max_size=120),
    st.sampled_from(_POOL),
    st.tuples(st.sampled_from(_POOL), st.randoms(use_true_random=False)).map(
        lambda t: mutate(t[0], t[1]))), max_size=20))
def test_fuzz_coalesce(pkts: list[bytes]) -> None:
    check_coalesce(pkts, expanded=False)


@cfg(60)
@given(rnd=st.randoms(use_true_random=False), interleave=st.booleans())
def test_fuzz_coalesce_mutated_flow(rnd: random.Random, interleave: bool) -> None:
    flows = round_robin(_FLOW, _FLOW6, _FLOWB) if interleave else _FLOW + _FLOW6 + _FLOWB
    pkts = [mutate(p, rnd) if rnd.random() < 0.2 else p for p in flows]
    check_coalesce(pkts, expanded=False)


MALFORMED = {
    "empty": b"",
    "header only": PLAIN,
    "truncated vnet": b"\x01\x01\x00",
    "gso_size 0": vnet(NEEDS_CSUM, GSO_TCPV4, 40, 0, 20, 16) + VALID_FRAMES[0][10:],
    "udp gso": vnet(NEEDS_CSUM, 3, 28, 1000, 20, 6) + VALID_FRAMES[0][10:],
    "udp_l4 gso": vnet(NEEDS_CSUM, 5, 28, 1000, 20, 6) + VALID_FRAMES[0][10:],
    "tcpv6 on v4": vnet(NEEDS_CSUM, GSO_TCPV6, 40, 1000, 20, 16) + VALID_FRAMES[0][10:],
    "tcpv4 on v6": vnet(NEEDS_CSUM, GSO_TCPV4, 60, 1000, 40, 16) + VALID_FRAMES[4][10:],
    "truncated packet": VALID_FRAMES[0][:-1],
    "trailing bytes": VALID_FRAMES[0] + b"\0",
    "truncated v6": VALID_FRAMES[4][:-7],
    "trailing v6": VALID_FRAMES[4] + b"\0\0",
    "only 30 bytes": VALID_FRAMES[0][:40],
    "wrong version": VALID_FRAMES[0][:10] + b"\x55" + VALID_FRAMES[0][11:],
    "version 6 header on v4 bytes": VALID_FRAMES[0][:10] + b"\x65" + VALID_FRAMES[0][11:],
    "udp under tcpv4": vnet(NEEDS_CSUM, GSO_TCPV4, 28, 20, 20, 6) + VALID_FRAMES[3][10:],
    "udp under tcpv6": vnet(NEEDS_CSUM, GSO_TCPV6, 48, 20, 40, 6) + VALID_FRAMES[7][10:],
    "ipv4 MF fragment": gso_frame(tcp_packet(A4, payload=bytes(3000)), 1000)[:16] + b"\x20\x00"
    + gso_frame(tcp_packet(A4, payload=bytes(3000)), 1000)[18:],
    "ipv4 fragment offset": gso_frame(tcp_packet(A4, payload=bytes(3000)), 1000)[:16]
    + b"\x40\x10" + gso_frame(tcp_packet(A4, payload=bytes(3000)), 1000)[18:],
    "tcp data offset too big": (lambda f: f[:10 + 32] + b"\xf0" + f[10 + 33:])(
        gso_frame(tcp_packet(A4, payload=b"abc"), 1000)),
    "tcp data offset < 5": (lambda f: f[:10 + 32] + b"\x40" + f[10 + 33:])(VALID_FRAMES[0]),
    "ihl < 5": VALID_FRAMES[0][:10] + b"\x44" + VALID_FRAMES[0][11:],
    "csum_start past end": vnet(NEEDS_CSUM, 0, 0, 0, 500, 6) + VALID_FRAMES[3][10:],
    "csum field past end": vnet(NEEDS_CSUM, 0, 0, 0, 20, 48) + VALID_FRAMES[3][10:],
    "csum field straddles end": vnet(NEEDS_CSUM, 0, 0, 0, 20, 47) + VALID_FRAMES[3][10:],
    "csum offsets huge": vnet(NEEDS_CSUM, 0, 0, 0, 0xFFFF, 0xFFFF) + VALID_FRAMES[3][10:],
}


def test_malformed_frames_exist_as_described() -> None:
    assert len(VALID_FRAMES[0]) == 10 + 20 + 20 + 3000 and VALID_FRAMES[4][10] >> 4 == 6
    assert len(VALID_FRAMES[3]) == 10 + 20 + 48 and VALID_FRAMES[7][10] >> 4 == 6
    for f in VALID_FRAMES:
        assert segment(f) is not None


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_segment_rejects_malformed(name: str) -> None:
    assert segment(MALFORMED[name]) is None


# ---- 5. NEEDS_CSUM completion -----------------------------------------------------------------


def partial_frame(ip: bytes, start: int, offset: int, proto: int, a: Addr) -> bytes:
    """`ip` with the checksum field holding the folded pseudo-header sum (as the kernel leaves a
    CHECKSUM_PARTIAL packet), behind a NEEDS_CSUM header."""
    b = bytearray(ip)
    struct.pack_into("!H", b, start + offset,
                     ones_sum(pseudo(a.src, a.dst, proto, len(ip) - start)))
    return vnet(NEEDS_CSUM, 0, 0, 0, start, offset) + bytes(b)


def check_completed(frame: bytes, start: int, offset: int, a: Addr, proto: int) -> bytes:
    res = segment(frame)
    assert res is not None and len(res) == 1
    out, pkt = res[0], frame[VNET_HDR_LEN:]
    at = start + offset
    assert out[:at] == pkt[:at] and out[at + 2:] == pkt[at + 2:], "only the field changes"
    assert ones_sum(pseudo(a.src, a.dst, proto, len(out) - start) + out[start:]) == 0xFFFF
    return out


@cfg(100)
@given(a=addr_strategy(), payload=st.binary(max_size=1500), ip_opts=st.booleans())
def test_needs_csum_udp(a: Addr, payload: bytes, ip_opts: bool) -> None:
    d = udp_dgram(a.src, a.dst, payload, csum=0)
    if a.v6:
        ip, start = ipv6(a.src, a.dst, UDP, d), 40
    else:
        opts = b"\x01\x01\x01\x00" if ip_opts else b""
        ip, start = ipv4(a.src, a.dst, UDP, d, opts=opts), 20 + len(opts)
    out = check_completed(partial_frame(ip, start, 6, UDP, a), start, 6, a, UDP)
    assert out == ip[:start] + udp_dgram(a.src, a.dst, payload) or \
        struct.unpack_from("!H", out, start + 6)[0] == 0      # 0: see the RFC 768 test below


@cfg(100)
@given(a=addr_strategy(), seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1),
       opts=st.sampled_from(TCP_OPTS), flags=st.sampled_from([ACK, ACK | FIN, ACK | ECE, SYN]),
       payload=st.sampled_from([b"", b"x", b"hello world"]))
def test_needs_csum_tcp_pure_ack(a: Addr, seq: int, ack: int, opts: bytes, flags: int,
                                 payload: bytes) -> None:
    pkt = tcp_packet(a, seq=seq, ack=ack, flags=flags, opts=opts, payload=payload)
    start = 40 if a.v6 else 20
    out = check_completed(partial_frame(pkt, start, 16, TCP, a), start, 16, a, TCP)
    assert tcp_verifies(out)
    assert out == pkt or struct.unpack_from("!H", out, start + 16)[0] in (0, 0xFFFF)


def _udp_summing_to_zero(a: Addr) -> tuple[bytes, int]:
    """A UDP packet whose computed checksum is 0 (transmitted as 0xFFFF, RFC 768/8200)."""
    base = udp_dgram(a.src, a.dst, b"\0\0" + b"abcdefgh", csum=0)
    s = ones_sum(pseudo(a.src, a.dst, UDP, len(base)) + base)
    fix = 0xFFFF - s            # one more word making the sum 0xFFFF: checksum ~0xFFFF = 0
    d = udp_dgram(a.src, a.dst, struct.pack("!H", fix) + b"abcdefgh", csum=0)
    assert checksum(pseudo(a.src, a.dst, UDP, len(d)) + d) == 0
    if a.v6:
        return ipv6(a.src, a.dst, UDP, d), 40
    return ipv4(a.src, a.dst, UDP, d), 20


@pytest.mark.parametrize("a", [A4, A6], ids=["v4", "v6"])
def test_needs_csum_udp_zero_becomes_ffff(a: Addr) -> None:
    """Linux's skb_checksum_help writes `csum_fold(csum) ?: CSUM_MANGLED_0`: never 0, which in
    UDP means 'no checksum' (and over IPv6 makes the receiver drop the datagram)."""
    ip, start = _udp_summing_to_zero(a)
    out = check_completed(partial_frame(ip, start, 6, UDP, a), start, 6, a, UDP)
    assert struct.unpack_from("!H", out, start + 6)[0] == 0xFFFF


# ---- checksum verification must be per segment -------------------------------------------------

@pytest.mark.parametrize("a", [A4, A6], ids=["v4", "v6"])
def test_coalesce_does_not_merge_swapped_payloads(a: Addr) -> None:
    """Two segments that each fail their own checksum (their payloads swapped, as a DMA or
    reordering bug would) must not merge: merged, the stream would be delivered out of order
    with fresh, correct checksums."""
    rng = random.Random(1)
    segs = ref_segment(tcp_packet(a, seq=1000, ack=5, flags=ACK | PSH,
                                  payload=rng.randbytes(4000)), 1000)
    p1, p2 = parse_tcp(segs[1]), parse_tcp(segs[2])
    assert p1 is not None and p2 is not None
    bad = [segs[0], segs[1][:p1.hl] + p2.payload, segs[2][:p2.hl] + p1.payload, segs[3]]
    assert [tcp_verifies(s) for s in bad] == [True, False, False, True]
    frames = coalesce(bad)
    assert frames == [PLAIN + s for s in bad]


def test_coalesce_v6_bad_checksum_offsetting_ipv6_header_words() -> None:
    segs = ref_segment(tcp_packet(A6, seq=1000, ack=5, flags=ACK,
                                  payload=random.Random(2).randbytes(2000)), 1000)
    header_words = sum(ones_sum(s[:40]) for s in segs)
    b = bytearray(segs[1])
    old = struct.unpack_from("!H", b, 40 + 16)[0]
    struct.pack_into("!H", b, 40 + 16, (old - header_words) % 0xFFFF)
    bad = [segs[0], bytes(b)]
    assert [tcp_verifies(s) for s in bad] == [True, False]
    assert coalesce(bad) == [PLAIN + s for s in bad]


# ---- the Coalescer across pushes (the gateway's writer) -------------------------------------


def test_coalescer_holds_open_runs_across_pushes_and_flush_returns_them() -> None:
    """A run still open at the end of a push is held, not written; the next push continues it;
    flush() writes what is left. The result equals coalesce() over the whole input."""
    rng = random.Random(11)
    a = ref_segment(tcp_packet(A4, seq=1, flags=ACK, payload=rng.randbytes(8000)), 1000)
    b = ref_segment(tcp_packet(A6, seq=7, flags=ACK, payload=rng.randbytes(8000)), 1000)
    gro = Coalescer()
    assert gro.push(a[:3] + b[:3]) == []
    assert gro.held == 6
    assert gro.push(a[3:6] + b[3:6]) == []
    assert gro.push(a[6:] + b[6:]) == []      # 8 full segments each, no PSH: still open
    assert gro.held == len(a) + len(b) == 16
    frames = gro.flush()
    assert gro.held == 0
    assert frames == coalesce(a + b)
    assert [expand([f]) for f in frames] == [a, b]


def test_coalescer_writes_a_run_at_once_when_psh_or_full_ends_it() -> None:
    rng = random.Random(12)
    psh = ref_segment(tcp_packet(A4, seq=1, flags=ACK | PSH, payload=rng.randbytes(5000)), 1000)
    gro = Coalescer()
    out = gro.push(psh)
    assert gro.held == 0 and len(out) == 1 and expand(out) == psh
    # 1000-byte segments: 65 fit under 65535 bytes with the 40 bytes of headers; the 65th
    # leaves no room for another, so the run is written without waiting for a flush
    full = ref_segment(tcp_packet(A4, seq=1, flags=ACK, payload=rng.randbytes(64000)), 1000)
    full += ref_segment(tcp_packet(A4, seq=64001, ident=64, flags=ACK,
                                   payload=rng.randbytes(6000)), 1000)
    out = gro.push(full[:65])
    assert len(out) == 1 and gro.held == 0 and expand(out) == full[:65]


# ---- the Internet checksum the gateway's echo replies use -----------------------------------


@cfg(300)
@given(data=st.binary(max_size=300))
@example(data=b"")
@example(data=bytes(8))            # all zeros: +0, so the checksum is 0xFFFF
@example(data=b"\xff\xff")         # a sum of 0xFFFF (-0): the checksum is 0x0000
@example(data=b"\x80")              # odd length: padded with a zero byte
def test_internet_checksum_matches_the_rfc_1071_reference(data: bytes) -> None:
    assert gso_checksum(data) == checksum(data)
