"""The house rule: a folder says which side of the bus its code lives on (docs/architecture.md).

Reads every module's imports (module level and inside functions) with `ast` and checks:
- `wire/` imports nothing outside `wire/` and the standard library;
- `sim/` (the device) imports nothing of the host: `hw/`, `link/`, `chardev/`;
- `hw/`, `link/` and `chardev/` (the host) import nothing of the device: `sim/`;
- `bus/`, `net/` and `mbim/` import nothing of either side.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "iosm_cuse"

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "sim": ("hw", "link", "chardev"),
    "hw": ("sim",),
    "link": ("sim",),
    "chardev": ("sim",),
    "bus": ("hw", "link", "chardev", "sim", "mbim"),
    "net": ("hw", "link", "chardev", "sim", "mbim", "bus", "wire"),
    "mbim": ("hw", "link", "chardev", "sim", "bus", "net", "wire"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here.pop()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            # `from iosm_cuse.x import y` may name a module y: count it as imported too.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "iosm_cuse" or len(parts) < 2:
        return None
    return parts[1]


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations(path: Path) -> list[str]:
    layer = layer_of(module_name(path))
    found: list[str] = []
    for name in sorted(imported(path)):
        target = layer_of(name)
        if layer == "wire":
            top = name.split(".")[0]
            if target not in (None, "wire") or (target is None and top == "iosm_cuse"):
                found.append(f"{name} (wire/ imports only wire/ and the standard library)")
            elif target is None and top not in sys.stdlib_module_names:
                found.append(f"{name} (not the standard library)")
        elif layer in FORBIDDEN and target in FORBIDDEN[layer]:
            found.append(f"{name} ({layer}/ must not import {target}/)")
    return found


def test_the_package_has_every_layer() -> None:
    layers = {layer_of(module_name(p)) for p in modules()}
    assert {"wire", "bus", "hw", "mbim", "chardev", "link", "net", "sim"} <= layers


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_respect_the_layers(path: Path) -> None:
    assert violations(path) == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule must be able to fail: a device module that imports the host is caught, inside a
    function too, and so is a wire module importing a third-party package."""
    sim = PACKAGE / "sim" / "_layer_probe.py"
    wire = PACKAGE / "wire" / "_layer_probe.py"
    try:
        sim.write_text("def f() -> None:\n    from iosm_cuse.hw.engine import IpcEngine\n")
        wire.write_text("import numpy\nfrom ..sim import config\n")
        assert violations(sim) == ["iosm_cuse.hw.engine (sim/ must not import hw/)",
                                   "iosm_cuse.hw.engine.IpcEngine (sim/ must not import hw/)"]
        found = violations(wire)
        assert any(v.startswith("numpy ") for v in found)
        assert any(v.startswith("iosm_cuse.sim ") for v in found)
    finally:
        sim.unlink(missing_ok=True)
        wire.unlink(missing_ok=True)
