"""`python -m iosm_cuse.port_alone`: the MBIM port alone, with the modem model's MBIM function
behind it in-process (no IPC engine, no bus). For kernel-tier tests, benchmarks and trying a
client. It wires a host part (`chardev/`) to a device part (`sim/`), so, like the daemon, it lives
at the top of the package and not in either side's folder.

Prints one line `ready <path> (<transport>)` on stdout once the port can be opened, then serves
until SIGTERM/SIGINT; with `--report`, one line `stats <JSON>` on SIGUSR1 and on the way out: the
port's and the transport's counters and the model's answers by kind (`bench/hostile.py`
accounts with them).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from iosm_cuse.chardev import Transport, start_transport
from iosm_cuse.chardev.loopback import LoopbackOpener, answer_open
from iosm_cuse.chardev.port import MbimPort
from iosm_cuse.chardev.pty import DEFAULT_LINK, PtyTransport
from iosm_cuse.chardev.server import DEFAULT_DEVNAME, CuseServer, CuseUnavailable
from iosm_cuse.mbim.message import describe_transfer

Answers = collections.Counter[str]


class FunctionChannel:
    """A channel to a ChannelFunction (Contract 3) in this process: what the modem model's
    MBIM function sends - answers and indications alike - arrives as DL transfers on a later
    loop iteration, as through the engine."""

    def __init__(self, fn: Any, on_receive: Callable[[bytes], None],
                 answers: Answers | None = None) -> None:
        self.fn = fn
        self.on_receive = on_receive
        self.answers = answers
        self.closed = False
        self._loop = asyncio.get_running_loop()
        fn.opened(self._queue)

    def _queue(self, data: bytes) -> None:
        self._loop.call_soon(self._deliver, bytes(data))

    def _deliver(self, data: bytes) -> None:
        if self.answers is not None:
            self.answers[describe_transfer(data)] += 1
        if not self.closed:
            self.on_receive(data)

    def send(self, data: bytes) -> None:
        if self.closed:
            raise OSError(errno.ENOTCONN, "channel closed")
        self.fn.receive(bytes(data))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.fn.closed()


def mbim_opener(function: Any = None,
                answers: Answers | None = None) -> Callable[[Callable[[bytes], None]], Any]:
    """`open_channel` for the port: the model's MBIM function (`function`, or a new one) behind
    its ChannelFunction adapter, the one the model attaches to channel 6, so indications reach
    the host too. What the function sends is counted by kind into `answers` when given."""
    from iosm_cuse.sim.mbim import MbimChannelFunction, MbimFunction

    fn = MbimChannelFunction(function if function is not None else MbimFunction())

    async def open_channel(on_receive: Callable[[bytes], None]) -> FunctionChannel:
        await asyncio.sleep(0)  # opening a real channel takes a round trip
        return FunctionChannel(fn, on_receive, answers)

    return open_channel


def report(port: MbimPort, transport: Transport, function: Any,
           answers: Answers) -> dict[str, Any]:
    """The `stats` line: what the port passed and refused, what the transport saw and threw
    away, and what the model answered."""
    chardev: dict[str, Any]
    if isinstance(transport, CuseServer):
        st = transport.session.stats
        chardev = {"requests": st.requests, **st.rejects.as_dict()}
    elif isinstance(transport, PtyTransport):
        chardev = dict(transport.stream_status())
    else:
        chardev = {}
    return {"port": {**port.stats, "dropped": port.dropped}, "transport": chardev,
            "answers": dict(sorted(answers.items())),
            "internal_errors": getattr(function, "internal_errors", 0)}


async def serve(args: argparse.Namespace) -> int:
    answers: Answers = collections.Counter()
    function: Any = None
    if not args.minimal:
        from iosm_cuse.sim.mbim import MbimFunction

        function = MbimFunction()
    port = MbimPort(LoopbackOpener(answer_open) if args.minimal
                    else mbim_opener(function, answers))
    try:
        if args.cuse_fd is not None:
            transport: Transport = CuseServer(port, args.devname, fd=args.cuse_fd)
            await transport.start()
        else:
            transport = await start_transport(port, transport=args.transport,
                                              devname=args.devname, link=args.link)
    except (CuseUnavailable, OSError) as exc:
        print(f"iosm-cuse port_alone: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def print_report() -> None:
        print("stats " + json.dumps(report(port, transport, function, answers)), flush=True)

    if args.report:
        loop.add_signal_handler(signal.SIGUSR1, print_report)
    print(f"ready {transport.path} ({transport.transport})", flush=True)
    try:
        await stop.wait()
    finally:
        await transport.close()
        await port.close()
        if args.report:
            print_report()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iosm_cuse.port_alone", description=__doc__)
    parser.add_argument("--transport", choices=("auto", "cuse", "pty"), default="auto")
    parser.add_argument("--devname", default=DEFAULT_DEVNAME)
    parser.add_argument("--link", default=str(DEFAULT_LINK), help="PTY symlink")
    parser.add_argument("--minimal", action="store_true",
                        help="answer OPEN/CLOSE/COMMAND with empty successes, no modem model")
    parser.add_argument("--cuse-fd", type=int, metavar="FD",
                        help="speak CUSE on this inherited SOCK_SEQPACKET fd (a fake kernel)")
    parser.add_argument("--report", action="store_true",
                        help="print one line `stats <JSON>` of counters on SIGUSR1 and on exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="warnings only (the model logs every rejected message at info)")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
