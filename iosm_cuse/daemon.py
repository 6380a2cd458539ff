"""`iosm-cuse up`: one asyncio loop that wires a Bus, the IPC engine, the MBIM port (CUSE or PTY),
the data links and the control socket, and takes them down again in the reverse order.

The layers meet only through the contracts of docs/architecture.md; this module knows no
protocol detail. What `--device` names and how it opens is devices.py; the run directory's
locks rundir.py; the options options.py; the text of `status` status.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from iosm_cuse import control
from iosm_cuse.control import ControlError, JsonDict
from iosm_cuse.devices import DeviceSpec, ModemDevice, open_device, parse_device
from iosm_cuse.options import UpError, UpOptions
from iosm_cuse.procstat import process_usage
from iosm_cuse.rundir import claim_instance, pty_link_path
from iosm_cuse.sd_notify import Notifier
from iosm_cuse.status import exec_stage_name, port_status
from iosm_cuse.wire.args import ArgError
from iosm_cuse.wire.channels import AT_CHANNELS, MBIM_CHANNEL, channel_config

# The layers are imported while the model process boots (see Daemon.start), not with this module.
if TYPE_CHECKING:
    from iosm_cuse.chardev import AtPort, CuseServer, MbimPort, Transport
    from iosm_cuse.chardev.port import Channel
    from iosm_cuse.hw.engine import EngineState, IpcEngine
    from iosm_cuse.hw.mux.host import MuxHost
    from iosm_cuse.link.manager import LinkManager
    from iosm_cuse.scenario import Scenario, Step
    from iosm_cuse.system.announce import Announcer

log = logging.getLogger("iosm_cuse.daemon")


_Layer = TypeVar("_Layer")


def _started(layer: _Layer | None, what: str) -> _Layer:
    """A layer that `start` has brought up; asking for one before is a bug in the wiring."""
    if layer is None:
        raise RuntimeError(f"the {what} is not started")
    return layer


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
        # The stack, bottom-up; None until `start` has brought that layer up.
        self.device: ModemDevice | None = None
        self.engine: IpcEngine | None = None
        self.mux: MuxHost | None = None
        self.port: MbimPort | None = None
        self.chardev: Transport | None = None
        # The AT ports wwan<N>at0 and wwan<N>at1 (channels 2 and 4), on the MBIM port's transport
        self.at_ports: list[tuple[AtPort, Transport]] = []
        self.links: LinkManager | None = None
        self.control: control.ControlServer | None = None
        self.announcer: Announcer | None = None  # --modemmanager auto, on a CUSE port
        self.failure: str | None = None  # why the daemon stops by itself (exit status 1)
        self._stop = asyncio.Event()
        self._recovering: asyncio.Task[None] | None = None
        self._playing: asyncio.Task[None] | None = None  # up --scenario
        # Under iosm-cuse@.service (Type=notify) systemd waits for READY=1 (docs/systemd.md §1).
        self.notify = Notifier.from_environ()

    # -- lifecycle

    async def start(self) -> str:
        """Bring everything up; returns the ready line."""
        # The model process boots (a second Python) while this one imports the layers: on two
        # cores that overlap is most of the < 1 s to ready.
        opening = asyncio.ensure_future(open_device(self.spec, self.opts, self.instance))
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
        await self._start_at_ports()
        self._mark("port")
        self.links = await self._start_links()
        self._mark("links")
        self.control = control.ControlServer(control.socket_path(self.instance), self.handle)
        await self.control.start()
        self._mark("control")
        self.announcer = self._start_announcer()
        return self.ready_line()

    def _start_announcer(self) -> Announcer | None:
        """ModemManager finds the port only when told (docs/modemmanager.md §1); a PTY port
        is no device it could take."""
        if self.opts.modemmanager == "off" or self.transport != "cuse":
            return None
        from iosm_cuse.chardev import CuseServer
        from iosm_cuse.system.announce import Announcer

        at_ports = tuple(c.devname for _p, c in self.at_ports if isinstance(c, CuseServer))
        announcer = Announcer(self.instance, self.port_name, at_ports=at_ports)
        announcer.start()
        announcer.port_ready()
        return announcer

    def _mark(self, step: str) -> None:
        """Milliseconds since the process started, per startup step (`status` shows them)."""
        self.startup_ms[step] = round(_since_process_start() * 1000)

    async def close(self) -> None:
        """Top-down: control socket, ModemManager's view (withdrawn), the port (hung up, its
        openers given a few seconds to close, then closed), links, engine, model."""
        if self._recovering is not None:
            self._recovering.cancel()
        if self._playing is not None:
            self._playing.cancel()
        steps: list[tuple[str, Callable[[], Awaitable[None]] | None]] = [
            ("control socket", self.control.close if self.control is not None else None),
            ("announcements", self.announcer.stop if self.announcer is not None else None),
            ("port hangup", self._hang_up if self.chardev is not None else None),
            ("AT ports", self._close_at_ports if self.at_ports else None),
            ("MBIM port", self.chardev.close if self.chardev is not None else None),
            ("links", self.links.stop if self.links is not None else None),
            ("engine", self.engine.stop if self.engine is not None else None),
            ("device", self.device.close if self.device is not None else None)]
        for what, closing in steps:
            if closing is None:
                continue
            try:
                await asyncio.wait_for(closing(), timeout=5)
            except Exception as exc:  # keep going: every later step still has to run
                log.warning("closing the %s: %s", what, exc or type(exc).__name__)

    async def _hang_up(self) -> None:
        """A client polling the node must see POLLHUP before the node goes: after /dev/cuse is
        closed the kernel reports POLLERR alone, which libmbim's proxy polls on forever
        (docs/cuse.md §9)."""
        from iosm_cuse.chardev import CuseServer

        servers = [c for c in (self.chardev, *(c for _p, c in self.at_ports))
                   if isinstance(c, CuseServer)]
        # Together: each waits up to its grace for its own openers.
        await asyncio.gather(*(c.hang_up("stopping") for c in servers))

    async def _close_at_ports(self) -> None:
        at_ports, self.at_ports = self.at_ports, []
        await asyncio.gather(*(chardev.close() for _port, chardev in at_ports))

    async def serve_forever(self) -> None:
        await self._stop.wait()

    def request_stop(self, why: str) -> None:
        log.info("%s: shutting down", why)
        self._stop.set()

    def ready_line(self) -> str:
        how = "cuse" if self.transport == "cuse" else "pty fallback: no CUSE"
        device, engine = _started(self.device, "device"), _started(self.engine, "engine")
        return (f"iosm-cuse: {device.description} ready; MBIM port {self.port_path()} "
                f"({how}); data link {self.instance} (session 0); MUX {engine.mux_mode}")

    def port_path(self) -> str:
        if self.chardev is not None:
            return str(self.chardev.path)
        return str(pty_link_path(self.port_name))

    # -- the layers (each adapts one contract of docs/architecture.md)

    async def _start_engine(self) -> IpcEngine:
        from iosm_cuse.hw.engine import EngineError, IpcEngine

        engine = IpcEngine(_started(self.device, "device").bus)
        try:
            await engine.start()
        except EngineError as exc:
            raise UpError(f"modem handshake failed: {exc}") from exc
        engine.add_state_listener(self._on_engine_state)
        return engine

    def _make_mux(self) -> MuxHost:
        from iosm_cuse.hw.mux.host import MuxHost

        return MuxHost(_started(self.engine, "engine"))

    def _make_port(self) -> MbimPort:
        from iosm_cuse.chardev.port import MbimPort

        return MbimPort(_opener(_started(self.engine, "engine"), MBIM_CHANNEL))

    def at_port_names(self) -> tuple[str, ...]:
        """wwan<N>at0, wwan<N>at1: the kernel's names for the AT channels' ports."""
        return tuple(f"{self.instance}at{i}" for i in range(len(AT_CHANNELS)))

    async def _start_at_ports(self) -> None:
        """The AT ports, on the transport the MBIM port got (CUSE, or the PTY fallback with
        symlinks next to the MBIM port's). One that cannot be served is a warning, not a
        failure: the MBIM port and the data link are what `up` promises (docs/at-ports.md)."""
        from iosm_cuse.chardev import AtPort, start_transport

        engine = _started(self.engine, "engine")
        for name, channel in zip(self.at_port_names(), AT_CHANNELS, strict=True):
            port = AtPort(_opener(engine, channel), td_size=channel_config(channel).ul_buf_size)
            try:
                chardev = await start_transport(port, transport=self.transport, devname=name,
                                                link=pty_link_path(name))
            except OSError as exc:
                log.warning("AT port %s not served: %s", name, exc.strerror or exc)
                continue
            self.at_ports.append((port, chardev))

    async def _start_chardev(self, transport: str | None = None) -> Transport:
        """CUSE when /dev/cuse can be opened (after `modprobe cuse`), else for `auto` the PTY
        with its symlink in the run directory."""
        from iosm_cuse.chardev import CuseServer, CuseUnavailable, start_transport

        try:
            chardev = await start_transport(
                _started(self.port, "MBIM port"), transport=transport or self.opts.transport,
                devname=self.port_name, link=pty_link_path(self.port_name))
        except CuseUnavailable as exc:
            raise UpError(f"--transport cuse: {exc.strerror or exc}") from exc
        self.transport = chardev.transport
        if isinstance(chardev, CuseServer):  # the node can vanish under us
            chardev.on_dead = self._port_lost
            chardev.start_keeper(self._withdraw_args(chardev), self.at_port_names())
        return chardev

    def _withdraw_args(self, chardev: CuseServer) -> tuple[str, str, int, int] | None:
        """What the keeper needs to withdraw the ports from ModemManager after a SIGKILL."""
        if self.opts.modemmanager == "off":
            return None
        try:
            st = os.stat(chardev.path)
        except OSError:
            return None
        return self.instance, self.port_name, os.major(st.st_rdev), os.minor(st.st_rdev)

    def _port_lost(self, why: str) -> None:
        """The CUSE connection died: no port any more. Exit 1 rather than re-create the node
        here: clients hold fds on the dead one anyway, and systemd's Restart=on-failure
        starts a clean daemon (with `modprobe cuse` again if the module went away)."""
        self.failure = f"MBIM port {self.port_path()} lost: {why}"
        log.error("%s; stopping", self.failure)
        self._stop.set()

    async def _start_links(self) -> LinkManager:
        from iosm_cuse.link.manager import LinkManager

        if not os.path.exists("/dev/net/tun"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["modprobe", "-q", "tun"], check=False, timeout=5)
        links = LinkManager(_started(self.mux, "MUX"), self.instance)
        await links.start()
        return links

    # -- crash and restart of the modem

    def _on_engine_state(self, state: EngineState) -> None:
        # The one WARNING line per modem crash; the layers log theirs at DEBUG.
        port = _started(self.port, "MBIM port")
        if state.value == "DOWN":
            reason = _started(self.engine, "engine").last_error or "modem down"
            exit_ = _model_process_detail(self.device, "last_exit")
            log.warning("modem down: %s%s; %s", reason, f" ({exit_})" if exit_ else "",
                        "stopping" if self._stop.is_set() else "restarting")
            port.hangup(reason, quiet=True)
            for at_port, _chardev in self.at_ports:
                at_port.hangup(reason, quiet=True)
            if self.announcer is not None:
                self.announcer.modem_down()
            self.notify.status(f"modem down: {reason}")
            if self._recovering is None and not self._stop.is_set():
                self._recovering = asyncio.get_running_loop().create_task(self._recover())
        elif state.value == "RUNNING":
            port.revive()
            for at_port, _chardev in self.at_ports:
                at_port.revive()
            if self.announcer is not None and not self._stop.is_set():
                self.announcer.port_ready()

    async def _recover(self) -> None:
        device, engine = _started(self.device, "device"), _started(self.engine, "engine")
        try:
            for attempt in range(1, 4):
                try:
                    await device.recover()
                    await engine.start()
                    break
                except Exception as exc:
                    log.warning("modem restart %d failed: %s", attempt, exc)
                    await asyncio.sleep(0.5 * attempt)
            else:
                self.failure = "modem did not come back after 3 restarts"
                log.error("%s; stopping", self.failure)
                self.notify.status(self.failure)
                self._stop.set()
                return
            self.restarts += 1
            log.info("modem running again (restart %d)", self.restarts)
            self.notify.status(f"modem running again (restart {self.restarts}); "
                               + self.ready_line())
        finally:
            self._recovering = None

    # -- up --scenario

    def play_scenario(self, scenario: Scenario) -> None:
        """Play `scenario` in the background through the control socket's own handler; each
        step's outcome is one log line."""
        from iosm_cuse.scenario import play
        from iosm_cuse.sim.control import check

        async def send(action: str, args: JsonDict) -> JsonDict:
            try:
                checked = check(action, args)
            except ArgError as exc:
                raise ControlError(exc.errno, exc.message) from None
            return await self.handle(control.MODEM_PREFIX + action, checked)

        def report(step: Step, result: JsonDict | None, exc: Exception | None) -> None:
            if exc is not None:
                log.warning("scenario: %.2f s %s: %s", step.at, step.action, exc)
            else:
                sent = ", ".join((result or {}).get("indications", [])) or "no indication"
                log.info("scenario: %.2f s %s: %s", step.at, step.action, sent)

        async def run() -> None:
            failed = await play(scenario, send, report, stop_on_error=False)
            log.info("scenario %s done: %d steps, %d failed", scenario.name or "",
                     len(scenario.steps), failed)

        self._playing = asyncio.get_running_loop().create_task(run())

    # -- control socket

    async def handle(self, op: str, args: JsonDict) -> JsonDict:
        """The control socket's operations (declared in control.OPS)."""
        if op == "status":
            st = self.status()
            st["modem"]["process"] = await _model_usage(self.device)
            return st
        if op.startswith(control.MODEM_PREFIX):
            return await _model_control(self.device, op.removeprefix(control.MODEM_PREFIX),
                                        args)
        from iosm_cuse.link.args import LinkError

        try:
            result: JsonDict = await _started(self.links, "links").handle(op, args)
        except LinkError as exc:
            raise ControlError(exc.errno, exc.message) from None
        return result

    def status(self) -> JsonDict:
        eng, mux = _started(self.engine, "engine"), _started(self.mux, "MUX")
        links, device = _started(self.links, "links"), _started(self.device, "device")
        errors: JsonDict = dict(eng.counters)
        errors.update(mux.counters)
        errors.update(links.counters())
        return {
            "device": str(self.spec),
            "instance": self.instance,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "startup_ms": self.startup_ms,
            "process": process_usage(),
            "modem": {
                "name": device.description,
                "pid": _model_process_detail(device, "pid"),
                "exec_stage": exec_stage_name(eng.bus),
                "ipc_state": eng.state.value,
                "mux_mode": str(eng.mux_mode),
                "restarts": self.restarts,
                "last_error": eng.last_error,
            },
            "port": {"path": self.port_path(), "transport": self.transport,
                     **port_status(_started(self.port, "MBIM port"), self.chardev)},
            "at_ports": [self._at_status(p, c) for p, c in self.at_ports],
            "mux": mux.status(),
            "links": [info.as_dict() for info in links.show()],
            "errors": errors,
        }

    @staticmethod
    def _at_status(port: AtPort, chardev: Transport) -> JsonDict:
        st = port_status(port, chardev)
        del st["max_control"]  # a byte stream negotiates no message size
        return {"path": str(chardev.path), "transport": chardev.transport, **st}


def _opener(engine: IpcEngine, channel: int) -> Callable[[Callable[[bytes], None]],
                                                         Awaitable[Channel]]:
    """Contract 4's `open_channel(on_receive)` for one channel of the engine."""
    async def open_channel(on_receive: Callable[[bytes], None]) -> Channel:
        return await engine.open_channel(channel, on_receive)

    return open_channel


# A model that does not answer within this is reported without its figures, not waited for:
# `status` must answer while the model hangs or restarts.
MODEL_USAGE_TIMEOUT = 1.0


async def _model_usage(device: ModemDevice | None) -> JsonDict | None:
    """The model process's own rss_kb, fds and tasks, or None: a UIO device has no process of
    ours, and a model that is down, busy restarting or slow has none to give."""
    from iosm_cuse.sim.process import ModelProcess

    if not isinstance(device, ModelProcess):
        return None
    return await device.process_usage(MODEL_USAGE_TIMEOUT)


# A live-control action is quick; a model that takes longer is restarting or wedged.
MODEL_CONTROL_TIMEOUT = 5.0


async def _model_control(device: ModemDevice | None, action: str, args: JsonDict) -> JsonDict:
    """Forward a checked `modem.<action>` to the model process (sim/control.py applies it)."""
    from iosm_cuse.sim.process import ModelError, ModelProcess

    if not isinstance(device, ModelProcess):
        raise ControlError(errno.EOPNOTSUPP,
                           "live control needs the built-in model (up --device sim)")
    try:
        reply = await device.command("control", timeout=MODEL_CONTROL_TIMEOUT, action=action,
                                     args=args)
    except ModelError as exc:
        raise ControlError(errno.EAGAIN, f"modem {action}: {exc} (restarting?)") from None
    result = reply.get("result")
    if reply.get("ok") is True and isinstance(result, dict):
        return result
    err, msg = reply.get("errno"), reply.get("error")
    raise ControlError(err if isinstance(err, int) else errno.EIO,
                       msg if isinstance(msg, str) else f"modem {action}: failed")


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


def _model_process_detail(device: ModemDevice | None, name: str) -> object:
    """The model process's `pid` or `last_exit` (how it ended); None for a UIO device, which
    has no process of its own."""
    value: object = getattr(device, name, None)
    return value


def run_up(opts: UpOptions) -> int:
    """`iosm-cuse up`: returns the exit status."""
    try:
        scenario = _load_scenario(opts.scenario)
        spec = parse_device(opts.device)
        instance, port_name, locks = claim_instance(spec, opts.port_name)
    except UpError as exc:
        print(f"iosm-cuse: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(Daemon(opts, spec, instance, port_name), scenario))
    finally:
        for lock in reversed(locks):
            lock.release()


def _load_scenario(path: Path | None) -> Scenario | None:
    """--scenario checked before anything starts: a bad file is exit 1 with its reason."""
    if path is None:
        return None
    from iosm_cuse.scenario import ScenarioError, parse

    try:
        return parse(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise UpError(f"--scenario {path}: {exc}") from exc
    except ScenarioError as exc:
        raise UpError(f"--scenario {exc}") from exc


async def _serve(daemon: Daemon, scenario: Scenario | None = None) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop, signal.Signals(sig).name)
    try:
        try:
            line = await daemon.start()
        except (UpError, OSError) as exc:
            print(f"iosm-cuse: {exc}", file=sys.stderr)
            daemon.notify.status(f"failed: {exc}")
            return 1
        log.debug("ready %d ms after the process started: %s", daemon.startup_ms["control"],
                  daemon.startup_ms)
        print(line, flush=True)
        # The port and the data link exist now: the unit becomes active (docs/systemd.md §1).
        daemon.notify.ready(line.removeprefix("iosm-cuse: "))
        if scenario is not None:
            daemon.play_scenario(scenario)
        await daemon.serve_forever()
        return 0 if daemon.failure is None else 1
    finally:
        daemon.notify.stopping(f"stopping: {daemon.failure or 'asked to stop'}")
        await daemon.close()
        daemon.notify.close()
