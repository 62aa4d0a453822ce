"""``python -m synthct.cli``: the same command line as ``synthct``."""

import sys

from synthct.cli import main

sys.exit(main())
