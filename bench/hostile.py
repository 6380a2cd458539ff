"""Hostile input at scale through the MBIM port: N malformed writes, then a real mbimcli.

The port is `python -m iosm_cuse.port_alone --report` (MbimFunction -> MbimPort -> transport) in
its own process; this process is the hostile client. It opens the port once, sends an OPEN, and
then writes N messages drawn (seeded) from these kinds, draining the answers as it goes:

    short            1..11 bytes: not even a header (the model cannot answer: no TransactionId)
    unknown_type     a header whose MessageType is none of MBIM's
    device_type      a device-to-host type (OPEN_DONE, COMMAND_DONE, INDICATE_STATUS...) sent up
    length_mismatch  a real message whose MessageLength is not its size
    bad_fragments    COMMANDs with TotalFragments 0, CurrentFragment >= Total, a first fragment
                     of a set that never completes, a later fragment without its first
    unknown_service  a well-formed COMMAND for a service UUID nobody implements
    junk_payload     a known read-only CID (or one without a set) with a random command type and
                     a random information buffer
    tiny_open        an OPEN with MaxControlTransfer below 64
    host_error       a HOST_ERROR with a random code
    oversized        more than 4096 bytes in one write (refused with EMSGSIZE by the CUSE port)

Then it checks, and reports (`--json` for one object):
- crashes: the server still runs, its node/link is there, it exits 0 on SIGTERM, it logged no
  traceback, and the model caught no internal error (any of these counts one);
- accounting: the writes the client saw refused (EMSGSIZE) equal the port's `emsgsize`, the
  writes it saw accepted equal the port's `tx`, and the answers it read, by kind, equal what
  the model sent (the port dropping none);
- a real `mbimcli --query-device-caps` after the flood succeeds.

In the guest (real CUSE, Debian's kernel; Python is ~11x slower there, so the rate is not a
performance figure):

    python3 -m tests.vm --timeout 3600 --cmd '.venv/bin/python bench/hostile.py --writes 100000'

On a host without CUSE, `--transport pty` runs the same flood through the PTY fallback (whose
framing turns the stream into messages its own way: the accounting there is reported, not
checked).
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from iosm_cuse.chardev.pty import MbimFramer
from iosm_cuse.mbim.cids import BasicConnect
from iosm_cuse.mbim.constants import CommandType, MessageType
from iosm_cuse.mbim.message import (
    HEADER,
    Command,
    HostError,
    Open,
    describe_transfer,
    encode_message,
)
from iosm_cuse.mbim.uuids import Service

READY_TIMEOUT = 300.0  # the guest is slow to import
MBIMCLI_TIMEOUT = 120.0
QUIET_S = 3.0  # answers still coming after the flood: fragment timeouts fire after 1.25 s
DRAIN_EVERY = 16  # writes between two drains of the answers (the port queues up to 1 MiB)
MAX_CONTROL = 4096

KINDS = ("short", "unknown_type", "device_type", "length_mismatch", "bad_fragments",
         "unknown_service", "junk_payload", "tiny_open", "host_error", "oversized")
# Query-only CIDs, and CIDs without a set: junk cannot change the modem's state through them.
HARMLESS_CIDS = (BasicConnect.DEVICE_CAPS, BasicConnect.PIN_LIST, BasicConnect.HOME_PROVIDER,
                 BasicConnect.VISIBLE_PROVIDERS, BasicConnect.DEVICE_SERVICES,
                 BasicConnect.PACKET_STATISTICS, BasicConnect.IP_CONFIGURATION,
                 BasicConnect.SUBSCRIBER_READY_STATUS)
KNOWN_TYPES = {int(t) for t in MessageType}
DEVICE_TYPES = [t for t in MessageType if t & 0x80000000]


class Hostile:
    """Seeded generator of hostile writes, one kind at a time."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tid = 100

    def next_tid(self) -> int:
        self.tid = self.tid % 0xFFFFFFF0 + 1
        return self.tid

    def command(self, service: uuid.UUID, cid: int, ctype: int, info: bytes) -> bytes:
        return encode_message(Command(self.next_tid(), service, cid, ctype, info))

    def make(self, kind: str) -> bytes:
        r = self.rng
        if kind == "short":
            return r.randbytes(r.randint(1, 11))
        if kind == "unknown_type":
            mtype = r.choice([0, 5, 0x7FFFFFFF, 0x80000000, 0x80000008, r.getrandbits(32)])
            while mtype in KNOWN_TYPES:
                mtype = r.getrandbits(32)
            body = r.randbytes(r.randint(0, 64))
            return HEADER.pack(mtype, HEADER.size + len(body), self.next_tid()) + body
        if kind == "device_type":
            body = r.randbytes(r.choice([4, 8, 40, r.randint(0, 100)]))
            return HEADER.pack(r.choice(DEVICE_TYPES), HEADER.size + len(body),
                               self.next_tid()) + body
        if kind == "length_mismatch":
            msg = bytearray(self.command(Service.BASIC_CONNECT.value, BasicConnect.DEVICE_CAPS,
                                         CommandType.QUERY, r.randbytes(r.randint(0, 32))))
            wrong = r.choice([0, 1, 11, 12, len(msg) - 1, len(msg) + 1, 4096, 0xFFFFFFFF])
            struct.pack_into("<I", msg, 4, wrong)
            return bytes(msg)
        if kind == "bad_fragments":
            msg = bytearray(self.command(Service.BASIC_CONNECT.value, r.choice(HARMLESS_CIDS),
                                         CommandType.QUERY, r.randbytes(r.randint(0, 64))))
            total, current = r.choice([(0, 0), (1, 1), (2, 2), (3, 1), (2, 0), (5, 4),
                                       (0xFFFFFFFF, 0), (r.getrandbits(32), r.getrandbits(32))])
            struct.pack_into("<II", msg, HEADER.size, total, current)
            return bytes(msg)
        if kind == "unknown_service":
            return self.command(uuid.UUID(bytes=r.randbytes(16)), r.getrandbits(32),
                                r.choice([0, 1]), r.randbytes(r.randint(0, 256)))
        if kind == "junk_payload":
            return self.command(Service.BASIC_CONNECT.value, r.choice(HARMLESS_CIDS),
                                r.choice([0, 1, 2, r.getrandbits(32)]),
                                r.randbytes(r.randint(0, 1024)))
        if kind == "tiny_open":
            return encode_message(Open(self.next_tid(), r.randint(0, 63)))
        if kind == "host_error":
            return encode_message(HostError(self.next_tid(), r.getrandbits(32)))
        if kind == "oversized":
            size = r.choice([MAX_CONTROL + 1, 8192, r.randint(MAX_CONTROL + 1, 65536)])
            head = HEADER.pack(MessageType.COMMAND, size, self.next_tid())
            return head + r.randbytes(size - len(head))
        raise ValueError(kind)


