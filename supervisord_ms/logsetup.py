"""Daemon log lines on stderr, in a form journald keeps.

Under systemd (``JOURNAL_STREAM`` set) each line starts with a syslog priority
prefix ``<3>``..``<7>`` so ``journalctl -p warning`` works and no timestamp is
added (the journal has one). On a terminal, levels are coloured; otherwise plain.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
# The daemon's logger tree, and the package's import path as a safety net.
LOGGER_TREES = ("modelserverd", "supervisord_ms")
_COLOUR = {logging.ERROR: "31", logging.WARNING: "33", logging.CRITICAL: "31;1"}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


class ConsoleFormatter(logging.Formatter):
    def __init__(self, colour: bool):
        super().__init__("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        code = _COLOUR.get(record.levelno)
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(ConsoleFormatter(colour=stream.isatty()))
    # One tree: every module logs under "modelserverd" ("modelserverd.store",
    # "modelserverd.api", ...). A module logger named after its import path
    # ("supervisord_ms.x") is sent to the same handler, so no line of the daemon
    # ever reaches stderr without its priority prefix, or not at all.
    for name in LOGGER_TREES:
        root = logging.getLogger(name)
        root.handlers[:] = [handler]
        root.setLevel(level)
        root.propagate = False
