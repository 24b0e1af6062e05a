"""The multi_worker side channel (run/feed.py, run/wire.py) at the socket level, without TensorFlow:
every fault goes through a real TCP connection on 127.0.0.1 (a listening chief, a follower, or a
hand-made client that speaks as much of the protocol as the attack needs)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct
import threading
import time
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.run import feed, wire
from dreamer_tf.run.feed import FeedError, FeedLost, Role

KEY = b"0123456789abcdef0123456789abcdef"
WAIT = 60.0  # bounds every wait of a test; never reached when the code under test is right


# --- helpers ------------------------------------------------------------------------------------------
@contextmanager
def channels(key: bytes = KEY):
    """(chief's channel, follower's channel) over one authenticated TCP connection on 127.0.0.1."""
    server = socket.create_server(("127.0.0.1", 0))
    out = {}

    def serve():
        sock, _ = server.accept()
        out["chief"] = wire.handshake_chief(sock, key, time.monotonic() + WAIT, "the follower")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sock = socket.create_connection(server.getsockname()[:2])
    follower = wire.handshake_follower(sock, key, time.monotonic() + WAIT, "the chief")
    thread.join(WAIT)
    server.close()
    try:
        yield out["chief"], follower
    finally:
        out["chief"].close()
        follower.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def roles(port: int, key: bytes | None = KEY) -> tuple[Role, Role]:
    common = dict(followers=1, tasks=["worker 1"], address=("127.0.0.1", port), key=key)
    return Role(chief=True, name="worker 0", **common), Role(chief=False, name="worker 1", **common)


class Listener:
    """The chief's `feed.accept` on a thread: `.result` (channels, names) or `.error` once done."""

    def __init__(self, role: Role, wait: float = WAIT):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(role, wait), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # listening once a connection is accepted
            try:
                socket.create_connection(role.address, timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)

    def _run(self, role, wait):
        try:
            self.result = feed.accept(role, wait)
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def join(self, wait: float = WAIT):
        self.thread.join(wait)
        assert not self.thread.is_alive(), "the chief did not accept its follower"
        if self.error is not None:
            raise self.error
        return self.result


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the chief hangs up (within WAIT s)."""
    sock.settimeout(WAIT)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


def refusals(capfd, at_least: int) -> str:
    """stderr once the chief has printed `at_least` refusals (its threads print them)."""
    err, deadline = "", time.monotonic() + WAIT
    while err.count("multi_worker: refused a connection") < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
        err += capfd.readouterr().err
    return err


def raw_client(port: int, key: bytes = KEY) -> wire.Channel:
    """An authenticated client that may then send anything."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return wire.handshake_follower(sock, key, time.monotonic() + WAIT, "the chief")


class Recorder:
    """A socket stand-in that keeps what a Channel sends (to replay, reorder or alter it)."""

    def __init__(self):
        self.frames: list[bytes] = []

    def settimeout(self, value):
        pass

    def sendall(self, data: bytes):
        self.frames.append(bytes(data))


def frames_of(conn: wire.Channel, payloads: list[bytes]) -> list[bytes]:
    """The exact bytes `conn` would send for each payload (its sequence numbers advance)."""
    real, recorder = conn.sock, Recorder()
    conn.sock = recorder
    try:
        out = []
        for payload in payloads:
            recorder.frames = []
            conn.send(payload, WAIT)
            out.append(b"".join(recorder.frames))
        return out
    finally:
        conn.sock = real


# --- 1. names received never leave the temporary folder ------------------------------------------------
@pytest.mark.parametrize("name", ["file:{evil}", "file:../evil", "file:../../evil", "file:sub/agent.index",
                                  "file:..", "file:.", "file:", "agent.index", "file:agent.index/../../evil",
                                  "file:agent.index\x00", "file:agent.data-0-of-1", "file:~/evil",
                                  "file:agent.index\\..\\evil"])
