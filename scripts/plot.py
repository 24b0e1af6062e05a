#!/usr/bin/env python
"""Thin wrapper: `python scripts/plot.py --help` (same as `dreamer-tf plot`)."""
import sys

from dreamer_tf.study.plotting import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
