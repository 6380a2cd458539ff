"""watch: the decision core with events, uevent decoding against a fake sysfs, and the process
adapter/CLI with real child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import until, until_async
from hypothesis import given
from hypothesis import strategies as st
from uio_fakesys import FakeSysfs

from iosm_cuse.bus.pci import IOSM_PCI_IDS, IVSHMEM_PCI_ID, PciId
from iosm_cuse.watch import (
    DeviceEvent,
    Start,
    StartAfter,
    Stop,
    WatchCore,
    Watcher,
    describe_uevent,
    monitor_source,
    present_devices,
)

XMM = PciId(0x8086, 0x7560)
A = "0000:03:00.0"


def ev(action: str, bdf: str = A, pci_id: PciId | None = XMM, uio: bool = True,
       subsystem: str = "pci") -> DeviceEvent:
    return DeviceEvent(action, subsystem, bdf, pci_id, uio)


# --- the core -----------------------------------------------------------------------------------

def test_bind_starts_once_unbind_stops() -> None:
    core = WatchCore()
    assert core.event(ev("bind")) == [Start(A, 1)]
    assert core.event(ev("add", subsystem="uio")) == []  # same device, already wanted
    core.child_started(A, 1, 0.0)
    assert core.event(ev("unbind", pci_id=None, uio=False)) == [Stop(A)]
    assert core.event(ev("remove", pci_id=None, uio=False)) == []


def test_not_uio_bound_or_foreign_ids_ignored() -> None:
    core = WatchCore()
    assert core.event(ev("bind", uio=False)) == []  # bound to iosm or another driver
    assert core.event(ev("bind", pci_id=IVSHMEM_PCI_ID)) == []  # test device not asked for
    assert core.event(ev("bind", pci_id=PciId(0x1AF4, 0x1041))) == []
    core = WatchCore(accepted=IOSM_PCI_IDS | {IVSHMEM_PCI_ID})
    assert core.event(ev("bind", pci_id=IVSHMEM_PCI_ID)) == [Start(A, 1)]


def test_crash_restarts_with_exponential_backoff_capped() -> None:
    core = WatchCore(backoff_initial=1.0, backoff_max=5.0, stable_after=30.0)
    gen = core.event(ev("present"))[0]
    assert isinstance(gen, Start)
    delays = []
    g, t = gen.gen, 0.0
    for _ in range(5):
        core.child_started(A, g, t)
        (after,) = core.child_exited(A, g, 1, t + 0.5)
        assert isinstance(after, StartAfter)
        delays.append(after.delay)
        (start,) = core.timer_fired(A)
        assert isinstance(start, Start)
        g, t = start.gen, t + 10
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_long_run_resets_backoff_and_clean_exit_not_restarted() -> None:
    core = WatchCore(backoff_initial=1.0, stable_after=30.0)
    core.event(ev("bind"))
    core.child_started(A, 1, 0.0)
    assert core.child_exited(A, 1, 1, 1.0) == [StartAfter(A, 1.0)]
    assert core.timer_fired(A) == [Start(A, 2)]
    core.child_started(A, 2, 2.0)
    assert core.child_exited(A, 2, 1, 3.0) == [StartAfter(A, 2.0)]
    assert core.timer_fired(A) == [Start(A, 3)]
    core.child_started(A, 3, 10.0)
    assert core.child_exited(A, 3, 1, 100.0) == [StartAfter(A, 1.0)]  # ran 90 s: reset
    assert core.timer_fired(A) == [Start(A, 4)]
    core.child_started(A, 4, 101.0)
    assert core.child_exited(A, 4, 0, 102.0) == []


def test_unbind_during_backoff_cancels_restart() -> None:
    core = WatchCore()
    core.event(ev("bind"))
    core.child_started(A, 1, 0.0)
    assert core.child_exited(A, 1, 1, 1.0) == [StartAfter(A, 1.0)]
    assert core.event(ev("unbind", pci_id=None, uio=False)) == []  # no child to stop
    assert core.timer_fired(A) == []


def test_rebind_while_stopping_waits_for_the_old_child() -> None:
    core = WatchCore()
    core.event(ev("bind"))
    core.child_started(A, 1, 0.0)
    assert core.event(ev("unbind", pci_id=None, uio=False)) == [Stop(A)]
    assert core.event(ev("bind")) == []  # old child still stopping: never two at once
    assert core.child_exited(A, 1, -15, 1.5) == [Start(A, 2)]  # killed by us: replaced now
    core.child_started(A, 2, 2.0)
    assert core.child_exited(A, 1, 1, 2.5) == []  # a stale report changes nothing
    assert core.event(ev("unbind", pci_id=None, uio=False)) == [Stop(A)]
    assert core.event(ev("unbind", pci_id=None, uio=False)) == []  # one Stop per child


def test_unbind_while_spawning_stops_the_new_child() -> None:
    core = WatchCore()
    assert core.event(ev("bind")) == [Start(A, 1)]
    assert core.event(ev("unbind", pci_id=None, uio=False)) == [Stop(A)]
    assert A in core.stopping
    assert core.child_exited(A, 1, -15, 1.0) == []


def test_stop_all_stops_every_child_that_exists() -> None:
    core = WatchCore()
    b, c = "0000:04:00.0", "0000:05:00.0"
    core.event(ev("bind"))
    core.event(ev("bind", bdf=b))  # still spawning: stopped too
    core.event(ev("bind", bdf=c))
    core.child_started(A, 1, 0.0)
    core.child_started(c, 1, 0.0)
    assert core.child_exited(c, 1, 0, 1.0) == []  # clean exit: nothing left for c
    assert core.stop_all() == [Stop(A), Stop(b)]
    assert core.wanted == set()


_actions = st.sampled_from(["add", "bind", "unbind", "remove", "present", "change", "exit",
                            "exit0", "timer", "started"])


@given(st.lists(st.tuples(_actions, st.sampled_from([A, "0000:04:00.0"]), st.booleans()),
                max_size=40))
def test_core_invariants_under_any_event_order(steps: list[tuple[str, str, bool]]) -> None:
    """Whatever the order of uevents, child exits and timers: never two children for one
    device, a Stop only for a child that exists, and nothing left running once unbound."""
    core = WatchCore()
    children: dict[str, int] = {}  # bdf -> gen of the child that exists (spawning or running)
    stopped: set[str] = set()
    bound: dict[str, bool] = {}
    for now, (what, bdf, uio) in enumerate(steps):
        if what == "started":
            if bdf in children:
                core.child_started(bdf, children[bdf], float(now))
            continue
        if what in ("exit", "exit0"):
            if bdf not in children:
                continue
            stopped.discard(bdf)
            actions = core.child_exited(bdf, children.pop(bdf), 0 if what == "exit0" else 1,
                                        float(now))
        elif what == "timer":
            actions = core.timer_fired(bdf)
        else:
            actions = core.event(ev(what, bdf=bdf, uio=uio))
            if what in ("unbind", "remove"):
                bound[bdf] = False
            elif uio:
                bound[bdf] = True
        for a in actions:
            if isinstance(a, Start):
                assert a.bdf not in children, "second child for a device"
                children[a.bdf] = a.gen
            elif isinstance(a, Stop):
                assert a.bdf in children and a.bdf not in stopped
                stopped.add(a.bdf)
    for bdf, gen in children.items():
        if not bound.get(bdf, False):
            assert bdf in stopped, f"child {gen} of unbound {bdf} never stopped"


# --- uevents and sysfs --------------------------------------------------------------------------

@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_pci(A, 0x8086, 0x7560, {0: 0x1000, 2: 0x1000})
    fs.add_pci("0000:00:03.0", 0x1AF4, 0x1110, {0: 0x100, 2: 0x400000})
    return fs


def test_describe_pci_bind_and_uio_add(sysfs: FakeSysfs) -> None:
    sysfs.bind(A, "uio_pci_generic", "uio0")
    bind = describe_uevent({"ACTION": "bind", "SUBSYSTEM": "pci", "DRIVER": "uio_pci_generic",
                            "DEVPATH": f"/devices/pci0000:00/{A}", "PCI_ID": "8086:7560"},
                           sysfs.root)
    assert bind == DeviceEvent("bind", "pci", A, XMM, True)
    add = describe_uevent({"ACTION": "add", "SUBSYSTEM": "uio",
                           "DEVPATH": f"/devices/pci0000:00/{A}/uio/uio0"}, sysfs.root)
    assert add == DeviceEvent("add", "uio", A, XMM, True)


def test_describe_unbind_and_foreign(sysfs: FakeSysfs) -> None:
    ub = describe_uevent({"ACTION": "unbind", "SUBSYSTEM": "pci",
                          "DEVPATH": f"/devices/pci0000:00/{A}"}, sysfs.root)
    assert ub == DeviceEvent("unbind", "pci", A, None, False)
    assert describe_uevent({"ACTION": "add", "SUBSYSTEM": "net",
                            "DEVPATH": "/devices/virtual/net/lo"}, sysfs.root) is None
    assert describe_uevent({"ACTION": "add", "SUBSYSTEM": "uio",
                            "DEVPATH": "/devices/platform/foo/uio/uio3"}, sysfs.root) is None
    assert describe_uevent({"ACTION": "add", "SUBSYSTEM": "pci",
                            "DEVPATH": "/devices/../../etc"}, sysfs.root) is None


def test_present_devices_reports_binding(sysfs: FakeSysfs) -> None:
    sysfs.bind("0000:00:03.0", "uio_pci_generic", "uio0")
    got = {e.bdf: e.uio_bound for e in present_devices(sysfs.root)}
    assert got == {A: False, "0000:00:03.0": True}


def test_monitor_source(tmp_path: Path) -> None:
    control = tmp_path / "control"
    assert monitor_source(control) == "kernel"
    control.touch()
    assert monitor_source(control) == "udev"


# --- the adapter, with real child processes -----------------------------------------------------

CHILD = """
import os, signal, sys, time
log = sys.argv[1]
def bye(*_):
    with open(log, "a") as f:
        f.write(f"term {sys.argv[2]} {os.getpid()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)  # before "start": the test may stop us right after it
with open(log, "a") as f:
    f.write(f"start {sys.argv[2]} {os.getpid()} {sys.argv[3]}\\n")
if sys.argv[3] == "crash":
    sys.exit(3)
time.sleep(60)
"""


def _lines(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []


CHILD_TIMEOUT = 30.0  # seconds for a child to start, crash, restart or stop


def test_watcher_starts_stops_and_restarts_children(sysfs: FakeSysfs, tmp_path: Path) -> None:
    script, log = tmp_path / "child.py", tmp_path / "log"
    script.write_text(CHILD)
    mode = tmp_path / "mode"
    mode.write_text("crash")

    async def main() -> None:
        core = WatchCore(backoff_initial=0.05, backoff_max=0.2)
        code = (f"import sys; sys.argv[3] = open({str(mode)!r}).read(); "
                f"exec(open({str(script)!r}).read())")
        cmd = [sys.executable, "-c", code, str(log), "{bdf}", "-"]
        w = Watcher(core, cmd, sysfs.root, stop_timeout=5)
        sysfs.bind(A, "uio_pci_generic", "uio0")
        w.on_uevent({"ACTION": "bind", "SUBSYSTEM": "pci", "PCI_ID": "8086:7560",
                     "DEVPATH": f"/devices/pci0000:00/{A}"})
        try:
            await until_async(lambda: sum(x.startswith("start") for x in _lines(log)) >= 2,
                              CHILD_TIMEOUT, lambda: _lines(log), poll=0.02)
            mode.write_text("run")  # crashes twice at least, then stays up
            # a child that read "run" (earlier ones may still crash once more)
            await until_async(lambda: A in w.children and w.children[A].returncode is None
                              and core.started_at.get(A) is not None
                              and _lines(log)[-1] == f"start {A} {w.children[A].pid} run",
                              CHILD_TIMEOUT, lambda: _lines(log), poll=0.02)
            pid = w.children[A].pid
            sysfs.unbind(A)
            w.on_uevent({"ACTION": "unbind", "SUBSYSTEM": "pci",
                         "DEVPATH": f"/devices/pci0000:00/{A}"})
            await until_async(lambda: f"term {A} {pid}" in _lines(log), CHILD_TIMEOUT,
                              lambda: _lines(log), poll=0.02)
        finally:
            await w.shutdown()  # stops every child still running, also after a failure
        assert A not in w.children

    asyncio.run(main())


def test_cli_sigterm_stops_all_children(sysfs: FakeSysfs, tmp_path: Path) -> None:
    pytest.importorskip("pyudev")
    script, log = tmp_path / "child.py", tmp_path / "log"
    script.write_text(CHILD)
    sysfs.bind("0000:00:03.0", "uio_pci_generic", "uio0")
    sysfs.bind(A, "uio_pci_generic", "uio1")
    cmd = f"{sys.executable} {script} {log} {{bdf}} run"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "iosm-cuse"), "watch",
                             "--sysfs", str(sysfs.root), "--source", "kernel",
                             "--test-device", "1af4:1110", "--exec", cmd],
                            stderr=subprocess.PIPE, text=True)
    try:
        def both_started() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return len([x for x in _lines(log) if x.startswith("start")]) >= 2

        until(both_started, 20, lambda: _lines(log))
        pids = {int(x.split()[2]) for x in _lines(log)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        terms = {int(x.split()[2]) for x in _lines(log) if x.startswith("term")}
        assert terms == pids
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "listening to kernel" not in err  # --source given: no auto line
    assert "0000:00:03.0: started" in err and f"{A}: started" in err
