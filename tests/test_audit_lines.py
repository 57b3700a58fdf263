"""log.audit(): a batch's audit lines written straight to setup()'s handlers must be the lines logging writes for
the same rows, and anything but setup()'s own handlers gets logging's records."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from webiptd import log
from webiptd.config import Log
from webiptd.firewall.worker import AUDIT_LINE, BULK_AUDIT_LINE

ROWS = [("admin", "198.51.100.7", "block", "f2b-web", "203.0.113.7/32", "admin/sshd", "600", "created", "all"),
        ("f2b", "2001:db8::7", "unblock", "f2b-ssh", "2001:db8:ffff::/48", "*", "-", "deleted", "tcp/22,80"),
        ("ü-user", "198.51.100.8", "expire", "x", "203.0.113.8/32", "-", "-", "released", "udp")]
BULK = [("feed", "198.51.100.9", "f2b-web", 100_000, "198.18.0.0/32", "198.19.255.255/32", "feed", "permanent",
         99_999, 1, "all")]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_audit_writes_what_logging_writes(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    direct, records = tmp_path / "direct.log", tmp_path / "records.log"
    made: list[str] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record.name)
        return record

    try:
        log.setup(Log(direct, "WARNING"))  # the audit trail is kept whatever the level
        logging.setLogRecordFactory(counting)
        log.audit(AUDIT_LINE, ROWS)
        log.audit(BULK_AUDIT_LINE, BULK)
        logging.setLogRecordFactory(factory)
        assert made == []  # written straight to the handlers' streams
        via_audit = capfd.readouterr().err
        log.setup(Log(records, "WARNING"))
        for row in ROWS:
            logging.getLogger(log.AUDIT).info(AUDIT_LINE, *row)
        for row in BULK:
            logging.getLogger(log.AUDIT).info(BULK_AUDIT_LINE, *row)
        logging.getLogger(log.ROOT).handlers[0].flush()
        via_records = capfd.readouterr().err
    finally:
        logging.setLogRecordFactory(factory)
        with capfd.disabled():  # the handlers of the tests after this one write to the real stderr, not capfd's file
            log.setup(Log(None, "INFO"))
    assert len(_lines(direct)) == 4 and all(STAMP.match(line) for line in _lines(direct))
    assert [STAMP.sub("", line) for line in _lines(direct)] == [STAMP.sub("", line) for line in _lines(records)]
    assert via_audit == via_records and via_audit.count("INFO webiptd.audit: ") == 4  # the journal's copy


def test_audit_gives_records_to_any_other_handler(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=log.AUDIT):
        log.audit(AUDIT_LINE, ROWS[:2])
    assert [r.getMessage() for r in caplog.records if r.name == log.AUDIT] == [AUDIT_LINE % row for row in ROWS[:2]]
