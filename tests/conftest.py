"""Fixtures shared by the test tiers, and the rule that keeps `kernel` tests inside the guest.

On the host, `kernel`-marked tests are skipped (tests/vm runs them in a Debian-kernel guest).
Inside the guest (IOSM_IN_GUEST=1, set by tests/vm), only `kernel`-marked tests run.

Host-side fixtures (each cleans up after its yield, also when the test fails):
  netns          a network namespace, created for the test and always deleted
  netns_name     a namespace name no one uses yet, for the code under test to create (or the
                 test: `ip netns add`); deleted after the test if it exists. Ask for it
                 before start_up, so daemons are reaped before it goes
  start_up       start `iosm-cuse up` (tests/daemon_up.py's Up) in `netns`; every daemon it
                 started is killed (if still running) and reaped after the test
  up             one daemon started with the defaults by start_up
  shm_pair       the host and device ends of a shared-memory bus, both closed after the test;
                 run the engine against the model on it with helpers.engine_running

Guest-side fixtures for kernel tests (see tests/vm/README.md):
  ivshmem        the ivshmem-plain device bound to uio_pci_generic, its BAR2 and the host file
  host_run       run a command on the HOST beside the guest and get its result
  host_process   start a process on the HOST for the duration of a test (e.g. the modem model)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_up import StartUp, Up, namespace_name, network_namespace
from helpers import ShmPair, device_view

from iosm_cuse.bus.shm import ShmBus

IN_GUEST = os.environ.get("IOSM_IN_GUEST") == "1"
IN_UML = os.environ.get("IOSM_IN_UML") == "1"
KERNEL_SKIP = "kernel tier: runs in the guest via tests/vm"
UML_SKIP = "uml tier: runs in User-Mode Linux via tests/uml"


def _keep_only(config: pytest.Config, items: list[pytest.Item], marker: str) -> None:
    """Deselect every item without `marker` (inside a guest, only its own tier runs)."""
    others = [item for item in items if item.get_closest_marker(marker) is None]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if item.get_closest_marker(marker) is not None]


def _skip_marked(items: list[pytest.Item], marker: str, reason: str) -> None:
    """Skip, with `reason`, every item with `marker` (a tier that runs elsewhere)."""
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker(marker) is not None:
            item.add_marker(skip)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_UML:
        _keep_only(config, items, "uml")
        return
    _skip_marked(items, "uml", UML_SKIP)
    if IN_GUEST:
        _keep_only(config, items, "kernel")
        return
    _skip_marked(items, "kernel", KERNEL_SKIP)


# --- a network namespace and the daemon in it (host) -----------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace(namespace_name()) as name:
        yield name


@pytest.fixture
def netns_name() -> Iterator[str]:
    with network_namespace(namespace_name("iosmgw"), create=False) as name:
        yield name


@pytest.fixture
def start_up(netns: str, tmp_path: Path) -> Iterator[StartUp]:
    """start_up(*extra, mount_ns=True) -> Up: `iosm-cuse up --device sim --transport pty
    *extra` in `netns` with the run directory tmp_path/run."""
    started: list[Up] = []

    def start(*extra: str, mount_ns: bool = True) -> Up:
        daemon = Up(netns, tmp_path / "run", *extra, mount_ns=mount_ns)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.reap()


@pytest.fixture
def up(start_up: StartUp) -> Up:
    return start_up()


# --- the engine and the model in one process (host) -------------------------------------------


@pytest.fixture
def shm_pair() -> Iterator[ShmPair]:
    host = ShmBus.create()
    try:
        dev = device_view(host)
        try:
            yield ShmPair(host, dev)
        finally:
            dev.close()
    finally:
        host.close()


# --- the ivshmem device (guest) -------------------------------------------------------------

IVSHMEM_ID = ("0x1af4", "0x1110")
PCI_DEVICES = Path("/sys/bus/pci/devices")
UIO_NEW_ID = Path("/sys/bus/pci/drivers/uio_pci_generic/new_id")


@dataclass(frozen=True)
class Ivshmem:
    """QEMU's ivshmem-plain in the guest. BAR2 (resource2) is the host file `host_path`."""

    bdf: str  # PCI address, e.g. 0000:00:03.0
    uio: Path  # /dev/uioN
    resource2: Path  # mmap this (read/write) for the shared memory
    size: int
    host_path: str  # the backing file on the host (for host_run / host_process commands)
    info: dict[str, Any]  # tests/vm's ivshmem.json: tokens and offsets of the smoke test


