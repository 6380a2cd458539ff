"""Several modems on one machine, below the running stack: which instance each `up` claims
(race-free between processes started at once), which daemon the client commands reach, and
what makes each model a modem of its own (addresses, IMEI, gateway TUN name)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from iosm_cuse import control, rundir
from iosm_cuse.cli import main
from iosm_cuse.control import ControlError, ControlServer
from iosm_cuse.options import UpError, UpOptions, instance_number
from iosm_cuse.sim.config import ModemConfig, luhn_digit

# ---- claiming instances from several processes at once ------------------------------------

CLAIM_AT_ONCE = r"""
import os, sys, time
from iosm_cuse import devices, rundir
start = float(sys.argv[1])
while time.time() < start:
    pass
instance, port, locks = rundir.claim_instance(devices.DeviceSpec("sim"), None)
print(instance, port, flush=True)
sys.stdin.read()  # hold the locks until the test closes our stdin
"""


def test_ups_started_at_once_get_distinct_consecutive_instances(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    n = 8
    start = time.time() + 1.5  # every process has imported by then and spins until it
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_AT_ONCE, str(start)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, control.RUN_DIR_ENV: str(tmp_path)})
             for _ in range(n)]
    try:
        claimed = []
        for proc in procs:
            assert proc.stdout is not None
            claimed.append(tuple(proc.stdout.readline().split()))
        assert sorted(claimed) == sorted((f"wwan{k}", f"wwan{k}mbim0") for k in range(n))
        # With all eight held, a ninth process's claim takes wwan8.
        instance, _, locks = rundir.claim_instance(rundir_spec(), None)
        assert instance == f"wwan{n}"
        for lock in locks:
            lock.release()
    finally:
        for proc in procs:
            proc.communicate(timeout=10)
    # They exited without releasing: the kernel dropped their locks, wwan0 is free again.
    instance, _, locks = rundir.claim_instance(rundir_spec(), None)
    assert instance == "wwan0"
    for lock in locks:
        lock.release()


def rundir_spec() -> Any:
    from iosm_cuse.devices import DeviceSpec

    return DeviceSpec("sim")


CHURN = r"""
import os, sys
from iosm_cuse import devices, options, rundir
marker = sys.argv[1]
overlaps = 0
for _ in range(int(sys.argv[2])):
    try:
        _, _, locks = rundir.claim_instance(devices.DeviceSpec("sim"), "wwan0mbim0")
    except options.UpError:
        continue
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        overlaps += 1
    else:
        os.close(fd)
        os.unlink(marker)
    for lock in locks:
        lock.release()
print(overlaps, flush=True)
"""


def test_a_lock_released_while_another_process_waits_is_never_held_twice(
        tmp_path: Path) -> None:
    """The owner unlinks its lock file on release: a process that opened the old file before
    and flocks it after must not believe it holds the instance while a third holds the new
    file (rundir.Lock checks the file it locked is still the one at the path)."""
    env = {**os.environ, control.RUN_DIR_ENV: str(tmp_path / "run")}
    marker = tmp_path / "holder"
    procs = [subprocess.Popen([sys.executable, "-c", CHURN, str(marker), "3000"],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    overlaps = [int(proc.communicate(timeout=120)[0]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert overlaps == [0, 0, 0, 0]


def test_all_instances_taken_is_a_clear_refusal(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    held = []
    try:
        while True:
            try:
                held.append(rundir.claim_instance(rundir_spec(), None)[2])
            except UpError as exc:
                assert "all of wwan0..wwan15 are served" in str(exc)
                break
        assert len(held) == 16
    finally:
        for locks in held:
            for lock in locks:
                lock.release()


# ---- which daemon a client command reaches -----------------------------------------------


class Daemon:
    """A control server answering `status` and `link.*` with its own instance's name."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((op, args))
        if op == "status":
            return {"device": "sim", "pid": os.getpid(), "instance": self.instance}
        if op == "link.add" and args["linkid"] == 0:
            raise ControlError(errno.EBUSY, f"link id 0 is already used by {self.instance}")
        return {"links": [{"name": self.instance, "linkid": 0, "session": "open", "mtu": 1500,
                           "parent": self.instance}]}


