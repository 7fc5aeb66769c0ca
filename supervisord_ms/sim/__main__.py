"""Entry point of ``python -m supervisord_ms.sim``."""

from __future__ import annotations

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
