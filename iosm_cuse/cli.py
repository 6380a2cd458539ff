"""The `iosm-cuse` command line: one click group, each command defined by the layer it drives."""

from __future__ import annotations

import errno
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from iosm_cuse import __version__, control


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iosm-cuse")
def main() -> None:
    """Userspace IOSM driver: /dev/wwan0mbim0 over CUSE, wwan0-X over TUN, and a modem model."""


# udev-driven start (udev/ rules + unit) and the watcher that replaces it without systemd.
from iosm_cuse.udev_install import install_udev_command  # noqa: E402
from iosm_cuse.watch import watch_command  # noqa: E402

main.add_command(install_udev_command)
main.add_command(watch_command)


# ---- the daemon, its status, the links (daemon.py; control.py for the socket) ------------------
# Imports of the layers stay inside the commands: `up` must be ready in well under a second and
# `status` should not pay for TUN or MBIM code it never runs.


@main.command()
@click.option("--device", default="auto", show_default=True,
              help="auto (a UIO-bound modem, else the model), sim, uio:<PCI address> or /dev/uioN.")
@click.option("--transport", type=click.Choice(["auto", "cuse", "pty"]), default="auto",
              show_default=True, help="MBIM port through CUSE, or a PTY when CUSE is missing.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Modem model configuration (SIM, operator, APNs, addresses).")
@click.option("--mux", type=click.Choice(["lite", "aggregation"]),
              help="MUX mode the model announces (default: the model's own, Lite).")
@click.option("--gateway", default="echo", show_default=True, metavar="echo|tun|netns:NAME",
              help="Where the model sends uplink packets: answer pings itself, or a gateway "
                   "TUN (iosmgw0), optionally in network namespace NAME.")
@click.option("--port-name", metavar="wwanNmbimM",
              help="MBIM port name (default: wwan<N>mbim0, first N not in use).")
@click.option("--modemmanager", type=click.Choice(["auto", "off"]), default="auto",
              show_default=True,
              help="auto: announce the MBIM port and the data link to ModemManager whenever "
                   "it is on the system bus (needs root and `install-udev`'s rules); off: never.")
@click.option("--scenario", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Play this scenario (a TOML timeline of `modem` actions) once ready.")
@click.option("-v", "--verbose", is_flag=True)
def up(device: str, transport: str, config: Path | None, mux: str | None, gateway: str,
       port_name: str | None, modemmanager: str, scenario: Path | None, verbose: bool) -> None:
    """Start the driver: MBIM port, data link wwan<N> (session 0), control socket."""
    from iosm_cuse.daemon import run_up
    from iosm_cuse.options import UpOptions

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="iosm-cuse: %(message)s")
    opts = UpOptions(device=device, transport=transport, config=config, mux=mux,
                     gateway=gateway, port_name=port_name, modemmanager=modemmanager,
                     scenario=scenario)
    sys.exit(run_up(opts))


def _choices(enum_name: str) -> list[str]:
    """The values of a live-control enum (sim/control.py), for click.Choice."""
    from iosm_cuse.sim import control as model_control

    values: list[str] = [m.value for m in getattr(model_control, enum_name)]
    return values


_socket_option = click.option(
    "--socket", "sock", type=click.Path(path_type=Path), envvar=control.SOCKET_ENV,
    help="Control socket of the daemon (default: the one for the named wwan device).")
# Which modem of several (`up` twice gives wwan0 and wwan1): the default is the only one
# running. `modem` subcommands take it the same way (`_socket_for`).
instance_option = click.option(
    "--instance", type=click.IntRange(0, 999), metavar="N",
    help="The modem wwanN (default: the only one running).")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@instance_option
@_socket_option
def status(as_json: bool, instance: int | None, sock: Path | None) -> None:
    """Device, modem state, MBIM port and its openers, links and their counters."""
    from iosm_cuse.status import format_status

    st = _call(sock, _named(instance), "status")
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


@main.group()
@instance_option
@click.pass_context
def link(ctx: click.Context, instance: int | None) -> None:
    """Data links wwan<N>-<linkid>, as with `ip link ... type wwan`. The modem is the one a
    wwanN or wwanN-M name belongs to, else --instance N, else the only one running."""
    ctx.obj = _named(instance)


_ip_args = {"context_settings": {"ignore_unknown_options": True, "allow_interspersed_args": False}}


