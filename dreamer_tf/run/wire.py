"""The multi_worker side channel's wire format (run/feed.py): authentication, framing, messages.

Handshake (fixed sizes, a deadline on each read and write):
  chief -> follower   MAGIC, chief nonce (32 random bytes)
  follower -> chief   MAGIC, follower nonce, HMAC(key, "follower" | both nonces)
  chief -> follower   HMAC(key, "chief" | both nonces)
Each side checks the other's proof with hmac.compare_digest; the session key is
HMAC(key, "session" | both nonces), fresh per connection, so a recorded session cannot be replayed.

Frames: an 8-byte length, the payload, then HMAC-SHA256(session key, direction | sequence number |
length | payload). The sequence number counts each direction's frames from 0 and is never sent:
a replayed, reordered, reflected, dropped or altered frame fails its tag. The length is checked
against the receiver's limit for what it expects before anything is allocated.

Payload: a 4-byte header length, a JSON object header (`kind`, the arrays' names, dtypes and
shapes) and the arrays' raw bytes. Only plain numeric dtypes are accepted; nothing is unpickled or
decompressed. Every malformed input is a FeedError of one line.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dreamer_tf.run.logdir import RunError

__all__ = ["FeedError", "FeedLost", "Channel", "handshake_chief", "handshake_follower", "encode", "decode",
           "feed_key", "KEY_ENV", "TIMEOUT_ENV", "MAKE_KEY", "SMALL", "CONFIG_LIMIT", "array_bytes"]

KEY_ENV, TIMEOUT_ENV = "DREAMER_FEED_KEY", "DREAMER_FEED_TIMEOUT"
MAKE_KEY = "python -c 'import secrets; print(secrets.token_hex(32))'"
MIN_KEY = 16  # characters: a key shorter than this is guessable
MAGIC = b"dreamer_tf feed v2\n"
NONCE = TAG = 32
REFUSED = bytes(TAG)  # the chief's answer to a wrong proof (no secret: anyone on the path could cut it)
SMALL = 64 * 1024  # join, armed, ready, stop: a few names and numbers
CONFIG_LIMIT = 4 * 1024 * 1024  # hello (the config) and spaces
_DTYPE = re.compile(r"[<>|=][biuf][1248]")
_LENGTH = struct.Struct("!Q")


class FeedError(RunError):
    """A multi_worker run that cannot start or go on: bad TF_CONFIG or key, an unreachable or
    misbehaving peer, a message that is malformed, too large or not authentic."""


class FeedLost(RuntimeError):
    """The other side of the feed went away during the run."""


# --- keys ------------------------------------------------------------------------------------------
def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may be anywhere (no lookup here)
        return False


def feed_key(environ: Mapping[str, str], hosts: list[str]) -> bytes | None:
    """DREAMER_FEED_KEY as bytes; None when it is unset and every host is this machine's loopback
    (the chief then writes a random key to a file only this user can read: `local_key_file`).
    ValueError (one line) for an empty or short key, or no key with a host that is not loopback."""
    value = environ.get(KEY_ENV)
    if value is not None:
        if len(value.strip()) < MIN_KEY:
            raise ValueError(f"{KEY_ENV} is {'empty' if not value.strip() else f'{len(value.strip())} characters'}: "
                             f"use a secret of at least {MIN_KEY} characters, the same on every task, e.g. "
                             f"the output of `{MAKE_KEY}`")
        return value.strip().encode()
    remote = [h for h in hosts if not _loopback(h)]
    if remote:
        raise ValueError(f"multi_worker across hosts ({remote[0]} is not a loopback address) needs {KEY_ENV}: set "
                         f"it to the same secret on every task, e.g. the output of `{MAKE_KEY}`")
    return None


def local_key_file(address: tuple[str, int]) -> Path:
    """Where a loopback-only chief puts its per-run key: a folder of the user's own, mode 0700."""
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "dreamer_tf" / "feed_keys"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = folder.stat()
    except OSError as e:
        raise FeedError(f"multi_worker: cannot make {folder} for the feed's key ({e.strerror or e}); set "
                        f"{KEY_ENV} on every task instead (e.g. the output of `{MAKE_KEY}`)") from None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise FeedError(f"multi_worker: {folder} must belong to this user with mode 0700 (it holds the feed's "
                        f"keys); fix it, or set {KEY_ENV}")
    host, port = address
    return folder / f"{re.sub(r'[^0-9A-Za-z.]', '_', host)}_{int(port)}.key"


