"""The model's packet gateway on crafted packets: session checks, routing, echo mode, and fuzzing
of the IP/ICMP parsing (untrusted bytes from the host)."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.gateway import (
    FragmentError,
    Gateway,
    Reassembler,
    echo_reply,
    fragment_v4,
    fragment_v6,
    parse_addresses,
)


def csum(data: bytes) -> int:
    """A second, naive RFC 1071 checksum so the gateway's is not checked against itself."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(src: str, dst: str, payload: bytes, proto: int = 1, frag: int = 0) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, frag, 33, proto,
                                0, ipaddress.ip_address(src).packed,
                                ipaddress.ip_address(dst).packed))
    hdr[10:12] = struct.pack("!H", csum(bytes(hdr)))
    return bytes(hdr) + payload


def icmp4_echo(ident: int, seq: int, data: bytes, kind: int = 8) -> bytes:
    body = bytearray(struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data)
    body[2:4] = struct.pack("!H", csum(bytes(body)))
    return bytes(body)


def pseudo6(src: bytes, dst: bytes, n: int) -> bytes:
    return src + dst + struct.pack("!I3xB", n, 58)


def ip6_echo(src: str, dst: str, ident: int, seq: int, data: bytes, kind: int = 128) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    body = bytearray(struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data)
    body[2:4] = struct.pack("!H", csum(pseudo6(s, d, len(body)) + bytes(body)))
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 64, s, d) + bytes(body)


class Down:
    def __init__(self, accept: bool = True) -> None:
        self.sent: list[tuple[int, bytes]] = []
        self.accept = accept

    def __call__(self, if_id: int, pkt: bytes) -> bool:
        self.sent.append((if_id, pkt))
        return self.accept


def make_gateway(*sessions: int) -> tuple[Gateway, Down]:
    config = ModemConfig()
    gw = Gateway(config, "echo")
    down = Down()
    gw.downlink = down
    for n in sessions:
        gw.session_changed(n, config.session_ip(n))     # has ipv4/ipv6 like SessionState
    return gw, down


def test_echo_v4_reply_is_correct() -> None:
    gw, down = make_gateway(1)
    req = ip4("10.99.1.2", "10.99.1.1", icmp4_echo(0x1234, 7, b"hello world"))
    gw.uplink(1, req)
    [(if_id, rep)] = down.sent
    assert if_id == 1
    assert rep[12:16] == req[16:20] and rep[16:20] == req[12:16]
    assert csum(rep[:20]) == 0 and csum(rep[20:]) == 0
    assert rep[20] == 0 and rep[24:] == req[24:]          # type reply, same id/seq/data
    assert len(rep) == struct.unpack_from("!H", rep, 2)[0] == len(req)
    assert gw.counters["echo_replies"] == 1 and gw.counters["dl_packets"] == 1


def test_echo_v6_reply_is_correct() -> None:
    gw, down = make_gateway(2)
    req = ip6_echo("fd99:2::2", "fd99:2::1", 9, 1, b"x" * 56)
    gw.uplink(2, req)
    [(if_id, rep)] = down.sent
    assert if_id == 2 and rep[8:24] == req[24:40] and rep[24:40] == req[8:24]
    assert rep[40] == 129 and rep[44:] == req[44:]
    assert csum(pseudo6(rep[8:24], rep[24:40], len(rep) - 40) + rep[40:]) == 0


def test_any_address_in_the_sessions_v6_prefix_is_its_own() -> None:
    gw, down = make_gateway(2)
    gw.uplink(2, ip6_echo("fd99:2::abcd:1", "fd99:2::1", 1, 1, b""))
    assert len(down.sent) == 1


@pytest.mark.parametrize("pkt, reason", [
    (ip4("10.99.1.2", "10.99.1.1", icmp4_echo(1, 1, b"x"), frag=0x2000), "drop_fragment"),
    (ip4("10.99.1.2", "10.99.1.1", icmp4_echo(1, 1, b"x", kind=0)), "drop_not_echo"),
    (ip4("10.99.1.2", "10.99.1.1", b"\x08\x00\xff\xffabcd"), "drop_not_echo"),   # bad csum
    (ip4("10.99.1.2", "10.99.1.1", b"udp-payload", proto=17), "drop_not_echo"),
    (ip4("10.99.2.2", "10.99.1.1", icmp4_echo(1, 1, b"x")), "drop_source"),
    (ip6_echo("fd99:3::2", "fd99:1::1", 1, 1, b""), "drop_source"),
    (ip6_echo("fe80::2", "ff02::2", 1, 1, b""), "drop_link_local"),
    (ip6_echo("fd99:1::2", "fd99:1::1", 1, 1, b"", kind=129), "drop_not_echo"),
    (b"\x45" + bytes(10), "drop_malformed"),
    (b"\x00" * 40, "drop_malformed"),
])
def test_what_is_not_answered_is_counted(pkt: bytes, reason: str) -> None:
    gw, down = make_gateway(1)
    gw.uplink(1, pkt)
    assert down.sent == []
    assert gw.counters[reason] == 1


