"""Run the modem model in its own process and hand the host a Bus to it.

The parent creates the shared memory (memfds) and the eventfds (`ShmBus.create`), starts
`python -m iosm_cuse.sim --sock-fd N` with one end of a Unix socketpair, and sends the fds
(SCM_RIGHTS) with a JSON header: the layout, the device config and the `functions` factory
spec. After that the socket carries JSON-line commands (crash, hang, reset, stats, ping,
shape); `stats` includes the child's own rss_kb, fds and tasks (procstat.py), which the
daemon's `status` shows as "modem"."process". `shape` shapes a session's downlink in the
packet gateway (sim/gateway.py, Gateway.set_shape / clear_shape):

    {"op": "shape", "session": 0, "delay_ms": 50, "loss_percent": 1, "rate_mbit": 10}
    {"op": "shape", "session": 0, "clear": true}
    {"op": "shape"}                        (only the answer: every shaped session)
    -> {"ok": true, "shapes": {"0": {"delay_ms": 50.0, "loss_percent": 1.0,
                                     "rate_mbit": 10.0}}, "shaped": {"0": {"passed": ...}}}

`functions` is "module:callable"; in the child it is called as `factory(model, options)` and
attaches the channel functions (`sim.assembly.MODEL` attaches the MBIM function, the MUX and
the packet gateway this way). The child's sys.path is the parent's, so a factory defined in a
test module is importable.

The child runs in a session of its own, so a terminal's Ctrl-C reaches only the parent, which
then stops the child in order. The child notices a parent that died without doing so: its
control socket reads EOF, and PR_SET_PDEATHSIG sends it SIGTERM.

If the child dies, the parent writes exec stage 0xFFFFFFFF into BAR2 (what a host reads from a
device that fell off the bus): the engine's watchdog reports DOWN. `recover()` resets a live
model or starts a new child on the same shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from iosm_cuse.bus.base import BAR2
from iosm_cuse.bus.shm import ShmBus, ShmLayout, send_bus_fds
from iosm_cuse.procstat import process_usage
from iosm_cuse.wire.ipc import SCRATCHPAD, ExecStage

if TYPE_CHECKING:
    from iosm_cuse.sim.assembly import ModelOptions
    from iosm_cuse.sim.device import DeviceConfig, DeviceModel

log = logging.getLogger("iosm_cuse.sim.process")


class ModelError(Exception):
    """The model process could not be started or did not answer."""


START_TIMEOUT = 10.0  # a new child's first answer; the kernel-tier guest (TCG) needs ~120 s


class ModelProcess:
    """The parent's handle on a model process: `bus` is the host's view of the device.

    `start_timeout` bounds the wait for a new child's first answer (imports and the factory
    included); waiting longer costs nothing when the child is quick, as the answer ends it."""

    description = 'modem model "XMM7560 (simulated)"'

    def __init__(self, bus: ShmBus, functions: str | None, config: dict[str, Any],
                 options: dict[str, Any], start_timeout: float = START_TIMEOUT) -> None:
        self.bus = bus
        self.start_timeout = start_timeout
        self.functions = functions
        self.config = config
        self.options = options
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self.last_exit: str | None = None  # how the last child ended by itself, for the log

    @classmethod
    async def spawn(cls, *, functions: str | None = None, config: dict[str, Any] | None = None,
                    options: dict[str, Any] | None = None,
                    layout: ShmLayout | None = None,
                    start_timeout: float = START_TIMEOUT) -> ModelProcess:
        """Create the shared memory, start the child, wait until its model is up."""
        bus = ShmBus.create(layout)
        self = cls(bus, functions, dict(config or {}), dict(options or {}), start_timeout)
        try:
            await self._start_child()
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _start_child(self) -> None:
        self.last_exit = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "iosm_cuse.sim", "--sock-fd", str(child.fileno()),
                pass_fds=(child.fileno(),), env=env, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True)
        finally:
            child.close()
        send_bus_fds(parent, self.bus, {"functions": self.functions, "config": self.config,
                                        "options": self.options})
        self._reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self._watch = asyncio.ensure_future(self._watch_child(self.proc))
        reply = await self.command("ping", timeout=self.start_timeout)
        if not reply.get("ok"):
            raise ModelError(f"model did not start: {reply.get('error')}")

    async def _watch_child(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is self.proc:
            # The daemon's "modem down" line tells it, with this: one line per crash.
            self.last_exit = f"model process {proc.pid} {_describe_exit(code)}"
            log.debug("modem %s", self.last_exit)
            # a device that fell off the bus reads as all ones
            with contextlib.suppress(ValueError, TypeError, OSError):
                self.bus.write32(BAR2, SCRATCHPAD["exec_stage"].offset, ExecStage.INVALID)
                if self.bus.irq_efd is not None:  # wake the engine now, not at its next poll
                    os.eventfd_write(self.bus.irq_efd, 1)

    async def command(self, op: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
        """One JSON-line command to the child and its reply. Each command carries an id that
        the reply repeats: the late reply of a command that timed out is skipped, not taken
        for the answer to the next one."""
        async with self._lock:
            # Checked under the lock: a restart may have replaced the child while we waited.
            writer, reader = self._writer, self._reader
            if writer is None or reader is None or not self.alive:
                raise ModelError("model process is not running")
            self._next_id += 1
            cmd_id = self._next_id
            writer.write(json.dumps({"op": op, "id": cmd_id, **args}).encode() + b"\n")
            await writer.drain()
            try:
                reply = await asyncio.wait_for(_reply_to(reader, cmd_id), timeout)
            except TimeoutError:
                raise ModelError(f"model did not answer {op!r} in {timeout} s") from None
        return reply

    async def process_usage(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The child's own rss_kb, fds and tasks (procstat) for `status`; None when it is not
        running, is busy with another command (a reset during a restart goes first: `status`
        never delays a recovery) or does not answer within `timeout`."""
        if not self.alive or self._lock.locked():
            return None
        try:
            reply = await self.command("stats", timeout=timeout)
        except (ModelError, OSError):
            return None
        usage = reply.get("process")
        return usage if isinstance(usage, dict) else None

    async def crash(self) -> None:
        await self.command("crash")

    async def hang(self) -> None:
        await self.command("hang")

    async def stats(self) -> dict[str, Any]:
        return await self.command("stats")

    async def recover(self) -> None:
        """Bring the model back to RUN/UNINIT: reset it, or start a new child if it died (or
        does not answer)."""
        if self.alive:
            try:
                await self.command("reset", timeout=2.0)
                return
            except ModelError as exc:
                log.info("model does not answer (%s): restarting the process", exc)
                await self._stop_child()
        await self._start_child()

    async def _stop_child(self) -> None:
        proc, self.proc = self.proc, None
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def close(self) -> None:
        await self._stop_child()
        self.bus.close()


