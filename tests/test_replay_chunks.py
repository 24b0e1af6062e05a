"""Tests of the `chunks` replay store (dreamer_tf/data/chunks.py, stores.ChunkStore).

Each was seen failing on a broken store: frames reversed inside a chunk (round trip, same
batches as `frames`, migration tests), a non-atomic chunked write (crash test), migration
disabled (crash and run_v0 tests), one chunk per frame (index test), LZ4 errors swallowed
(corrupt-chunk test). The native decoder was seen failing the round trip when its partial decode
wrote one frame short, and when the scratch copy took the frames after the window's start.
"""
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.data import EpisodeError, Replay, load_episode
from dreamer_tf.data import chunks
from dreamer_tf.data.stores import DISK_BYTES_PER_FRAME, ChunkStore, disk_bytes_per_frame

sys.path.insert(0, str(Path(__file__).parent))
from test_replay import make_episode, windows_of  # noqa: E402

RUN_V0 = Path(__file__).parent / "golden" / "run_v0"


@pytest.fixture(params=["native", "python"])
def decoder(request, monkeypatch):
    """Both decode paths: LZ4's C functions into the window (partial decode) and the lz4 package's."""
    if request.param == "python":
        monkeypatch.setattr(chunks, "_NATIVE", None)
    return request.param


def test_the_native_decoder_is_found():
    # The fast path (decode into the batch, stop at the window's end) must be what runs here.
    assert chunks._NATIVE is not None


