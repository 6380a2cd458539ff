"""The client commands (`status`, `link`) through click's CliRunner against a control server
running in this process, and `up`'s refusals that need no modem."""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from iosm_cuse import control, devices, rundir
from iosm_cuse.cli import main
from iosm_cuse.control import ControlError, ControlServer
from iosm_cuse.options import UpError

STATUS = {
    "device": "sim", "pid": 1,
    "modem": {"name": "XMM7560 (simulated)", "exec_stage": "RUN", "ipc_state": "RUNNING",
              "mux_mode": "lite"},
    "port": {"path": "/run/iosm-cuse/wwan0mbim0", "transport": "pty",
             "openers": 1, "opener_pids": [42]},
    "links": [{"name": "wwan0", "linkid": 0, "session": "open", "up": True, "mtu": 1500,
               "counters": {"rx_packets": 3, "rx_bytes": 252, "tx_packets": 4, "tx_bytes": 300,
                            "tx_dropped_mux": 1, "rx_dropped_write": 2}}],
    "errors": {"bad_td": 0},
}


class FakeDaemonSide:
    """A control handler with the daemon's error conventions; records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((op, args))
        if op == "status":
            return STATUS
        if op == "link.add" and args["linkid"] == 0:
            raise ControlError(errno.EBUSY, "link id 0 is already used by wwan0")
        return {"links": []}


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDaemonSide]:
    """A ControlServer on its own loop in a thread, at the default socket of instance wwan0."""
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.delenv(control.SOCKET_ENV, raising=False)
    side = FakeDaemonSide()
    loop = asyncio.new_event_loop()
    srv = ControlServer(control.socket_path("wwan0"), side)
    loop.run_until_complete(srv.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield side
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_status_json_is_the_daemon_answer(server: FakeDaemonSide) -> None:
    res = CliRunner().invoke(main, ["status", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == STATUS


def test_status_text_names_state_port_and_links(server: FakeDaemonSide) -> None:
    res = CliRunner().invoke(main, ["status"])
    assert res.exit_code == 0, res.output
    assert "exec stage RUN, IPC RUNNING, MUX lite" in res.output
    assert "/run/iosm-cuse/wwan0mbim0 (pty), open by 1 (pid 42)" in res.output
    assert ("wwan0: linkid 0, session open, up, mtu 1500; rx 3 pkts 252 B, tx 4 pkts 300 B, "
            "dropped 3") in res.output
    assert "bad_td 0" in res.output


def test_no_daemon_is_one_line_on_stderr_and_exit_1(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    res = CliRunner().invoke(main, ["status"])
    assert res.exit_code == 1
    assert res.stdout == ""
    assert res.stderr.startswith("iosm-cuse: no iosm-cuse daemon listens on")
    assert "Traceback" not in res.output


def test_explicit_socket_option_wins(server: FakeDaemonSide, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["status", "--socket", str(tmp_path / "other.sock")])
    assert res.exit_code == 1 and "other.sock" in res.stderr
    assert server.requests == []


def test_daemon_error_prints_like_iproute2_and_exit_2(server: FakeDaemonSide,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI's own error path, independent of the link argument parser.
    from iosm_cuse import cli

    with pytest.raises(SystemExit) as info:
        cli._call(None, "wwan0", "link.add", {"linkid": 0})
    assert info.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == ("RTNETLINK answers: Device or resource busy: "
                       "link id 0 is already used by wwan0\n")
    assert server.requests == [("link.add", {"dev": None, "parent": None, "linkid": 0,
                                             "mtu": None})]


def test_up_rejects_a_bad_device_and_port_name(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    res = CliRunner().invoke(main, ["up", "--device", "floppy"])
    assert res.exit_code == 1 and "--device 'floppy'" in res.stderr
    res = CliRunner().invoke(main, ["up", "--device", "sim", "--port-name", "eth0"])
    assert res.exit_code == 1 and "--port-name 'eth0'" in res.stderr


def test_second_claim_of_a_device_is_refused_with_the_owner(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A UIO device is one modem: a second claim is refused. Each model is a modem of its own:
    a second `up --device sim` gets the next instance, as a second iosm device is wwan1."""
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    spec = devices.DeviceSpec("uio", "0000:03:00.0")
    instance, port, locks = rundir.claim_instance(spec, None)
    assert (instance, port) == ("wwan0", "wwan0mbim0")
    try:
        with pytest.raises(UpError, match=r"device uio:0000:03:00.0 is already driven .*pid \d+"):
            rundir.claim_instance(spec, None)
        # A model takes the next free name; an explicit used name is refused.
        sim = devices.DeviceSpec("sim")
        inst2, port2, locks2 = rundir.claim_instance(sim, None)
        assert (inst2, port2) == ("wwan1", "wwan1mbim0")
        inst3, port3, locks3 = rundir.claim_instance(sim, None)
        assert (inst3, port3) == ("wwan2", "wwan2mbim0")
        for lock in locks2 + locks3:
            lock.release()
        with pytest.raises(UpError, match="wwan0mbim0 is already served"):
            rundir.claim_instance(sim, "wwan0mbim0")
    finally:
        for lock in locks:
            lock.release()
    # Released: the device can be claimed again, the lock files are gone.
    _, _, again = rundir.claim_instance(spec, None)
    for lock in again:
        lock.release()
    assert list(tmp_path.glob("*.lock")) == []


