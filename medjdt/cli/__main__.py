"""``python -m medjdt.cli``: the ``medjdt`` command."""

import sys

from medjdt.cli import main

sys.exit(main())
