"""`iosm-cuse up`'s options, checked before anything starts: a bad one is a message and exit
status 1, never a half-built stack."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iosm_cuse.sim.assembly import ModelOptions

_INSTANCE = re.compile(r"^wwan([0-9]{1,3})$")
_PORT_NAME = re.compile(r"^(wwan[0-9]{1,3})mbim[0-9]{1,3}$")
# Instances `up` tries, in order, when no --port-name is given.
MAX_INSTANCES = 16


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
    # auto: announce the ports to ModemManager whenever it is on the system bus; off: never
    modemmanager: str = "auto"
    scenario: Path | None = None  # a scenario (iosm_cuse/scenario.py) played once ready

    def model_options(self, instance: str = "wwan0") -> ModelOptions:
        """What the built-in model is assembled from (sim/assembly.py), as the modem of wwan
        `instance` (its addresses, IMEI and gateway TUN name)."""
        from iosm_cuse.sim.assembly import ModelOptions

        return ModelOptions(config=str(self.config) if self.config else None,
                            gateway=self.gateway, mux=self.mux,
                            instance=instance_number(instance))


def instance_number(instance: str) -> int:
    """wwanK -> K."""
    m = _INSTANCE.match(instance)
    if m is None:
        raise UpError(f"{instance!r} is no wwan instance (wwan<N>)")
    return int(m.group(1))


def port_name_choices(port_name: str | None) -> list[tuple[str, str]]:
    """(wwan instance, MBIM port name) pairs to claim, in order: the one --port-name names, or
    wwanNmbim0 for every N. Raises UpError for a name that is not wwan<N>mbim<M>."""
    if port_name is None:
        return [(f"wwan{n}", f"wwan{n}mbim0") for n in range(MAX_INSTANCES)]
    m = _PORT_NAME.match(port_name)
    if m is None:
        raise UpError(f"--port-name {port_name!r}: expected wwan<N>mbim<M>, like wwan0mbim0")
    return [(m.group(1), port_name)]


def check_model_config(path: Path | None) -> None:
    """Load --config here, in the daemon, so a bad file fails `up` with its reason rather than
    the model process with a timeout."""
    if path is None:
        return
    from iosm_cuse.sim.config import ConfigError, ModemConfig

    try:
        ModemConfig.load(path)
    except (ConfigError, OSError) as exc:
        raise UpError(f"--config {path}: {exc}") from exc
