"""Plot the metrics.jsonl of one or more runs: a shim for ``mmpretrain-plot`` (mmpretrain/tools/plot_metrics.py).

Kept so that commands written for a checkout go on working; ``--help`` lists the arguments.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without install

from mmpretrain.tools.plot_metrics import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main(argv, prog="plot_metrics.py")


if __name__ == "__main__":
    sys.exit(main())
