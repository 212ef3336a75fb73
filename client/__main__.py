"""``python -m tidings`` is the ``tidings`` command (``python -m tidings serve`` runs the broker)."""

from __future__ import annotations

import sys

from tidings.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
