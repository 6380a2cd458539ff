"""`iosm-cuse install-udev`: place the udev rules and the systemd template unit, then reload.

The files live once, in the source tree's `udev/` (installed to share/iosm-cuse/udev); the
command only fills in the group of the MBIM port and the path of the `iosm-cuse` program.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from iosm_cuse.bus.pci import IOSM_PCI_IDS

RULES = "70-iosm-cuse.rules"
TEST_RULES = "69-iosm-cuse-test.rules"
UNIT = "iosm-cuse@.service"
RULES_DIR = Path("etc/udev/rules.d")
UNIT_DIR = Path("etc/systemd/system")
DEFAULT_GROUP = "dialout"
# The unit's portable ExecStart, replaced by this installation's absolute program path.
PORTABLE_EXEC = "/usr/bin/env iosm-cuse"
_GROUP = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class InstallError(Exception):
    pass


def source_dir() -> Path:
    """udev/ beside the package (source tree, editable install), else the installed data."""
    here = Path(__file__).resolve().parent.parent / "udev"
    for candidate in (here, Path(sys.prefix) / "share" / "iosm-cuse" / "udev"):
        if (candidate / RULES).is_file():
            return candidate
    raise InstallError(f"cannot find {RULES} (looked in {here} and "
                       f"{Path(sys.prefix) / 'share/iosm-cuse/udev'})")


def render_rules(text: str, group: str) -> str:
    if not _GROUP.match(group):
        raise InstallError(f"bad group name {group!r}")
    marker = f'GROUP="{DEFAULT_GROUP}"'
    if marker not in text:
        raise InstallError(f"{RULES} has no {marker} to replace")
    return text.replace(marker, f'GROUP="{group}"')


def render_unit(text: str, program: str) -> str:
    if PORTABLE_EXEC not in text:
        raise InstallError(f"{UNIT} has no {PORTABLE_EXEC!r} to replace")
    return text.replace(PORTABLE_EXEC,
                        program if program == PORTABLE_EXEC else shlex.quote(program))


def program_path() -> str:
    """The absolute path of the running `iosm-cuse`, so units work from a virtualenv too."""
    exe = Path(sys.argv[0])
    if exe.name == "iosm-cuse" and exe.is_file():
        return str(exe.resolve())
    found = shutil.which("iosm-cuse")
    return str(Path(found).resolve()) if found else PORTABLE_EXEC


@dataclass(frozen=True)
class Plan:
    files: tuple[tuple[Path, str], ...]  # destination, content
    commands: tuple[tuple[str, ...], ...]  # run afterwards, in order


def plan_install(src: Path, prefix: Path, group: str, test_device: bool, program: str,
                 udevd_running: bool, systemd_running: bool) -> Plan:
    """What to write and run; pure apart from reading the source files."""
    files = [(prefix / RULES_DIR / RULES, render_rules((src / RULES).read_text(), group)),
             (prefix / UNIT_DIR / UNIT, render_unit((src / UNIT).read_text(), program))]
    if test_device:
        files.append((prefix / RULES_DIR / TEST_RULES, (src / TEST_RULES).read_text()))
    commands: list[tuple[str, ...]] = []
    live = prefix == Path("/")
    if live and systemd_running:
        commands.append(("systemctl", "daemon-reload"))
    if live and udevd_running:
        commands.append(("udevadm", "control", "--reload"))
        # Replay "add" for modems already present, so they are bound and started now.
        ids = sorted(IOSM_PCI_IDS) + ([] if not test_device else [(0x1AF4, 0x1110)])
        for vendor, device in ids:
            commands.append(("udevadm", "trigger", "--action=add", "--subsystem-match=pci",
                             f"--attr-match=vendor=0x{vendor:04x}",
                             f"--attr-match=device=0x{device:04x}"))
    return Plan(tuple(files), tuple(commands))


def execute(plan: Plan, dry_run: bool) -> None:
    for dest, content in plan.files:
        click.echo(f"{'would write' if dry_run else 'writing'} {dest}")
        if not dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_text(content)
            tmp.chmod(0o644)
            tmp.replace(dest)
    for argv in plan.commands:
        click.echo(f"{'would run' if dry_run else 'running'} {shlex.join(argv)}")
        if not dry_run:
            result = subprocess.run(argv, check=False, capture_output=True, text=True)
            if result.returncode != 0:
                click.echo(f"warning: {shlex.join(argv)} failed: {result.stderr.strip()}",
                           err=True)


@click.command("install-udev")
@click.option("--prefix", type=click.Path(path_type=Path, file_okay=False), default=Path("/"),
              show_default=True, help="Root to install under (reloads only when it is /).")
@click.option("--group", default=DEFAULT_GROUP, show_default=True,
              help="Group owning /dev/wwanXmbimY and /dev/wwanXatY (mode 0660).")
@click.option("--test-device", is_flag=True,
              help="Also install 69-iosm-cuse-test.rules: QEMU's ivshmem (1af4:1110) is "
                   "treated as a modem. For test VMs only.")
@click.option("--dry-run", is_flag=True, help="Print what would be written and run.")
def install_udev_command(prefix: Path, group: str, test_device: bool, dry_run: bool) -> None:
    """Install the udev rules and systemd unit that start iosm-cuse when a modem appears."""
    try:
        plan = plan_install(source_dir(), prefix, group, test_device, program_path(),
                            udevd_running=Path("/run/udev/control").exists(),
                            systemd_running=Path("/run/systemd/system").is_dir())
        execute(plan, dry_run)
    except (InstallError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
