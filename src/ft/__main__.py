"""`python -m ft ...`: the same as the `ft` script."""

import sys

from ft.cli import main

sys.exit(main())
