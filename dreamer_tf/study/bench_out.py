"""Where `dreamer-tf bench` writes: `--out`, by default `bench_results/` in the current directory and
never the committed `results/` (run from a checkout, a plain `dreamer-tf bench` used to overwrite
results/bench.md without a word); checked before any timing, written atomically, and said."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from dreamer_tf.study.paths import check_not_file
from dreamer_tf.utils import atomic_write_text, make_dir

__all__ = ["DEFAULT_OUT", "check_out", "write_results", "rewrite_markdown"]

DEFAULT_OUT = Path("bench_results")  # the committed numbers are regenerated with --out results


def check_out(out: Path) -> None:
    """PathError (one line) when --out is a file or cannot be created or written."""
    make_dir(check_not_file(out, "--out"), "--out")


def write_results(out: Path, results: dict, markdown: Callable[[dict], str]) -> None:
    """OUT/bench.json and OUT/bench.md, each written whole or not at all; prints where."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "bench.md", markdown(results))
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}", flush=True)


def rewrite_markdown(out: Path, markdown: Callable[[dict], str]) -> None:
    """--markdown-only: OUT/bench.md again from OUT/bench.json; ValueError (one line) without one."""
    source = out / "bench.json"
    if not source.is_file():
        raise ValueError(f"--markdown-only: {source} does not exist (give the --out that holds bench.json)")
    try:
        results = json.loads(source.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"--markdown-only: {source} is not a bench.json ({e})") from None
    atomic_write_text(out / "bench.md", markdown(results))
    print(f"wrote {out / 'bench.md'}", flush=True)