def test_parse_device_forms() -> None:
    assert devices.parse_device("sim") == devices.DeviceSpec("sim")
    assert devices.parse_device("uio:0000:03:00.0") == devices.DeviceSpec("uio", "0000:03:00.0")
    assert devices.parse_device("/dev/uio0") == devices.DeviceSpec("uio", "/dev/uio0")
    with pytest.raises(UpError):
        devices.parse_device("uio")


def test_link_add_takes_the_ip_link_form_as_is(server: FakeDaemonSide) -> None:
    res = CliRunner().invoke(main, ["link", "add", "dev", "wwan0-1", "parentdev-name", "wwan0",
                                    "type", "wwan", "linkid", "1"])
    assert res.exit_code == 0, res.output
    assert server.requests == [("link.add", {"dev": "wwan0-1", "parent": "wwan0", "linkid": 1,
                                             "mtu": None})]


def test_link_add_of_a_used_id_is_ebusy_exit_2(server: FakeDaemonSide) -> None:
    res = CliRunner().invoke(main, ["link", "add", "wwan0-5", "linkid", "0", "mtu", "1400"])
    assert res.exit_code == 2
    assert res.stderr.startswith("RTNETLINK answers: Device or resource busy")
    assert server.requests == [("link.add", {"dev": "wwan0-5", "parent": None, "linkid": 0,
                                             "mtu": 1400})]


@pytest.mark.parametrize("argv", [
    ["add", "dev", "wwan0-1", "type", "vlan", "linkid", "1"],
    ["add", "dev", "wwan0-1"],
    ["add", "dev", "wwan0-1", "linkid"],
    ["del"],
    ["show", "dev", "a/b"],
])
def test_bad_link_command_lines_exit_255_without_asking_the_daemon(
        server: FakeDaemonSide, argv: list[str]) -> None:
    res = CliRunner().invoke(main, ["link", *argv])
    assert res.exit_code == 255, res.output
    assert res.stdout == "" and res.stderr.strip()
    assert "Traceback" not in res.output
    assert server.requests == []


def test_link_del_and_show(server: FakeDaemonSide) -> None:
    assert CliRunner().invoke(main, ["link", "del", "wwan0-1"]).exit_code == 0
    assert CliRunner().invoke(main, ["link", "delete", "dev", "wwan0-2"]).exit_code == 0
    res = CliRunner().invoke(main, ["link", "show", "dev", "wwan0", "-j"])
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    assert CliRunner().invoke(main, ["link", "list"]).exit_code == 0
    assert server.requests == [("link.del", {"dev": "wwan0-1", "linkid": None}),
                               ("link.del", {"dev": "wwan0-2", "linkid": None}),
                               ("link.show", {"dev": "wwan0"}), ("link.show", {"dev": None})]


def test_auto_device_prefers_a_uio_bound_modem(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from uio_fakesys import FakeSysfs

    fs = FakeSysfs(tmp_path / "sys")
    fs.add_pci("0000:00:03.0", 0x1AF4, 0x1110, {0: 0x100, 2: 0x400000})  # ivshmem: not a modem
    fs.add_pci("0000:03:00.0", 0x8086, 0x7560, {0: 0x1000, 2: 0x1000})
    assert devices.find_default_device(fs.root) == devices.DeviceSpec("sim")
    assert "0000:03:00.0 is not bound to UIO" in caplog.text
    fs.add_pci("0000:04:00.0", 0x8086, 0x7360, {0: 0x1000, 2: 0x1000})
    fs.bind("0000:04:00.0", "uio_pci_generic", uio="uio0")
    assert devices.find_default_device(fs.root) == devices.DeviceSpec("uio", "0000:04:00.0")


def test_up_refuses_a_bad_config_before_starting_anything(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path / "run"))
    bad = tmp_path / "modem.json"
    bad.write_text('{"bogus": 1}')
    res = CliRunner().invoke(main, ["up", "--device", "sim", "--config", str(bad)])
    assert res.exit_code == 1
    assert res.stderr.startswith(f"iosm-cuse: --config {bad}: ")
    assert "bogus" in res.stderr and "Traceback" not in res.output
    assert list((tmp_path / "run").iterdir()) == []  # locks released


def test_up_transport_cuse_without_cuse_is_refused_cleanly(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    try:
        os.close(os.open("/dev/cuse", os.O_RDWR))
        pytest.skip("this kernel has CUSE: the refusal cannot happen here")
    except OSError:
        pass
    env = {**os.environ, control.RUN_DIR_ENV: str(tmp_path / "run")}
    res = subprocess.run([str(Path(sys.executable).parent / "iosm-cuse"), "up", "--device", "sim",
                          "--transport", "cuse"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    assert "iosm-cuse: --transport cuse: /dev/cuse: " in res.stderr
    assert "Traceback" not in res.stderr
    assert list((tmp_path / "run").iterdir()) == []
