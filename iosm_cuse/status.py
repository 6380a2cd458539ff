"""The `status` answer: the parts the daemon reads off its layers, and the text `iosm-cuse
status` prints for humans (`status --json` prints the answer itself).

"process" (the daemon) and "modem"."process" (the model process, asked over its command socket
with a 1 s bound; null for a UIO modem or a model that is down) are {"rss_kb", "fds", "tasks"}:
resident memory, open descriptors, asyncio tasks (procstat.py), so a long run can be watched."""

from __future__ import annotations

from typing import TYPE_CHECKING

from iosm_cuse.control import JsonDict

if TYPE_CHECKING:
    from iosm_cuse.bus.base import Bus
    from iosm_cuse.chardev import MbimPort, Transport


def format_status(st: JsonDict) -> str:
    """The `status` answer for humans; `status --json` prints the dict itself."""
    modem = st.get("modem", {})
    port = st.get("port", {})
    lines = [
        f"device: {st.get('device')}  {modem.get('name', '')}  "
        f"({st.get('instance', 'wwan0')}, daemon pid {st.get('pid')})",
        f"modem:  exec stage {modem.get('exec_stage')}, IPC {modem.get('ipc_state')}, "
        f"MUX {modem.get('mux_mode')}, restarts {modem.get('restarts', 0)}",
        f"port:   {port.get('path')} ({port.get('transport')}), "
        f"open by {port.get('openers', 0)}" + _pids(port.get("opener_pids", [])),
        "at:     " + ("; ".join(f"{p.get('path')} ({p.get('transport')}), open by "
                               f"{p.get('openers', 0)}" + _pids(p.get("opener_pids", []))
                               for p in st.get("at_ports", [])) or "none"),
        f"memory: daemon {_usage(st.get('process'))}; model {_usage(modem.get('process'))}",
        "links:",
    ]
    for ln in st.get("links", []):
        c = ln.get("counters", {})
        lines.append(f"  {ln.get('name')}: linkid {ln.get('linkid')}, session "
                     f"{ln.get('session')}, {'up' if ln.get('up') else 'down'}, mtu "
                     f"{ln.get('mtu')}; rx {c.get('rx_packets', 0)} pkts "
                     f"{c.get('rx_bytes', 0)} B, tx {c.get('tx_packets', 0)} pkts "
                     f"{c.get('tx_bytes', 0)} B, dropped "
                     f"{sum(v for k, v in c.items() if 'dropped' in k)}")
    errors = st.get("errors", {})
    lines.append("errors: " + (", ".join(f"{k} {v}" for k, v in errors.items()) or "none"))
    return "\n".join(lines)


def _usage(usage: JsonDict | None) -> str:
    """A process's "process" figures (procstat.process_usage), or why there are none."""
    if not usage:
        return "n/a"
    return f"RSS {usage.get('rss_kb')} kB, {usage.get('fds')} fds, {usage.get('tasks')} tasks"


def _pids(pids: list[object]) -> str:
    return f" (pid {', '.join(str(p) for p in pids)})" if pids else ""


def exec_stage_name(bus: Bus) -> str:
    """The device's exec stage as the scratchpad says it, by name when it is a known one."""
    from iosm_cuse.bus.base import BAR2
    from iosm_cuse.wire.ipc import SCRATCHPAD, ExecStage

    try:
        raw = bus.read32(BAR2, SCRATCHPAD["exec_stage"].offset)
    except Exception:  # a closed or vanished bus
        return "UNKNOWN"
    try:
        return ExecStage(raw).name
    except ValueError:
        return f"{raw:#010x}"


def port_status(port: MbimPort, chardev: Transport | None) -> JsonDict:
    """The MBIM port's openers (by pid where CUSE tells them), limits and counters; behind a
    PTY also what its stream framing holds and threw away."""
    from iosm_cuse.chardev import CuseServer, PtyTransport

    pids = chardev.opener_pids() if isinstance(chardev, CuseServer) else []
    st: JsonDict = {"openers": port.openers, "opener_pids": list(pids),
                    "max_control": port.negotiated, "gone": port.gone, "dropped": port.dropped,
                    "counters": dict(port.stats)}
    if isinstance(chardev, PtyTransport):
        st["stream"] = chardev.stream_status()
    return st
