"""Fixtures of the kernel-tier guest tests shared by more than one module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mm_guest import Services, services_running


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """dbus-daemon --system, polkitd, systemd-udevd with our rules, stock ModemManager."""
    with services_running(tmp_path_factory.mktemp("services")) as svc:
        yield svc
