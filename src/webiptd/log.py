"""Logging set-up, done once here: everything to log.file, warnings, errors and audit lines to stderr.

log.file uses WatchedFileHandler, so logrotate needs neither a signal nor copytruncate.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys

from webiptd.config import Log

ROOT = "webiptd"
AUDIT = "webiptd.audit"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrFilter(logging.Filter):
    """The journal gets warnings, errors and the audit trail; the file gets everything."""

    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        return self.everything or record.levelno >= logging.WARNING or record.name == AUDIT


def setup(log: Log, *, verbose_stderr: bool = False) -> None:
    """(Re)configure the `webiptd` loggers. Safe to call again on reload."""
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(getattr(logging, log.level))
    root.propagate = False
    stderr = logging.StreamHandler(sys.stderr)
    # Under systemd the journal adds its own timestamp.
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    stderr.addFilter(_StderrFilter(verbose_stderr or log.file is None))
    root.addHandler(stderr)
    if log.file is not None:
        log.file.parent.mkdir(mode=0o750, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(log.file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    # The audit trail is kept whatever the level, because it is the record of every change.
    logging.getLogger(AUDIT).setLevel(logging.INFO)
