"""What `GET /metrics` shows, in Prometheus' text format, made by the official client library (prometheus_client).

Counters and histograms are updated where things happen (a request, a batch, a failed login); what is a state rather
than an event (entries per chain, the queue, connection slots, the worker's heartbeat) is read when scraped, from
counts the worker and admission keep up to date, so a scrape costs the same at 100k entries as at none.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# generate_latest() writes the classic text format, 0.0.4, which every Prometheus 2.x reads; prometheus_client 0.26
# names it version=1.0.0, which Debian 12's Prometheus 2.42 does not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The label values a client can choose are limited to these, so that no client can make series without end.
METHODS = ("GET", "HEAD", "PUT", "DELETE", "POST")
# Request latencies, from a cached PUT (about 0.3 ms) to a bulk POST of 10,000 items (seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384)


class Metrics:
    """The metrics of one daemon, in a registry of its own (not prometheus_client's global one)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.requests = Counter("webiptd_requests", "Requests answered, by route, method and status.",
                                ("route", "method", "status"), registry=r)
        self.request_seconds = Histogram("webiptd_request_duration_seconds",
                                         "Time from a request's parsed head to its response, by route.",
                                         ("route",), buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("webiptd_batch_size_commands",
                                    "Commands the firewall worker took in one batch (group commit).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.commit_seconds = Histogram("webiptd_commit_duration_seconds",
                                        "Time to commit a batch's changes: the state store, then the kernel.",
                                        buckets=COMMIT_BUCKETS, registry=r)
        self.blocks_added = Counter("webiptd_blocks_added", "Entries added to the kernel, by chain.", ("chain",),
                                    registry=r)
        self.blocks_removed = Counter("webiptd_blocks_removed", "Entries removed by a request (their last claim "
                                      "released), by chain.", ("chain",), registry=r)
        self.blocks_expired = Counter("webiptd_blocks_expired", "Entries removed at their expiry, by chain.",
                                      ("chain",), registry=r)
        self.reconciles = Counter("webiptd_reconciles", "Times the kernel was brought in line with the state store "
                                  "(start, reload, after a failed batch or a kernel-check repair).", registry=r)
        self.kernel_repairs = Counter("webiptd_kernel_check_repairs", "Times the kernel check found blocks taken out "
                                      "of the kernel behind the daemon's back and put them back.", registry=r)
        self.batch_failures = Counter("webiptd_batch_failures", "Batches the store or the kernel refused (their "
                                      "requests got 503 or 507; nothing changed).", registry=r)
        self.auth_failures = Counter("webiptd_auth_failures", "Failed logins: unknown user, wrong password or bad "
                                     "credentials.", registry=r)
        self.throttled = Counter("webiptd_throttled_requests", "Requests refused with 429 while their client was "
                                 "throttled for failed logins.", registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # the labels' lookup costs more than the update: done once per label set
            children = (self.requests.labels(route, method if method in METHODS else "other", str(status)),
                        self.request_seconds.labels(route))
            if len(self._children) < 4096:  # bounded: method is any word a client sends ("other" in the label)
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Read the states `collect` yields at every scrape."""
        self.registry.register(_Callback(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families depend on the config; nothing to check them against at registration


def states(entries: Mapping[str, int], backends: Mapping[str, str], queue_depth: int, heartbeat_age: float,
           slots: Mapping[str, int]) -> Iterator[Metric]:
    """The gauges of a scrape: `entries` per chain (with its backend from `backends`), the worker's queue and
    heartbeat, and admission's slot counts (admission.Admission.counts())."""
    family = GaugeMetricFamily("webiptd_entries", "Entries (blocks, or allows in an allow chain) per chain.",
                               labels=("chain", "backend"))
    for chain in sorted(set(entries) | set(backends)):
        family.add_metric((chain, backends.get(chain, "unknown")), entries.get(chain, 0))
    yield family
    yield GaugeMetricFamily("webiptd_worker_queue_depth", "Commands waiting for the firewall worker.",
                            value=queue_depth)
    yield GaugeMetricFamily("webiptd_worker_heartbeat_age_seconds", "Seconds since the firewall worker last went "
                            "round its loop; it goes round at least once a second while healthy.",
                            value=heartbeat_age)
    slot_family = GaugeMetricFamily("webiptd_connection_slots", "Connection slots in use, by pool (reserved: the "
                                    "trusted clients' own).", labels=("pool",))
    slot_family.add_metric(("reserved",), slots.get("reserved", 0))
    slot_family.add_metric(("general",), slots.get("general", 0))
    yield slot_family
    ended = CounterMetricFamily("webiptd_connections_ended_early", "Connections admission ended: refused at once "
                                "(pool or per-client limit full), evicted for a newcomer, or past a phase's deadline.",
                                labels=("reason",))
    for reason in ("refused", "evicted", "expired"):
        ended.add_metric((reason,), slots.get(reason, 0))
    yield ended