@link.command("add", **_ip_args)
@_socket_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def link_add(sock: Path | None, args: tuple[str, ...]) -> None:
    """add [dev] NAME parentdev-name wwan0 type wwan linkid ID [mtu MTU]"""
    req = _parse_ip(args, "add")
    res = _call(sock, req.get("parent") or _instance_of(req.get("dev")) or _link_instance(),
                "link.add", req)
    _print_links(res)


@link.command("del", **_ip_args)
@_socket_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def link_del(sock: Path | None, args: tuple[str, ...]) -> None:
    """del [dev] NAME"""
    req = _parse_ip(args, "del")
    _call(sock, _instance_of(req.get("dev")) or _link_instance(), "link.del", req)


@link.command("show", **_ip_args)
@_socket_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def link_show(sock: Path | None, args: tuple[str, ...]) -> None:
    """show [[dev] NAME]"""
    req = _parse_ip(args, "show")
    as_json = req.pop("json", False)
    res = _call(sock, _instance_of(req.get("dev")) or _link_instance(), "link.show", req)
    if as_json:
        click.echo(json.dumps(res.get("links", [])))
    else:
        _print_links(res)


# iproute2's other spellings of the verbs
link.add_command(link_del, "delete")
link.add_command(link_show, "list")
link.add_command(link_show, "lst")


@main.group(invoke_without_command=True)
@click.option("--shm", type=click.Path(dir_okay=False, path_type=Path),
              help="Shared file to serve (the ivshmem backing file), created if missing "
                   "[default: /dev/shm/iosm-cuse-modem].")
@click.option("--size", type=click.IntRange(min=1 << 16), default=4 << 20, show_default=True,
              help="Size in bytes of a file that --shm creates.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Modem model configuration.")
@click.option("--mux", type=click.Choice(["lite", "aggregation"]))
@click.option("--gateway", default="echo", show_default=True, metavar="echo|tun|netns:NAME")
@click.option("--virtpci", type=click.Path(dir_okay=False, path_type=Path), metavar="SOCKET",
              help="Be a PCI function of a User-Mode Linux kernel instead: serve vhost-user on "
                   "SOCKET (UML: virtio_uml.device=SOCKET:<id>); the kernel's iosm driver is "
                   "then the host.")
@click.option("--caps", metavar="HEX", help="CP capabilities the model announces, in hex "
              "(overrides the MUX mode's; e.g. 200000 for UL flow credit). With --virtpci.")
@click.option("--pci-id", default="8086:7560", show_default=True,
              type=click.Choice(["8086:7560", "8086:7360"]), help="PCI id. With --virtpci.")
@click.option("--stats", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the model's counters and reject counters (JSON) on exit. With "
                   "--virtpci.")
@click.option("--fault", type=click.Choice(["mux-offset", "mux-length", "td-size", "crash"]),
              help="Spoil the third MUX data transfer down (or crash then): the host driver's "
                   "defences (iosm_cuse/sim/faults.py). With --virtpci.")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def modem(ctx: click.Context, shm: Path | None, size: int, config: Path | None,
          mux: str | None, gateway: str, virtpci: Path | None, caps: str | None, pci_id: str,
          stats: Path | None, fault: str | None, verbose: bool) -> None:
    """Run the modem model alone, for a driver in another process or a VM (ivshmem), or as a
    PCI function of a UML kernel (--virtpci); or, with a command, control the model of a
    running `iosm-cuse up` (docs/control.md)."""
    if ctx.invoked_subcommand is not None:
        given = [f"--{p.name.replace('_', '-')}" for p in ctx.command.params
                 if ctx.get_parameter_source(p.name or "") is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)}: options of running the model, not of "
                                   f"`modem {ctx.invoked_subcommand}`")
        return
    from iosm_cuse.options import UpOptions
    from iosm_cuse.sim.process import run_modem, run_modem_virtpci

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="iosm-cuse modem: %(message)s")
    options = UpOptions(config=config, mux=mux, gateway=gateway).model_options()
    if virtpci is None:
        if caps is not None or pci_id != "8086:7560" or stats or fault:
            raise click.UsageError("--caps, --pci-id, --stats and --fault go with --virtpci")
        sys.exit(run_modem(options, shm, size))
    if shm is not None:
        raise click.UsageError("--shm and --virtpci exclude each other")
    try:
        capabilities = int(caps, 16) if caps is not None else None
    except ValueError:
        raise click.BadParameter(f"{caps!r} is not a hex number", param_hint="--caps") from None
    if capabilities is not None and not 0 <= capabilities <= 0xFFFFFFFF:
        raise click.BadParameter("beyond 32 bits", param_hint="--caps")
    vendor, device = (int(x, 16) for x in pci_id.split(":"))
    sys.exit(run_modem_virtpci(options, virtpci, capabilities, (vendor, device), stats, fault))


