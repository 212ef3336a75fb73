"""``python -m tidings.broker [serve] [flags]`` runs the daemon, like ``tidings serve``."""

from __future__ import annotations

import sys

from tidings.broker.serve import main

if __name__ == "__main__":
    sys.exit(main())