def _batches(replay: Replay, n: int = 4, batch: int = 6, length: int = 20) -> list[dict]:
    return [replay.sample(batch, length) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_chunked_episodes_round_trip_exactly_and_every_window_reads_back(tmp_path, decoder):
    # Lengths around the chunk size: a short last chunk, exact multiples, one chunk only.
    episodes = [make_episode(i, n, state=True, size=16) for i, n in enumerate([5, 16, 33, 48, 70])]
    replay = Replay(tmp_path, store="chunks")
    paths = [replay.add(ep) for ep in episodes]
    for path, episode in zip(paths, episodes):
        with zipfile.ZipFile(path) as zf:
            assert chunks.IMAGE_MEMBER in zf.namelist() and "image.npy" not in zf.namelist()
        loaded = load_episode(path)
        assert sorted(loaded) == sorted(episode)
        for key in episode:
            np.testing.assert_array_equal(loaded[key], episode[key], err_msg=key)
    reopened = Replay(tmp_path, store="chunks")
    store = reopened._store
    for entry, episode in zip(reopened._episodes, episodes):
        n = len(episode["image"])
        for length in (1, 7, n):
            for start in range(n - length + 1):
                out = np.empty((length,) + episode["image"].shape[1:], np.uint8)
                store.read(entry, start, out)
                np.testing.assert_array_equal(out, episode["image"][start:start + length])


def test_chunks_store_gives_the_same_batches_as_frames_for_the_same_seed(tmp_path, decoder):
    episodes = [make_episode(i, 30 + 7 * i, size=16) for i in range(6)]
    replays = {store: Replay(tmp_path / store, store=store, seed=3) for store in ("chunks", "frames")}
    for episode in episodes:
        for replay in replays.values():
            replay.add(episode)
    _assert_same(_batches(replays["chunks"]), _batches(replays["frames"]))
    states = {store: dict(replay.get_state(), newest=None) for store, replay in replays.items()}
    assert states["chunks"] == states["frames"]
    # ... and after a reload, with the state restored mid-stream.
    state = replays["chunks"].get_state()
    expected = _batches(replays["frames"])
    reloaded = Replay(tmp_path / "chunks", store="chunks", seed=99)
    reloaded.set_state(state)
    _assert_same(_batches(reloaded), expected)
    # The image files hold no second copy of the images.
    assert not (tmp_path / "chunks" / "frames").exists()


def test_a_crash_while_migrating_leaves_the_old_episode_and_the_next_open_migrates_it(tmp_path):
    writer = Replay(tmp_path, store="frames")
    episodes = [make_episode(i, 40, size=16) for i in range(2)]
    paths = [writer.add(ep) for ep in episodes]
    old_bytes = [p.read_bytes() for p in paths]
    # The child dies (no cleanup) at the rename of the first migrated file.
    code = textwrap.dedent(f"""
        import os
        from dreamer_tf.data import Replay
        os.replace = lambda src, dst: os._exit(17)
        Replay({str(tmp_path)!r}, store="chunks")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 17, result.stderr
    assert [p.read_bytes() for p in paths] == old_bytes  # untouched: never half an episode
    assert any(p.name.startswith(".") and ".tmp" in p.name for p in tmp_path.iterdir())
    replay = Replay(tmp_path, store="chunks", seed=1)
    assert replay.paths() == paths
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp file removed
    for path, episode in zip(paths, episodes):
        assert chunks.read_index(path) is not None
        np.testing.assert_array_equal(load_episode(path)["image"], episode["image"])
    _assert_same(_batches(replay), _batches(Replay(tmp_path, store="cache", seed=1)))


def test_old_format_run_v0_is_migrated_once_and_samples_as_before(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN_V0, run)
    episode_dir = run / "train_episodes"
    names = sorted(p.name for p in episode_dir.glob("*.npz"))
    originals = {name: load_episode(episode_dir / name) for name in names}
    frames = Replay(episode_dir, store="frames", seed=5)  # the old store (builds its frame files)
    assert len(list((episode_dir / "frames").glob("*.npy"))) == len(names)
    expected = _batches(frames, length=8)
    replay = Replay(episode_dir, store="chunks", seed=5)
    assert sorted(p.name for p in episode_dir.glob("*.npz")) == names  # same names: checkpoints still match
    assert not (episode_dir / "frames").exists()  # the raw copies are gone
    for name in names:
        assert chunks.read_index(episode_dir / name) is not None
        migrated = load_episode(episode_dir / name)
        for key, value in originals[name].items():
            np.testing.assert_array_equal(migrated[key], value, err_msg=key)
    _assert_same(_batches(replay, length=8), expected)
    stamps = [(episode_dir / n).stat().st_mtime_ns for n in names]
    Replay(episode_dir, store="chunks")  # already migrated: nothing is rewritten
    assert [(episode_dir / n).stat().st_mtime_ns for n in names] == stamps
    # A resumed run may switch its store (the config check lets replay_store change).
    from dreamer_tf import config as configlib
    from dreamer_tf.run.logdir import prepare_logdir
    stored = configlib.load_file(run / "config.yaml")
    prepare_logdir(stored.replace(replay_store="chunks"), run)


def test_the_index_is_a_few_offsets_per_episode(tmp_path):
    replay = Replay(tmp_path, store="chunks")
    for i in range(8):
        replay.add(make_episode(i, 501, size=8))
    reopened = Replay(tmp_path, store="chunks")
    frames = reopened.num_steps + reopened.num_episodes
    per_frame = reopened._store.index_bytes(reopened._episodes) / frames
    assert per_frame <= 0.6  # one int64 offset per chunk of 16-32 frames: 2.5e6 frames index in ~1 MB
    for entry in reopened._episodes:
        assert isinstance(entry.chunks.offsets, np.ndarray) and entry.chunks.offsets.dtype == np.int64
    assert reopened.cached_frames == 0


def _payload_offset(path: Path) -> tuple[int, np.ndarray]:
    index = chunks.read_index(path)
    return index.data_offset, index.offsets


def test_a_corrupt_chunk_is_a_one_line_error_naming_the_file(tmp_path, decoder, capfd, monkeypatch):
    replay = Replay(tmp_path, store="chunks")
    paths = [replay.add(make_episode(i, 60, size=32)) for i in range(3)]
    start, offsets = _payload_offset(paths[1])
    data = bytearray(paths[1].read_bytes())
    data[start + offsets[1]:start + offsets[1] + 64] = bytes(64)  # chunk 1's first 64 bytes
    paths[1].write_bytes(bytes(data))
    with pytest.raises(EpisodeError) as caught:
        load_episode(paths[1])
    message = str(caught.value)
    assert str(paths[1]) in message and "chunk 1" in message and "\n" not in message
    # Found when sampled if the open-time CRC check is off: dropped and quarantined.
    monkeypatch.setattr(ChunkStore, "verify", False)
    reloaded = Replay(tmp_path, store="chunks")
    monkeypatch.undo()
    capfd.readouterr()
    for _ in range(30):
        assert 1 not in {eid for eid, _ in windows_of(reloaded.sample(8, 40))}
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(paths[1]) in lines[0] and "chunk 1" in lines[0], lines
    assert reloaded.paths() == [paths[0], paths[2]] and (tmp_path / "quarantine" / paths[1].name).exists()
    # A truncated payload is caught when the file is opened.
    paths[2].write_bytes(paths[2].read_bytes()[:start + offsets[2]])
    assert Replay(tmp_path, store="chunks").paths() == paths[:1]
    [line] = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert paths[2].name in line and "quarantine" in line


def test_disk_bytes_per_frame_is_the_measured_bound():
    assert 0 < disk_bytes_per_frame() == DISK_BYTES_PER_FRAME["chunks"] <= 4.8 * 1024
    assert disk_bytes_per_frame("frames") > 12288 > disk_bytes_per_frame("cache")
    with pytest.raises(ValueError, match="one of"):
        disk_bytes_per_frame("tape")



def test_the_earliest_failed_window_is_reported_whatever_thread_read_it(tmp_path, monkeypatch):
    # Which episode a failed batch drops must not depend on the thread count (reproducibility):
    # read_many reports the failure of the earliest job, as reading them in order would.
    from dreamer_tf.data.stores import read_in_order
    replay = Replay(tmp_path, store="chunks")
    paths = [replay.add(make_episode(i, 60, size=32)) for i in range(3)]
    for path in paths[1:]:
        start, offsets = _payload_offset(path)
        data = bytearray(path.read_bytes())
        for c in range(len(offsets) - 1):  # every chunk: any window of the episode fails
            data[start + offsets[c]:start + offsets[c] + 64] = bytes(64)
        path.write_bytes(bytes(data))
    monkeypatch.setattr(ChunkStore, "verify", False)  # else both are quarantined when opened
    reloaded = Replay(tmp_path, store="chunks")
    good, first, second = reloaded._episodes
    out = lambda: np.empty((10, 32, 32, 3), np.uint8)  # noqa: E731
    # Two threads read jobs 0, 2, 4 and 1, 3, 5: the earliest failure (job 1) is the second thread's.
    jobs = [(good, 0, out()), (second, 0, out()), (first, 0, out()), (good, 5, out()), (first, 3, out()),
            (good, 9, out())]
    expected = read_in_order(reloaded._store, jobs)[0]
    assert expected is second
    for threads in (1, 2, 3):
        reloaded._store.threads = threads
        assert reloaded._store.read_many(jobs)[0] is expected
