"""`--device`: which modem `up` drives, found and opened. `open_device` is the single place
that turns a DeviceSpec into a started device with a Bus (docs/architecture.md, Contract 5)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from iosm_cuse.options import UpError, UpOptions, check_model_config

if TYPE_CHECKING:
    from iosm_cuse.bus.base import Bus
    from iosm_cuse.sim.process import ModelProcess

log = logging.getLogger(__name__)

# A new model process's first answer: under TCG (the kernel-tier guest, Python ~11x slower)
# importing the model takes far longer than ModelProcess's default allows.
MODEL_START_TIMEOUT = 120.0


class ModemDevice(Protocol):
    """What the daemon drives: the model process (sim.process.ModelProcess) or a UIO-bound
    modem (bus.uio.UioModemDevice)."""

    @property
    def bus(self) -> Bus: ...

    @property
    def description(self) -> str: ...

    async def recover(self) -> None:
        """Bring the device back to where the engine's handshake can start again."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class DeviceSpec:
    """What `--device` named, resolved: the model ('sim') or a UIO-bound PCI device."""

    kind: str  # "sim" | "uio"
    ref: str = ""  # uio: PCI address (0000:03:00.0) or UIO node (/dev/uio0)

    @property
    def lock_key(self) -> str | None:
        """Two daemons must never drive the same device: one lock file per key. None for the
        model: each `up --device sim` starts a modem of its own (rundir.claim_instance)."""
        return None if self.kind == "sim" else "uio-" + self.ref.replace("/", "_")

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


async def open_device(spec: DeviceSpec, opts: UpOptions,
                      instance: str = "wwan0") -> ModemDevice:
    """The one place that turns a DeviceSpec into a started device; a model is started as the
    modem of wwan `instance`."""
    if spec.kind == "sim":
        return await spawn_model(opts, instance)
    from iosm_cuse.bus.uio import UioError, UioModemDevice

    try:
        return await UioModemDevice.open(str(spec))
    except UioError as exc:
        raise UpError(str(exc)) from exc


async def spawn_model(opts: UpOptions, instance: str = "wwan0") -> ModelProcess:
    """The modem model in its own process on a shared-memory bus, assembled over there from
    `opts` (sim/assembly.py)."""
    from dataclasses import asdict

    from iosm_cuse.sim.assembly import MODEL
    from iosm_cuse.sim.device import DeviceConfig
    from iosm_cuse.sim.process import ModelError, ModelProcess

    check_model_config(opts.config)  # fail here, with the reason, not in the child
    try:
        return await ModelProcess.spawn(
            functions=MODEL, config=asdict(DeviceConfig.for_mux(opts.mux or "lite")),
            options=opts.model_options(instance).as_json(), start_timeout=MODEL_START_TIMEOUT)
    except ModelError as exc:
        raise UpError(f"modem model: {exc}") from exc
