"""The shipped logrotate/web-ipt-d, run by the real `logrotate -f` against a daemon under load:
logging goes on in the new file and no audit line is lost, with no signal and no copytruncate.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon

SHIPPED = Path(__file__).resolve().parent.parent / "logrotate" / "web-ipt-d"
LOGROTATE = shutil.which("logrotate")
PATH_LINE = re.compile(r"^(\S+)\s*\{\s*$", re.M)
SU_LINE = re.compile(r"^(\s*)su\s+\S+\s+\S+\s*$", re.M)


def directives(text: str) -> list[str]:
    """The directive names inside the shipped file's block, comments dropped."""
    body = text.split("{", 1)[1].rsplit("}", 1)[0]
    lines = (line.split("#", 1)[0].strip() for line in body.splitlines())
    return [line.split()[0] for line in lines if line]


def test_the_shipped_config_needs_no_signal_and_no_copytruncate():
    text = SHIPPED.read_text()
    assert PATH_LINE.findall(text) == ["/var/log/web-ipt-d/web-ipt-d.log"]
    found = directives(text)
    for unwanted in ("copytruncate", "postrotate", "prerotate", "firstaction", "lastaction", "create"):
        assert unwanted not in found
    # The daemon makes the new file; a line written while the file is moved lands in .1,
    # which therefore must not be compressed in the same run.
    assert "nocreate" in found
    assert "compress" not in found or "delaycompress" in found


def private_config(log: Path) -> str:
    """The shipped file with only its path (and `su` user, which does not exist here) rewritten.

    Debian's /etc/logrotate.conf sets `create` globally before including logrotate.d; that is
    repeated here so the shipped file is tested in the context it is installed into.
    """
    text = SHIPPED.read_text()
    text, n = PATH_LINE.subn(f"{log} {{", text)
    assert n == 1
    text, n = SU_LINE.subn(r"\1su root root", text)
    assert n == 1
    return "create\n" + text


def rotate(workdir: Path, config: Path) -> None:
    assert LOGROTATE is not None
    result = subprocess.run([LOGROTATE, "-f", "-s", str(workdir / "logrotate.state"), str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result


def read_log(path: Path) -> list[str]:
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode().splitlines()
    return path.read_text().splitlines()


def audited(lines: list[str], network: str) -> int:
    return sum(1 for line in lines if "action=block" in line and f"network={network} " in line)


class Load:
    """Blocks a new address per request, one after another, from a thread, until stopped."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.acked: list[str] = []
        self.failures: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            address = f"2001:db8:ffff::{n:x}"
            try:
                reply = self.daemon.request("PUT", f"/chain/f2b-web/ipv6/{address}")
            except Exception as exc:  # reported by the test, not lost in a thread
                self.failures.append(exc)
                return
            if reply.status != 201:
                self.failures.append(reply)
                return
            self.acked.append(f"{address}/128")

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count and not self.failures:
            assert time.monotonic() < deadline, f"only {len(self.acked)} of {count} requests in {timeout}s"
            time.sleep(0.01)
        assert not self.failures, self.failures

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive() and not self.failures, self.failures
        return self.acked


@pytest.mark.root
def test_rotation_under_load_loses_nothing(running, workdir):
    d = running
    log = workdir / "web-ipt-d.log"
    config = workdir / "logrotate.conf"
    config.write_text(private_config(log))
    config.chmod(0o644)  # logrotate refuses a config that others may write

    load = Load(d)
    try:
        load.wait_for(20)
        rotate(workdir, config)  # web-ipt-d.log -> .1
        load.wait_for(len(load.acked) + 20)
        rotate(workdir, config)  # .1 -> .2.gz (delaycompress), web-ipt-d.log -> .1
        load.wait_for(len(load.acked) + 20)
    finally:
        acked = load.stop()

    rotated = [workdir / "web-ipt-d.log.1", workdir / "web-ipt-d.log.2.gz"]
    assert all(p.exists() for p in rotated)
    assert not (workdir / "web-ipt-d.log.1.gz").exists()
    assert list(workdir.glob("*.backup")) == []

    # Logging goes on in the file that now has the name, without a signal.
    final = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.77")
    assert final.status == 201
    assert audited(read_log(log), "203.0.113.77/32") == 1

    # Every acknowledged block has exactly one audit line, in one of the three files.
    everything = read_log(log) + [line for p in rotated for line in read_log(p)]
    missing = [n for n in acked if audited(everything, n) != 1]
    assert missing == [], f"{len(missing)} of {len(acked)} audit lines missing or doubled"
    # Each file got some of them: the daemon followed both renames.
    for path in [log, *rotated]:
        assert any(audited(read_log(path), n) for n in acked), path
    assert "Logging error" not in d.stderr()