@pytest.fixture
def two_daemons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Daemon]]:
    """wwan0 and wwan3 answering on their sockets, and a dead daemon's socket of wwan1."""
    run = tmp_path / "run"
    monkeypatch.setenv(control.RUN_DIR_ENV, str(run))
    monkeypatch.delenv(control.SOCKET_ENV, raising=False)
    loop = asyncio.new_event_loop()
    daemons = {name: Daemon(name) for name in ("wwan0", "wwan3")}
    servers = [ControlServer(control.socket_path(name), d) for name, d in daemons.items()]
    for srv in servers:
        loop.run_until_complete(srv.start())
    import socket

    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(control.socket_path("wwan1")))  # bound, never listening: refuses
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield daemons
    finally:
        dead.close()
        for srv in servers:
            asyncio.run_coroutine_threadsafe(srv.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_running_instances_are_the_answering_sockets(two_daemons: dict[str, Daemon]) -> None:
    assert rundir.running_instances() == ["wwan0", "wwan3"]


def test_several_running_and_none_named_is_an_error_listing_them(
        two_daemons: dict[str, Daemon]) -> None:
    for argv in (["status"], ["link", "show"], ["link", "add", "dev", "x", "linkid", "2"]):
        res = CliRunner().invoke(main, argv)
        assert res.exit_code == 1, (argv, res.output)
        assert res.stderr == ("iosm-cuse: 2 modems are running (wwan0, wwan3); say which "
                              "with --instance N\n")
    assert all(d.requests == [] for d in two_daemons.values())


def test_instance_option_and_link_names_choose_the_daemon(
        two_daemons: dict[str, Daemon]) -> None:
    res = CliRunner().invoke(main, ["status", "--instance", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["instance"] == "wwan3"
    res = CliRunner().invoke(main, ["link", "--instance", "0", "show"])
    assert res.exit_code == 0 and "wwan0@wwan0" in res.stdout
    # A wwanN-M or parent name says the modem, as before.
    res = CliRunner().invoke(main, ["link", "add", "dev", "wwan3-1", "parentdev-name", "wwan3",
                                    "type", "wwan", "linkid", "1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["link", "del", "wwan3-1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["link", "--instance", "3", "add", "dev", "x",
                                    "linkid", "0"])
    assert res.exit_code == 2 and "already used by wwan3" in res.stderr
    assert [op for op, _ in two_daemons["wwan3"].requests] == [
        "status", "link.add", "link.del", "link.add"]
    assert [op for op, _ in two_daemons["wwan0"].requests] == ["link.show"]
    # An instance with no daemon: the usual "no daemon" error, not another modem's answer.
    res = CliRunner().invoke(main, ["status", "--instance", "1"])
    assert res.exit_code == 1 and "no iosm-cuse daemon listens on" in res.stderr
    assert res.stderr.rstrip().endswith("(is `iosm-cuse up` running?)")


def test_the_only_running_daemon_is_the_default(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(control.SOCKET_ENV, raising=False)
    loop = asyncio.new_event_loop()
    d = Daemon("wwan2")
    srv = ControlServer(control.socket_path("wwan2"), d)
    loop.run_until_complete(srv.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        res = CliRunner().invoke(main, ["status", "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["instance"] == "wwan2"
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# ---- each model a modem of its own ---------------------------------------------------------


def test_each_instance_has_its_own_addresses_imei_and_gateway_tun() -> None:
    base = ModemConfig()
    assert base.for_instance(0) is base
    seen_v4: set[str] = set()
    imeis = set()
    for k in range(16):
        cfg = base.for_instance(k)
        nets = {str(cfg.session_ip(n).ipv4.network) for n in range(8)}
        assert len(nets) == 8 and not nets & seen_v4
        seen_v4 |= nets
        assert cfg.session_ip(0).ipv4_gateway == cfg.session_ip(0).ipv4.network[1]
        assert len(cfg.device_id) == 15 and luhn_digit(cfg.device_id[:14]) == int(
            cfg.device_id[14])
        imeis.add(cfg.device_id)
        opts = UpOptions().model_options(f"wwan{k}")
        assert opts.instance == k
    assert len(imeis) == 16
    assert str(base.for_instance(1).session_ip(3).ipv4) == "10.99.11.2/24"
    assert str(base.for_instance(1).session_ip(3).ipv6) == "fd99:b::2/64"
    # What a configuration file set is kept.
    own = ModemConfig.from_dict({"device_id": "490154203237518",
                                 "sessions": [{"ipv4": "192.0.2.2/24"}]})
    moved = own.for_instance(2)
    assert moved.device_id == "490154203237518"
    assert str(moved.session_ip(0).ipv4) == "192.0.2.2/24"
    assert str(moved.session_ip(1).ipv4) == "10.99.17.2/24"
    with pytest.raises(UpError):
        instance_number("eth0")


def test_the_gateway_tun_is_named_after_the_instance() -> None:
    from iosm_cuse.sim.assembly import gateway_tun_name

    assert gateway_tun_name(0) == "iosmgw0" and gateway_tun_name(5) == "iosmgw5"


def test_each_instance_is_announced_to_modemmanager_as_a_modem_of_its_own() -> None:
    """ModemManager groups ports by ID_MM_PHYSDEV_UID: each instance's port and link share
    one, and no two instances do (the guest test shows `mmcli -L` listing each)."""
    from iosm_cuse.system import uevent

    uids = set()
    for k in range(8):
        ports = uevent.Ports(f"wwan{k}", f"wwan{k}mbim0", 240, k, 10 + k)
        port = uevent.port_event(ports, "add", 1, 1)
        net = uevent.net_event(ports, "add", 2, 1)
        assert port["ID_MM_PHYSDEV_UID"] == net["ID_MM_PHYSDEV_UID"]
        assert port["DEVNAME"] == f"/dev/wwan{k}mbim0" and net["INTERFACE"] == f"wwan{k}"
        uids.add(port["ID_MM_PHYSDEV_UID"])
    assert len(uids) == 8
