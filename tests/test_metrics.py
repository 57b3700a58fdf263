"""GET /metrics against the real daemon: only for users with `metrics: true`, in Prometheus' text format that
promtool accepts, and its figures follow what happened: requests by route and status, entries per chain and backend,
blocks added, removed and expired, failed logins and throttling, the worker and the connection slots. Label values a
client chooses are bounded."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.harness import PASSWORDS
from webiptd.metrics import Metrics

pytestmark = pytest.mark.root


def get(d: Daemon, path: str, user: str = "scraper") -> Any:
    """A request as `user`; the scraper has the reader's password."""
    return d.request("GET", path, user=user, password=PASSWORDS["reader"] if user == "scraper" else None)


def scrape(d: Daemon) -> dict[str, float]:
    r = get(d, "/metrics")
    assert r.status == 200, r
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers
    return parse(r.raw.decode())


def parse(text: str) -> dict[str, float]:
    """{'name{labels}': value} of every sample line."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture
def metered(daemon: Daemon) -> Daemon:
    daemon.config["users"]["scraper"] = {"password_hash": daemon.config["users"]["reader"]["password_hash"],
                                         "chains": [], "metrics": True}
    daemon.config["limits"]["auth_failures"] = 3
    daemon.start()
    return daemon


@pytest.mark.backends
def test_a_scrape_counts_what_happened_and_promtool_accepts_it(metered: Daemon) -> None:
    d = metered
    for i in range(3):
        assert d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.{i + 1}").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=22&timeout=1").status == 201
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.1").status == 200
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.1").status == 201
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.77").status == 404
    time.sleep(1.5)  # the 1 s block expires
    assert d.request("GET", "/chain/f2b-web").status == 200  # and its expiry has run by the time this is answered
    r = get(d, "/metrics")
    assert r.status == 200, r
    s = parse(r.raw.decode())
    assert s['webiptd_requests_total{method="PUT",route="block",status="201"}'] == 5
    assert s['webiptd_requests_total{method="GET",route="lookup",status="404"}'] == 1
    backend = d.backend
    assert s[f'webiptd_entries{{backend="{backend}",chain="f2b-web"}}'] == 2
    assert s[f'webiptd_entries{{backend="{backend}",chain="f2b-ssh"}}'] == 1
    assert s[f'webiptd_entries{{backend="{backend}",chain="admin-list"}}'] == 0
    assert s['webiptd_blocks_added_total{chain="f2b-web"}'] == 4
    assert s['webiptd_blocks_removed_total{chain="f2b-web"}'] == 1
    assert s['webiptd_blocks_expired_total{chain="f2b-web"}'] == 1
    assert s["webiptd_reconciles_total"] >= 1
    assert s['webiptd_request_duration_seconds_count{route="block"}'] == 5
    assert s["webiptd_batch_size_commands_count"] >= 6 and s["webiptd_commit_duration_seconds_count"] >= 6
    assert s["webiptd_worker_queue_depth"] == 0 and s["webiptd_worker_heartbeat_age_seconds"] < 5
    assert s['webiptd_connection_slots{pool="reserved"}'] >= 1  # this very request, from loopback
    # promtool (Debian's prometheus package) checks the exposition format and the naming conventions.
    checked = subprocess.run(["promtool", "check", "metrics"], input=r.raw, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_only_users_with_metrics_true_may_scrape(metered: Daemon) -> None:
    d = metered
    assert d.request("GET", "/metrics", user=None).status == 401
    r = d.request("GET", "/metrics", user="admin")
    assert r.status == 403 and r.json["error"] == "forbidden" and "metrics: true" in r.json["message"]
    assert get(d, "/metrics?x=1").status == 400
    assert d.request("HEAD", "/metrics", user="scraper", password=PASSWORDS["reader"]).status == 200
    # The scraper's user has no chains: it can read the metrics and nothing else.
    assert get(d, "/chain/f2b-web").status == 403


def test_failed_logins_and_throttling_are_counted(metered: Daemon) -> None:
    d = metered
    # From ::1, so that the scrape from 127.0.0.1 is not throttled with them.
    for _ in range(3):
        assert d.request("GET", "/chains", user="admin", password="wrong", conn=d.connection("::1")).status == 401
    assert d.request("GET", "/chains", user="admin", conn=d.connection("::1")).status == 429
    s = scrape(d)
    assert s["webiptd_auth_failures_total"] == 3 and s["webiptd_throttled_requests_total"] == 1


def test_label_values_a_client_chooses_stay_bounded(metered: Daemon) -> None:
    d = metered
    for method in ("BREW", "PROPFIND", "XYZZY", "PATCH"):
        assert d.request(method, "/chains").status == 405
    for i in range(20):
        assert d.request("GET", f"/no-such-route-{i}").status == 404
    s = scrape(d)
    methods = {re.search(r'method="([^"]*)"', k).group(1) for k in s if k.startswith("webiptd_requests_total")}
    routes = {re.search(r'route="([^"]*)"', k).group(1) for k in s if k.startswith("webiptd_requests_total")}
    assert methods <= {"GET", "HEAD", "PUT", "DELETE", "POST", "other"}, methods
    assert routes <= {"none", "health", "version", "chains", "metrics", "list", "bulk", "lookup", "block",
                      "unblock", "chain"}, routes
    assert s['webiptd_requests_total{method="other",route="chains",status="405"}'] == 4
    assert s['webiptd_requests_total{method="GET",route="none",status="404"}'] == 20


def test_a_scrape_does_not_grow_with_the_entries() -> None:
    """The states come from counts kept up to date, not from the entries: the collector is handed counts only."""
    m = Metrics()
    seen: list[int] = []

    def states():  # type: ignore[no-untyped-def]
        from webiptd.metrics import states as make
        seen.append(1)
        return make({"f2b-web": 1_000_000}, {"f2b-web": "ipset"}, 0, 0.1, {})

    m.watch(states)
    text = m.render().decode()
    assert 'webiptd_entries{backend="ipset",chain="f2b-web"} 1e+06' in text and seen == [1]
