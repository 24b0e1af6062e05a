#!/usr/bin/env python
"""Thin wrapper: `python scripts/report.py --help` (same as `dreamer-tf report`)."""
import sys

from dreamer_tf.study.report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