# ---- live control of a running model (sim/control.py declares the actions) -------------------


def _control_options(f: Callable[..., None]) -> Callable[..., None]:
    """--json, --instance and --socket, on every `modem` control command."""
    f = click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")(f)
    return _socket_option(instance_option(f))


def _modem_call(sock: Path | None, instance: int | None, as_json: bool, action: str,
                args: dict[str, Any] | None = None) -> dict[str, Any]:
    res = _call(sock, _named(instance), control.MODEM_PREFIX + action, args)
    if as_json:
        click.echo(json.dumps(res))
    return res


def _print_sent(res: dict[str, Any]) -> None:
    sent = res.get("indications") or []
    click.echo(f"{res.get('action')}: " + (f"indicated {', '.join(sent)}" if sent
                                           else "no change to indicate"))


def _change(action: str, **fixed: Any
            ) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., None]]:
    """A control command whose arguments are its click parameters, printed as what it sent."""
    def wrap(f: Callable[..., dict[str, Any]]) -> Callable[..., None]:
        def run(sock: Path | None, instance: int | None, as_json: bool, **params: Any) -> None:
            args = {**fixed, **f(**params)}
            res = _modem_call(sock, instance, as_json, action, args)
            if not as_json:
                _print_sent(res)
        run.__name__ = f.__name__
        run.__doc__ = f.__doc__
        return _control_options(run)
    return wrap


@modem.command("register")
@click.argument("state", type=click.Choice(_choices("Network")))
@click.option("--operator", metavar="MCCMNC", help="The network's MCC and MNC (5 or 6 digits).")
@click.option("--name", metavar="TEXT", help="The network's name.")
@click.option("--cause", type=int, metavar="N",
              help="With denied: the 3GPP reject cause in NwError (default 11).")
@_change("register")
def modem_register(state: str, operator: str | None, name: str | None, cause: int | None
                   ) -> dict[str, Any]:
    """The network: home|roaming|searching|denied|off (REGISTER_STATE and what follows)."""
    return {"state": state, "operator": operator, "name": name, "cause": cause}


@modem.command("signal")
@click.option("--rssi", type=int, required=True, metavar="N", help="0..31, 99 unknown.")
@click.option("--ber", type=int, metavar="N", help="Bit error rate 0..7, 99 unknown.")
@click.option("--rsrp", type=int, metavar="DBM")
@click.option("--rsrq", type=int, metavar="DB")
@click.option("--snr", type=int, metavar="DB")
@_change("signal")
def modem_signal(rssi: int, ber: int | None, rsrp: int | None, rsrq: int | None,
                 snr: int | None) -> dict[str, Any]:
    """Radio conditions (SIGNAL_STATE)."""
    return {"rssi": rssi, "ber": ber, "rsrp": rsrp, "rsrq": rsrq, "snr": snr}


@modem.command("sim")
@click.argument("state", type=click.Choice(_choices("SimCard")))
@_change("sim")
def modem_sim(state: str) -> dict[str, Any]:
    """The SIM: ready|absent|pin|puk (SUBSCRIBER_READY_STATUS and what follows)."""
    return {"state": state}


@modem.command("detach")
@_change("detach")
def modem_detach() -> dict[str, Any]:
    """The network detaches packet service; every session goes down."""
    return {}


@modem.command("deactivate")
@click.argument("session", type=int)
@click.option("--cause", type=int, metavar="N",
              help="3GPP session management cause in NwError (default 36, regular).")
@_change("deactivate")
def modem_deactivate(session: int, cause: int | None) -> dict[str, Any]:
    """The network takes session SESSION down (CONNECT deactivated)."""
    return {"session": session, "cause": cause}


@modem.command("radio")
@click.argument("state", type=click.Choice(_choices("Switch")))
@_change("radio")
def modem_radio(state: str) -> dict[str, Any]:
    """The hardware radio switch (RADIO_STATE and what follows)."""
    return {"state": state}


@modem.command("fcc")
@click.argument("state", type=click.Choice(_choices("FccLock")))
@_change("fcc")
def modem_fcc(state: str) -> dict[str, Any]:
    """FCC lock: lock keeps the software radio OFF whatever the host sets; unlock lets it on."""
    return {"state": state}


@modem.group("sms")
def modem_sms() -> None:
    """SMS: deliver one to the modem, or list what hosts sent."""


