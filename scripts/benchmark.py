#!/usr/bin/env python
"""Thin wrapper: `python scripts/benchmark.py --help` (same as `dreamer-tf benchmark`)."""
import sys

from dreamer_tf.study.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