async def _reply_to(reader: asyncio.StreamReader, cmd_id: int) -> dict[str, Any]:
    """The reply line that repeats `cmd_id`; earlier lines (late replies) are skipped."""
    while True:
        line = await reader.readline()
        if not line:
            raise ModelError("model process closed its control socket")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ModelError("model process sent a malformed reply") from None
        if isinstance(reply, dict) and reply.get("id") == cmd_id:
            return reply


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


# ---- the child ---------------------------------------------------------------------------------


Cleanup = Callable[[], Awaitable[None]]


@runtime_checkable
class ModelFunctions(Protocol):
    """What a `functions` factory may return besides a bare cleanup (or nothing): the
    assembled functions (sim.assembly.Assembly), closed when the model stops, adding their
    counters to the `stats` command's answer."""

    async def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


@runtime_checkable
class ControlledFunctions(Protocol):
    """Functions that take live-control actions (sim/control.py): the assembled model."""

    def control(self, action: str, args: Mapping[str, Any]) -> dict[str, Any]: ...


Factory = Callable[["DeviceModel", Mapping[str, Any]], "ModelFunctions | Cleanup | None"]


class _CleanupOnly:
    """A factory's bare cleanup (or none) as ModelFunctions with no counters of its own."""

    def __init__(self, cleanup: Cleanup | None) -> None:
        self._cleanup = cleanup

    async def close(self) -> None:
        if self._cleanup is not None:
            await self._cleanup()

    def stats(self) -> dict[str, Any]:
        return {}


