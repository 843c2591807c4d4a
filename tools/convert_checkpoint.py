"""Hand checkpoints over (consolidate, to-hf, to-openclip, from-hf, from-openclip): a shim for ``mmpretrain-convert``
(mmpretrain/convert/cli.py).

Kept so that commands written for a checkout go on working; ``--help`` lists the subcommands and flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without install

from mmpretrain.convert.cli import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main(argv, prog="convert_checkpoint.py")


if __name__ == "__main__":
    sys.exit(main())
