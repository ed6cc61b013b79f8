"""``python -m slmkit ...``: the ``slmkit`` command, where the console script is not on PATH."""

import sys

from slmkit.cli import main

sys.exit(main())