def test_session_not_connected_is_dropped_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    gw, down = make_gateway(1)
    req = ip4("10.99.3.2", "10.99.3.1", icmp4_echo(1, 1, b""))
    for _ in range(5):
        gw.uplink(3, req)
    assert down.sent == [] and gw.counters["drop_not_connected"] == 5
    assert sum("session 3" in r.message for r in caplog.records) == 1
    gw.session_changed(3, ModemConfig().session_ip(3))
    gw.uplink(3, req)
    assert len(down.sent) == 1
    gw.session_changed(3, None)
    gw.uplink(3, req)
    assert len(down.sent) == 1 and gw.counters["drop_not_connected"] == 6


def test_downlink_routes_by_destination_to_the_owning_session() -> None:
    gw, _ = make_gateway(0, 1, 7)
    assert gw.route(ip4("10.99.9.9", "10.99.7.2", b"")) == 7
    assert gw.route(ip4("10.99.9.9", "10.99.1.2", b"")) == 1
    assert gw.route(ip4("10.99.9.9", "10.99.1.3", b"")) is None
    assert gw.route(ip6_echo("fd99:9::1", "fd99::2", 1, 1, b"")) == 0
    assert gw.route(ip6_echo("fd99:9::1", "fd99:7::1234", 1, 1, b"")) == 7
    assert gw.route(ip4("10.99.9.9", "10.99.2.2", b"")) is None      # session 2 not connected
    gw.session_changed(7, None)
    assert gw.route(ip4("10.99.9.9", "10.99.7.2", b"")) is None
    assert gw.route(b"\x60" + bytes(20)) is None


def test_refused_downlink_is_counted() -> None:
    gw, down = make_gateway(1)
    down.accept = False
    gw.uplink(1, ip4("10.99.1.2", "10.99.1.1", icmp4_echo(1, 1, b"")))
    assert gw.counters["drop_downlink"] == 1 and gw.counters["dl_packets"] == 0


def test_session_without_ipv6_drops_ipv6() -> None:
    gw, down = make_gateway()
    state: Any = type("S", (), {"ipv4": ipaddress.IPv4Interface("10.99.4.2/24"), "ipv6": None})
    gw.session_changed(4, state)
    gw.uplink(4, ip6_echo("fd99:4::2", "fd99:4::1", 1, 1, b""))
    assert gw.counters["drop_source"] == 1 and down.sent == []


@pytest.mark.parametrize("mode, expected", [("echo", ("echo", None)), ("tun", ("tun", None)),
                                            ("netns:gw", ("tun", "gw"))])
def test_modes(mode: str, expected: tuple[str, str | None]) -> None:
    gw = Gateway(ModemConfig(), mode)
    assert (gw.mode, gw.netns) == expected


@pytest.mark.parametrize("mode", ["", "netns:", "netns:a/b", "tap"])
def test_bad_modes(mode: str) -> None:
    with pytest.raises(ValueError):
        Gateway(ModemConfig(), mode)


VALID = [ip4("10.99.1.2", "10.99.1.1", icmp4_echo(3, 4, b"abcdefgh")),
         ip6_echo("fd99:1::2", "fd99:1::1", 3, 4, b"abcdefgh")]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120) | st.builds(
    lambda base, pos, val, cut: (base[:pos] + bytes([val]) + base[pos + 1:])[:cut],
    st.sampled_from(VALID), st.integers(0, 70), st.integers(0, 255), st.integers(0, 80)))
def test_fuzz_no_exception_escapes(pkt: bytes) -> None:
    gw, down = make_gateway(1)
    parse_addresses(pkt)
    rep = echo_reply(pkt)
    if rep is not None:            # whatever is answered is a well-formed reply
        if rep[0] >> 4 == 4:
            assert csum(rep[:(rep[0] & 15) * 4]) == 0
        else:
            assert csum(pseudo6(rep[8:24], rep[24:40], len(rep) - 40) + rep[40:]) == 0
    gw.uplink(1, pkt)
    gw.route(pkt)
    answered = sum(gw.counters[k] for k in gw.counters if k.startswith("drop")) + \
        gw.counters["echo_replies"]
    # one outcome each, or a fragment kept for the rest of its datagram
    assert answered == 1 or (answered == 0 and gw.counters["ul_fragments"] == 1)
    assert [p for _, p in down.sent] == ([rep] if gw.counters["echo_replies"] else [])


