"""Exceptions of the daemon package.

    ModelServerdError          base: anything the daemon reports to an operator
    ├── ConfigError            (config.py) a config file that cannot be used
    ├── StoreError             (store.py) state database missing, corrupt or read-only
    ├── GpuError               (gpus.py) NVML or the file: GPU view cannot be read
    └── LaunchError            (launcher.py) a server process could not be started

Each message says what failed, for which server or file, and what to do.
"""

from __future__ import annotations


class ModelServerdError(Exception):
    """Base of every error the daemon reports; the CLI prints its message."""
