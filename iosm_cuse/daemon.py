"""`iosm-cuse up`: one asyncio loop that wires a Bus, the IPC engine, the MBIM port (CUSE or PTY),
the data links and the control socket, and takes them down again in the reverse order.

The layers meet only through the contracts of docs/architecture.md; this module knows no
protocol detail. `open_device` is the single place that turns `--device` into a running Bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from iosm_cuse import control
from iosm_cuse.control import ControlError, JsonDict

log = logging.getLogger("iosm_cuse.daemon")

MUX_MODES = ("lite", "aggregation")
_PORT_NAME = re.compile(r"^(wwan[0-9]{1,3})mbim[0-9]{1,3}$")
_INSTANCE_NAME = re.compile(r"^wwan[0-9]{1,3}$")


class UpError(Exception):
    """`up` cannot start; the message is for the user, the daemon exits non-zero."""


@dataclass(frozen=True)
class UpOptions:
    device: str = "auto"
    transport: str = "auto"
    config: Path | None = None
    mux: str | None = None  # the model's MUX capability; None = the config's (Lite for 7560)
    gateway: str = "echo"
    port_name: str | None = None  # None: wwanNmbim0 with the first free N


# ---- --device -> Bus ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """What `--device` named, resolved: the model ('sim') or a UIO-bound PCI device."""

    kind: str  # "sim" | "uio"
    ref: str = ""  # uio: PCI address (0000:03:00.0) or UIO node (/dev/uio0)

    @property
    def lock_key(self) -> str:
        """Two daemons must never drive the same device: one lock file per key."""
        return "sim" if self.kind == "sim" else "uio-" + self.ref.replace("/", "_")

    def __str__(self) -> str:
        return self.kind if self.kind == "sim" else f"uio:{self.ref}"


def parse_device(text: str) -> DeviceSpec:
    """`auto` | `sim` | `uio:<bdf>` | `/dev/uioN` -> DeviceSpec ('auto' resolved by sysfs)."""
    if text == "auto":
        return find_default_device()
    if text == "sim":
        return DeviceSpec("sim")
    if text.startswith("uio:") or text.startswith("/dev/uio"):
        return DeviceSpec("uio", _pci_address(text))
    raise UpError(f"--device {text!r}: expected auto, sim, uio:<PCI address> or /dev/uioN")


def _pci_address(text: str) -> str:
    """The PCI address behind a uio spec, so /dev/uio0 and uio:<bdf> lock the same device;
    the spec as given when sysfs cannot tell (opening it will then say why)."""
    from iosm_cuse.bus.pci import PciError
    from iosm_cuse.bus.uio import parse_device_spec

    try:
        return parse_device_spec(text).bdf
    except (PciError, OSError):
        return text.removeprefix("uio:")


def find_default_device(sysfs: Path | None = None) -> DeviceSpec:
    """A modem bound to UIO if there is one, else the built-in model. Unbound modems are
    pointed out, since `up` cannot use them."""
    from iosm_cuse.bus import pci

    try:
        devices = pci.find_iosm_devices(sysfs or pci.SYSFS)
    except (OSError, pci.PciError):
        devices = []
    for dev in devices:
        if dev.uio_bound:
            return DeviceSpec("uio", dev.bdf)
    for dev in devices:
        log.warning("modem %s is not bound to UIO, using the model instead: %s",
                    dev.bdf, pci.bind_hint(dev))
    return DeviceSpec("sim")


# ---- locks and names ----------------------------------------------------------------------------


class Lock:
    """An flock'ed file under the run directory holding the owner's pid; the kernel drops the
    lock when the process dies, so a crashed daemon never blocks the next one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def try_acquire(self) -> bool:
        control.prepare_run_dir(self.path.parent)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return True

    def owner(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._file.close()
            self._file = None


def claim_instance(spec: DeviceSpec, port_name: str | None) -> tuple[str, str, list[Lock]]:
    """Lock the device and a wwan instance name; returns (instance, port name, locks).
    Raises UpError naming the daemon that holds the device or the name."""
    dev_lock = Lock(control.run_dir() / f"device-{spec.lock_key}.lock")
    if not dev_lock.try_acquire():
        raise UpError(f"device {spec} is already driven by iosm-cuse (pid {dev_lock.owner()}); "
                      "`iosm-cuse status` shows it")
    if port_name is not None:
        m = _PORT_NAME.match(port_name)
        if m is None:
            dev_lock.release()
            raise UpError(f"--port-name {port_name!r}: expected wwan<N>mbim<M>, like wwan0mbim0")
        names = [(m.group(1), port_name)]
    else:
        names = [(f"wwan{n}", f"wwan{n}mbim0") for n in range(16)]
    for instance, port in names:
        lock = Lock(control.run_dir() / f"{instance}.lock")
        if lock.try_acquire():
            return instance, port, [dev_lock, lock]
    dev_lock.release()
    raise UpError(f"{names[0][1]} is already served by iosm-cuse (pid {lock.owner()}); "
                  "choose another --port-name")


# ---- status as text -----------------------------------------------------------------------------


def format_status(st: JsonDict) -> str:
    """The `status` answer for humans; `status --json` prints the dict itself."""
    modem = st.get("modem", {})
    port = st.get("port", {})
    lines = [
        f"device: {st.get('device')}  {modem.get('name', '')}  (daemon pid {st.get('pid')})",
        f"modem:  exec stage {modem.get('exec_stage')}, IPC {modem.get('ipc_state')}, "
        f"MUX {modem.get('mux_mode')}, restarts {modem.get('restarts', 0)}",
        f"port:   {port.get('path')} ({port.get('transport')}), "
        f"open by {port.get('openers', 0)}" + _pids(port.get("opener_pids", [])),
        "links:",
    ]
    for ln in st.get("links", []):
        c = ln.get("counters", {})
        lines.append(f"  {ln.get('name')}: linkid {ln.get('linkid')}, session "
                     f"{ln.get('session')}, {'up' if ln.get('up') else 'down'}, mtu "
                     f"{ln.get('mtu')}; rx {c.get('rx_packets', 0)} pkts "
                     f"{c.get('rx_bytes', 0)} B, tx {c.get('tx_packets', 0)} pkts "
                     f"{c.get('tx_bytes', 0)} B, dropped "
                     f"{sum(v for k, v in c.items() if 'dropped' in k)}")
    errors = st.get("errors", {})
    lines.append("errors: " + (", ".join(f"{k} {v}" for k, v in errors.items()) or "none"))
    return "\n".join(lines)


def _pids(pids: list[Any]) -> str:
    return f" (pid {', '.join(str(p) for p in pids)})" if pids else ""


# ---- the daemon ----------------------------------------------------------------------------------

MBIM_CHANNEL = 6
MUX_CHANNEL = 0
# The model process imports this to attach its channel functions (sim/process.py's factory hook).
MODEL_FUNCTIONS = "iosm_cuse.daemon:model_functions"


class Daemon:
    """The running stack of one `up`. Built bottom-up in `start`, torn down top-down in `close`;
    `close` copes with a half-built stack, so a failed start cleans up too."""

    def __init__(self, opts: UpOptions, spec: DeviceSpec, instance: str, port_name: str) -> None:
        self.opts = opts
        self.spec = spec
        self.instance = instance
        self.port_name = port_name
        self.transport = ""
        self.restarts = 0
        self.started = time.monotonic()
        self.startup_ms: dict[str, int] = {}
        self.device: Any = None  # sim.process.ModelProcess or hw.uio.UioModemDevice
        self.engine: Any = None  # hw.engine.IpcEngine
        self.mux: Any = None  # hw.mux.host.MuxHost
        self.port: Any = None  # chardev.port.MbimPort
        self.chardev: Any = None  # CUSE server or PTY transport
        self.links: Any = None  # link.manager.LinkManager
        self.control: control.ControlServer | None = None
        self.failure: str | None = None  # why the daemon stops by itself (exit status 1)
        self._stop = asyncio.Event()
        self._recovering: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> str:
        """Bring everything up; returns the ready line."""
        # The model process boots (a second Python) while this one imports the layers: on two
        # cores that overlap is most of the < 1 s to ready.
        opening = asyncio.ensure_future(open_device(self.spec, self.opts))
        await asyncio.sleep(0)
        try:
            _import_layers()
            self._mark("imports")
        finally:
            self.device = await opening
        self._mark("device")
        self.engine = await self._start_engine()
        self._mark("handshake")
        self.mux = self._make_mux()
        self.port = self._make_port()
        self.chardev = await self._start_chardev()
        self._mark("port")
        self.links = await self._start_links()
        self._mark("links")
        self.control = control.ControlServer(control.socket_path(self.instance), self.handle)
        await self.control.start()
        self._mark("control")
        return self.ready_line()

    def _mark(self, step: str) -> None:
        """Milliseconds since the process started, per startup step (`status` shows them)."""
        self.startup_ms[step] = round(_since_process_start() * 1000)

    async def close(self) -> None:
        """Top-down: control socket, port (answering pending requests), links, engine, model."""
        if self._recovering is not None:
            self._recovering.cancel()
        steps = [("control socket", self.control, "close"), ("MBIM port", self.chardev, "close"),
                 ("links", self.links, "stop"), ("engine", self.engine, "stop"),
                 ("device", self.device, "close")]
        for what, obj, method in steps:
            if obj is None:
                continue
            try:
                await asyncio.wait_for(getattr(obj, method)(), timeout=5)
            except Exception as exc:  # keep going: every later step still has to run
                log.warning("closing the %s: %s", what, exc or type(exc).__name__)

    async def serve_forever(self) -> None:
        await self._stop.wait()

    def request_stop(self, why: str) -> None:
        log.info("%s: shutting down", why)
        self._stop.set()

    def ready_line(self) -> str:
        how = "cuse" if self.transport == "cuse" else "pty fallback: no CUSE"
        return (f"iosm-cuse: {self.device.description} ready; MBIM port {self.port_path()} "
                f"({how}); data link {self.instance} (session 0); MUX {self.engine.mux_mode}")

    def port_path(self) -> str:
        if self.chardev is not None:
            return str(self.chardev.path)
        return str(control.run_dir() / self.port_name)  # where the PTY's symlink goes

    # -- the layers (each adapts one contract of docs/architecture.md)

    async def _start_engine(self) -> Any:
        from iosm_cuse.hw.engine import EngineError, IpcEngine

        engine = IpcEngine(self.device.bus)
        try:
            await engine.start()
        except EngineError as exc:
            raise UpError(f"modem handshake failed: {exc}") from exc
        engine.add_state_listener(self._on_engine_state)
        return engine

    def _make_mux(self) -> Any:
        from iosm_cuse.hw.mux.host import MuxHost

        return MuxHost(self.engine)

    def _make_port(self) -> Any:
        from iosm_cuse.chardev.port import MbimPort

        async def open_channel(on_receive: Any) -> Any:
            return await self.engine.open_channel(MBIM_CHANNEL, on_receive)

        return MbimPort(open_channel)

    async def _start_chardev(self, transport: str | None = None) -> Any:
        """CUSE when /dev/cuse can be opened (after `modprobe cuse`), else for `auto` the PTY
        with its symlink in the run directory."""
        from iosm_cuse.chardev import CuseUnavailable, start_transport

        try:
            chardev = await start_transport(
                self.port, transport=transport or self.opts.transport, devname=self.port_name,
                link=control.run_dir() / self.port_name)
        except CuseUnavailable as exc:
            raise UpError(f"--transport cuse: {exc.strerror or exc}") from exc
        self.transport = chardev.transport
        if hasattr(chardev, "on_dead"):  # CUSE: the node can vanish under us
            chardev.on_dead = self._port_lost
        return chardev

    def _port_lost(self, why: str) -> None:
        """The CUSE connection died: no port any more. Exit 1 rather than re-create the node
        here: clients hold fds on the dead one anyway, and systemd's Restart=on-failure
        starts a clean daemon (with `modprobe cuse` again if the module went away)."""
        self.failure = f"MBIM port {self.port_path()} lost: {why}"
        log.error("%s; stopping", self.failure)
        self._stop.set()

    async def _start_links(self) -> Any:
        from iosm_cuse.link.manager import LinkManager

        if not os.path.exists("/dev/net/tun"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["modprobe", "-q", "tun"], check=False, timeout=5)
        links = LinkManager(self.mux, self.instance)
        await links.start()
        return links

    # -- crash and restart of the modem

    def _on_engine_state(self, state: Any) -> None:
        # The one WARNING line per modem crash; the layers log theirs at DEBUG.
        if state.value == "DOWN":
            reason = self.engine.last_error or "modem down"
            exit_ = getattr(self.device, "last_exit", None)
            log.warning("modem down: %s%s; %s", reason, f" ({exit_})" if exit_ else "",
                        "stopping" if self._stop.is_set() else "restarting")
            self.port.hangup(reason, quiet=True)
            if self._recovering is None and not self._stop.is_set():
                self._recovering = asyncio.get_running_loop().create_task(self._recover())
        elif state.value == "RUNNING":
            self.port.revive()

    async def _recover(self) -> None:
        try:
            for attempt in range(1, 4):
                try:
                    await self.device.recover()
                    await self.engine.start()
                    break
                except Exception as exc:
                    log.warning("modem restart %d failed: %s", attempt, exc)
                    await asyncio.sleep(0.5 * attempt)
            else:
                self.failure = "modem did not come back after 3 restarts"
                log.error("%s; stopping", self.failure)
                self._stop.set()
                return
            self.restarts += 1
            log.info("modem running again (restart %d)", self.restarts)
        finally:
            self._recovering = None

    # -- control socket

    async def handle(self, op: str, args: JsonDict) -> JsonDict:
        """The control socket's operations (declared in control.OPS)."""
        if op == "status":
            return self.status()
        from iosm_cuse.link.args import LinkError

        try:
            result: JsonDict = await self.links.handle(op, args)
        except LinkError as exc:
            raise ControlError(exc.errno, exc.message) from None
        return result

    def status(self) -> JsonDict:
        eng = self.engine
        errors: JsonDict = dict(eng.counters)
        errors.update(self.mux.counters)
        errors.update(self.links.counters())
        return {
            "device": str(self.spec),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "startup_ms": self.startup_ms,
            "modem": {
                "name": self.device.description,
                "pid": getattr(self.device, "pid", None),
                "exec_stage": exec_stage_name(eng.bus),
                "ipc_state": eng.state.value,
                "mux_mode": str(eng.mux_mode),
                "restarts": self.restarts,
                "last_error": eng.last_error,
            },
            "port": {"path": self.port_path(), "transport": self.transport,
                     **_port_status(self.port, self.chardev)},
            "mux": self.mux.status(),
            "links": [info.as_dict() for info in self.links.show()],
            "errors": errors,
        }


def _since_process_start() -> float:
    """Seconds since this process was started, interpreter start-up included (/proc, 10 ms
    resolution); since this module was imported when /proc is unreadable."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()


def _import_layers() -> None:
    import importlib

    for name in ("hw.engine", "hw.mux.host", "chardev", "link.manager"):
        importlib.import_module(f"iosm_cuse.{name}")


def exec_stage_name(bus: Any) -> str:
    from iosm_cuse.bus.base import BAR2
    from iosm_cuse.wire.ipc import SCRATCHPAD, ExecStage

    try:
        raw = bus.read32(BAR2, SCRATCHPAD["exec_stage"].offset)
    except Exception:  # a closed or vanished bus
        return "UNKNOWN"
    try:
        return ExecStage(raw).name
    except ValueError:
        return f"{raw:#010x}"


def _port_status(port: Any, chardev: Any) -> JsonDict:
    pids = getattr(chardev, "opener_pids", None)
    return {"openers": port.openers, "opener_pids": list(pids() if callable(pids) else []),
            "max_control": port.negotiated, "gone": port.gone, "dropped": port.dropped,
            "counters": dict(port.stats)}


async def open_device(spec: DeviceSpec, opts: UpOptions) -> Any:
    """The one place that turns a DeviceSpec into a started device with `bus`, `description`,
    `recover()` and `close()`."""
    if spec.kind == "sim":
        return await spawn_model(opts)
    from iosm_cuse.bus.uio import UioError, UioModemDevice

    try:
        return await UioModemDevice.open(str(spec))
    except UioError as exc:
        raise UpError(str(exc)) from exc


async def spawn_model(opts: UpOptions) -> Any:
    """The modem model in its own process on a shared-memory bus, its channel functions attached
    by `model_functions` over there."""
    from dataclasses import asdict

    from iosm_cuse.sim.config import ConfigError, ModemConfig
    from iosm_cuse.sim.device import DeviceConfig
    from iosm_cuse.sim.process import ModelError, ModelProcess

    if opts.config is not None:  # fail here, with the reason, not in the child
        try:
            ModemConfig.load(opts.config)
        except (ConfigError, OSError) as exc:
            raise UpError(f"--config {opts.config}: {exc}") from exc
    options = {"config": str(opts.config) if opts.config else None, "gateway": opts.gateway,
               "mux": opts.mux}
    try:
        return await ModelProcess.spawn(
            functions=MODEL_FUNCTIONS, config=asdict(DeviceConfig.for_mux(opts.mux or "lite")),
            options=options, start_timeout=MODEL_START_TIMEOUT)
    except ModelError as exc:
        raise UpError(f"modem model: {exc}") from exc


# A new model process's first answer: under TCG (the kernel-tier guest, Python ~11x slower)
# importing the model takes far longer than ModelProcess's default allows.
MODEL_START_TIMEOUT = 120.0


def model_functions(model: Any, options: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    """Runs in the model process: MBIM on channel 6, the MUX on channel 0, the packet gateway
    behind the MUX and told of MBIM sessions (Contract 3). Returns the cleanup the model
    process runs on every way out: closing the gateway (its TUN, a namespace it created)."""
    from iosm_cuse.sim.config import ModemConfig
    from iosm_cuse.sim.gateway import Gateway
    from iosm_cuse.sim.mbim import MbimChannelFunction, MbimFunction
    from iosm_cuse.sim.mux import MuxDevice

    config = ModemConfig.load(options["config"]) if options.get("config") else ModemConfig()
    mbim = MbimFunction(config)
    gateway = Gateway(config, options.get("gateway") or "echo")
    mux = MuxDevice(gateway.uplink, options.get("mux"), credit_window=_credit_window(model))
    gateway.downlink = mux.downlink
    mbim.session_listener = gateway.session_changed
    mbim.statistics_source = lambda: gateway_statistics(gateway.counters)
    model.attach(MBIM_CHANNEL, MbimChannelFunction(mbim))
    model.attach(MUX_CHANNEL, mux)
    loop = asyncio.get_running_loop()
    task = loop.create_task(gateway.start())
    task.add_done_callback(_log_gateway_failure)
    model.gateway = gateway  # kept alive with the model

    async def close() -> None:
        # sim.process awaits this when the model stops (EOF, SIGTERM, SIGINT). A start still
        # configuring may be about to create the namespace: let it finish, then remove it.
        if not task.done():
            with contextlib.suppress(Exception):
                await task
        await gateway.close()

    return close


# UL credit granted per session by a model announcing credit flow control (capability bit 21);
# re-granted after half of it was used, so a stream never waits on a round trip at this size.
MODEL_CREDIT_WINDOW = 64 * 1024


def _credit_window(model: Any) -> int:
    """A model whose capabilities announce UL flow on credits must grant them, or the host
    would never send a packet."""
    from iosm_cuse.wire.ipc import CAP_UL_FLOW_CREDIT

    caps = int(getattr(getattr(model, "config", None), "capabilities", 0))
    return MODEL_CREDIT_WINDOW if caps & CAP_UL_FLOW_CREDIT else 0


def gateway_statistics(c: dict[str, int]) -> Any:
    """The gateway's counters as MBIM PACKET_STATISTICS ("in" is towards the host)."""
    from iosm_cuse.sim.mbim import PacketStatistics

    return PacketStatistics(
        in_discards=c["drop_downlink"] + c["drop_no_session"],
        in_octets=c["dl_bytes"], in_packets=c["dl_packets"],
        out_octets=c["ul_bytes"], out_packets=c["ul_packets"], out_errors=c["drop_malformed"],
        out_discards=c["drop_not_connected"] + c["drop_source"] + c["drop_link_local"]
        + c["drop_not_echo"] + c["drop_tun_write"])


def _log_gateway_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("packet gateway did not start: %s", task.exception())


def run_up(opts: UpOptions) -> int:
    """`iosm-cuse up`: returns the exit status."""
    try:
        spec = parse_device(opts.device)
        instance, port_name, locks = claim_instance(spec, opts.port_name)
    except UpError as exc:
        print(f"iosm-cuse: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(Daemon(opts, spec, instance, port_name)))
    finally:
        for lock in reversed(locks):
            lock.release()


async def _serve(daemon: Daemon) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop, signal.Signals(sig).name)
    try:
        try:
            line = await daemon.start()
        except (UpError, OSError) as exc:
            print(f"iosm-cuse: {exc}", file=sys.stderr)
            return 1
        log.debug("ready %d ms after the process started: %s", daemon.startup_ms["control"],
                  daemon.startup_ms)
        print(line, flush=True)
        await daemon.serve_forever()
        return 0 if daemon.failure is None else 1
    finally:
        await daemon.close()


DEFAULT_SHM = Path("/dev/shm/iosm-cuse-modem")
# ivshmem wants a power of two, and the file holds two register pages plus the DMA pool that
# Lite channel 0 and MBIM channel 6 need at once (hw.channels.dma_bytes_needed: about 4.2 MiB).
DEFAULT_SHM_SIZE = 8 * 1024 * 1024


def run_modem(opts: UpOptions, shm: Path | None, size: int = DEFAULT_SHM_SIZE) -> int:
    """`iosm-cuse modem [--shm FILE]`: the model alone on an ivshmem backing file (created with
    `size` bytes if missing), for a driver in a VM (`up --device uio:...`) or another process."""
    from iosm_cuse.sim.process import serve_file

    path = shm or DEFAULT_SHM
    try:
        if not path.exists():
            with open(path, "xb") as f:
                f.truncate(size)
        total = path.stat().st_size
    except OSError as exc:
        print(f"iosm-cuse modem: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    options = {"config": str(opts.config) if opts.config else None, "gateway": opts.gateway,
               "mux": opts.mux}
    print(f"iosm-cuse modem: serving {path} ({total} bytes, MUX {opts.mux or 'lite'}); QEMU: "
          f"-object memory-backend-file,id=iosm,size={total},share=on,mem-path={path} "
          "-device ivshmem-plain,memdev=iosm", flush=True)
    try:
        return asyncio.run(serve_file(path, MODEL_FUNCTIONS, opts.mux or "lite", options))
    except KeyboardInterrupt:
        return 0
