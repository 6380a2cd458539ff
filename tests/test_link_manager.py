"""LinkManager and SessionBridge with an in-memory MUX and fake TUNs (SEQPACKET socketpairs keep
packet boundaries as a TUN fd does)."""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from iosm_cuse.link import manager as manager_module
from iosm_cuse.link.args import LinkError
from iosm_cuse.link.loopback import LoopbackMux
from iosm_cuse.link.manager import LinkManager
from iosm_cuse.net.tun import IFF_NOARP, IFF_POINTOPOINT, IFF_UP

V4 = bytes([0x45]) + bytes(19) + b"payload"
V6 = bytes([0x60]) + bytes(39) + b"payload"


class FakeTun:
    """Stands for a TUN device: `fd` is the daemon's end, `peer` is the kernel's."""

    next_index = 10

    def __init__(self, name: str, mtu: int) -> None:
        self.fd_sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd_sock.setblocking(False)
        self.peer.setblocking(False)
        self.fd = self.fd_sock.fileno()
        self._name = name
        self._mtu = mtu
        self._flags = IFF_POINTOPOINT | IFF_NOARP
        self.index = FakeTun.next_index
        FakeTun.next_index += 1
        self.closed = False

    def name(self) -> str:
        return self._name

    def ifindex(self) -> int:
        return self.index

    def flags(self) -> int:
        return self._flags

    def set_up(self, up: bool) -> None:
        self._flags = (self._flags | IFF_UP) if up else (self._flags & ~IFF_UP)

    def mtu(self) -> int:
        return self._mtu

    def set_mtu(self, mtu: int) -> None:
        self._mtu = mtu

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True
        self.fd_sock.close()
        self.peer.close()

    def recv_all(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(70000))
            except BlockingIOError:
                return out


class Env:
    def __init__(self, mux: LoopbackMux) -> None:
        self.mux = mux
        self.uplinked: list[tuple[int, bytes]] = []
        self.tuns: dict[str, FakeTun] = {}
        mux.uplink = lambda i, p: self.uplinked.append((i, p))
        self.mgr = LinkManager(mux, "wwan0", tun_factory=self.factory, poll_interval=3600,
                               event_socket=None)

    def factory(self, name: str, mtu: int) -> FakeTun:
        tun = FakeTun(name, mtu)
        self.tuns[name] = tun
        return tun

    async def up(self, name: str, up: bool = True) -> None:
        self.tuns[name].set_up(up)
        await self.mgr.settle()


def with_env(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in its own loop with a started manager on a LoopbackMux (no
    pytest-asyncio here); extra pytest fixtures pass through."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        async def body() -> None:
            e = Env(LoopbackMux())
            await e.mgr.start()
            try:
                await fn(e, *args, **kwargs)
            finally:
                await e.mgr.stop()

        asyncio.run(body())

    sig = inspect.signature(fn)
    run.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=list(sig.parameters.values())[1:])
    return run


