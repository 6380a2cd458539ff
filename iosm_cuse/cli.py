"""The `iosm-cuse` command line: one click group, each command defined by the layer it drives."""

from __future__ import annotations

import click

from iosm_cuse import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iosm-cuse")
def main() -> None:
    """Userspace IOSM driver: /dev/wwan0mbim0 over CUSE, wwan0-X over TUN, and a modem model."""


# udev-driven start (udev/ rules + unit) and the watcher that replaces it without systemd.
from iosm_cuse.udev_install import install_udev_command  # noqa: E402
from iosm_cuse.watch import watch_command  # noqa: E402

main.add_command(install_udev_command)
main.add_command(watch_command)
