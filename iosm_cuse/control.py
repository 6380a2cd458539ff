"""The daemon's control socket: a JSON-lines request/response protocol on a Unix socket.

One request per line, one response line per request, in order:

    {"id": 1, "op": "link.add", "args": {"dev": "wwan0-1", "parent": "wwan0", "linkid": 1}}
    {"id": 1, "ok": true, "result": {...}}
    {"id": 1, "ok": false, "errno": 16, "error": "link id 1 is already used by wwan0-1"}

The operations and their arguments are declared once, in `OPS`; the codec below checks every
request against it, so a handler only ever sees well-typed arguments. The codec is sans-IO
(bytes in, values out); `ControlServer` and `call` are the thin socket adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iosm_cuse.sim.control import ACTIONS
from iosm_cuse.wire.args import Arg, ArgError, check_args, is_int

log = logging.getLogger(__name__)

# Where the daemon keeps its sockets, locks and the PTY fallback's symlink. The environment
# variable lets tests run a daemon without touching a real one's files.
RUN_DIR_ENV = "IOSM_CUSE_RUN_DIR"
DEFAULT_RUN_DIR = Path("/run/iosm-cuse")
SOCKET_ENV = "IOSM_CUSE_SOCKET"
MAX_LINE = 64 * 1024
JsonDict = dict[str, Any]


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def socket_path(instance: str) -> Path:
    """The control socket of the daemon serving wwan device `instance` (e.g. 'wwan0')."""
    return run_dir() / f"{instance}.sock"


MODEM_PREFIX = "modem."

# The protocol, declared once: operation -> its arguments.
OPS: dict[str, tuple[Arg, ...]] = {
    "status": (),
    "link.show": (Arg("dev", str, required=False),),
    "link.add": (
        Arg("dev", str, required=False),
        Arg("parent", str, required=False),
        Arg("linkid", int),
        Arg("mtu", int, required=False),
    ),
    "link.del": (Arg("dev", str, required=False), Arg("linkid", int, required=False)),
    # Live control of the modem model (docs/control.md): `modem.<action>`, its arguments as
    # the model declares them; the daemon forwards a checked request to the model process.
    **{f"{MODEM_PREFIX}{action}": spec for action, spec in ACTIONS.items()},
}


class ControlError(Exception):
    """A request failed; `errno` follows the kernel's conventions (EBUSY for a used link id)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: JsonDict


# ---- sans-IO codec ----------------------------------------------------------------------------


def encode_request(req: Request) -> bytes:
    return _dump({"id": req.id, "op": req.op, "args": req.args})