def run_async(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def run() -> None:
        asyncio.run(fn())  # type: ignore[arg-type]

    return run


@with_env
async def test_start_creates_wwan0_for_session_0_and_stop_removes_all(env: Env) -> None:
    [info] = env.mgr.show()
    assert (info.name, info.linkid, info.mtu, info.up, info.session) == \
        ("wwan0", 0, 1500, False, "closed")
    await env.mgr.add("wwan0-1", 1)
    await env.mgr.stop()
    assert env.mgr.show() == []
    assert all(t.closed for t in env.tuns.values())


@with_env
async def test_add_validation_errors_change_nothing(env: Env) -> None:
    await env.mgr.add("wwan0-1", 1, parent="wwan0")
    before = [i.as_dict() for i in env.mgr.show()]
    cases = [
        (("wwan0-9", 1), {}, errno.EBUSY, "link id 1 is in use by wwan0-1"),
        (("wwan0-8", 8), {}, errno.EINVAL, "out of range"),
        (("x", -1), {}, errno.EINVAL, "out of range"),
        (("wwan0-1", 2), {}, errno.EEXIST, "already exists"),
        (("a" * 16, 2), {}, errno.EINVAL, "not a valid ifname"),
        (("wwan0-2", 2), {"parent": "wwan1"}, errno.ENODEV, "parent"),
        (("wwan0-2", 2), {"mtu": 2033}, errno.EINVAL, "mtu"),
        (("wwan0-2", 2), {"mtu": 67}, errno.EINVAL, "mtu"),
    ]
    for args, kw, err, text in cases:
        with pytest.raises(LinkError) as info:
            await env.mgr.add(*args, **kw)  # type: ignore[arg-type]
        assert info.value.errno == err, args
        assert text in info.value.message
    assert [i.as_dict() for i in env.mgr.show()] == before
    assert set(env.tuns) == {"wwan0", "wwan0-1"}


@run_async
async def test_mtu_never_above_what_the_mux_carries() -> None:
    e = Env(LoopbackMux(max_ip_packet=1400))
    await e.mgr.start()
    try:
        assert e.mgr.show()[0].mtu == 1400
        info = await e.mgr.add("wwan0-1", 1, mtu=1300)
        assert info.mtu == 1300
    finally:
        await e.mgr.stop()


@with_env
async def test_delete_and_readd_and_unknown(env: Env) -> None:
    await env.mgr.add("wwan0-1", 1)
    with pytest.raises(LinkError) as info:
        await env.mgr.delete("wwan0-5")
    assert info.value.errno == errno.ENODEV
    await env.mgr.delete("wwan0-1")
    assert env.tuns["wwan0-1"].closed
    await env.mgr.add("other", 1)
    # The kernel lets the default link go too; link id 0 is then free again.
    await env.mgr.delete("wwan0")
    await env.mgr.add("wwan0", 0)
    assert [(i.name, i.linkid) for i in env.mgr.show()] == [("wwan0", 0), ("other", 1)]


@with_env
async def test_admin_up_opens_the_session_and_down_closes_it(env: Env) -> None:
    await env.mgr.add("wwan0-1", 1)
    await env.up("wwan0-1")
    assert env.mux.sessions == {1} and env.mux.channel_open
    assert env.mgr.show("wwan0-1")[0].session == "open"
    await env.up("wwan0")
    assert env.mux.sessions == {0, 1}
    await env.up("wwan0-1", False)
    assert env.mux.sessions == {0} and env.mux.closes == [1]
    await env.up("wwan0", False)
    assert not env.mux.channel_open


@run_async
async def test_failed_session_open_puts_the_link_down() -> None:
    e = Env(LoopbackMux(fail_open={2}))
    await e.mgr.start()
    try:
        await e.mgr.add("wwan0-2", 2)
        await e.up("wwan0-2")
        [info] = e.mgr.show("wwan0-2")
        assert (info.up, info.session, info.counters["session_open_errors"]) == \
            (False, "closed", 1)
    finally:
        await e.mgr.stop()


@with_env
async def test_packets_flow_both_ways_and_only_on_their_link(env: Env) -> None:
    await env.mgr.add("wwan0-1", 1)
    await env.mgr.add("wwan0-2", 2)
    await env.up("wwan0-1")
    await env.up("wwan0-2")
    env.tuns["wwan0-1"].peer.send(V4)
    env.tuns["wwan0-2"].peer.send(V6)
    await asyncio.sleep(0.05)
    assert sorted(env.uplinked) == [(1, V4), (2, V6)]
    assert env.mux.downlink(2, V4 + b"dl")
    assert env.tuns["wwan0-2"].recv_all() == [V4 + b"dl"]
    assert env.tuns["wwan0-1"].recv_all() == []
    c1 = env.mgr.show("wwan0-1")[0].counters
    c2 = env.mgr.show("wwan0-2")[0].counters
    assert (c1["tx_packets"], c1["tx_bytes"], c1["rx_packets"]) == (1, len(V4), 0)
    assert (c2["tx_packets"], c2["rx_packets"], c2["rx_bytes"]) == (1, 1, len(V4) + 2)


@with_env
async def test_bad_uplink_packets_are_dropped_counted_and_logged_once(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    await env.mgr.add("wwan0-1", 1)
    await env.up("wwan0-1")
    peer = env.tuns["wwan0-1"].peer
    for _ in range(3):
        peer.send(V4 + bytes(2100))        # larger than MUX Lite's 2032
        peer.send(b"\x00" * 40)            # not IP
    peer.send(V4)
    await asyncio.sleep(0.05)
    c = env.mgr.show("wwan0-1")[0].counters
    assert (c["tx_dropped_too_big"], c["tx_dropped_not_ip"], c["tx_packets"]) == (3, 3, 1)
    assert env.uplinked == [(1, V4)]
    assert sum("2032" in r.message for r in caplog.records) == 1
    assert sum("non-IP" in r.message for r in caplog.records) == 1


@with_env
async def test_downlink_for_an_unknown_link_is_counted(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.mux.sessions.add(5)                 # a session the host never bridged
    for _ in range(4):
        env.mux.downlink(5, V4)
    assert env.mgr.counters()["dl_unknown_link"] == 4
    assert sum("if_id 5" in r.message for r in caplog.records) == 1


@with_env
async def test_flow_control_stops_reading_that_link_only(env: Env) -> None:
    await env.mgr.add("wwan0-1", 1)
    await env.mgr.add("wwan0-2", 2)
    await env.up("wwan0-1")
    await env.up("wwan0-2")
    env.mux.flow(1, True)
    env.tuns["wwan0-1"].peer.send(V4)
    env.tuns["wwan0-2"].peer.send(V6)
    await asyncio.sleep(0.05)
    assert env.uplinked == [(2, V6)]       # link 1's packet waits in the kernel's queue
    env.mux.flow(1, False)
    await asyncio.sleep(0.05)
    assert env.uplinked == [(2, V6), (1, V4)]
    assert env.mgr.show("wwan0-1")[0].counters["flow_stops"] == 1


@with_env
async def test_mux_refusal_is_counted_as_drop(env: Env) -> None:
    await env.mgr.add("wwan0-1", 1)
    await env.up("wwan0-1")
    env.mux.sessions.discard(1)            # the MUX lost the session: transmit() -> False
    env.tuns["wwan0-1"].peer.send(V4)
    await asyncio.sleep(0.05)
    assert env.mgr.show("wwan0-1")[0].counters["tx_dropped_mux"] == 1


@with_env
async def test_control_operations(env: Env) -> None:
    res = await env.mgr.handle("link.add", {"dev": "wwan0-3", "parent": "wwan0", "linkid": 3})
    assert res["links"][0]["name"] == "wwan0-3" and res["links"][0]["linkid"] == 3
    shown = await env.mgr.handle("link.show", {})
    assert [ln["name"] for ln in shown["links"]] == ["wwan0", "wwan0-3"]
    assert set(shown["links"][0]) >= {"name", "ifindex", "linkid", "session", "up", "mtu",
                                      "counters", "flags", "parent"}
    await env.mgr.handle("link.del", {"linkid": 3})
    with pytest.raises(LinkError) as info:
        await env.mgr.handle("link.del", {"dev": "wwan0-3"})
    assert info.value.errno == errno.ENODEV


@with_env
async def test_a_link_whose_device_vanished_is_removed_and_its_session_closed(env: Env) -> None:
    await env.mgr.add("wwan0-4", 4)
    await env.up("wwan0-4")
    assert 4 in env.mux.sessions
    tun = env.tuns["wwan0-4"]
    tun.peer.close()                   # the reader sees end of file, as a destroyed TUN fails
    tun.closed = True
    await asyncio.sleep(0.05)
    assert [i.name for i in env.mgr.show()] == ["wwan0"]
    assert 4 not in env.mux.sessions
    await env.mgr.add("wwan0-4", 4)    # the link id is free again


@run_async
async def test_stop_is_bounded_when_the_modem_never_answers_close() -> None:
    e = Env(LoopbackMux(hang_close=True))
    await e.mgr.start()
    for n in range(1, 8):
        await e.mgr.add(f"wwan0-{n}", n)
    for name in e.tuns:
        e.tuns[name].set_up(True)
    await e.mgr.settle()
    assert e.mux.sessions == set(range(8))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(e.mgr.stop(), 10)
    # All eight closes waited at once: about one CLOSE_TIMEOUT, not eight.
    assert loop.time() - t0 < 2 * manager_module.CLOSE_TIMEOUT
    assert e.mgr.show() == [] and all(t.closed for t in e.tuns.values())