# ---- IPv4 fragments in echo mode ----------------------------------------------------------


def split(pkt: bytes, size: int, order: list[int] | None = None) -> list[bytes]:
    """`pkt` cut into fragments of `size` payload bytes (built here, not by fragment_v4)."""
    hdr, payload = bytearray(pkt[:20]), pkt[20:]
    out = []
    for off in range(0, len(payload), size):
        piece = payload[off:off + size]
        more = 0x2000 if off + size < len(payload) else 0
        h = bytearray(hdr)
        struct.pack_into("!H", h, 2, 20 + len(piece))
        struct.pack_into("!H", h, 6, (off // 8) | more)
        h[10:12] = b"\0\0"
        h[10:12] = struct.pack("!H", csum(bytes(h)))
        out.append(bytes(h) + piece)
    return [out[i] for i in order] if order is not None else out


def join(frags: list[bytes]) -> bytes:
    """The datagram the fragments make, reassembled naively (for checking replies)."""
    parts = sorted(frags, key=lambda f: struct.unpack_from("!H", f, 6)[0] & 0x1FFF)
    payload = b"".join(f[20:struct.unpack_from("!H", f, 2)[0]] for f in parts)
    return parts[0][:20] + payload


@pytest.mark.parametrize("order", [None, [2, 0, 1], [1, 2, 0]])
def test_a_fragmented_echo_request_is_answered_in_fragments(order: list[int] | None) -> None:
    """ping -s 3000 over a 1500-byte link: three fragments up, a reply down in fragments of
    at most the session MTU, each a valid IPv4 packet, together the echo reply."""
    gw, down = make_gateway(1)
    data = bytes(range(256)) * 12                          # 3072 bytes of ICMP data
    req = ip4("10.99.1.2", "10.99.1.1", icmp4_echo(0x42, 9, data))
    frags = split(req, 1480, order)
    assert len(frags) == 3
    for f in frags:
        gw.uplink(1, f)
    replies = [p for _, p in down.sent]
    mtu = ModemConfig().session_ip(1).mtu
    assert len(replies) == 3 and all(len(p) <= mtu and csum(p[:20]) == 0 for p in replies)
    rep = join(replies)
    assert rep[12:16] == req[16:20] and rep[16:20] == req[12:16]
    assert rep[20] == 0 and rep[24:] == req[24:] and csum(rep[20:]) == 0
    assert gw.counters["echo_replies"] == 1 and gw.counters["ul_fragments"] == 3
    assert gw.counters["dl_packets"] == 3


def test_fragments_that_do_not_fit_together_drop_their_datagram() -> None:
    req = ip4("10.99.1.2", "10.99.1.1", icmp4_echo(1, 1, bytes(2000)))
    a, b = split(req, 1480)
    r = Reassembler()
    assert r.push(a, 0.0) is None
    overlapping = bytearray(b)
    struct.pack_into("!H", overlapping, 6, 1472 // 8)    # starts inside the first one
    overlapping[10:12] = b"\0\0"
    overlapping[10:12] = struct.pack("!H", csum(bytes(overlapping)))
    with pytest.raises(FragmentError):
        r.push(bytes(overlapping), 0.1)
    assert len(r) == 0 and r.push(b, 0.2) is None        # the datagram is gone: b waits alone
    odd = bytearray(a)
    struct.pack_into("!H", odd, 2, 20 + 1479)           # a non-final fragment of 1479 bytes
    odd[10:12] = b"\0\0"
    odd[10:12] = struct.pack("!H", csum(bytes(odd)))
    with pytest.raises(FragmentError):
        Reassembler().push(bytes(odd), 0.0)


def test_partial_datagrams_are_bounded_in_number_and_age() -> None:
    r = Reassembler(max_datagrams=2, timeout=5.0)
    firsts = [split(ip4("10.99.1.2", f"10.99.1.{i + 1}", icmp4_echo(i, i, bytes(2000))), 1480)
              for i in range(3)]                        # three datagrams: three destinations
    for t, (a, _) in enumerate(firsts):
        r.push(a, float(t))
    assert len(r) == 2                                      # the oldest went
    assert r.push(firsts[0][1], 3.0) is None                # its rest alone completes nothing
    assert r.push(firsts[2][1], 3.5) is not None            # a kept one completes
    assert r.push(firsts[0][1], 30.0) is None and len(r) == 1   # the others expired


def test_fragment_v4_respects_df_and_small_packets() -> None:
    small = ip4("10.99.1.1", "10.99.1.2", icmp4_echo(1, 1, b"x"))
    assert fragment_v4(small, 1500) == [small]
    df = ip4("10.99.1.1", "10.99.1.2", icmp4_echo(1, 1, bytes(3000)), frag=0x4000)
    assert fragment_v4(df, 1500) == [df]
    big = ip4("10.99.1.1", "10.99.1.2", icmp4_echo(1, 1, bytes(3000)))
    parts = fragment_v4(big, 1500)
    assert [len(p) for p in parts] == [1500, 1500, 20 + 3008 - 2 * 1480]
    assert join(parts)[20:] == big[20:]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=20, max_size=200), max_size=6),
       st.integers(0, 8))
