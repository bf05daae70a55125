"""``python -m autoguide_fast.cli``: the ``autoguide`` command."""

import sys

from . import main

sys.exit(main())
