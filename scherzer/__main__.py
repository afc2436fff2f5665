"""`python -m scherzer` runs the `scherzer` command."""

import sys

from scherzer.cli import main

sys.exit(main())
