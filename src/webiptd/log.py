"""Logging set-up, done once here: everything to log.file (WatchedFileHandler, so logrotate needs neither a
signal nor copytruncate), warnings, errors and audit lines to stderr; and the summary of what clients cause."""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from webiptd.config import Log

ROOT = "webiptd"
AUDIT = "webiptd.audit"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_deferring = threading.local()
# The handlers setup() installed, each with whether its lines carry the time: while they are the `webiptd` logger's
# handlers, audit() writes their lines itself (see there).
_installed: list[tuple[logging.Handler, bool]] = []


class _StderrFilter(logging.Filter):
    """The journal gets warnings, errors and the audit trail; the file gets everything."""

    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        return self.everything or record.levelno >= logging.WARNING or record.name == AUDIT


class _Formatter(logging.Formatter):
    """The stdlib's format; the date part is formatted once a second, not once a record (strftime is ~3 µs)."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(created))
            self._second = second
        return "%s,%03d" % (self._text, msecs)  # the stdlib's default_msec_format


class _FlushOncePerBatch:
    """A handler mix-in: inside `batch()`, the thread's records are written to the stream's buffer and
    flushed when the batch ends; everywhere else each record is flushed as it is written."""

    def flush(self) -> None:
        if not getattr(_deferring, "active", False):
            super().flush()  # type: ignore[misc]


class _StreamHandler(_FlushOncePerBatch, logging.StreamHandler):
    pass


class _FileHandler(_FlushOncePerBatch, logging.handlers.WatchedFileHandler):
    """Inside `batch()`, the file is checked for a rotation (a stat(2)) once, at the batch's first record, not at
    each: the lines of one batch go to one file either way."""

    def reopenIfNeeded(self) -> None:
        if getattr(_deferring, "active", False):
            if getattr(_deferring, "checked", False):
                return
            _deferring.checked = True
        super().reopenIfNeeded()


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Write this thread's records as usual, and flush every handler once at the end.

    Measured with the worker and 16 changes a batch: two write(2)s an audit line (file and journal)
    were about a quarter of the worker's time (bench/README.md).
    """
    _deferring.active = True
    _deferring.checked = False
    try:
        yield
    finally:
        _deferring.active = False
        for handler in logging.getLogger(ROOT).handlers:
            handler.flush()


def _stderr_stream() -> io.TextIOBase:
    # Python line-buffers stderr (one write(2) a line); a block-buffered writer of our own on the same
    # descriptor lets a batch leave in one write. Each record outside `batch()` is still flushed at once.
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return sys.stderr  # type: ignore[return-value]  # no descriptor (say under a test harness): as is
    sys.stderr.flush()
    return open(fd, "w", encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace",
                closefd=False, buffering=1 << 16)


def setup(log: Log, *, verbose_stderr: bool = False) -> None:
    """(Re)configure the `webiptd` loggers. Safe to call again on reload."""
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.flush()
        handler.close()
    root.setLevel(getattr(logging, log.level))
    root.propagate = False
    stderr = _StreamHandler(_stderr_stream())
    # Under systemd the journal adds its own timestamp.
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    stderr.addFilter(_StderrFilter(verbose_stderr or log.file is None))
    root.addHandler(stderr)
    if log.file is not None:
        log.file.parent.mkdir(mode=0o750, exist_ok=True)
        handler = _FileHandler(log.file, encoding="utf-8")
        handler.setFormatter(_Formatter(FORMAT))
        root.addHandler(handler)
    # The audit trail is kept whatever the level, because it is the record of every change.
    logging.getLogger(AUDIT).setLevel(logging.INFO)
    _installed[:] = [(h, isinstance(h, _FileHandler)) for h in root.handlers]