def test_sync_names_outside_the_temporary_folder_are_refused(tmp_path, name):
    evil = tmp_path / "evil"
    name = name.replace("{evil}", str(evil))
    with channels() as (chief, follower):
        feed.send(chief, {"kind": "sync"}, {"file:agent.index": np.zeros(4, np.uint8),
                                             name: np.frombuffer(b"pwned", np.uint8)}, wait=WAIT)
        _, arrays = feed.receive(follower, 1 << 20, WAIT)
    with pytest.raises(FeedError, match="only 'file:agent.index' and 'file:agent.data-NNNNN-of-NNNNN' are allowed"
                                        "|holds 1 files") as e:
        feed.restore_bytes(None, arrays)  # refused before TensorFlow is imported or anything written
    one_line(e.value)
    assert not evil.exists() and not Path("evil").exists()


@pytest.mark.parametrize("files", [{}, {"file:agent.index": np.zeros(3, np.float32)},
                                   {"file:agent.index": np.zeros((2, 2), np.uint8)},
                                   {"file:agent.data-00000-of-00001": np.zeros(3, np.uint8)}])
def test_sync_that_is_not_a_checkpoint_is_one_line(files):
    with pytest.raises(FeedError) as e:
        feed.checkpoint_files(files)
    one_line(e.value)


# --- 2. keys ---------------------------------------------------------------------------------------
def tf_config(hosts: list[str], index: int = 0) -> str:
    return json.dumps({"cluster": {"worker": [f"{h}:{2000 + i}" for i, h in enumerate(hosts)]},
                       "task": {"type": "worker", "index": index}})


@pytest.mark.parametrize("hosts", [["10.0.0.1", "10.0.0.2"], ["127.0.0.1", "gpu-box"], ["localhost", "[2001:db8::1]"]])
def test_no_key_with_a_host_that_is_not_loopback_is_refused(hosts):
    with pytest.raises(ValueError) as e:
        feed.cluster_role({"TF_CONFIG": tf_config(hosts)})
    message = one_line(e.value)
    assert "needs DREAMER_FEED_KEY" in message and "secrets.token_hex(32)" in message


@pytest.mark.parametrize("key", ["", "   ", "short"])
def test_an_empty_or_short_key_is_not_a_key(key):
    for hosts in (["127.0.0.1", "127.0.0.1"], ["10.0.0.1", "10.0.0.2"]):
        with pytest.raises(ValueError, match="DREAMER_FEED_KEY is .*at least 16 characters") as e:
            feed.cluster_role({"TF_CONFIG": tf_config(hosts), "DREAMER_FEED_KEY": key})
        one_line(e.value)


def test_keys_of_loopback_and_remote_clusters():
    assert feed.cluster_role({"TF_CONFIG": tf_config(["127.0.0.1", "localhost", "[::1]"])}).key is None
    remote = {"TF_CONFIG": tf_config(["10.0.0.1", "10.0.0.2"]), "DREAMER_FEED_KEY": " " + KEY.decode() + "\n"}
    assert feed.cluster_role(remote).key == KEY


