#!/usr/bin/env python
"""Thin wrapper: `python scripts/table.py --help` (same as `dreamer-tf table`)."""
import sys

from dreamer_tf.study.table import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
