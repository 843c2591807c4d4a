"""`python -m mmpretrain.evaluate`: the older spelling of `python -m mmpretrain.eval`, kept for existing commands.

The evaluation code lives in the mmpretrain.eval package (CHANGELOG.md maps the old names to the new ones).
"""

import sys

from mmpretrain.eval.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