def audit(fmt: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """One audit line (logger `webiptd.audit`, INFO) per row of %-arguments for `fmt`, as `info(fmt, *row)` writes.

    While setup()'s handlers are the only ones, the lines are formatted here, with one time for all, and each
    handler's stream gets them in one write: the same bytes as logging's, without a LogRecord, findCaller and a
    handler lock a line (bench/README.md). Any other set-up (a test's caplog, a handler added) gets the records.
    """
    logger = logging.getLogger(AUDIT)
    root = logging.getLogger(ROOT)
    handlers = root.handlers
    if (not _installed or len(handlers) != len(_installed)
            or any(h is not mine for h, (mine, _) in zip(handlers, _installed))
            or logger.handlers or logger.filters or root.filters or not logger.propagate or logger.disabled
            or root.disabled or not logger.isEnabledFor(logging.INFO)):
        for row in rows:
            logger.info(fmt, *row)
        return
    messages = [fmt % row for row in rows]
    if not messages:
        return
    plain = "".join(f"INFO {AUDIT}: {m}\n" for m in messages)
    timed = None
    for handler, with_time in _installed:
        if handler.level > logging.INFO:
            continue
        if with_time:
            if timed is None:
                now = time.time()
                assert isinstance(handler.formatter, _Formatter)
                stamp = handler.formatter.stamp(now, int((now - int(now)) * 1000))  # as a LogRecord's msecs
                timed = "".join(f"{stamp} INFO {AUDIT}: {m}\n" for m in messages)
            _write(handler, timed)
        else:
            _write(handler, plain)


def _write(handler: logging.Handler, text: str) -> None:
    """What StreamHandler.emit does for a record, for many lines at once."""
    handler.acquire()
    try:
        if isinstance(handler, _FileHandler):
            handler.reopenIfNeeded()
            if handler.stream is None:
                handler.stream = handler._open()
        assert isinstance(handler, logging.StreamHandler)
        handler.stream.write(text)
        handler.flush()
    except Exception:
        handler.handleError(logging.makeLogRecord({"name": AUDIT, "levelno": logging.INFO, "levelname": "INFO",
                                                   "msg": "%s", "args": (text,)}))
    finally:
        handler.release()


class Reason(NamedTuple):
    """What a client caused, as a warning: `one` for the first event, `many` (with {n}) for a period's count."""

    one: str
    many: str


class Summarized:
    """Warnings that clients cause, written at most once a period per (reason, source), with a count.

    The first event of a (reason, source) is written at once, so an attack shows when it starts; later
    ones are counted and written as one line when the period is over ("closed 412 connections from
    198.51.100.7 over the per-client limit in the last 60 s"). At most `max_sources` sources are named at
    a time; events from any others are counted per reason under "other sources". So however long an
    attack lasts and from however many addresses, the log grows by a bounded number of lines a period.
    `flush()` writes what is due; the server calls it a few times a second.
    """

    def __init__(self, logger: logging.Logger, period: float = 60.0, max_sources: int = 32,
                 clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._period = period
        self._max_sources = max_sources
        self._clock = clock
        self._lock = threading.Lock()
        # (reason, source) -> [start of the current period, events counted since then]
        self._named: dict[tuple[Reason, str], list[float]] = {}
        self._others: dict[Reason, list[float]] = {}

    def event(self, reason: Reason, source: str) -> None:
        now = self._clock()
        with self._lock:
            entry = self._named.get((reason, source))
            if entry is not None:
                entry[1] += 1
                return
            if len(self._named) < self._max_sources:
                self._named[(reason, source)] = [now, 0]
                first = True
            else:
                other = self._others.setdefault(reason, [now, 0])
                other[1] += 1
                first = False
        if first:
            self._logger.warning("%s", reason.one.format(source=source))

    def flush(self) -> None:
        now = self._clock()
        lines = []
        with self._lock:
            for key, entry in list(self._named.items()):
                if now - entry[0] < self._period:
                    continue
                if entry[1]:
                    lines.append(key[0].many.format(n=int(entry[1]), source=key[1]))
                    entry[0], entry[1] = now, 0
                else:
                    del self._named[key]  # a quiet period: the next event is written at once again
            for reason, entry in list(self._others.items()):
                if now - entry[0] >= self._period:
                    lines.append(reason.many.format(n=int(entry[1]), source="other sources"))
                    del self._others[reason]
        for line in lines:
            self._logger.warning("%s in the last %d s", line, self._period)