def test_loopback_cluster_without_a_key_uses_a_private_per_run_key(tmp_path, monkeypatch):
    """No DREAMER_FEED_KEY on loopback: the chief writes a random key (0600, in a 0700 folder of this
    user); its follower reads it. The old public key (sha256 of the cluster) does not authenticate."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    chief, follower = roles(free_port(), key=None)
    listener = Listener(chief)
    key_file = wire.local_key_file(chief.address)
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o777 == 0o700
    tasks = {"worker": ["127.0.0.1:2000", "127.0.0.1:2001"]}
    public = hashlib.sha256(b"dreamer_tf feed " + json.dumps(tasks, sort_keys=True).encode()).hexdigest().encode()
    with pytest.raises(FeedError, match="refused this worker's key"):
        raw_client(chief.address[1], public)
    first = key_file.read_bytes()
    conn = feed.connect(follower, WAIT)
    (joined,), names = listener.join()
    assert names == ["worker 1 (at 127.0.0.1)"]
    assert not key_file.exists()  # every follower has joined: the key is not left on disk
    conn.close()
    joined.close()
    listener = Listener(chief)  # a new run: a new key
    assert key_file.read_bytes() != first and len(first) == 64
    feed.connect(follower, WAIT).close()
    listener.join()
    assert list(key_file.parent.iterdir()) == []


def test_a_key_folder_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    folder = tmp_path / "dreamer_tf" / "feed_keys"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    with pytest.raises(FeedError, match="mode 0700") as e:
        wire.local_key_file(("127.0.0.1", 1))
    one_line(e.value)


def test_an_unwritable_key_folder_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(blocker))  # a file where the folder would be
    with pytest.raises(FeedError, match="cannot make .* set DREAMER_FEED_KEY") as e:
        wire.local_key_file(("127.0.0.1", 1))
    one_line(e.value)


# --- 3. deadlines: one silent or slow client blocks no other ----------------------------------------------
def test_silent_and_slow_clients_do_not_block_the_real_follower(monkeypatch, capfd):
    monkeypatch.setattr(feed, "HANDSHAKE_SECONDS", 1.0)
    chief, follower = roles(free_port())
    listener = Listener(chief)
    silent = socket.create_connection(chief.address)  # says nothing, stays open
    slow = raw_client(chief.address[1])  # authenticated, then 1 byte of a 100-byte join
    slow.sock.sendall(struct.pack("!Q", 100)[:1])
    stalled = raw_client(chief.address[1])  # authenticated, length sent, payload never
    stalled.sock.sendall(struct.pack("!Q", 100))
    conn = feed.connect(follower, WAIT)
    (joined,), names = listener.join()  # the old code waited for `silent` without end
    assert names == ["worker 1 (at 127.0.0.1)"]
    for sock in (slow.sock, stalled.sock, silent):  # each closed by the chief at its own deadline
        assert closed_by_peer(sock)
    err = refusals(capfd, 4)  # the three and the Listener's probe
    assert err.count("the join message took too long") == 2 and err.count("the handshake took too long") == 1, err
    conn.close()
    joined.close()
    silent.close()


def test_a_trickled_frame_is_refused_by_its_deadline(monkeypatch, capfd):
    """An authenticated client that sends its join a byte at a time: each byte comes in time, the
    whole frame does not (the deadline is the message's, not each read's)."""
    monkeypatch.setattr(feed, "HANDSHAKE_SECONDS", 2.0)
    chief, follower = roles(free_port())
    listener = Listener(chief)
    slow = raw_client(chief.address[1])
    frame = frames_of(slow, [payload({"kind": "join", "name": "worker 1", "pad": "x" * 40})])[0]
    for i in range(len(frame)):  # 0.25 s a byte: 100+ bytes would take half a minute
        try:
            slow.sock.sendall(frame[i:i + 1])
        except OSError:
            break  # the chief hung up
        time.sleep(0.25)
    conn = feed.connect(follower, WAIT)
    listener.join()
    assert "the join message took too long" in refusals(capfd, 2)
    conn.close()


def test_a_frame_that_stalls_midway_is_refused_by_its_deadline():
    with channels() as (chief, follower):
        chief.sock.sendall(struct.pack("!Q", 1000) + b"x" * 10)
        with pytest.raises(FeedLost, match="took too long") as e:
            feed.receive(follower, 1 << 20, None, "a message from the chief", rest=1.0)
        one_line(e.value)


def test_a_peer_that_does_not_read_fails_the_send_by_its_deadline():
    with channels() as (chief, follower):
        chief.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(FeedLost, match="took too long") as e:  # the follower never reads
            feed.send(chief, {"kind": "sync"}, {"file:agent.index": np.zeros(64 << 20, np.uint8)}, wait=1.0)
        one_line(e.value)


# --- 4. message sizes ---------------------------------------------------------------------------------
def test_a_huge_declared_frame_is_refused_before_it_is_read(monkeypatch, capfd):
    monkeypatch.setattr(feed, "HANDSHAKE_SECONDS", 5.0)
    chief, follower = roles(free_port())
    listener = Listener(chief)
    big = raw_client(chief.address[1])
    try:
        big.sock.sendall(struct.pack("!Q", 16 << 30) + b"\0" * (1 << 20))  # 16 GiB declared, 1 MiB streamed
    except OSError:
        pass  # the chief hung up first
    assert closed_by_peer(big.sock)
    conn = feed.connect(follower, WAIT)
    listener.join()
    err = refusals(capfd, 2)
    assert f"sent the join message of {16 << 30} bytes, more than the {wire.SMALL} it may hold; refused" in err, err
    conn.close()


def test_the_follower_refuses_more_than_one_update_holds():
    expected = {"rng": ((3,), np.int64), "image": ((2, 5, 8, 8, 3), np.uint8), "action": ((2, 5, 6), np.float32)}
    limit = feed.message_bytes(expected)
    assert limit == wire.SMALL + 24 + 2 * 5 * 8 * 8 * 3 + 2 * 5 * 6 * 4
    with channels() as (chief, follower):
        feed.send(chief, {"kind": "train"}, {"rng": np.zeros(3, np.int64), "image": np.zeros((200, 5, 8, 8, 3), np.uint8)})
        with pytest.raises(FeedError, match=f"more than the {limit} it may hold") as e:
            feed.receive(follower, limit, WAIT)
        one_line(e.value)


# --- 5. malformed messages ---------------------------------------------------------------------------------
def payload(header: dict | None = None, raw_header: bytes | None = None, tail: bytes = b"") -> bytes:
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("!I", len(head)) + head + tail


MALFORMED_READY = [
    (payload({"kind": "ready", "replicas": 7}), "`replicas` must be list, got 7"),
    (payload({"kind": "ready", "replicas": ["a"]}), "must be distinct replica ids in 0..1, got ['a']"),
    (payload({"kind": "ready", "replicas": [True]}), "must be distinct replica ids"),
    (payload({"kind": "ready", "replicas": [1, 1]}), "must be distinct replica ids"),
    (payload({"kind": "ready", "replicas": [5]}), "must be distinct replica ids"),
    (payload({"kind": "ready", "replicas": []}), "must be distinct replica ids"),
    (payload({"kind": "ready"}), "`replicas` must be list, got None"),
    (payload(raw_header=b"{not json"), "its header is not JSON"),
    (payload(raw_header=b"\xff\xfe"), "its header is not JSON"),
    (payload(raw_header=b"[" * 100000 + b"]" * 100000), "its header is not JSON|more than the"),
    (payload(["a"]), "not an object with a `kind`"),
    (payload({"kind": 7}), "not an object with a `kind`"),
    (b"\x00\x01", "2 bytes, shorter than its header's length"),
    (struct.pack("!I", 1000) + b"{}", "its header's length 1000 exceeds"),
    (payload({"kind": "ready", "replicas": [1], "arrays": [["x", "|O8", [1]]]}, tail=b"x" * 8), "numeric dtype"),
    (payload({"kind": "ready", "replicas": [1], "arrays": [["x", "<f4", [1000]]]}, tail=b"x" * 8), "needs 4000 bytes"),
    (payload({"kind": "ready", "replicas": [1], "arrays": "PK\x03\x04"}), "`arrays` is not a list"),
    (payload({"kind": "ready", "replicas": [1]}, tail=b"PK\x03\x04garbage npz"), "bytes follow its arrays"),
    (payload({"kind": "ready", "replicas": [1], "arrays": [["x", "<f4", [-1]]]}), "numeric dtype, shape"),
    (payload({"kind": "ready", "replicas": [1], "arrays": [["x", "<f4", [1]], ["x", "<f4", [1]]]}, tail=b"\0" * 8),
     "appears twice"),
    (payload({"kind": "failed", "error": "boom"}), "failed to start: boom"),
]


@pytest.mark.parametrize("data, message", MALFORMED_READY)
def test_malformed_ready_messages_are_one_line(data, message):
    with channels() as (chief, follower):
        follower.send(data, WAIT)
        with pytest.raises(FeedError) as e:
            header, _ = feed.receive(chief, wire.SMALL, WAIT, "the ready message")
            feed.read_ready(header, "worker 1", 2)
        assert any(part in one_line(e.value) for part in message.split("|")), e.value


@pytest.mark.parametrize("message, why", [
    ({"obs_space": {"image": {"shape": ["a"]}}, "act_space": {"shape": [6]}}, "obs_space"),
    ({"obs_space": {}, "act_space": {"shape": [6]}}, "0 observation keys"),
    ({"obs_space": [], "act_space": {"shape": [6]}}, "`obs_space` must be dict"),
    ({"obs_space": {"image": {"shape": [64, 64, 3]}}, "act_space": {"shape": [6], "low": [0, 1]}}, "act_space"),
    ({"obs_space": {"image": {"shape": [64, 64, 3]}}, "act_space": {"shape": [6], "n": "x"}}, "act_space"),
    ({"obs_space": {"image": 3}, "act_space": {"shape": [6]}}, "obs_space"),
])
def test_malformed_spaces_are_one_line(message, why):
    with pytest.raises(FeedError, match=why) as e:
        feed.spaces_from(message)
    one_line(e.value)


@pytest.mark.parametrize("arrays, why", [
    ({"rng": np.zeros(3, np.int64)}, "holds"),
    ({"rng": np.zeros(3, np.int64), "action": np.zeros((2, 5), np.float32)}, "expected float32 \\(2, 5, 6\\)"),
    ({"rng": np.zeros(3, np.int32), "action": np.zeros((2, 5, 6), np.float32)}, "expected int64"),
])
def test_malformed_train_messages_are_one_line(arrays, why):
    expected = {"rng": ((3,), np.int64), "action": ((2, 5, 6), np.float32)}
    with pytest.raises(FeedError, match=why) as e:
        feed.train_arrays(arrays, expected)
    one_line(e.value)


def test_fuzz_frames_random_truncated_and_wrong_types():
    """A bounded fuzz over one 127.0.0.1 connection per case: authentic frames with random bytes,
    random JSON of the wrong shape or types, and frames cut short by a closed connection. Each is a
    FeedError or FeedLost of one line (never another exception), the chief's reading side included."""
    rng = random.Random(30)
    values = [7, -1, 2 ** 70, 1.5, float("nan"), "a", "", None, True, [], ["a"], [0.5], [[1]], {}, {"a": 1}]
    seen = {FeedError: 0, FeedLost: 0}
    for case in range(75):
        kind = case % 5
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 300))
        elif kind == 3:  # a header of the right length holding anything
            head = rng.choice([rng.randbytes(rng.randrange(0, 60)), json.dumps(rng.choice(values)).encode()[:-1]])
            data = payload(raw_header=head, tail=rng.randbytes(rng.randrange(0, 8)))
        elif kind == 1:
            header = {"kind": rng.choice(["ready", "join", "armed", "train", rng.choice(values)])}
            for key in rng.sample(["replicas", "name", "arrays", "error"], rng.randrange(0, 4)):
                header[key] = rng.choice(values)
            data = payload(raw_header=json.dumps(header).encode())
        elif kind == 2:
            good = payload({"kind": "ready", "replicas": [1], "arrays": [["x", "<f8", [3]]]}, tail=b"\0" * 24)
            data = good[:rng.randrange(0, len(good))] + rng.randbytes(rng.randrange(0, 4))
        else:
            data = None  # a frame cut short: the connection closes inside it
        with channels() as (chief, follower):
            try:
                if data is None:
                    frame = frames_of(follower, [payload({"kind": "ready", "replicas": [1]})])[0]
                    follower.sock.sendall(frame[:rng.randrange(0, len(frame))])
                    follower.sock.shutdown(socket.SHUT_WR)
                else:
                    follower.send(data, WAIT)
                header, _ = feed.receive(chief, wire.SMALL, 5.0, "the ready message")
                feed.read_ready(header, "worker 1", 2)
            except (FeedError, FeedLost) as e:
                one_line(e)
                seen[type(e)] += 1
            else:
                assert header == {"kind": "ready", "replicas": [1]}, (case, data)
    assert seen[FeedError] >= 30 and seen[FeedLost] >= 10, seen


