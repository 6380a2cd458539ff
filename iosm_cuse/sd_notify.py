"""systemd's service notification protocol (docs/systemd.md §1), without libsystemd.

`up` runs as `Type=notify` under iosm-cuse@.service: systemd counts the unit active only when
the daemon says `READY=1`, once the MBIM port and the data link exist. The protocol is one
datagram of `KEY=VALUE` lines to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an
abstract name written with a leading `@`).

The core (`notify_address`, `encode`) is pure; `Notifier` is the thin adapter that sends. Without
`$NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failed send is logged once
and never raised: a lost notification must not take the modem down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("iosm_cuse.sd_notify")

ENV = "NOTIFY_SOCKET"
# Unix socket paths are at most 108 bytes including the terminating NUL (sun_path).
_SUN_PATH_MAX = 107


class NotifyError(ValueError):
    """A `$NOTIFY_SOCKET` value or a field this module cannot send."""


def notify_address(value: str) -> str | bytes:
    """The socket address for `$NOTIFY_SOCKET`: a filesystem path as str, an abstract name
    (`@name`) as bytes starting with NUL. Other forms (`vsock:`) are not supported here."""
    if value.startswith("@") and len(value) > 1:
        address = b"\0" + value[1:].encode()
        if len(address) > _SUN_PATH_MAX + 1:
            raise NotifyError(f"{ENV}={value!r}: abstract name too long")
        return address
    if value.startswith("/"):
        if len(value.encode()) > _SUN_PATH_MAX:
            raise NotifyError(f"{ENV}={value!r}: path too long")
        return value
    raise NotifyError(f"{ENV}={value!r}: expected /path or @abstract-name")


def encode(fields: Mapping[str, str]) -> bytes:
    """One notification: `KEY=VALUE` lines in the given order. Keys are upper-case words;
    a newline inside a value would start a new field, so it is turned into a space."""
    lines = []
    for key, value in fields.items():
        if not key or not all(ch.isupper() or ch.isdigit() or ch == "_" for ch in key):
            raise NotifyError(f"bad notification field name {key!r}")
        lines.append(f"{key}={value.replace(chr(10), ' ')}")
    return ("\n".join(lines) + "\n").encode()


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """From `$NOTIFY_SOCKET`, which is then removed from the environment: processes this
        one starts (the model, `ip`, `modprobe`) are not the service's main process."""
        env = os.environ if environ is None else environ
        value = env.pop(ENV, None)
        if not value:
            return cls(None)
        try:
            return cls(notify_address(value))
        except NotifyError as exc:
            log.warning("%s; not notifying the service manager", exc)
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        self.send({"READY": "1", "STATUS": status})

    def stopping(self, status: str) -> None:
        self.send({"STOPPING": "1", "STATUS": status})

    def status(self, status: str) -> None:
        self.send({"STATUS": status})

    def send(self, fields: Mapping[str, str]) -> None:
        if self.address is None:
            return
        message = encode(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s", self.address, exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
