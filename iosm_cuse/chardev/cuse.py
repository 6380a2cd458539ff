"""The CUSE wire protocol spoken on /dev/cuse, sans-IO.

One `read()` on /dev/cuse yields exactly one request; one `write()` must carry exactly one reply
or notification (fs/fuse/dev.c). `decode_request(bytes)` turns one request into one event;
the `reply_*` / `notify_poll` functions turn answers back into bytes. Nothing here does I/O.

Structs and opcodes are declared once, as data (`LAYOUTS`, `OPCODES`), after
include/uapi/linux/fuse.h (little-endian, no implicit padding; see docs/cuse.md §3).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, ClassVar

from iosm_cuse.wire.record import Record

# ------------------------------------------------------------------------------ constants

FUSE_KERNEL_VERSION = 7
# The minor we implement: >= 16 selects the 64-bit fuse_ioctl_iovec format; 31 is what libfuse
# 3.14 answers, and every field we read exists at that minor.
FUSE_KERNEL_MINOR = 31
MIN_KERNEL_MINOR = 11  # the kernel refuses a CUSE_INIT reply below 7.11

CUSE_UNRESTRICTED_IOCTL = 1 << 0
CUSE_INIT_INFO_MAX = 4096
FUSE_MIN_READ_BUFFER = 8192

FOPEN_DIRECT_IO = 1 << 0
FOPEN_NONSEEKABLE = 1 << 2

FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0
FUSE_INT_REQ_BIT = 1
FUSE_NOTIFY_POLL = 1

# Largest request body the kernel sends: CUSE never negotiates max_pages, so 32 pages.
MAX_PAGES_BYTES = 32 * 4096


class Op:
    OPEN = 14
    READ = 15
    WRITE = 16
    RELEASE = 18
    FSYNC = 20
    FLUSH = 25
    INTERRUPT = 36
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    CUSE_INIT = 4096


# ------------------------------------------------------------------------------ layouts


def _layout(name: str, *fields: tuple[str, str]) -> Record:
    return Record.sequential(name, *fields)


# Fields starting with "_" are padding/unused: packed as zero, not returned.
LAYOUTS: dict[str, Record] = {lay.name: lay for lay in (
    _layout("in_header", ("len", "I"), ("opcode", "I"), ("unique", "Q"), ("nodeid", "Q"),
            ("uid", "I"), ("gid", "I"), ("pid", "I"), ("total_extlen", "H"), ("_pad", "H")),
    _layout("out_header", ("len", "I"), ("error", "i"), ("unique", "Q")),
    _layout("cuse_init_in", ("major", "I"), ("minor", "I"), ("_unused", "I"), ("flags", "I")),
    _layout("cuse_init_out", ("major", "I"), ("minor", "I"), ("_unused", "I"), ("flags", "I"),
            ("max_read", "I"), ("max_write", "I"), ("dev_major", "I"), ("dev_minor", "I"),
            ("_spare", "40x")),
    _layout("open_in", ("flags", "I"), ("open_flags", "I")),
    _layout("open_out", ("fh", "Q"), ("open_flags", "I"), ("backing_id", "i")),
    _layout("read_in", ("fh", "Q"), ("offset", "Q"), ("size", "I"), ("read_flags", "I"),
            ("lock_owner", "Q"), ("flags", "I"), ("_pad", "I")),
    _layout("write_in", ("fh", "Q"), ("offset", "Q"), ("size", "I"), ("write_flags", "I"),
            ("lock_owner", "Q"), ("flags", "I"), ("_pad", "I")),
    _layout("write_out", ("size", "I"), ("_pad", "I")),
    _layout("flush_in", ("fh", "Q"), ("_unused", "I"), ("_pad", "I"), ("lock_owner", "Q")),
    _layout("release_in", ("fh", "Q"), ("flags", "I"), ("release_flags", "I"),
            ("lock_owner", "Q")),
    _layout("fsync_in", ("fh", "Q"), ("fsync_flags", "I"), ("_pad", "I")),
    _layout("ioctl_in", ("fh", "Q"), ("flags", "I"), ("cmd", "I"), ("arg", "Q"),
            ("in_size", "I"), ("out_size", "I")),
    _layout("ioctl_out", ("result", "i"), ("flags", "I"), ("in_iovs", "I"), ("out_iovs", "I")),
    _layout("ioctl_iovec", ("base", "Q"), ("len", "Q")),
    _layout("poll_in", ("fh", "Q"), ("kh", "Q"), ("flags", "I"), ("events", "I")),
    _layout("poll_out", ("revents", "I"), ("_pad", "I")),
    _layout("notify_poll_wakeup_out", ("kh", "Q")),
    _layout("interrupt_in", ("unique", "Q")),
)}
IN_HEADER = LAYOUTS["in_header"]
OUT_HEADER = LAYOUTS["out_header"]


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Request:
    """One decoded request; `unique` is what the reply must carry."""

    unique: int
    header: dict[str, int]
    OPCODE: ClassVar[int] = -1


@dataclass(frozen=True)
class Init(Request):
    major: int
    minor: int
    flags: int
    OPCODE: ClassVar[int] = Op.CUSE_INIT


@dataclass(frozen=True)
class Open(Request):
    flags: int
    OPCODE: ClassVar[int] = Op.OPEN


@dataclass(frozen=True)
class Read(Request):
    fh: int
    size: int
    flags: int  # the file's current f_flags: O_NONBLOCK set by fcntl shows up here
    OPCODE: ClassVar[int] = Op.READ


@dataclass(frozen=True)
class Write(Request):
    fh: int
    data: bytes
    flags: int
    OPCODE: ClassVar[int] = Op.WRITE


@dataclass(frozen=True)
class Flush(Request):
    fh: int
    OPCODE: ClassVar[int] = Op.FLUSH


@dataclass(frozen=True)
class Release(Request):
    fh: int
    OPCODE: ClassVar[int] = Op.RELEASE


@dataclass(frozen=True)
class Fsync(Request):
    fh: int
    OPCODE: ClassVar[int] = Op.FSYNC


@dataclass(frozen=True)
class Ioctl(Request):
    fh: int
    flags: int
    cmd: int
    arg: int
    in_data: bytes
    out_size: int
    OPCODE: ClassVar[int] = Op.IOCTL


@dataclass(frozen=True)
class Poll(Request):
    fh: int
    kh: int
    flags: int
    events: int
    OPCODE: ClassVar[int] = Op.POLL


@dataclass(frozen=True)
class Interrupt(Request):
    target: int  # the unique of the interrupted request
    OPCODE: ClassVar[int] = Op.INTERRUPT


@dataclass(frozen=True)
class Destroy(Request):
    OPCODE: ClassVar[int] = Op.DESTROY


@dataclass(frozen=True)
class Rejected:
    """A request we cannot accept. If `unique` is known, answer it with `-errno`."""

    unique: int | None
    errno: int
    reason: str


Event = Request | Rejected


def _fields(body: dict[str, int], *names: str) -> dict[str, Any]:
    return {n: body[n] for n in names}


# opcode -> (event class, body layout or None, whether data follows the struct, fields taken)
OPCODES: dict[int, tuple[type[Request], str | None, bool, tuple[str, ...]]] = {
    Op.CUSE_INIT: (Init, "cuse_init_in", False, ("major", "minor", "flags")),
    Op.OPEN: (Open, "open_in", False, ("flags",)),
    Op.READ: (Read, "read_in", False, ("fh", "size", "flags")),
    Op.WRITE: (Write, "write_in", True, ("fh", "flags")),
    Op.FLUSH: (Flush, "flush_in", False, ("fh",)),
    Op.RELEASE: (Release, "release_in", False, ("fh",)),
    Op.FSYNC: (Fsync, "fsync_in", False, ("fh",)),
    Op.IOCTL: (Ioctl, "ioctl_in", True, ("fh", "flags", "cmd", "arg", "out_size")),
    Op.POLL: (Poll, "poll_in", False, ("fh", "kh", "flags", "events")),
    Op.INTERRUPT: (Interrupt, "interrupt_in", False, ()),
    Op.DESTROY: (Destroy, None, False, ()),
}


def decode_request(data: bytes) -> Event:
    """One request read from /dev/cuse -> one event. Never raises on bad input."""
    if len(data) < IN_HEADER.size:
        return Rejected(None, errno.EINVAL, f"request of {len(data)} bytes, shorter than a header")
    hdr = IN_HEADER.unpack(data)
    unique = hdr["unique"]
    if hdr["len"] != len(data):
        return Rejected(unique, errno.EINVAL, f"header says {hdr['len']} bytes, got {len(data)}")
    entry = OPCODES.get(hdr["opcode"])
    if entry is None:
        return Rejected(unique, errno.ENOSYS, f"unknown opcode {hdr['opcode']}")
    cls, layout_name, has_data, take = entry
    # Extensions (total_extlen, in 8-byte units) trail the body; CUSE sends none, skip them.
    end = len(data) - 8 * hdr["total_extlen"]
    body_off = IN_HEADER.size
    body: dict[str, int] = {}
    if layout_name is not None:
        lay = LAYOUTS[layout_name]
        if end - body_off < lay.size:
            return Rejected(unique, errno.EINVAL,
                            f"opcode {hdr['opcode']}: body {end - body_off} < {lay.size} bytes")
        body = lay.unpack(data, body_off)
        body_off += lay.size
    extra = bytes(data[body_off:end])
    kwargs = _fields(body, *take)
    if cls is Write:
        if len(extra) != body["size"]:
            return Rejected(unique, errno.EINVAL,
                            f"WRITE size {body['size']} but {len(extra)} bytes of data")
        kwargs["data"] = extra
    elif cls is Ioctl:
        if len(extra) != body["in_size"]:
            return Rejected(unique, errno.EINVAL,
                            f"IOCTL in_size {body['in_size']} but {len(extra)} bytes")
        kwargs["in_data"] = extra
    elif cls is Interrupt:
        kwargs["target"] = body["unique"]
    elif has_data or extra:
        return Rejected(unique, errno.EINVAL, f"{len(extra)} stray bytes after the body")
    return cls(unique=unique, header=hdr, **kwargs)


# ------------------------------------------------------------------------------ replies


def reply(unique: int, body: bytes = b"") -> bytes:
    """A success reply carrying `body`."""
    return OUT_HEADER.pack(len=OUT_HEADER.size + len(body), error=0, unique=unique) + body


def reply_error(unique: int, err: int) -> bytes:
    """An error reply: the 16-byte header alone, error = -errno (the kernel wants (-1000, 0])."""
    if not 0 < err < 1000:
        raise ValueError(f"errno {err} out of range")
    return OUT_HEADER.pack(len=OUT_HEADER.size, error=-err, unique=unique)


def reply_init(unique: int, devname: str, *, flags: int = CUSE_UNRESTRICTED_IOCTL,
               max_read: int = MAX_PAGES_BYTES, max_write: int = MAX_PAGES_BYTES,
               minor: int = FUSE_KERNEL_MINOR) -> bytes:
    info = f"DEVNAME={devname}\0".encode()
    if len(info) > CUSE_INIT_INFO_MAX or "\0" in devname or not devname:
        raise ValueError(f"bad device name {devname!r}")
    body = LAYOUTS["cuse_init_out"].pack(
        major=FUSE_KERNEL_VERSION, minor=minor, flags=flags, max_read=max_read,
        max_write=max_write, dev_major=0, dev_minor=0)
    return reply(unique, body + info)


def reply_open(unique: int, fh: int) -> bytes:
    return reply(unique, LAYOUTS["open_out"].pack(
        fh=fh, open_flags=FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE))


def reply_write(unique: int, size: int) -> bytes:
    return reply(unique, LAYOUTS["write_out"].pack(size=size))


def reply_poll(unique: int, revents: int) -> bytes:
    return reply(unique, LAYOUTS["poll_out"].pack(revents=revents))


def reply_ioctl(unique: int, result: int, out: bytes = b"") -> bytes:
    return reply(unique, LAYOUTS["ioctl_out"].pack(result=result) + out)


def reply_ioctl_retry(unique: int, out_iovs: list[tuple[int, int]],
                      in_iovs: list[tuple[int, int]] | None = None) -> bytes:
    """Ask the kernel (unrestricted mode) to call again with the `in_iovs` client buffers
    copied in and room for the `out_iovs` ones to be copied out (in iovecs first)."""
    iov = LAYOUTS["ioctl_iovec"]
    ins = in_iovs or []
    vecs = b"".join(iov.pack(base=b, len=n) for b, n in [*ins, *out_iovs])
    return reply(unique, LAYOUTS["ioctl_out"].pack(
        flags=FUSE_IOCTL_RETRY, in_iovs=len(ins), out_iovs=len(out_iovs)) + vecs)


def notify_poll(kh: int) -> bytes:
    """FUSE_NOTIFY_POLL: unique 0, error = the notify code, then the kernel's poll handle."""
    body = LAYOUTS["notify_poll_wakeup_out"].pack(kh=kh)
    return OUT_HEADER.pack(len=OUT_HEADER.size + len(body), error=FUSE_NOTIFY_POLL,
                           unique=0) + body


