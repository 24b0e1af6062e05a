"""A damaged replay file is never trained on (issue 30, items 8-10): faults injected as files on disk.

Each test was seen failing on the code before the fix (commit 01f0b4a): a flipped payload byte was
sampled silently (no CRC check), a byte in the central directory raised NotImplementedError or
struct.error out of `Replay` (a traceback on resume), and bad files stayed in place and were
warned about with a two-line RuntimeWarning on every open.
"""
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.data import EpisodeError, Replay, load_episode
from dreamer_tf.data import chunks
from dreamer_tf.data.stores import ChunkStore

sys.path.insert(0, str(Path(__file__).parent))
from test_replay import make_episode, windows_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def stderr_lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def silent_flip(path: Path) -> int:
    """A byte position in the image payload of chunked file `path` whose inversion still decodes,
    to other frames: the damage LZ4 cannot see."""
    index = chunks.read_index(path)
    original = chunks.decode_all(path, index)
    data = bytearray(path.read_bytes())
    fd_path = path.with_suffix(".probe")
    for offset in range(int(index.offsets[0]) + 40, int(index.offsets[-1])):
        position = index.data_offset + offset
        data[position] ^= 0xFF
        fd_path.write_bytes(data)
        data[position] ^= 0xFF
        try:
            decoded = chunks.decode_all(fd_path, index)
        except chunks.ChunkError:
            continue
        if not np.array_equal(decoded, original):
            fd_path.unlink()
            return position
    raise AssertionError("no silent flip found")


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def central_entry(path: Path, member: str) -> int:
    """File offset of `member`'s central directory header."""
    import zipfile
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        start = zf.start_dir
    name = member.encode()
    at = data.find(b"PK\x01\x02", start)
    while at >= 0:
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_len] == name:
            return at
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} not in the central directory")