def load_factory(spec: str) -> Factory:
    """'package.module:callable' -> the callable."""
    import importlib

    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise ModelError(f"functions {spec!r}: expected module:callable")
    factory: Factory = getattr(importlib.import_module(mod), name)
    return factory


async def child_main(sock_fd: int) -> int:
    """The model process: receive the bus, build the model, serve commands until EOF (the
    parent closed the socket or died) or SIGTERM/SIGINT; then close what the factory opened."""
    from iosm_cuse.bus.shm import recv_bus_fds
    from iosm_cuse.sim.device import DeviceConfig, DeviceModel
    from iosm_cuse.sim.recorder import recorder_from_env

    _die_with_parent()
    sock = socket.socket(fileno=sock_fd)
    bus, extra = recv_bus_fds(sock)
    model = DeviceModel(bus, DeviceConfig(**extra.get("config", {})))
    model.record = recorder_from_env()   # IOSM_MODEL_RECORD=FILE: the protocol recording
    functions = attach_functions(model, extra.get("functions"), extra.get("options", {}))
    # Only now: until here a signal's default action is right (nothing to clean up yet, and a
    # slow start is not prolonged by waiting for it to finish).
    stop = _stop_on_signals(asyncio.get_running_loop())
    task = asyncio.ensure_future(model.run())
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    serving = asyncio.ensure_future(_serve_commands(model, functions, reader, writer))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel(serving, stopping, task)
        await close_functions(functions)
    return 0


