"""``python -m scherzer.cli`` (how the client starts a daemon process)."""

import sys

from scherzer.cli import main

sys.exit(main())
