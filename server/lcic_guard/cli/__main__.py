"""``python -m lcic_guard.cli``."""

import sys

from lcic_guard.cli import main

sys.exit(main())
