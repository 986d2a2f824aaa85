"""`python -m braze ...`: see braze.cli."""

import sys

from braze.cli import main

sys.exit(main())
