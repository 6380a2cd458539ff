"""The port's keeper after a SIGKILL: a small process that holds a duplicate of the daemon's
/dev/cuse descriptor and, when the daemon dies without saying goodbye, answers for the port as
a hung-up one until its last opener has gone, so no `mbim-proxy` polls a dead node at full CPU
(docs/modemmanager.md §6, docs/cuse.md §9).

`OrphanPort` is the pure part (requests in, replies out); `main` is the process: it waits on a
pipe whose write end only the daemon holds, reading the daemon's reports of how many opens it
has seen and how many files are open; "bye" means a clean stop (exit, touching nothing), end of
file without it means the daemon is gone. While it only waits it has imported nothing but the
standard library and runs at a lower priority: it starts beside the daemon, when the machine
is busiest.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("iosm_cuse.system.orphan")

HUNG_UP = select.POLLHUP | select.POLLERR
GRACE = 5.0  # s the orphaned port waits for its openers before the node goes
KH_SLACK = 4  # poll handles beyond the opens reported, for opens racing the daemon's death
BYE = b"bye\n"


class OrphanPort:
    """Answers every request as a port whose modem is gone (docs/modemmanager.md §6)."""

    def __init__(self, send: Callable[[bytes], None], opens_seen: int, open_files: int) -> None:
        self.send = send
        self.opens_seen = opens_seen
        self.open_files = open_files
        self.destroyed = False

    def wake_pollers(self) -> None:
        """The kernel numbers poll handles per opened file from 1; notifying one nobody polls
        on is ignored (docs/cuse.md §6), so every handle the connection can have had is woken."""
        from iosm_cuse.chardev import cuse

        for kh in range(1, self.opens_seen + KH_SLACK + 1):
            self.send(cuse.notify_poll(kh))

    @property
    def done(self) -> bool:
        return self.destroyed or self.open_files <= 0

    def handle(self, data: bytes) -> None:
        from iosm_cuse.chardev import cuse

        ev = cuse.decode_request(data)
        if isinstance(ev, cuse.Rejected):
            if ev.unique is not None:
                self.send(cuse.reply_error(ev.unique, ev.errno))
            return
        if isinstance(ev, cuse.Poll):
            self.send(cuse.reply_poll(ev.unique, HUNG_UP))
        elif isinstance(ev, (cuse.Flush, cuse.Fsync)):
            self.send(cuse.reply(ev.unique))
        elif isinstance(ev, cuse.Release):
            self.send(cuse.reply(ev.unique))
            self.open_files -= 1
        elif isinstance(ev, cuse.Interrupt):
            # A request the dead daemon had read (a parked read): fail it, the client waits
            # for that answer uninterruptibly otherwise (docs/cuse.md §8).
            self.send(cuse.reply_error(ev.target, errno.EIO))
        elif isinstance(ev, cuse.Destroy):
            self.send(cuse.reply(ev.unique))
            self.destroyed = True
        elif isinstance(ev, cuse.Open):
            self.send(cuse.reply_error(ev.unique, errno.ENODEV))
        else:  # READ, WRITE, IOCTL, and an INIT that cannot come twice
            self.send(cuse.reply_error(ev.unique, errno.EIO))


def parse_reports(buf: bytes) -> tuple[bool, tuple[int, int] | None, bytes]:
    """(goodbye seen, the last "opens files" report, the unfinished rest) of the pipe's bytes."""
    bye = False
    last: tuple[int, int] | None = None
    *lines, rest = buf.split(b"\n")
    for line in lines:
        if line == BYE.strip():
            bye = True
            continue
        parts = line.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            last = (int(parts[0]), int(parts[1]))
    return bye, last, rest


def report(opens_seen: int, open_files: int) -> bytes:
    return f"{opens_seen} {open_files}\n".encode()


def _forge_removes(instance: str, port_name: str, major: int, minor: int,
                   at_ports: list[str]) -> None:
    """`remove` for every port of the modem: one left behind keeps ModemManager's device. The
    AT ports' numbers do not matter for a removal."""
    import itertools

    from iosm_cuse.system import uevent
    from iosm_cuse.system.announce import send_uevent

    ports = uevent.Ports(instance, port_name, major, minor, None,
                         tuple(uevent.Node(name, 0, 0) for name in at_ports))
    usec = int(time.monotonic() * 1000) | 1
    seqs = itertools.count(usec)
    events = [uevent.port_event(ports, "remove", next(seqs), usec),
              *uevent.at_port_events(ports, "remove", seqs, usec),
              uevent.net_event(ports, "remove", next(seqs), usec)]
    for event in events:
        try:
            send_uevent(event)
        except OSError as exc:
            log.warning("orphaned port: remove event: %s", exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iosm_cuse.system.orphan")
    p.add_argument("--cuse-fd", type=int, required=True)
    p.add_argument("--pipe-fd", type=int, required=True)
    p.add_argument("--withdraw", nargs=4, metavar=("INSTANCE", "PORT", "MAJOR", "MINOR"),
                   help="send ModemManager the ports' remove events when taking over")
    p.add_argument("--withdraw-at", nargs="*", default=[], metavar="AT_PORT",
                   help="the AT ports (node names) to remove with them")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="iosm-cuse: %(message)s")
    # A service manager's SIGTERM to everything left must not cut the hang-up short: the
    # daemon's end of the pipe says when to act, and serve() is bounded by GRACE.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(10)
    state: tuple[int, int] = (0, 0)
    buf = b""
    while True:
        try:
            chunk = os.read(args.pipe_fd, 4096)
        except InterruptedError:
            continue
        bye, last, buf = parse_reports(buf + chunk)
        if last is not None:
            state = last
        if bye:
            return 0
        if not chunk:
            break
    with contextlib.suppress(OSError):  # root may take its priority back: spinning clients wait
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    log.warning("the daemon died: hanging %s up for its %d opener(s)",
                args.withdraw[1] if args.withdraw else "the port", state[1])
    if args.withdraw:
        instance, port_name, major, minor = args.withdraw
        _forge_removes(instance, port_name, int(major), int(minor), args.withdraw_at)
    return serve(args.cuse_fd, *state)


def serve(fd: int, opens_seen: int, open_files: int, grace: float = GRACE) -> int:
    """Answer as the orphaned port until its openers are gone or `grace` runs out; then close
    the connection, which removes the node."""
    from iosm_cuse.chardev import cuse

    def send(data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError as exc:  # a vanished request (ENOENT) or an ended connection
            log.debug("orphaned port: write: %s", exc)

    port = OrphanPort(send, opens_seen, open_files)
    port.wake_pollers()
    deadline = time.monotonic() + grace
    bufsize = cuse.request_buffer_size()
    while not port.done:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            data = os.read(fd, bufsize)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            break
        if not data:
            break
        port.handle(data)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
