"""Check and describe WebDataset shards: a shim for ``mmpretrain-inspect-shards`` (mmpretrain/tools/inspect_shards.py).

Kept so that commands written for a checkout go on working; ``--help`` lists the arguments.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without install

from mmpretrain.tools.inspect_shards import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main(argv, prog="inspect_shards.py")


if __name__ == "__main__":
    sys.exit(main())