def write_local_key(path: Path) -> bytes:
    """A fresh random key in `path` (0600, replaced atomically): the followers on this machine read it."""
    key = secrets.token_hex(32).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise FeedError(f"multi_worker: cannot write the feed's key to {path} ({e.strerror or e}); set "
                        f"{KEY_ENV} on every task instead") from None
    return key


def read_local_key(path: Path) -> bytes | None:
    try:
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise FeedError(f"multi_worker: the feed key file {path} must belong to this user with mode 0600")
        key = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FeedError(f"multi_worker: cannot read the feed's key {path} ({e.strerror or e}); set {KEY_ENV} "
                        f"on every task instead") from None
    return key if len(key) >= MIN_KEY else None


# --- sockets with deadlines -------------------------------------------------------------------------
def _left(deadline: float | None, what: str) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise FeedLost(f"{what} took too long")
    return left


def recv_exact(sock: socket.socket, n: int, deadline: float | None, what: str) -> bytes:
    """`n` bytes, all of them by `deadline` (a slow trickle does not extend it); FeedLost otherwise."""
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        sock.settimeout(_left(deadline, what))
        try:
            count = sock.recv_into(view[got:], n - got)
        except socket.timeout:
            raise FeedLost(f"{what} took too long") from None
        except OSError as e:
            raise FeedLost(f"the connection failed during {what} ({type(e).__name__})") from None
        if count == 0:
            raise FeedLost(f"the connection closed during {what}" if got or n else "the connection closed")
        got += count
    return bytes(buffer)


def send_all(sock: socket.socket, parts: list[bytes], deadline: float | None, what: str) -> None:
    for part in parts:
        sock.settimeout(_left(deadline, what))  # since Python 3.5 sendall's timeout is its total time
        try:
            sock.sendall(part)
        except socket.timeout:
            raise FeedLost(f"{what} took too long (the peer is not reading)") from None
        except OSError as e:
            raise FeedLost(f"the connection failed during {what} ({type(e).__name__})") from None


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalive: a peer whose host vanished (no FIN) ends a long idle read within ~1 minute."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# --- authentication and frames ------------------------------------------------------------------------
def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


class Channel:
    """An authenticated connection; every frame is checked (see the module's doc)."""

    def __init__(self, sock: socket.socket, session: bytes, outgoing: bytes, incoming: bytes, peer: str):
        self.sock, self.peer = sock, peer
        self._key, self._out, self._in = session, outgoing, incoming
        self._sent = self._received = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, payload: bytes, wait: float | None, what: str = "a message") -> None:
        length = _LENGTH.pack(len(payload))
        tag = _mac(self._key, self._out, _LENGTH.pack(self._sent), length, payload)
        self._sent += 1
        send_all(self.sock, [length, payload, tag], None if wait is None else time.monotonic() + wait,
                 f"sending {what}")

    def receive(self, limit: int, wait: float | None, what: str, rest: float | None = None) -> bytes:
        """The next frame's payload. `wait`: seconds for it to start (None: no limit, for a follower
        between updates: the watchdog and TCP keepalive notice a chief that is gone); `rest`: for
        the whole frame once started (default `wait`). FeedError if larger than `limit` bytes or
        not authentic, FeedLost if it does not come in time or the connection closes."""
        length = recv_exact(self.sock, _LENGTH.size, None if wait is None else time.monotonic() + wait, what)
        size = _LENGTH.unpack(length)[0]
        if size > limit:
            raise FeedError(f"multi_worker: {self.peer} sent {what} of {size} bytes, more than the {limit} it may "
                            f"hold; refused")
        rest = wait if rest is None else rest
        deadline = None if rest is None else time.monotonic() + rest
        payload = recv_exact(self.sock, size, deadline, what)
        tag = recv_exact(self.sock, TAG, deadline, what)
        expected = _mac(self._key, self._in, _LENGTH.pack(self._received), length, payload)
        if not hmac.compare_digest(tag, expected):
            raise FeedError(f"multi_worker: {what} from {self.peer} failed authentication (altered, replayed or "
                            f"out of order); refused")
        self._received += 1
        return payload


