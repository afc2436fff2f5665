"""`python -m scherzer` runs the `scherzer` command."""

import sys

from scherzer.cli import console_main

sys.exit(console_main())
