"""modelserverd: a per-host supervisor for SGLang model servers.

This package is imported by the client too (for the shared config loader), so
its ``__init__`` must stay free of heavy imports.
"""

__version__ = "0.1.0"
