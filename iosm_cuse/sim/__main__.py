"""`python -m iosm_cuse.sim --sock-fd N`: the modem model process (started by sim/process.py).

`--shm PATH` instead serves a single shared file (the ivshmem backing file of the test VM):
the model polls it, there are no eventfds and no command socket.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iosm_cuse.sim")
    ap.add_argument("--sock-fd", type=int, help="Unix socket carrying the bus fds and commands")
    ap.add_argument("--shm", type=Path, help="single shared file (ivshmem layout) to serve")
    ap.add_argument("--functions", help="module:callable attaching the channel functions "
                    "(the modem's own: iosm_cuse.sim.assembly:assemble)")
    ap.add_argument("--mux", choices=("lite", "aggregation"), default="lite")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="modem[%(process)d] %(name)s: %(message)s")
    from iosm_cuse.sim import process

    try:
        if args.sock_fd is not None:
            return asyncio.run(process.child_main(args.sock_fd))
        if args.shm is not None:
            return asyncio.run(process.serve_file(args.shm, args.functions, args.mux))
    except KeyboardInterrupt:
        return 0
    ap.error("one of --sock-fd or --shm is needed")
    return 2


if __name__ == "__main__":
    sys.exit(main())
