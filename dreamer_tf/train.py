"""`python -m dreamer_tf.train ARGS` is `dreamer-tf train ARGS` (the loop lives in dreamer_tf.run.loop)."""
from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from dreamer_tf.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
