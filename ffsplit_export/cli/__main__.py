"""``python -m ffsplit_export.cli``."""

import sys

from . import main

sys.exit(main())
