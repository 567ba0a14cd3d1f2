"""``python -m sdsx``: the same command line as the ``sdsx`` console script."""

import sys

from sdsx.cli import main

sys.exit(main())