def test_fuzz_the_listener_before_authentication(monkeypatch, capfd):
    """Random bytes, half handshakes and closed connections at the chief's listener: each refused
    in one line, and the listener still accepts the real follower afterwards."""
    monkeypatch.setattr(feed, "HANDSHAKE_SECONDS", 1.0)
    rng = random.Random(31)
    chief, follower = roles(free_port())
    listener = Listener(chief)
    for case in range(24):
        sock = socket.create_connection(chief.address, timeout=WAIT)
        sock.recv(len(wire.MAGIC) + wire.NONCE)
        junk = [rng.randbytes(rng.randrange(1, 200)), wire.MAGIC + rng.randbytes(64), wire.MAGIC[:5], b""][case % 4]
        try:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()
    conn = feed.connect(follower, WAIT)
    listener.join()
    conn.close()
    err = refusals(capfd, 25)  # +1: the Listener's own probe
    assert err.count("multi_worker: refused a connection") == 25 and "Traceback" not in err, err


# --- 6. every frame authenticated ------------------------------------------------------------------------------
def test_replayed_reordered_altered_and_reflected_frames_are_refused():
    first, second = payload({"kind": "ready", "replicas": [1]}), payload({"kind": "stop", "ok": True})
    with channels() as (chief, follower):
        frames = frames_of(follower, [first, second])
        follower.sock.sendall(frames[0] + frames[0])  # replayed
        assert feed.receive(chief, wire.SMALL, WAIT)[0]["kind"] == "ready"
        with pytest.raises(FeedError, match="failed authentication \\(altered, replayed or out of order\\)") as e:
            feed.receive(chief, wire.SMALL, WAIT)
        one_line(e.value)
    with channels() as (chief, follower):
        frames = frames_of(follower, [first, second])
        follower.sock.sendall(frames[1] + frames[0])  # reordered
        with pytest.raises(FeedError, match="failed authentication"):
            feed.receive(chief, wire.SMALL, WAIT)
    with channels() as (chief, follower):
        frame = bytearray(frames_of(follower, [first])[0])
        frame[20] ^= 1  # altered payload
        follower.sock.sendall(bytes(frame))
        with pytest.raises(FeedError, match="failed authentication"):
            feed.receive(chief, wire.SMALL, WAIT)
    with channels() as (chief, follower):
        frame = frames_of(chief, [first])[0]  # the chief's own frame sent back to it
        follower.sock.sendall(frame)
        with pytest.raises(FeedError, match="failed authentication"):
            feed.receive(chief, wire.SMALL, WAIT)