@modem_sms.command("deliver")
@click.option("--from", "sender", required=True, metavar="NUMBER")
@click.argument("text")
@_change("sms.deliver")
def modem_sms_deliver(sender: str, text: str) -> dict[str, Any]:
    """An SMS from NUMBER arrives."""
    return {"sender": sender, "text": text}


@modem_sms.command("outbox")
@_control_options
def modem_sms_outbox(sock: Path | None, instance: int | None, as_json: bool) -> None:
    """What hosts sent."""
    res = _modem_call(sock, instance, as_json, "sms.outbox")
    if not as_json:
        for msg in res.get("messages", []):
            click.echo(f"to {msg.get('to', '?')}: {msg.get('text', '')}")


@modem.group("ussd")
def modem_ussd() -> None:
    """USSD from the network."""


@modem_ussd.command("notify")
@click.argument("text")
@_change("ussd.notify")
def modem_ussd_notify(text: str) -> dict[str, Any]:
    """A network-initiated USSD message."""
    return {"text": text}


@modem.command("crash")
@click.option("--stage", type=click.Choice(_choices("CrashStage")), default="crash",
              show_default=True)
@_change("crash")
def modem_crash(stage: str) -> dict[str, Any]:
    """The modem crashes (the driver restarts it)."""
    return {"stage": stage}


@modem.command("shape")
@click.argument("session", type=int)
@click.option("--delay", "delay_ms", type=float, metavar="MS")
@click.option("--loss", "loss_percent", type=float, metavar="PERCENT")
@click.option("--rate", "rate_mbit", type=float, metavar="MBIT")
@click.option("--clear", is_flag=True, help="Back to an unshaped session.")
@_control_options
def modem_shape(sock: Path | None, instance: int | None, as_json: bool, session: int,
                delay_ms: float | None, loss_percent: float | None, rate_mbit: float | None,
                clear: bool) -> None:
    """Delay, loss and a rate cap on SESSION's traffic, in the model's gateway."""
    res = _modem_call(sock, instance, as_json, "shape", {
        "session": session, "delay_ms": delay_ms, "loss_percent": loss_percent,
        "rate_mbit": rate_mbit, "clear": clear or None})
    if not as_json:
        for sid, shape in (res.get("shapes") or {}).items():
            click.echo(f"session {sid}: " + " ".join(f"{k} {v}" for k, v in shape.items()))


@modem.command("state")
@_control_options
def modem_state(sock: Path | None, instance: int | None, as_json: bool) -> None:
    """Everything live control sets, as it stands now."""
    res = _modem_call(sock, instance, as_json, "state")
    if not as_json:
        click.echo(format_modem_state(res))


def format_modem_state(res: dict[str, Any]) -> str:
    st = res.get("state", {})
    prov, radio, sig = st.get("provider", {}), st.get("radio", {}), st.get("signal", {})
    lines = [
        f"network: {st.get('network')} (register state {st.get('register_state')}"
        + (f", {prov.get('id')} {prov.get('name')!r}" if prov.get("id") else "")
        + (f", reject cause {st.get('reject_cause')}" if st.get("reject_cause") else "") + ")",
        f"radio: hw {radio.get('hw')}, sw {radio.get('sw')}"
        + (", FCC locked" if radio.get("fcc_locked") else ""),
        f"sim: {st.get('sim')} (PIN retries {st.get('pin_retries')}, "
        f"PUK retries {st.get('puk_retries')})",
        f"signal: rssi {sig.get('rssi')}, ber {sig.get('ber')}",
        f"packet service: {st.get('packet_service')}",
    ]
    for sid, s in (st.get("sessions") or {}).items():
        lines.append(f"session {sid}: {s.get('apn')} {s.get('ip_type')} "
                     f"{s.get('ipv4') or ''} {s.get('ipv6') or ''}".rstrip())
    for sid, shape in (res.get("shapes") or {}).items():
        lines.append(f"shape {sid}: " + " ".join(f"{k} {v}" for k, v in shape.items()))
    return "\n".join(lines)


