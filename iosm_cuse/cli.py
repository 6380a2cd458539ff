"""The `iosm-cuse` command line: one click group, each command defined by the layer it drives."""

from __future__ import annotations

import errno
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import click

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
@click.option("-v", "--verbose", is_flag=True)
def up(device: str, transport: str, config: Path | None, mux: str | None, gateway: str,
       port_name: str | None, modemmanager: str, verbose: bool) -> None:
    """Start the driver: MBIM port, data link wwan<N> (session 0), control socket."""
    from iosm_cuse.daemon import run_up
    from iosm_cuse.options import UpOptions

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="iosm-cuse: %(message)s")
    opts = UpOptions(device=device, transport=transport, config=config, mux=mux,
                     gateway=gateway, port_name=port_name, modemmanager=modemmanager)
    sys.exit(run_up(opts))


_socket_option = click.option(
    "--socket", "sock", type=click.Path(path_type=Path), envvar=control.SOCKET_ENV,
    help="Control socket of the daemon (default: the one for the named wwan device).")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@_socket_option
def status(as_json: bool, sock: Path | None) -> None:
    """Device, modem state, MBIM port and its openers, links and their counters."""
    from iosm_cuse.status import format_status

    st = _call(sock, None, "status")
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


@main.group()
def link() -> None:
    """Data links wwan<N>-<linkid>, as with `ip link ... type wwan`."""


_ip_args = {"context_settings": {"ignore_unknown_options": True, "allow_interspersed_args": False}}


@link.command("add", **_ip_args)
@_socket_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def link_add(sock: Path | None, args: tuple[str, ...]) -> None:
    """add [dev] NAME parentdev-name wwan0 type wwan linkid ID [mtu MTU]"""
    req = _parse_ip(args, "add")
    res = _call(sock, req.get("parent") or _instance_of(req.get("dev")), "link.add", req)
    _print_links(res)


@link.command("del", **_ip_args)
@_socket_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def link_del(sock: Path | None, args: tuple[str, ...]) -> None:
    """del [dev] NAME"""
    req = _parse_ip(args, "del")
    _call(sock, _instance_of(req.get("dev")), "link.del", req)


@link.command("show", **_ip_args)
@_socket_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def link_show(sock: Path | None, args: tuple[str, ...]) -> None:
    """show [[dev] NAME]"""
    req = _parse_ip(args, "show")
    as_json = req.pop("json", False)
    res = _call(sock, _instance_of(req.get("dev")), "link.show", req)
    if as_json:
        click.echo(json.dumps(res.get("links", [])))
    else:
        _print_links(res)


# iproute2's other spellings of the verbs
link.add_command(link_del, "delete")
link.add_command(link_show, "list")
link.add_command(link_show, "lst")


@main.command()
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
def modem(shm: Path | None, size: int, config: Path | None, mux: str | None, gateway: str,
          virtpci: Path | None, caps: str | None, pci_id: str, stats: Path | None,
          fault: str | None, verbose: bool) -> None:
    """Run the modem model alone, for a driver in another process or a VM (ivshmem), or as a
    PCI function of a UML kernel (--virtpci)."""
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


_LINK_NAME = re.compile(r"^(wwan[0-9]{1,3})(?:-[0-9]+)?$")


def _instance_of(name: object) -> str | None:
    """wwan0-1 and wwan0 belong to the daemon of wwan0."""
    m = _LINK_NAME.match(name) if isinstance(name, str) else None
    return m.group(1) if m else None


def _socket_for(sock: Path | None, instance: str | None) -> Path:
    if sock is not None:
        return sock
    if instance is not None:
        return control.socket_path(instance)
    running = sorted(control.run_dir().glob("*.sock"))
    return running[0] if len(running) == 1 else control.socket_path("wwan0")


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
