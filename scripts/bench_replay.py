"""Replay memory/throughput benchmark: RSS vs replay size for the "frames" and "cache" stores.

Fills a replay directory with synthetic 500-step episodes (64x64x3 images that compress ~2-3x,
like rendered frames, not to nothing) up to each size, and for each size and store measures in
a fresh child process: load time, RSS/RssAnon after loading, after sampling N batches of 50x50,
and the sampling throughput. Writes results/replay_memory.json and results/replay_memory.md.

  python scripts/bench_replay.py [--sizes 50000 200000 500000] [--dir /tmp/replay_bench]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EPISODE_STEPS = 500


def status() -> dict:
    """Memory lines of /proc/self/status in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def synthetic_episode(rng: np.random.Generator, steps: int = EPISODE_STEPS) -> dict:
    """Blocky low-res scene upsampled 4x with 15% noisy pixels: ~3x zlib ratio, like rendered frames."""
    n = steps + 1
    base = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)
    noisy = rng.random(image.shape[:3]) < 0.15
    image[noisy] += rng.integers(0, 256, (int(noisy.sum()), 3), dtype=np.uint8)
    action = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
    action[0] = 0
    reward = rng.uniform(0, 1, n).astype(np.float32)
    reward[0] = 0
    return {"image": image, "action": action, "reward": reward,
            "discount": np.ones(n, np.float32), "state": rng.normal(size=(n, 24)).astype(np.float32)}


def du(path: Path, pattern: str) -> float:
    return round(sum(p.stat().st_size for p in path.glob(pattern)) / 2**30, 3)


def child(args) -> None:
    from dreamer_tf.data import Replay

    before = status()
    start = time.perf_counter()
    replay = Replay(args.dir, store=args.store, cache=args.cache, seed=0)
    load_s = time.perf_counter() - start
    loaded = status()
    replay.sample(50, 50)  # warm-up
    start = time.perf_counter()
    for _ in range(args.batches):
        replay.sample(50, 50)
    elapsed = time.perf_counter() - start
    sampled = status()
    print(json.dumps({
        "store": args.store, "cache": args.cache if args.store == "cache" else None,
        "frames": replay.num_steps + replay.num_episodes, "episodes": replay.num_episodes,
        "load_s": round(load_s, 2), "batches": args.batches,
        "batches_per_s": round(args.batches / elapsed, 2),
        "ms_per_sequence": round(1000 * elapsed / (args.batches * 50), 3),
        "cached_frames": replay.cached_frames,
        "loadavg_1min": round(os.getloadavg()[0], 2),  # the machine is shared: context for the speed
        "rss_start_mib": before, "rss_loaded_mib": loaded, "rss_sampled_mib": sampled,
    }))


def fill(directory: Path, frames: int, rng: np.random.Generator) -> None:
    from dreamer_tf.data import Replay

    replay = Replay(directory, store="frames")
    while replay.num_steps + replay.num_episodes < frames:
        replay.add(synthetic_episode(rng))


def summary(results: list[dict]) -> list[str]:
    """Conclusions computed from the rows (so a re-run keeps text and numbers consistent)."""
    frames = [r for r in results if r["store"] == "frames"]
    cache = [r for r in results if r["store"] == "cache"]
    if not frames:
        return []
    big = max(r["frames"] for r in results)
    lines = ["", "## Reading", ""]
    anon = ", ".join(f"{r['rss_sampled_mib']['RssAnon']:.0f}" for r in frames)
    sizes = ", ".join(f"{r['frames'] // 1000}k" for r in frames)
    lines.append(
        f"- `frames` store: RssAnon after sampling is {anon} MiB for {sizes} frames. It grows only "
        f"with the small per-step arrays (action, reward, discount, state: ~{_per_step_bytes(frames)} "
        f"bytes/step here), never with the images: those are read with `preadv` from uncompressed "
        f"files through the kernel page cache, which is shared and reclaimable and not in the RSS.")
    for c in sorted({r["cache"] for r in cache}):
        rows = [r for r in cache if r["cache"] == c]
        anon = ", ".join(f"{r['rss_sampled_mib']['RssAnon']:.0f}" for r in rows)
        lines.append(
            f"- `cache` store with cache={c}: RssAnon after sampling is {anon} MiB for the same sizes: "
            f"bounded by the cache ({c} frames x 12 KiB = {c * 12288 / 2**20:.0f} MiB) plus the small "
            f"arrays, independent of the replay size once the replay is larger than the cache.")
    top_f = max((r for r in frames if r["frames"] == big), key=lambda r: r["batches_per_s"], default=None)
    top_c = [r for r in cache if r["frames"] == big]
    if top_f and top_c:
        best_c = max(top_c, key=lambda r: r["batches_per_s"])
        lines.append(
            f"- Throughput at {big} frames: `frames` {top_f['batches_per_s']} batches/s of 50x50 "
            f"({top_f['ms_per_sequence']} ms/sequence) vs `cache` at most {best_c['batches_per_s']} batches/s "
            f"({best_c['ms_per_sequence']} ms/sequence): a cache miss decompresses a whole 501-frame "
            f"episode to use 50 frames, and with uniform sampling the hit rate is only ~cache/replay size.")
    lines += [
        "- Choice: `frames` is the default (`Replay(store=\"frames\")`): constant anonymous memory and "
        "one to two orders of magnitude faster sampling (a 50x50 batch in 3-15 ms, well under a "
        "train step, vs ~1 s for the cache once the replay outgrows it). Its price is disk: the uncompressed copy (`disk frames GiB`, 12 KiB per frame, ~30 GB "
        "for a 5e6-step paper run) next to the compressed `.npz` files. `store=\"cache\"` needs no "
        "extra disk and is the choice when disk is scarce and the train step is slow anyway (CPU).",
        "- Caveats: the frame files had just been written, so reads were served mostly from the page "
        "cache; when frame files exceed free RAM (5.7 GiB at 500k and 11.5 GiB at 1M frames here, next to "
        "other jobs' memory) part of the reads go to disk, one ~600 KB read per sequence, which is "
        "SSD-bound but still far cheaper than decompressing an episode. The machine was shared with other "
        "benchmarks (`load avg` column, 1-minute load on 2 cores, recorded from the 1M rows on), so "
        "absolute speeds are pessimistic and noisy; the frames-vs-cache ratio (60-300x) is the robust "
        "result. `cache` rows start cold: the 200k cache at 200k frames had not warmed up in 30 batches.",
    ]
    return lines