def test_a_recorded_session_cannot_be_replayed(monkeypatch, capfd):
    """What worker 1 sent in a whole session, recorded by a proxy on the path, replayed on a new
    connection: the chief's fresh nonce makes the recorded proof (and every frame) invalid."""
    monkeypatch.setattr(feed, "HANDSHAKE_SECONDS", 5.0)
    port = free_port()
    chief = Role(chief=True, name="worker 0", followers=2, tasks=["worker 1", "worker 2"],
                 address=("127.0.0.1", port), key=KEY)
    listener = Listener(chief)
    recorded = bytearray()
    server = socket.create_server(("127.0.0.1", 0))

    def forward(src: socket.socket, dst: socket.socket, keep: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if keep:
                    recorded.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        dst.close()

    def proxy():
        inside, _ = server.accept()
        outside = socket.create_connection(chief.address)
        threading.Thread(target=forward, args=(outside, inside, False), daemon=True).start()
        forward(inside, outside, True)
    threading.Thread(target=proxy, daemon=True).start()
    calls = []
    real = wire.hmac.compare_digest
    monkeypatch.setattr(wire.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    first = feed.connect(Role(chief=False, name="worker 1", followers=2, tasks=[],
                              address=server.getsockname()[:2], key=KEY), WAIT)
    assert calls, "proofs are checked with hmac.compare_digest"
    deadline = time.monotonic() + WAIT
    while len(recorded) < len(wire.MAGIC) + wire.NONCE + wire.TAG + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    replay = socket.create_connection(chief.address, timeout=WAIT)
    replay.recv(len(wire.MAGIC) + wire.NONCE)
    replay.sendall(bytes(recorded))
    assert replay.recv(wire.TAG) == wire.REFUSED  # the proof was for another nonce
    second = feed.connect(Role(chief=False, name="worker 2", followers=2, tasks=[], address=chief.address,
                               key=KEY), WAIT)
    _, names = listener.join()
    assert sorted(names) == ["worker 1 (at 127.0.0.1)", "worker 2 (at 127.0.0.1)"]  # in the order they finished joining
    assert "did not prove it holds the feed key" in refusals(capfd, 2)
    for conn in (first, second, replay):
        conn.close()
    server.close()


def test_a_follower_refuses_a_chief_without_the_key():
    server = socket.create_server(("127.0.0.1", 0))

    def impostor():
        sock, _ = server.accept()
        try:
            wire.handshake_chief(sock, b"another key of 32 bytes........", time.monotonic() + WAIT, "x")
        except FeedError:
            pass
        sock.close()
    threading.Thread(target=impostor, daemon=True).start()
    _, follower = roles(server.getsockname()[1])
    with pytest.raises(FeedError, match="must be the same on every task") as e:
        feed.connect(follower, WAIT)
    one_line(e.value)
    server.close()


# --- 7a. SIGTERM while the chief waits ----------------------------------------------------------------
def test_sigterm_while_the_chief_waits_for_its_workers_is_one_line(tmp_path):
    """`feed.accept` in a process of its own (no TensorFlow): SIGTERM ends the wait at once."""
    import signal
    import subprocess
    import sys
    port = free_port()
    code = ("import sys; from dreamer_tf.run import feed\n"
            f"role = feed.Role(chief=True, name='worker 0', followers=1, tasks=['worker 1'], "
            f"address=('127.0.0.1', {port}), key={KEY!r})\n"
            "try:\n    with feed.stop_on_signals():\n        feed.accept(role, 300)\n"
            "except feed.Stopped as e:\n    print(e, file=sys.stderr); sys.exit(128 + e.signum)\n")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(root)),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("multi_worker: stopped by SIGTERM while waiting for the workers")
    assert "Traceback" not in err


def test_a_tensorflow_without_the_start_up_deadline_api_is_a_note_not_a_traceback(monkeypatch, capsys):
    """cluster_start bounds TensorFlow's collective start-up through a private API; another TensorFlow
    than setup.py pins may lack it: one note saying what is lost, and the start-up goes on."""
    from tensorflow.python.eager import context

    from dreamer_tf.run import cluster_start
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr(context, "context", lambda: types.SimpleNamespace(coordination_service=None))
    cluster_start._register_deadline(5.0)
    err = capsys.readouterr().err
    assert err.startswith("note: multi_worker: this TensorFlow lacks the private API that bounds its cluster "
                          "start-up (AttributeError: ") and len(err.strip().splitlines()) == 1, err
