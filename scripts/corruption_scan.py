"""Corruption scan: flip every byte of one episode file in turn and see what the replay does with it.

For each byte position of a small episode file the byte is inverted (XOR 0xFF) in a copy, and the
copy goes through the replay's own reading path, as `Replay` runs it:

* ``open``: rejected when the replay opens the file (`episodes.load_parts`, then the store's
  ``attach``: for ``chunks`` the index and, with the check on, the payload's CRC-32): the replay
  quarantines it before any of its frames can be drawn;
* ``read``: rejected while a window is read (for ``chunks``: an LZ4 block that does not decode;
  for ``npz``: the image member, decoded only when sampled): quarantined before the batch is
  returned;
* ``same``: read, and every frame and small array equals the original (the flip hit bytes the
  reader does not use, e.g. a timestamp or the local header's copy of the CRC);
* ``silent``: read, and some frame or array differs: damaged data that would be trained on.

The goal is no ``silent`` flip. Each form is scanned with the check on and, as the code before the
check, off (``chunks`` only: ``ChunkStore.verify``). The episode is the first 51 frames (a `debug`
run's episode: time limit 100, action repeat 2) of dmc_cartpole_balance rendered under random
actions in a worker process without TensorFlow.

  python scripts/corruption_scan.py [--frames 51] [--out results/corruption_scan.json]

Writes results/corruption_scan.json and .md, and the same table as the section "Corruption scan"
of results/reliability.md (the rest of that file is left as it is).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TASK = "dmc_cartpole_balance"


def render(frames: int, out: Path) -> None:
    """Child process (MuJoCo, no TensorFlow): `frames` frames of TASK under random actions."""
    from dreamer_tf.envs.tasks import build_local, resolve

    env = build_local(resolve(TASK, seed=0))
    rng = np.random.default_rng(0)
    obs = env.reset()
    images = [obs["image"]]
    while len(images) < frames:
        obs, _, done, _ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        images.append(obs["image"])
        if done:
            obs = env.reset()
            images.append(obs["image"])
    env.close()
    np.save(out, np.stack(images[:frames]))


def episode_of(images: np.ndarray) -> dict[str, np.ndarray]:
    """A pixel run's episode around `images` (action[1] of cartpole, reward, discount)."""
    rng = np.random.default_rng(1)
    n = len(images)
    action = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    action[0] = 0
    return {"image": images, "action": action, "reward": rng.uniform(0, 1, n).astype(np.float32),
            "discount": np.ones(n, np.float32)}


def regions(data: bytes) -> list[tuple[str, int, int]]:
    """(name, start, stop) byte ranges of the zip: each member's local header and data, the
    central directory and the end record."""
    import io
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        directory = zf.start_dir
    for info in infos:
        start = info.header_offset
        name_len = int.from_bytes(data[start + 26:start + 28], "little")
        extra_len = int.from_bytes(data[start + 28:start + 30], "little")
        body = start + 30 + name_len + extra_len
        out += [(f"{info.filename} local header", start, body),
                (f"{info.filename} data", body, body + info.compress_size)]
    end = data.rfind(b"PK\x05\x06")
    out += [("central directory", directory, end), ("end record", end, len(data))]
    return out


def region_of(position: int, spans: list[tuple[str, int, int]]) -> str:
    return next((name for name, a, b in spans if a <= position < b), "other")


def outcome(path: Path, form: str, original: dict[str, np.ndarray], verify: bool) -> str:
    """What the replay's reading path makes of the file at `path` (see the module docstring)."""
    from dreamer_tf.data.episodes import EpisodeError, load_episode, load_parts
    from dreamer_tf.data.stores import ChunkStore, EpisodeEntry

    try:
        arrays, image_shape = load_parts(path, with_images=False)
        entry = EpisodeEntry(path, len(arrays["action"]), arrays)
        if form == "chunks":
            store = ChunkStore(path.parent / "frames", threads=1)
            store.verify = verify
            store.attach(entry, image_shape, None)
    except EpisodeError:
        return "open"
    if tuple(image_shape) != original["image"].shape or set(arrays) != set(original) - {"image"}:
        return "silent"  # loaded as an episode of another shape: it would be sampled
    try:
        if form == "chunks":
            images = np.empty(original["image"].shape, np.uint8)
            store.read(entry, 0, images)
        else:
            images = load_episode(path)["image"]
    except EpisodeError:
        return "read"
    same = np.array_equal(images, original["image"]) and all(
        np.array_equal(arrays[k], original[k]) for k in arrays)
    return "same" if same else "silent"


def scan(data: bytes, form: str, original: dict, verify: bool, work: Path) -> dict:
    spans = regions(data)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    silent_at = []
    path = work / f"00000000-deadbeef-{len(original['action']) - 1}.npz"
    buffer = bytearray(data)
    for position in range(len(data)):
        buffer[position] ^= 0xFF
        path.write_bytes(buffer)
        buffer[position] ^= 0xFF
        result = outcome(path, form, original, verify)
        counts[region_of(position, spans)][result] += 1
        if result == "silent":
            silent_at.append(position)
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    return {"form": form, "check": verify, "bytes": len(data), "total": dict(total),
            "regions": {name: dict(counts[name]) for name, _, _ in spans if name in counts},
            "silent_positions": silent_at[:50]}