def test_fuzz_reassembly_never_raises_anything_else(pkts: list[bytes], flip: int) -> None:
    r = Reassembler(max_datagrams=3)
    base = split(ip4("10.99.1.2", "10.99.1.1", icmp4_echo(1, 1, bytes(100))), 40)
    for n, pkt in enumerate([*base[:flip], *pkts]):
        try:
            whole = r.push(pkt, float(n))
        except FragmentError:
            continue
        if whole is not None:
            assert csum(whole[:20]) == 0
    assert len(r) <= 3


def split6(pkt: bytes, size: int, ident: int = 0x1234) -> list[bytes]:
    """An IPv6 packet cut into fragments of `size` payload bytes, each with a Fragment header
    (built here, not by fragment_v6)."""
    payload, nh = pkt[40:], pkt[6]
    out = []
    for off in range(0, len(payload), size):
        piece = payload[off:off + size]
        more = int(off + size < len(payload))
        hdr = bytearray(pkt[:40])
        struct.pack_into("!H", hdr, 4, 8 + len(piece))
        hdr[6] = 44
        out.append(bytes(hdr) + struct.pack("!BBHI", nh, 0, off | more, ident) + piece)
    return out


def join6(frags: list[bytes]) -> bytes:
    parts = sorted(frags, key=lambda f: struct.unpack_from("!H", f, 42)[0] & ~7)
    payload = b"".join(f[48:40 + struct.unpack_from("!H", f, 4)[0]] for f in parts)
    hdr = bytearray(parts[0][:40])
    hdr[6] = parts[0][40]
    struct.pack_into("!H", hdr, 4, len(payload))
    return bytes(hdr) + payload


@pytest.mark.parametrize("reverse", [False, True])
def test_a_fragmented_icmpv6_echo_request_is_answered_in_fragments(reverse: bool) -> None:
    """ping -6 -s 3000 over a 1500-byte link: fragments with Fragment headers up, the reply
    down in fragments of at most the MTU, each with a Fragment header of one identification."""
    gw, down = make_gateway(2)
    req = ip6_echo("fd99:2::2", "fd99:2::1", 5, 6, bytes(range(250)) * 12)
    frags = split6(req, 1448)
    for f in reversed(frags) if reverse else frags:
        gw.uplink(2, f)
    replies = [p for _, p in down.sent]
    mtu = ModemConfig().session_ip(2).mtu
    assert len(replies) == 3 and all(len(p) <= mtu and p[6] == 44 for p in replies)
    assert len({p[44:48] for p in replies}) == 1                 # one identification
    rep = join6(replies)
    assert rep[8:24] == req[24:40] and rep[40] == 129 and rep[44:] == req[44:]
    assert csum(pseudo6(rep[8:24], rep[24:40], len(rep) - 40) + rep[40:]) == 0
    assert gw.counters["echo_replies"] == 1 and gw.counters["ul_fragments"] == 3


def test_ipv6_fragments_that_overlap_drop_their_datagram() -> None:
    req = ip6_echo("fd99:2::2", "fd99:2::1", 5, 6, bytes(2000))
    a, b = split6(req, 1448)
    bad = bytearray(b)
    struct.pack_into("!H", bad, 42, 1440)                      # starts inside the first
    r = Reassembler()
    assert r.push(a, 0.0) is None
    with pytest.raises(FragmentError):
        r.push(bytes(bad), 0.1)
    assert len(r) == 0
    assert join6(fragment_v6(req, 1280, 9)) == req and fragment_v6(req[:1000], 1280, 9) == [
        req[:1000]]
