"""`python -m mmpretrain.eval` (see mmpretrain.eval.cli)."""

import sys

from mmpretrain.eval.cli import main

sys.exit(main())