def _per_step_bytes(frames: list[dict]) -> int:
    if len(frames) < 2:
        return 0
    a, b = frames[0], frames[-1]
    grow = (b["rss_loaded_mib"]["RssAnon"] - a["rss_loaded_mib"]["RssAnon"]) * 2**20
    return int(round(grow / max(1, b["frames"] - a["frames"])))


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Replay memory and sampling throughput",
        "",
        f"Generated by `scripts/bench_replay.py` on {meta['date']} ({meta['machine']}). Synthetic "
        f"{EPISODE_STEPS}-step episodes of 64x64x3 uint8 images (blocky scene + 15% noisy pixels, zlib ~"
        f"{meta['compression']}x), action[6], reward, discount, state[24]. Each row is a fresh process "
        f"that constructs `Replay(dir, store=...)` over the filled directory (`load s`) and samples "
        f"batches of 50 sequences x 50 steps (`batches`, after one warm-up batch; the cache starts "
        f"cold). RSS columns are MiB from `/proc/self/status`; the process starts at ~17 MiB RssAnon.",
        "",
        "| frames | episodes | store | cache | load s | RSS loaded | RssAnon loaded | RSS after sampling "
        "| RssAnon after sampling | batches | batches/s | ms/sequence | load avg | disk npz GiB "
        "| disk frames GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['frames']} | {r['episodes']} | {r['store']} | {r['cache'] or '-'} | {r['load_s']} "
            f"| {r['rss_loaded_mib']['VmRSS']} | {r['rss_loaded_mib']['RssAnon']} "
            f"| {r['rss_sampled_mib']['VmRSS']} | {r['rss_sampled_mib']['RssAnon']} | {r['batches']} "
            f"| {r['batches_per_s']} | {r['ms_per_sequence']} | {r.get('loadavg_1min', '-')} "
            f"| {r['disk_npz_gib']} | {r['disk_frames_gib']} |")
    return "\n".join(lines + summary(results)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 500_000])
    parser.add_argument("--dir", default="/tmp/replay_bench")
    parser.add_argument("--caches", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--batches", type=int, default=300, help="batches per frames-store run")
    parser.add_argument("--cache-batches", type=int, default=30, help="batches per cache-store run")
    parser.add_argument("--keep", action="store_true", help="keep the filled directory")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results/replay_memory.md from results/replay_memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="frames", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=int, default=200_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.report_only:
        data = json.loads((ROOT / "results" / "replay_memory.json").read_text())
        (ROOT / "results" / "replay_memory.md").write_text(markdown(data["results"], data["meta"]))
        return

    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    rng = np.random.default_rng(0)
    sample_ep = synthetic_episode(np.random.default_rng(1))
    import io
    buf = io.BytesIO()
    np.savez_compressed(buf, image=sample_ep["image"])
    compression = round(sample_ep["image"].nbytes / buf.tell(), 2)
    results = []
    for size in sorted(args.sizes):
        start = time.perf_counter()
        fill(directory, size, rng)
        print(f"filled {size} frames in {time.perf_counter() - start:.0f}s", flush=True)
        os.sync()  # finish the writeback first: it would otherwise compete with the sampling reads
        runs = [("frames", 0, args.batches)] + [("cache", c, args.cache_batches) for c in args.caches]
        for store, cache, batches in runs:
            cmd = [sys.executable, __file__, "--child", "--dir", str(directory), "--store", store,
                   "--cache", str(cache or 200_000), "--batches", str(batches)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["disk_npz_gib"] = du(directory, "*.npz")
            row["disk_frames_gib"] = du(directory / "frames", "*.npy")
            results.append(row)
            print(json.dumps(row), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "compression": compression, "episode_steps": EPISODE_STEPS}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "replay_memory.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (ROOT / "results" / "replay_memory.md").write_text(markdown(results, meta))
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