def request_buffer_size(max_write: int = MAX_PAGES_BYTES) -> int:
    """The read buffer /dev/cuse demands, or it answers EINVAL."""
    return max(FUSE_MIN_READ_BUFFER, IN_HEADER.size + LAYOUTS["write_in"].size + max_write)


# ------------------------------------------------------------------------------ fake kernel side
# The encoders a test's fake kernel needs: the same tables, the other direction.


def encode_request(opcode: int, unique: int, body: dict[str, int] | None = None,
                   data: bytes = b"", *, pid: int = 0) -> bytes:
    _, layout_name, _, _ = OPCODES[opcode]
    raw = LAYOUTS[layout_name].pack(**(body or {})) if layout_name else b""
    total = IN_HEADER.size + len(raw) + len(data)
    return IN_HEADER.pack(len=total, opcode=opcode, unique=unique, pid=pid) + raw + data


@dataclass(frozen=True)
class Reply:
    """A decoded reply or notification (what the fake kernel reads)."""

    unique: int
    error: int
    body: bytes


def decode_reply(data: bytes) -> Reply:
    if len(data) < OUT_HEADER.size:
        raise ValueError(f"reply of {len(data)} bytes")
    hdr = OUT_HEADER.unpack(data)
    if hdr["len"] != len(data):
        raise ValueError(f"reply header says {hdr['len']} bytes, got {len(data)}")
    return Reply(hdr["unique"], hdr["error"], bytes(data[OUT_HEADER.size:]))