def _vm_info() -> dict[str, Any]:
    path = os.environ.get("IOSM_VM_IVSHMEM_INFO")
    if not IN_GUEST or not path:
        pytest.fail("no IOSM_VM_IVSHMEM_INFO: kernel tests run only through tests/vm")
    info: dict[str, Any] = json.loads(Path(path).read_text())
    return info


def _find_ivshmem() -> str:
    for device in sorted(PCI_DEVICES.iterdir()):
        ids = ((device / "vendor").read_text().strip(), (device / "device").read_text().strip())
        if ids == IVSHMEM_ID:
            return device.name
    pytest.fail("no ivshmem PCI device (1af4:1110) in the guest")


def _bind_uio(bdf: str) -> Path:
    """Bind 1af4:1110 to uio_pci_generic (once per boot) and return its /dev/uioN."""
    device = PCI_DEVICES / bdf
    if not (device / "uio").is_dir():
        try:
            UIO_NEW_ID.write_text("1af4 1110")
        except FileExistsError:  # the id is known already: bind this device explicitly
            Path("/sys/bus/pci/drivers/uio_pci_generic/bind").write_text(bdf)
    deadline = time.monotonic() + 30
    while not (device / "uio").is_dir() or not any((device / "uio").iterdir()):
        if time.monotonic() > deadline:
            pytest.fail(f"{bdf} did not bind to uio_pci_generic")
        time.sleep(0.05)
    name = next((device / "uio").iterdir()).name
    node = Path("/dev") / name
    while not node.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{node} never appeared")
        time.sleep(0.05)
    return node


@pytest.fixture(scope="session")
def ivshmem() -> Ivshmem:
    info = _vm_info()
    bdf = _find_ivshmem()
    uio = _bind_uio(bdf)
    resource2 = PCI_DEVICES / bdf / "resource2"
    return Ivshmem(bdf, uio, resource2, resource2.stat().st_size, info["host_path"], info)


# --- processes on the host, beside the guest (tests/vm/agent.py) ------------------------------

AGENT_POLL = 0.05


def _agent_request(message: dict[str, Any], timeout: float) -> dict[str, Any]:
    directory = os.environ.get("IOSM_VM_AGENT_DIR")
    if not IN_GUEST or not directory:
        pytest.fail("no IOSM_VM_AGENT_DIR: host processes are offered only through tests/vm")
    base = Path(directory) / uuid.uuid4().hex
    tmp = base.with_suffix(".tmp")
    tmp.write_text(json.dumps(message))
    tmp.rename(base.with_suffix(".req"))
    response = base.with_suffix(".resp")
    deadline = time.monotonic() + timeout
    while not response.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the host agent did not answer {message['op']} within {timeout:.0f} s")
        time.sleep(AGENT_POLL)
    answer: dict[str, Any] = json.loads(response.read_text())
    response.unlink()
    if "error" in answer:
        pytest.fail(f"host agent: {answer['error']}")
    return answer


HostRun = Callable[..., dict[str, Any]]


@pytest.fixture
def host_run() -> HostRun:
    """host_run(argv, timeout=60) -> {"returncode", "stdout", "stderr"}, run on the host with
    the work tree as cwd and IOSM_VM_IVSHMEM set to the ivshmem backing file."""

    def run(argv: list[str], timeout: float = 60) -> dict[str, Any]:
        return _agent_request({"op": "run", "argv": argv, "timeout": timeout}, timeout + 30)

    return run


@pytest.fixture
def host_process() -> Iterator[Callable[[list[str]], str]]:
    """host_process(argv) -> handle: started on the host now, stopped (SIGTERM) after the test;
    its output is in <run dir>/agent/<handle>.log."""
    handles: list[str] = []

    def start(argv: list[str]) -> str:
        handle = str(_agent_request({"op": "start", "argv": argv}, 60)["handle"])
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        _agent_request({"op": "stop", "handle": handle}, 60)