def handshake_chief(sock: socket.socket, key: bytes, deadline: float, peer: str) -> Channel:
    """The chief's side: FeedError if the client does not prove it holds the key."""
    nonce = secrets.token_bytes(NONCE)
    send_all(sock, [MAGIC + nonce], deadline, "the handshake")
    reply = recv_exact(sock, len(MAGIC) + NONCE + TAG, deadline, "the handshake")
    if reply[:len(MAGIC)] != MAGIC:
        raise FeedError(f"multi_worker: {peer} does not speak this feed protocol ({MAGIC.strip().decode()})")
    theirs, proof = reply[len(MAGIC):len(MAGIC) + NONCE], reply[len(MAGIC) + NONCE:]
    if not hmac.compare_digest(proof, _mac(key, b"follower", nonce, theirs)):
        try:  # say so (a follower with a wrong key then stops at once, instead of retrying)
            send_all(sock, [REFUSED], deadline, "the handshake")
        except FeedLost:
            pass
        raise FeedError(f"multi_worker: {peer} did not prove it holds the feed key (wrong {KEY_ENV}?)")
    send_all(sock, [_mac(key, b"chief", nonce, theirs)], deadline, "the handshake")
    return Channel(sock, _mac(key, b"session", nonce, theirs), b"chief>", b"follower>", peer)


def handshake_follower(sock: socket.socket, key: bytes, deadline: float, peer: str) -> Channel:
    """The follower's side: FeedError if the chief does not prove it holds the key."""
    hello = recv_exact(sock, len(MAGIC) + NONCE, deadline, "the handshake")
    if hello[:len(MAGIC)] != MAGIC:
        raise FeedError(f"multi_worker: {peer} is not a dreamer_tf feed of this version "
                        f"({MAGIC.strip().decode()})")
    theirs, nonce = hello[len(MAGIC):], secrets.token_bytes(NONCE)
    send_all(sock, [MAGIC + nonce + _mac(key, b"follower", theirs, nonce)], deadline, "the handshake")
    proof = recv_exact(sock, TAG, deadline, "the handshake")
    if proof == REFUSED:
        raise FeedError(f"multi_worker: {peer} refused this worker's key")
    if not hmac.compare_digest(proof, _mac(key, b"chief", theirs, nonce)):
        raise FeedError(f"multi_worker: {peer} did not prove it holds the feed key (wrong {KEY_ENV}?)")
    return Channel(sock, _mac(key, b"session", theirs, nonce), b"follower>", b"chief>", peer)


# --- messages ---------------------------------------------------------------------------------------
def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """A JSON header (with the arrays' names, dtypes and shapes) and the arrays' bytes."""
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    specs = [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]
    head = json.dumps({**header, "arrays": specs}).encode()
    return b"".join([struct.pack("!I", len(head)), head, *(v.tobytes() for v in arrays.values())])


def array_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def decode(payload: bytes, what: str, peer: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a payload; FeedError (one line) for anything malformed."""
    def bad(why: str) -> FeedError:
        return FeedError(f"multi_worker: {what} from {peer} is malformed: {why}")

    if len(payload) < 4:
        raise bad(f"{len(payload)} bytes, shorter than its header's length")
    size = struct.unpack("!I", payload[:4])[0]
    if size > len(payload) - 4:
        raise bad(f"its header's length {size} exceeds the {len(payload) - 4} bytes that follow")
    try:
        header = json.loads(payload[4:4 + size].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"its header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise bad(f"its header is not an object with a `kind` ({type(header).__name__})")
    specs = header.pop("arrays", [])
    if not isinstance(specs, list) or len(specs) > 256:
        raise bad("`arrays` is not a list of at most 256 [name, dtype, shape]")
    arrays, offset = {}, 4 + size
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], str)
                and _DTYPE.fullmatch(spec[1]) and isinstance(spec[2], list) and len(spec[2]) <= 8
                and all(type(n) is int and 0 <= n < 2 ** 40 for n in spec[2])):
            raise bad(f"an array is not [name, numeric dtype, shape]: {str(spec)[:80]}")
        name, dtype, shape = spec[0], np.dtype(spec[1]), tuple(spec[2])
        if name in arrays:
            raise bad(f"array {name[:80]!r} appears twice")
        count = array_bytes(shape, dtype)
        if count > len(payload) - offset:
            raise bad(f"array {name[:80]!r} of shape {shape} needs {count} bytes, {len(payload) - offset} are left")
        arrays[name] = np.frombuffer(payload, dtype, math.prod(shape), offset).reshape(shape)
        offset += count
    if offset != len(payload):
        raise bad(f"{len(payload) - offset} bytes follow its arrays")
    return header, arrays


def field(header: Mapping[str, Any], name: str, kind: type | tuple, what: str, peer: str) -> Any:
    """header[name], which must be of type `kind` (bool is not an int here); FeedError otherwise."""
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise FeedError(f"multi_worker: {what} from {peer} is malformed: `{name}` must be "
                        f"{' or '.join(k.__name__ for k in kinds)}, got {str(value)[:80]}")
    return value
