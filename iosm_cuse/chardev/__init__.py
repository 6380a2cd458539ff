"""/dev/wwan0mbim0: the MBIM port's semantics (`port.MbimPort`), and /dev/wwan0at0, /dev/wwan0at1:
the AT ports' (`port.AtPort`), each behind CUSE (`server`) or, on kernels without CUSE, a PTY
(`pty`). `start_transport` picks one and says which."""

from __future__ import annotations

from pathlib import Path

from iosm_cuse.chardev.port import AtPort, MbimPort
from iosm_cuse.chardev.pty import DEFAULT_LINK, PtyTransport
from iosm_cuse.chardev.server import DEFAULT_DEVNAME, CuseServer, CuseUnavailable

Transport = CuseServer | PtyTransport

__all__ = ["AtPort", "CuseServer", "CuseUnavailable", "MbimPort", "PtyTransport", "Transport",
           "start_transport"]


async def start_transport(port: MbimPort, *, transport: str = "auto",
                          devname: str = DEFAULT_DEVNAME,
                          link: Path | str = DEFAULT_LINK) -> Transport:
    """Start /dev/<devname> on CUSE ("cuse"), the PTY at `link` ("pty"), or CUSE with the PTY
    as fallback ("auto"; one log line says so, and the result's `.fallback` is True).
    Raises CuseUnavailable for "cuse" when /dev/cuse cannot be opened."""
    if transport not in ("auto", "cuse", "pty"):
        raise ValueError(f"transport {transport!r}: auto, cuse or pty")
    reason: str | None = None
    if transport in ("auto", "cuse"):
        server = CuseServer(port, devname)
        try:
            await server.start()
            return server
        except CuseUnavailable as exc:
            if transport == "cuse":
                raise
            reason = str(exc)  # PtyTransport.start says, in one line, that it is the fallback
    pty = PtyTransport(port, link, reason=reason)
    await pty.start()
    return pty