def set_bytes(path: Path, position: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[position:position + len(value)] = value
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# Item 8: image data that decodes to other frames


def test_a_flip_that_decodes_to_other_frames_is_quarantined_before_any_batch(tmp_path, capfd):
    replay = Replay(tmp_path, store="chunks")
    paths = [replay.add(make_episode(i, 60, size=16)) for i in range(3)]
    flip(paths[1], silent_flip(paths[1]))
    stderr_lines(capfd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = Replay(tmp_path, store="chunks")
    [line] = stderr_lines(capfd)
    assert str(paths[1]) in line and "CRC-32" in line and f"quarantine/{paths[1].name}" in line, line
    assert reopened.paths() == [paths[0], paths[2]]
    assert (tmp_path / "quarantine" / paths[1].name).exists() and not paths[1].exists()
    for _ in range(20):
        assert 1 not in {eid for eid, _ in windows_of(reopened.sample(8, 20))}
    # Loading the whole episode (evaluation tools, migration) checks the CRC too.
    with pytest.raises(EpisodeError, match="CRC-32"):
        load_episode(tmp_path / "quarantine" / paths[1].name)


def test_a_quarantined_newest_episode_is_one_more_line_on_resume_not_a_warning(tmp_path, capfd):
    """A resumed run's replay state names its newest episode; when that file was the damaged one, the
    stream cannot be the original's: one line says so, beside the quarantine's line."""
    replay = Replay(tmp_path, store="chunks", seed=3)
    paths = [replay.add(make_episode(i, 60, size=16)) for i in range(3)]
    replay.sample(4, 10)
    state = replay.get_state()
    flip(paths[2], silent_flip(paths[2]))
    stderr_lines(capfd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = Replay(tmp_path, store="chunks", seed=3)
        reopened.set_state(state)
    quarantined, stream = stderr_lines(capfd)
    assert f"quarantine/{paths[2].name}" in quarantined, quarantined
    assert stream == (f"replay: the sample stream differs from the original run from here on: its newest "
                      f"episode {paths[2].name} was quarantined")


def test_the_check_reads_files_written_before_it(tmp_path):
    # The check is the zip's own CRC-32 of the stored payload: a file written by the earlier code
    # (golden run_v0 holds plain .npz; this is a chunked file of format version 1) verifies as is.
    path = tmp_path / "00000000-aaaaaaaa-39.npz"
    path.write_bytes(chunks.encode(make_episode(0, 40, size=16)))
    index = chunks.read_index(path, verify=True)
    assert index is not None and index.crc != 0
    assert Replay(tmp_path, store="chunks").paths() == [path]


def test_quarantine_leaves_the_healthy_sample_stream_alone(tmp_path, capfd):
    # The replay with a damaged file samples exactly what one that never held the file samples.
    damaged, clean = tmp_path / "damaged", tmp_path / "clean"
    writer = Replay(damaged, store="chunks")
    paths = [writer.add(make_episode(i, 30 + 7 * i, size=16)) for i in range(5)]
    clean.mkdir()
    for i in (0, 1, 3, 4):
        shutil.copy(paths[i], clean / paths[i].name)
    flip(paths[2], silent_flip(paths[2]))
    a, b = Replay(damaged, store="chunks", seed=3), Replay(clean, store="chunks", seed=3)
    assert [p.name for p in a.paths()] == [p.name for p in b.paths()]
    for _ in range(10):
        x, y = a.sample(4, 12), b.sample(4, 12)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert a.get_state() == b.get_state()
    # Once: the next open finds nothing to say, and a second damaged file of the same name is
    # kept beside the first, not over it.
    stderr_lines(capfd)
    assert Replay(damaged, store="chunks").paths() == a.paths() and stderr_lines(capfd) == []
    shutil.copy(tmp_path / "damaged" / "quarantine" / paths[2].name, paths[2])
    Replay(damaged, store="chunks")
    assert sorted(p.name for p in (damaged / "quarantine").iterdir()) == [paths[2].name, paths[2].name + ".1"]


# ---------------------------------------------------------------------------------------------
# Items 9 and 10: any failure to open a file is that file's problem, moved once, one line


def _version_65(path: Path) -> None:  # zipfile: NotImplementedError('zip file version 6.5')
    set_bytes(path, central_entry(path, "action.npy") + 6, (65).to_bytes(2, "little"))


def _header_past_the_end(path: Path) -> None:  # chunks.read_index: struct.error (30-byte header)
    size = path.stat().st_size
    set_bytes(path, central_entry(path, chunks.IMAGE_MEMBER) + 42, (size - 10).to_bytes(4, "little"))


def _truncated(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _empty(path: Path) -> None:
    os.truncate(path, 0)


def _zeroed(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _name_flipped(path: Path) -> None:  # a byte of a member's name in the central directory
    flip(path, central_entry(path, "reward.npy") + 46)


DAMAGE = {"version 6.5": _version_65, "header past the end": _header_past_the_end, "truncated": _truncated,
          "empty": _empty, "zeroed": _zeroed, "member name": _name_flipped}


@pytest.mark.parametrize("store", ["chunks", "cache"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_file_that_cannot_be_opened_is_quarantined_in_one_line(tmp_path, capfd, damage, store):
    if damage == "header past the end" and store != "chunks":
        pytest.skip("the chunked file's image member")
    replay = Replay(tmp_path, store=store)
    paths = [replay.add(make_episode(i, 20, size=8)) for i in range(3)]
    DAMAGE[damage](paths[1])
    stderr_lines(capfd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = Replay(tmp_path, store=store)
    lines = stderr_lines(capfd)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert str(paths[1]) in lines[0] and f"moved it to {tmp_path / 'quarantine' / paths[1].name}" in lines[0]
    assert reopened.paths() == [paths[0], paths[2]] and not paths[1].exists()
    reopened.sample(4, 10)
    assert Replay(tmp_path, store=store).num_episodes == 2 and stderr_lines(capfd) == []


# ---------------------------------------------------------------------------------------------
# Through a real resumed run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("corrupt") / "run"
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir",
                           str(logdir), "--no-tensorboard", "--set", "steps=300"],
                          capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logdir


@pytest.mark.slow
def test_a_resumed_run_quarantines_damaged_episodes_and_finishes(finished_run, tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(finished_run, logdir)
    episodes = sorted((logdir / "train_episodes").glob("*.npz"))
    flipped, versioned = episodes[0], episodes[1]
    flip(flipped, silent_flip(flipped))  # item 8: decodes to other frames
    _version_65(versioned)  # item 9: NotImplementedError out of zipfile
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(logdir),
                           "--no-tensorboard", "--set", "steps=400"],
                          capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]
    quarantine = logdir / "train_episodes" / "quarantine"
    for path in (flipped, versioned):
        said = [line for line in proc.stderr.splitlines() if path.name in line]
        assert len(said) == 1 and re.search(rf"moved it to \S+/quarantine/{path.name}$", said[0]), said
        assert (quarantine / path.name).exists() and not path.exists()
    assert '"finished"' in (logdir / "status.json").read_text()


def test_a_new_episode_never_takes_the_number_of_a_quarantined_one(tmp_path):
    # Resume compares file names with the checkpoint's `last_episode`: numbers must keep growing.
    replay = Replay(tmp_path, store="chunks")
    paths = [replay.add(make_episode(i, 20, size=8)) for i in range(3)]
    _truncated(paths[2])  # the newest
    reopened = Replay(tmp_path, store="chunks")
    assert (tmp_path / "quarantine" / paths[2].name).exists()
    assert reopened.add(make_episode(3, 20, size=8)).name.startswith("00000003-")