@modem.command("play")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_control_options
def modem_play(sock: Path | None, instance: int | None, as_json: bool, file: Path) -> None:
    """Play a scenario FILE (a TOML timeline of these actions) against the running model."""
    import asyncio

    from iosm_cuse.scenario import ScenarioError, Step, parse, play

    try:
        scenario = parse(file.read_text(), str(file))
    except (ScenarioError, UnicodeDecodeError) as exc:
        click.echo(f"iosm-cuse: {exc}", err=True)
        sys.exit(1)
    path = _socket_for(sock, _named(instance))

    async def send(action: str, args: dict[str, Any]) -> dict[str, Any]:
        return control.call(path, control.MODEM_PREFIX + action, args)

    def report(step: Step, res: dict[str, Any] | None, exc: Exception | None) -> None:
        if as_json:
            line: dict[str, Any] = {"at": step.at, "action": step.action}
            line.update({"result": res} if exc is None else {"error": str(exc)})
            click.echo(json.dumps(line))
        elif res is not None:
            sent = ", ".join(res.get("indications") or []) or "no change to indicate"
            click.echo(f"{step.at:8.2f} s  {step.action}: {sent}")

    try:
        asyncio.run(play(scenario, send, report))
    except control.ControlError as exc:
        click.echo(f"iosm-cuse: {exc.strerror}: {exc.message}", err=True)
        sys.exit(1 if exc.errno in (errno.ECONNREFUSED, errno.EACCES) else 2)


_LINK_NAME = re.compile(r"^(wwan[0-9]{1,3})(?:-[0-9]+)?$")


def _instance_of(name: object) -> str | None:
    """wwan0-1 and wwan0 belong to the daemon of wwan0."""
    m = _LINK_NAME.match(name) if isinstance(name, str) else None
    return m.group(1) if m else None


def _named(instance: int | None) -> str | None:
    """--instance N -> 'wwanN'."""
    return None if instance is None else f"wwan{instance}"


def _link_instance() -> str | None:
    """The `link` group's --instance, for a command whose names do not say the modem."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.command.name == "link":
            return ctx.obj if isinstance(ctx.obj, str) else None
        ctx = ctx.parent
    return None


class NoInstance(click.ClickException):
    """Several modems run and the command did not say which (exit status 1)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"iosm-cuse: {self.format_message()}", err=True)


def _socket_for(sock: Path | None, instance: str | None) -> Path:
    """The control socket to use: --socket, else the named instance's, else the only running
    daemon's (wwan0's when none runs: the error then says no daemon listens there). With
    several running and none named, NoInstance lists them."""
    from iosm_cuse.rundir import running_instances

    if sock is not None:
        return sock
    if instance is not None:
        return control.socket_path(instance)
    running = running_instances()
    if len(running) > 1:
        raise NoInstance(f"{len(running)} modems are running ({', '.join(running)}); "
                         "say which with --instance N")
    return control.socket_path(running[0] if running else "wwan0")


def _call(sock: Path | None, instance: str | None, op: str,
          args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One control request; errors go to stderr as iproute2 prints them, exit status 2 for an
    error the daemon answered (as `ip` does for RTNETLINK errors), 1 when there is no daemon."""
    try:
        return control.call(_socket_for(sock, instance), op, args)
    except control.ControlError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.EACCES, errno.ETIMEDOUT, errno.EPROTO):
            click.echo(f"iosm-cuse: {exc.message}", err=True)
            sys.exit(1)
        prefix = "RTNETLINK answers" if op.startswith("link.") else "iosm-cuse"
        click.echo(f"{prefix}: {exc.strerror}: {exc.message}", err=True)
        sys.exit(2)


def _print_links(res: dict[str, Any]) -> None:
    for ln in res.get("links", []):
        click.echo(format_link(ln))


def format_link(ln: dict[str, Any]) -> str:
    """One link in the shape of `ip link show`, plus its session."""
    flags = ",".join(ln.get("flags", [])) or "POINTOPOINT,NOARP"
    text = (f"{ln.get('ifindex', 0)}: {ln.get('name')}@{ln.get('parent', '')}: <{flags}> "
            f"mtu {ln.get('mtu')} linkid {ln.get('linkid')} session {ln.get('session')}")
    counters = ln.get("counters")
    if isinstance(counters, dict) and counters:
        text += "\n    " + " ".join(f"{k} {v}" for k, v in counters.items())
    return text


def _parse_ip(args: tuple[str, ...], verb: str) -> dict[str, Any]:
    """`ip link` argument forms -> the control request's arguments (link/args.py parses);
    a malformed command line exits 255 with iproute2's message, as `ip` does."""
    from iosm_cuse.link.args import LinkError, parse_verb

    try:
        cmd = parse_verb(verb, args)
    except LinkError as exc:
        click.echo(exc.message, err=True)
        sys.exit(255)
    req = cmd.request()
    if cmd.json:
        req["json"] = True
    return req
