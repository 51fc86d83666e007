"""`python -m ft.cli ...`: the same as `ft ...` (and `python -m ft ...`)."""

import sys

from ft.cli import main

sys.exit(main())
