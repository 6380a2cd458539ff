"""`iosm-cuse up --transport pty` as a real process, and the network namespaces it runs in.

Not a test module: the fixtures `netns`, `up` and `start_up` (conftest.py) are built on it, and
the host-tier tests drive the daemon through `Up`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

IOSM_CUSE = [str(Path(sys.executable).parent / "iosm-cuse")]
READY = re.compile(r"^iosm-cuse: .* ready; MBIM port (\S+) \((cuse|pty fallback[^)]*)\); "
                   r"data link (\S+) \(session 0\); MUX (\S+)$")
MBIMCLI_TIMEOUT = 20
READY_TIMEOUT = 15
REAP_TIMEOUT = 10

_names = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespace_name(prefix: str = "iosmt") -> str:
    """A name no other test process uses (the pid) nor another namespace of this one."""
    return f"{prefix}{os.getpid()}n{next(_names)}"


@contextlib.contextmanager
def network_namespace(name: str, *, create: bool = True) -> Iterator[str]:
    """`name` for the block, deleted after it whatever happened. create=False: something under
    test creates it (and should remove it); the deletion here is the safety net."""
    if create:
        ip("netns", "add", name)
    try:
        if create:
            ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        ip("netns", "del", name, check=False)


def link_name(session: int, instance: str = "wwan0") -> str:
    """The data link of MBIM session `session` of modem `instance`, as `iosm-cuse link add`
    names them here."""
    return instance if session == 0 else f"{instance}-{session}"


def disable_ipv6(ns: str) -> None:
    """No router solicitations or MLD reports: nothing moves a link's counters on its own."""
    for key in ("all", "default"):
        ip("netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")


class Up:
    """A running `iosm-cuse up`; every command runs in its namespace with its run directory.
    If it never prints its ready line, the process is killed and reaped before the failure.
    Several may run with one run directory: each is a modem of its own (`instance`, wwanN,
    from its ready line), and `status`, `add_link` and `connect` address that one."""

    def __init__(self, ns: str, run_dir: Path, *extra: str, mount_ns: bool = True) -> None:
        self.ns = ns
        self.run_dir = run_dir
        self.env = {**os.environ, "IOSM_CUSE_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
        self.env.pop("IOSM_CUSE_SOCKET", None)
        t0 = time.monotonic()
        # `ip netns exec` also gives a mount namespace of its own: a namespace the model creates
        # there is invisible outside. nsenter switches the network namespace only.
        enter = ["ip", "netns", "exec", ns] if mount_ns else ["nsenter", f"--net=/run/netns/{ns}"]
        self.proc = subprocess.Popen(
            [*enter, *IOSM_CUSE, "up", "--device", "sim", "--transport", "pty",
             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
            start_new_session=not mount_ns)  # a process group of its own, as under a shell
        try:
            self.ready_line = self._read_ready(timeout=READY_TIMEOUT)
            self.startup_s = time.monotonic() - t0
            m = READY.match(self.ready_line)
            assert m, self.ready_line
        except BaseException:
            self.reap()
            raise
        self.port = m.group(1)
        self.instance = m.group(3)  # wwanN: its data link of session 0

    def link(self, session: int) -> str:
        """This modem's data link of `session` (wwanN, wwanN-M)."""
        return link_name(session, self.instance)

    def _read_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            pytest.fail(f"no ready line within {timeout} s: {self.proc.stderr.read()}")
        line = self.proc.stdout.readline().rstrip("\n")
        if not line:
            self.proc.wait(5)
            pytest.fail(f"up exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return line

    def run(self, *argv: str, timeout: float = MBIMCLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True,
                              text=True, env=self.env, timeout=timeout)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(*IOSM_CUSE, *args)

    def mbimcli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("mbimcli", "-d", self.port, *args)

    def status(self) -> dict[str, Any]:
        res = self.cli("status", "--json", "--instance", self.instance.removeprefix("wwan"))
        assert res.returncode == 0, res.stderr
        st: dict[str, Any] = json.loads(res.stdout)
        return st

    def add_link(self, session: int) -> None:
        """`iosm-cuse link add` of wwan0-N for session N (wwan0 always exists)."""
        res = self.cli("link", "add", "dev", self.link(session), "parentdev-name", self.instance,
                       "type", "wwan", "linkid", str(session))
        assert res.returncode == 0, res.stderr

    def connect(self, session: int) -> str:
        """mbimcli attach (idempotent) and connect of `session` (IPv4), the granted address on
        its link, the link up; returns the model's gateway address for that session."""
        attach = self.mbimcli("--attach-packet-service")
        assert attach.returncode == 0, attach.stderr
        con = self.mbimcli(f"--connect=session-id={session},access-string=internet,ip-type=ipv4")
        assert con.returncode == 0 and "'activated'" in con.stdout, con.stdout + con.stderr
        addr = re.search(r"IP \[0\]: '([0-9.]+/[0-9]+)'", con.stdout)
        gw = re.search(r"Gateway: '([0-9.]+)'", con.stdout)
        assert addr and gw, con.stdout
        ip("-n", self.ns, "addr", "replace", addr.group(1), "dev", self.link(session))
        ip("-n", self.ns, "link", "set", self.link(session), "up")
        return gw.group(1)

    def open_fds(self, pid: int | None = None) -> int:
        """Open file descriptors of the daemon (or of `pid`), from /proc."""
        return len(os.listdir(f"/proc/{pid or self.status()['pid']}/fd"))

    def links(self) -> dict[str, int]:
        """name -> ifindex of every link but lo in the namespace."""
        out = ip("-n", self.ns, "-j", "link", "show").stdout
        return {ln["ifname"]: ln["ifindex"] for ln in json.loads(out) if ln["ifname"] != "lo"}

    def terminate(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Stop it as a user would (the test checks how it went): signal, wait, its stderr."""
        self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"up did not exit within 15 s of SIGTERM: {err}")
        return self.proc.returncode, err

    def reap(self) -> None:
        """Teardown: kill it if it still runs, collect its exit and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=REAP_TIMEOUT)


# start_up(*extra, mount_ns=True) -> Up: the conftest fixture that starts daemons in `netns`.
StartUp = Callable[..., Up]