def markdown(data: dict) -> str:
    meta = data["meta"]
    kinds = ("open", "read", "same", "silent")
    lines = [
        "## Corruption scan: every byte of one episode file flipped in turn",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, commit {meta['commit']}; CPU: {meta['cpu']}, "
        f"Python {meta['python']}; {meta['seconds']:.0f} s). The episode: {meta['episode']}. Each "
        "byte in turn is inverted (XOR 0xFF) in a copy that goes through the replay's reading path "
        "(`scripts/corruption_scan.py`): `open` = refused when the replay opens the file (quarantined "
        "before any frame can be drawn), `read` = refused while a window is read (quarantined before "
        "the batch is returned), `same` = every frame and array read equals the original (the flip hit "
        "bytes the reader does not use), `silent` = some frame or array differs: trained on. `check off` "
        "is the reading path before the CRC check (`ChunkStore.verify = False`).",
        "",
        "| file form | CRC check | bytes | " + " | ".join(kinds) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["scans"]:
        lines.append(f"| {r['form']} | {'on' if r['check'] else 'off'} | {r['bytes']} | "
                     + " | ".join(str(r["total"].get(k, 0)) for k in kinds) + " |")
    lines += ["", "Reading:", ""] + reading(data["scans"])
    for r in data["scans"]:
        lines += ["", f"By region, {r['form']}, check {'on' if r['check'] else 'off'} "
                  "(open / read / same / silent):", ""]
        lines += [f"- {name}: " + " / ".join(str(c.get(k, 0)) for k in kinds)
                  for name, c in r["regions"].items()]
    return "\n".join(lines) + "\n"


def reading(scans: list[dict]) -> list[str]:
    """Conclusions computed from the scans (a re-run keeps text and numbers together)."""
    lines = []
    for r in scans:
        t, payload = r["total"], r["regions"].get(f"{chunks_member(r)} data", {})
        caught = t.get("open", 0) + t.get("read", 0)
        lines.append(
            f"- {r['form']}, check {'on' if r['check'] else 'off'}: {caught} of {r['bytes']} flips caught "
            f"before sampling, {t.get('silent', 0)} decoded silently to other data, {t.get('same', 0)} "
            f"changed nothing read; of the {sum(payload.values())} image-payload bytes, "
            f"{payload.get('open', 0) + payload.get('read', 0)} caught and {payload.get('silent', 0)} silent.")
    lines.append("- `same` flips (by region below) are in the zip's headers, central directory and end "
                 "record (fields the reader does not check, e.g. timestamps and the local headers' "
                 "copies of sizes) or in deflate bits that do not change the output.")
    return lines


def chunks_member(scan: dict) -> str:
    return "image.chunks" if scan["form"] == "chunks" else "image.npy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=51, help="frames of the episode (T+1)")
    parser.add_argument("--forms", nargs="+", default=["chunks", "npz"], choices=["chunks", "npz"])
    parser.add_argument("--out", default=str(ROOT / "results" / "corruption_scan.json"))
    parser.add_argument("--reliability", default=str(ROOT / "results" / "reliability.md"),
                        help="the report whose corruption-scan section is written ('' = none)")
    parser.add_argument("--render", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        return render(args.frames, Path(args.render))
    from dreamer_tf.data import chunks
    from dreamer_tf.data.episodes import check_episode
    from dreamer_tf.utils import atomic_write_text, cpu_model_and_flags, git_commit

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corruption_scan-") as tmp:
        work = Path(tmp)
        frames_file = work / "frames.npy"
        subprocess.run([sys.executable, __file__, "--render", str(frames_file), "--frames", str(args.frames)],
                       check=True)
        episode = episode_of(np.load(frames_file))
        check_episode(episode)
        files = {"chunks": chunks.encode(episode)}
        if "npz" in args.forms:
            import io
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **episode)
            files["npz"] = buffer.getvalue()
        scans = []
        for form in args.forms:
            for verify in ((True, False) if form == "chunks" else (True,)):
                result = scan(files[form], form, episode, verify, work)
                print(json.dumps({k: v for k, v in result.items() if k != "regions"}), flush=True)
                scans.append(result)
    model, _ = cpu_model_and_flags()
    sizes = ", ".join(f"{len(v)}-byte {k} file" for k, v in files.items())
    data = {"meta": {
        "command": "python scripts/corruption_scan.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(ROOT),
        "cpu": model, "python": platform.python_version(), "seconds": time.perf_counter() - start,
        "episode": f"{args.frames} frames of {TASK} at 64x64 under random actions with action[1], "
                   f"reward and discount ({sizes})"},
        "scans": scans}
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
    atomic_write_text(Path(args.out).with_suffix(".md"), markdown(data))
    if args.reliability:
        put_section(Path(args.reliability), markdown(data))
    print(markdown(data))


def put_section(path: Path, section: str) -> None:
    """Replace this scan's section of `path` (from its heading to the next "## " heading), or
    append it: the file holds other runs' sections too."""
    from dreamer_tf.utils import atomic_write_text

    text = path.read_text() if path.exists() else ""
    heading = section.splitlines()[0]
    if heading in text:
        before, _, rest = text.partition(heading)
        after = rest.find("\n## ")
        text = before + section + (rest[after + 1:] if after >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


if __name__ == "__main__":
    main()