def decode_request(line: bytes) -> Request:
    """Parse and check one request line; raises ControlError(EINVAL/EOPNOTSUPP) on bad input.
    The id of a malformed request is recovered when possible, so the error can still be matched
    (see `request_id`)."""
    obj = _load(line)
    req_id = obj.get("id", 0)
    if not _is_int(req_id):
        raise ControlError(errno.EINVAL, "request id must be an integer")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ControlError(errno.EINVAL, "request has no 'op' string")
    spec = OPS.get(op)
    if spec is None:
        raise ControlError(errno.EOPNOTSUPP, f"unknown operation {op!r}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ControlError(errno.EINVAL, "'args' must be an object")
    return Request(req_id, op, _check_args(op, spec, args))


def request_id(line: bytes) -> int:
    """Best effort: the id of a (possibly invalid) request line, 0 if there is none."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 0
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if _is_int(rid) else 0


def encode_result(req_id: int, result: JsonDict) -> bytes:
    return _dump({"id": req_id, "ok": True, "result": result})


def encode_error(req_id: int, err: ControlError) -> bytes:
    return _dump({"id": req_id, "ok": False, "errno": err.errno, "error": err.message})


def decode_response(line: bytes, expect_id: int) -> JsonDict:
    """The result of a response line, or ControlError raised with the daemon's errno/message;
    a malformed response is EPROTO."""
    try:
        obj = _load(line)
    except ControlError as exc:
        raise ControlError(errno.EPROTO, f"bad response from daemon: {exc.message}") from None
    if obj.get("id") != expect_id:
        raise ControlError(errno.EPROTO, "response does not match the request")
    if obj.get("ok") is True and isinstance(obj.get("result"), dict):
        result: JsonDict = obj["result"]
        return result
    err, msg = obj.get("errno"), obj.get("error")
    if obj.get("ok") is False and _is_int(err) and isinstance(msg, str):
        raise ControlError(err, msg)
    raise ControlError(errno.EPROTO, "bad response from daemon")


def _check_args(op: str, spec: tuple[Arg, ...], args: JsonDict) -> JsonDict:
    try:
        return check_args(op, spec, args)
    except ArgError as exc:
        raise ControlError(exc.errno, exc.message) from None


_is_int = is_int


def _load(line: bytes) -> JsonDict:
    if len(line) > MAX_LINE:
        raise ControlError(errno.EMSGSIZE, f"line longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ControlError(errno.EINVAL, "not a JSON line") from None
    if not isinstance(obj, dict):
        raise ControlError(errno.EINVAL, "a message must be a JSON object")
    return obj


def _dump(obj: JsonDict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# ---- asyncio server -----------------------------------------------------------------------------

Handler = Callable[[str, JsonDict], Awaitable[JsonDict]]


async def handle_line(line: bytes, handler: Handler) -> bytes:
    """One request line in, one response line out; never raises for anything a client sends."""
    try:
        req = decode_request(line)
    except ControlError as exc:
        return encode_error(request_id(line), exc)
    try:
        return encode_result(req.id, await handler(req.op, req.args))
    except ControlError as exc:
        return encode_error(req.id, exc)
    except Exception as exc:  # a bug in a handler must not take the daemon down
        log.exception("control: %s failed", req.op)
        return encode_error(req.id, ControlError(errno.EIO, f"{req.op}: internal error: {exc}"))


class ControlServer:
    """Serves `handler` on a Unix socket readable and writable by its owner only."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        prepare_run_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            # Only called with the instance lock held, so a socket here is a dead daemon's.
            self.path.unlink()
        old = os.umask(0o177)  # no window in which the socket is group/world accessible
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_LINE + 1)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    writer.write(encode_error(0, ControlError(
                        errno.EMSGSIZE, f"line longer than {MAX_LINE} bytes")))
                    break
                except asyncio.IncompleteReadError:
                    break
                writer.write(await handle_line(line, self._handler))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()


def prepare_run_dir(path: Path) -> None:
    """Create the run directory 0700 (tightening an existing one we own)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


# ---- synchronous client (the CLI) ---------------------------------------------------------------


def call(path: Path, op: str, args: JsonDict | None = None, timeout: float = 10.0) -> JsonDict:
    """Send one request and return its result; raises ControlError (ENOENT/ECONNREFUSED when no
    daemon listens, the daemon's errno otherwise)."""
    req = Request(1, op, {k: v for k, v in (args or {}).items() if v is not None})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(errno.ECONNREFUSED,
                               f"no iosm-cuse daemon listens on {path} (is `iosm-cuse up` running?)"
                               ) from None
        except PermissionError:
            raise ControlError(errno.EACCES, f"{path}: permission denied (run as root)") from None
        try:
            sock.sendall(encode_request(req))
            line = _read_line(sock)
        except TimeoutError:
            raise ControlError(errno.ETIMEDOUT, f"daemon did not answer within {timeout} s"
                               ) from None
        except OSError as exc:
            raise ControlError(exc.errno or errno.EIO, f"control socket: {exc.strerror}") from None
    return decode_response(line, req.id)


def _read_line(sock: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError(errno.EPROTO, "daemon closed the control socket without answering")
        buf += chunk
        if len(buf) > 16 * MAX_LINE:
            raise ControlError(errno.EMSGSIZE, "response too long")
    return bytes(buf)