async def _serve_commands(model: DeviceModel, functions: ModelFunctions,
                          reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        reply = _command(model, functions, line)
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            reply["id"] = json.loads(line).get("id")  # repeated so the parent can match it
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


CLEANUP_TIMEOUT = 2.5  # ModelProcess kills a child that has not exited 3 s after SIGTERM


def attach_functions(model: DeviceModel, spec: str | None,
                     options: Mapping[str, Any]) -> ModelFunctions:
    """Run the factory; what it returns is closed when the model stops (the assembly's close
    removes the packet gateway's TUN and a namespace it created)."""
    result = load_factory(spec)(model, options) if spec else None
    if isinstance(result, ModelFunctions):
        return result
    return _CleanupOnly(result if callable(result) else None)


async def close_functions(functions: ModelFunctions) -> None:
    try:
        await asyncio.wait_for(functions.close(), CLEANUP_TIMEOUT)
    except Exception as exc:  # the process ends anyway; say what stays behind
        log.warning("closing the model's functions: %s", exc or type(exc).__name__)


def _stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by SIGTERM (the parent's stop, or its death via PDEATHSIG) or SIGINT.
    Plain signal handlers, not loop.add_signal_handler: its wakeup fd is inherited by the
    processes pyroute2 forks for namespaces, whose signals would then stop this model."""
    stop = asyncio.Event()
    me = os.getpid()

    def on_signal(signum: int, frame: object) -> None:
        if os.getpid() != me:  # a forked helper: behave as if we were never there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return stop


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGTERM when the parent dies (a crash included): the model then stops as if told to.
    Best effort; the control socket's EOF says the same a moment later."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_PDEATHSIG): %s", exc)


def _command(model: DeviceModel, functions: ModelFunctions, line: bytes) -> dict[str, Any]:
    try:
        op = json.loads(line)["op"]
    except (ValueError, KeyError, TypeError):
        return {"ok": False, "error": "bad command"}
    if op == "ping":
        return {"ok": True, "pid": os.getpid()}
    if op in ("crash", "hang", "reset"):
        getattr(model, op)()
        return {"ok": True}
    if op == "control":
        return _control(functions, json.loads(line))
    if op == "stats":
        return {"ok": True, "ul_transfers": model.ul_transfers,
                "dl_transfers": model.dl_transfers, "dropped_dl": model.dropped_dl,
                "dl_refused": model.dl_refused,
                "rejects": dict(model.rejects.counters), "ipc_state": int(model.ipc_state),
                "gateway": None, "process": process_usage(), **functions.stats()}
    return {"ok": False, "error": f"unknown op {op!r}"}


def _control(functions: ModelFunctions, cmd: dict[str, Any]) -> dict[str, Any]:
    """A live-control action: its result, or the errno and message refusing it."""
    from iosm_cuse.sim.control import ActionError

    action, args = cmd.get("action"), cmd.get("args", {})
    if not isinstance(functions, ControlledFunctions):
        return {"ok": False, "errno": errno.EOPNOTSUPP, "error": "this model takes no control"}
    if not isinstance(action, str) or not isinstance(args, dict):
        return {"ok": False, "errno": errno.EINVAL, "error": "bad control command"}
    try:
        return {"ok": True, "result": functions.control(action, args)}
    except ActionError as exc:
        return {"ok": False, "errno": exc.errno, "error": exc.message}
    except Exception as exc:  # a bug in an action must not take the model down
        log.exception("control: %s failed", action)
        return {"ok": False, "errno": errno.EIO, "error": f"{action}: internal error: {exc}"}


async def serve_file(path: Path, functions: str | None, mux: str = "lite",
                     options: dict[str, Any] | None = None) -> int:
    """Serve a single shared file (ivshmem layout): the device side for the UIO test VM."""
    from iosm_cuse.bus.shm import DEVICE
    from iosm_cuse.sim.device import DeviceConfig, DeviceModel

    bus = ShmBus.open_file(path, DEVICE)
    try:
        model = DeviceModel(bus, DeviceConfig.for_mux(mux))
        attached = attach_functions(model, functions, options or {})
        stop = _stop_on_signals(asyncio.get_running_loop())
        running = asyncio.ensure_future(model.run())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                running.result()  # the model's own failure, after the cleanup below
        finally:
            await _cancel(running, stopping)
            await close_functions(attached)
    finally:
        bus.close()
    return 0


DEFAULT_SHM = Path("/dev/shm/iosm-cuse-modem")
# ivshmem wants a power of two, and the file holds two register pages plus the DMA pool that
# Lite channel 0 and MBIM channel 6 need at once (wire.channels.dma_bytes_needed: about 4.2 MiB).
DEFAULT_SHM_SIZE = 8 * 1024 * 1024


def run_modem(options: ModelOptions, shm: Path | None, size: int = DEFAULT_SHM_SIZE) -> int:
    """`iosm-cuse modem [--shm FILE]`: the assembled model alone on an ivshmem backing file
    (created with `size` bytes if missing), for a driver in a VM (`up --device uio:...`) or
    another process. Returns the exit status."""
    from iosm_cuse.sim.assembly import MODEL

    path = shm or DEFAULT_SHM
    try:
        if not path.exists():
            with open(path, "xb") as f:
                f.truncate(size)
        total = path.stat().st_size
    except OSError as exc:
        print(f"iosm-cuse modem: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    mux = options.mux or "lite"
    print(f"iosm-cuse modem: serving {path} ({total} bytes, MUX {mux}); QEMU: "
          f"-object memory-backend-file,id=iosm,size={total},share=on,mem-path={path} "
          "-device ivshmem-plain,memdev=iosm", flush=True)
    try:
        return asyncio.run(serve_file(path, MODEL, mux, options.as_json()))
    except KeyboardInterrupt:
        return 0


async def serve_virtpci(path: Path, functions: str | None, config: DeviceConfig,
                        options: dict[str, Any] | None = None,
                        pci_id: tuple[int, int] = (0x8086, 0x7560),
                        stats: Path | None = None, fault: str | None = None) -> int:
    """Serve the model as a virt-pci function on the vhost-user socket `path`, for a UML kernel
    (docs/uml-virtpci.md): the kernel's own iosm driver is then the host. On the way out the
    model's counters and every reject counter are written to `stats` (JSON) when given;
    `fault` makes the device misbehave (sim/faults.py)."""
    from iosm_cuse.bus.pci import PciId
    from iosm_cuse.bus.virtpci.device import VirtPciBus
    from iosm_cuse.bus.virtpci.server import VirtPciServer
    from iosm_cuse.sim.device import DeviceModel
    from iosm_cuse.sim.faults import make_faulty
    from iosm_cuse.sim.recorder import recorder_from_env

    stop = _stop_on_signals(asyncio.get_running_loop())  # before the socket exists
    # UML busy-waits ~40 ms for each config/MMIO read, answered on the server's thread: hand the
    # GIL over more often than the default 5 ms, and finish the heavy setup (imports of the
    # functions) before the socket exists, so no read waits behind it.
    sys.setswitchinterval(0.0005)
    bus = VirtPciBus(PciId(*pci_id))
    model = DeviceModel(bus, config)  # its scratchpad is there before the first MMIO read
    model.record = recorder_from_env()   # IOSM_MODEL_RECORD=FILE: the protocol recording
    attached = attach_functions(model, functions, options or {})
    injector = make_faulty(model, attached, fault) if fault else None
    server = VirtPciServer(bus, path)
    server.start()
    try:
        running = asyncio.ensure_future(model.run())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                running.result()
        finally:
            await _cancel(running, stopping)
            await close_functions(attached)
            log.info("virt-pci model stopped: ipc %s, ul %d, dl %d, rejects %s, bus rejects %s",
                     model.ipc_state.name, model.ul_transfers, model.dl_transfers,
                     model.rejects.as_dict(), bus.rejects.as_dict())
            if stats is not None:
                _write_stats(stats, {
                    "ipc_state": model.ipc_state.name, "ul_transfers": model.ul_transfers,
                    "dl_transfers": model.dl_transfers, "ul_unclaimed": model.ul_unclaimed,
                    "rejects": {"device": dict(model.rejects.counters),
                                "bus": dict(bus.rejects.counters),
                                **attached.stats().get("function_rejects", {})},
                    "gateway": attached.stats().get("gateway"),
                    "fault": injector.report() if injector is not None else None})
    finally:
        server.stop()
        bus.close()
    return 0


def _write_stats(path: Path, stats: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(stats, indent=1, default=str) + "\n")
    except OSError as exc:
        log.warning("stats file %s: %s", path, exc.strerror)


def run_modem_virtpci(options: ModelOptions, path: Path, capabilities: int | None = None,
                      pci_id: tuple[int, int] = (0x8086, 0x7560), stats: Path | None = None,
                      fault: str | None = None) -> int:
    """`iosm-cuse modem --virtpci SOCKET`: the assembled model as a PCI function of a UML
    kernel (`linux ... virtio_uml.device=SOCKET:<id>`). `capabilities` overrides the MUX mode's
    CP capabilities (e.g. bit 21, UL flow credit)."""
    from iosm_cuse.sim.assembly import MODEL
    from iosm_cuse.sim.device import DeviceConfig

    config = DeviceConfig.for_mux(options.mux or "lite")
    if capabilities is not None:
        config.capabilities = capabilities
    print(f"iosm-cuse modem: serving {path} as PCI {pci_id[0]:04x}:{pci_id[1]:04x} "
          f"(capabilities {config.capabilities:#x})", flush=True)
    try:
        return asyncio.run(serve_virtpci(path, MODEL, config, options.as_json(), pci_id, stats,
                                         fault))
    except KeyboardInterrupt:
        return 0