def start_server(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen[str], str,
                                                                   Path]:
    argv = [sys.executable, "-m", "iosm_cuse.port_alone", "--transport", args.transport,
            "--report", "--quiet"]
    if args.transport == "cuse":
        subprocess.run(["modprobe", "-q", "cuse"], check=False)
        argv += ["--devname", args.devname]
        path = f"/dev/{args.devname}"
    else:
        path = str(workdir / "wwan0mbim0")
        argv += ["--link", path]
    stderr_path = workdir / "server.stderr"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("ready"):
        proc.kill()
        raise SystemExit(f"port_alone: no ready line ({line!r}): {stderr_path.read_text()}")
    return proc, path, stderr_path


def server_stats(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Ask the server for its `stats` line (SIGUSR1) and read it."""
    assert proc.stdout is not None
    proc.send_signal(signal.SIGUSR1)
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("stats "):
        raise SystemExit(f"no stats line from the server: {line!r}")
    st: dict[str, Any] = json.loads(line[len("stats "):])
    return st


class Client:
    """The hostile client: one open file, writes counted by outcome, answers by kind."""

    def __init__(self, path: str, stream: bool) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
        self.framer = MbimFramer() if stream else None  # the PTY may join answers
        self.answers: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self.refused: collections.Counter[str] = collections.Counter()

    def write(self, data: bytes) -> None:
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:  # a full PTY: read answers, then try again
            self.drain()
            select.select([], [self.fd], [], 10)
            self.write(data)
            return
        except OSError as exc:
            self.refused[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            return
        if n != len(data):
            self.refused["short write"] += 1
            return
        self.accepted += 1

    def drain(self) -> int:
        got = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return got
            if not data:
                return got
            msgs = [data] if self.framer is None else self.framer.feed(data)
            for m in msgs:
                self.answers[describe_transfer(m)] += 1
            got += len(msgs)

    def drain_until_quiet(self, quiet_s: float) -> None:
        while select.select([self.fd], [], [], quiet_s)[0]:
            self.drain()

    def close(self) -> None:
        os.close(self.fd)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="iosm-hostile-"))
    proc, path, stderr_path = start_server(args, workdir)
    crashes: list[str] = []
    out: dict[str, Any] = {"transport": args.transport, "writes": args.writes,
                           "seed": args.seed}
    try:
        client = Client(path, stream=args.transport == "pty")
        gen = Hostile(args.seed)
        plan: collections.Counter[str] = collections.Counter()
        client.write(encode_message(Open(1, MAX_CONTROL)))
        legit = client.accepted
        t0 = time.monotonic()
        for i in range(args.writes):
            kind = KINDS[gen.rng.randrange(len(KINDS))]
            plan[kind] += 1
            client.write(gen.make(kind))
            if i % DRAIN_EVERY == DRAIN_EVERY - 1:
                client.drain()
        flood_s = time.monotonic() - t0
        client.drain_until_quiet(QUIET_S)
        if proc.poll() is not None:
            crashes.append(f"server exited {proc.returncode} during the flood")
        st = server_stats(proc) if proc.poll() is None else {}
        client.close()
        out.update(seconds=round(flood_s, 1), writes_per_s=round(args.writes / flood_s),
                   by_kind=dict(sorted(plan.items())), client_accepted=client.accepted - legit,
                   client_refused=dict(client.refused),
                   answers_read=dict(sorted(client.answers.items())), server=st)
        if st:
            port = st["port"]
            out["accounting"] = {
                "refused_writes_match_port_emsgsize":
                    sum(client.refused.values()) == port["emsgsize"] == plan["oversized"]
                    if args.transport == "cuse" else None,
                "accepted_writes_match_port_tx":
                    client.accepted == port["tx"] if args.transport == "cuse" else None,
                "answers_read_match_model_answers":
                    dict(client.answers) == st["answers"] and port["dropped"] == 0
                    if args.transport == "cuse" else None,
            }
            if st.get("internal_errors"):
                crashes.append(f"model internal errors: {st['internal_errors']}")
        if not Path(path).exists():
            crashes.append(f"{path} is gone")
        mbimcli = shutil.which("mbimcli")
        if mbimcli is None:
            out["mbimcli"] = "mbimcli missing"
        else:
            t1 = time.monotonic()
            res = subprocess.run([mbimcli, "-d", path, "--query-device-caps"],
                                 capture_output=True, text=True, timeout=MBIMCLI_TIMEOUT)
            ok = res.returncode == 0 and "Max sessions: '8'" in res.stdout
            out["mbimcli"] = ("ok" if ok else f"FAILED ({res.returncode}): {res.stderr.strip()}")
            out["mbimcli_s"] = round(time.monotonic() - t1, 2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                crashes.append("server did not stop on SIGTERM")
        if proc.returncode not in (0, None):
            crashes.append(f"server exit status {proc.returncode}")
        log = stderr_path.read_text()
        if "Traceback" in log:
            crashes.append("traceback in the server's log")
        out["server_log_lines"] = len(log.splitlines())
        out["crashes"] = len(crashes)
        out["crash_causes"] = crashes
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--transport", choices=("cuse", "pty"), default="cuse")
    parser.add_argument("--devname", default="wwan6mbim0")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    acct = out.get("accounting", {})
    good = (out["crashes"] == 0 and out.get("mbimcli") == "ok"
            and all(v is not False for v in acct.values()))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
