"""``python -m mmpretrain.convert COMMAND SRC OUT``: the converter's CLI (mmpretrain/convert/cli.py)."""

import sys

from mmpretrain.convert.cli import main

sys.exit(main(prog="python -m mmpretrain.convert"))
