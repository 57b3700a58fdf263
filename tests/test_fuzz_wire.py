"""The wire fuzz: thousands of seeded malformed and mutated requests (tests/fuzz_requests.py) against a live
daemon in a namespace of its own. Every answer is well-formed HTTP/1.1 with a JSON body and below 500, bad input
gets a 4xx, the daemon lives, its log holds no traceback and does not grow with the requests, and the kernel
holds nothing outside the managed chains and nothing that overlaps never_block.

WEBIPTD_FUZZ_CASES (10000) and WEBIPTD_FUZZ_SEED (a fixed one, so that CI runs the same cases each time;
"random" for a new one, printed) choose the cases.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import math
import os
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from tests.conftest import PASSWORDS, PORT, PKI, Daemon, module_daemon
from tests.fuzz_requests import Case, Generator, Profile, User

pytestmark = pytest.mark.root

CASES = int(os.environ.get("WEBIPTD_FUZZ_CASES", "10000"))
_SEED = os.environ.get("WEBIPTD_FUZZ_SEED") or "20261129"
SEED = random.SystemRandom().randrange(1 << 32) if _SEED == "random" else int(_SEED)
THREADS = 4
RUN_LIMIT = 300.0  # seconds: the run stops by itself and fails if it has not finished by then
READ_TIMEOUT = 15.0  # longer than worker_timeout, so a slow firewall is a 503 and not a silent connection
CONNECT_TIMEOUT = 5.0
ENOUGH = 500  # failed cases after which the run stops: the report has all it can use
MAIN = "127.0.0.1"
# Cases that may count as failed logins come from addresses of their own, so the throttle they trip never
# reaches the others (127.0.0.0/8 is loopback in the namespace, and in never_block).
POOL = tuple(f"127.0.2.{i}" for i in range(1, 65))
EXTRA_NEVER_BLOCK = ["198.19.255.0/24", "2001:db8:dead::/48"]  # inside the ranges the cases block from
KEEPALIVE_MAX = 8 * 1024  # larger cases go alone: the server may answer and close before reading them all

STATUS_RE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\t\x20-\x7e]*\r\n")
FIELD_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ([\t\x20-\x7e]*)\r\n")


def configure(config: dict[str, Any]) -> None:
    config["never_block"] = config["never_block"] + EXTRA_NEVER_BLOCK
    config["log"]["level"] = "INFO"  # DEBUG logs every request; the flood check counts what is left


@pytest.fixture(scope="module")
def fuzzed(pki: PKI, user_hashes: dict[str, str]) -> Iterator[Daemon]:
    with module_daemon(pki, user_hashes, configure=configure) as d:
        yield d


def profile_of(d: Daemon) -> Profile:
    users = []
    for name, user in d.config["users"].items():
        allow = [ipaddress.ip_network(n) for n in user.get("allow_from") or []]
        users.append(User(name, PASSWORDS[name], tuple(user["chains"]), bool(user.get("read_only")),
                          not allow or any(ipaddress.ip_address(MAIN) in n for n in allow)))
    users.sort(key=lambda u: (u.chains != ("*",) or u.read_only or not u.allowed_here, u.name))  # a writer first
    return Profile(tuple(users), tuple(d.config["chains"]), tuple(d.config["never_block"]))


# -- reading answers -----------------------------------------------------------------------------------------

class Malformed(Exception):
    """An answer that is no well-formed HTTP/1.1 response with a JSON body."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    json: Any = None

    def summary(self) -> str:
        return f"{self.status} {self.body[:200]!r}"


def read_chunked(rfile: Any, status: int) -> bytes:
    """A chunked body (RFC 9112 7.1), strictly: hex sizes, each chunk's CRLF, the last chunk and no trailers."""
    body = b""
    while True:
        line = rfile.readline(100)
        if not re.fullmatch(rb"[0-9a-f]{1,8}\r\n", line):
            raise Malformed(f"{status}: chunk size line {line[:100]!r}")
        size = int(line[:-2], 16)
        chunk = rfile.read(size + 2)
        if len(chunk) != size + 2 or not chunk.endswith(b"\r\n"):
            raise Malformed(f"{status}: chunk of {size} bytes cut off")
        if size == 0:
            return body
        body += chunk[:-2]


def read_answer(rfile: Any, head_ok: bool) -> Answer | None:
    """One response, or None when the stream ends before one starts; raises Malformed."""
    line = rfile.readline(4097)
    if not line:
        return None
    match = STATUS_RE.fullmatch(line)
    if match is None:
        raise Malformed(f"status line {line[:200]!r}")
    status = int(match.group(1))
    headers: dict[str, str] = {}
    for _ in range(100):
        raw = rfile.readline(8193)
        if raw == b"\r\n":
            break
        fm = FIELD_RE.fullmatch(raw)
        if fm is None:
            raise Malformed(f"{status}: header line {raw[:200]!r}")
        name = fm.group(1).decode().lower()
        if name in headers:
            raise Malformed(f"{status}: {name} twice")
        headers[name] = fm.group(2).decode()
    else:
        raise Malformed(f"{status}: endless header section")
    if status < 200:
        return Answer(status, headers, b"")
    length = headers.get("content-length", "")
    streamed = headers.get("transfer-encoding") == "chunked" or (
        not length and headers.get("connection") == "close")  # a listing: chunked, or to HTTP/1.0 until the close
    if streamed and length:
        raise Malformed(f"{status}: Content-Length with {headers.get('transfer-encoding')!r}")
    if not streamed and not length.isdigit():
        raise Malformed(f"{status}: Content-Length {length!r}")
    if length == "0" or (head_ok and not _body_follows(rfile)):  # no body, or the answer to a HEAD
        return Answer(status, headers, b"")
    if streamed:
        body = read_chunked(rfile, status) if headers.get("transfer-encoding") == "chunked" else rfile.read()
    else:
        body = rfile.read(int(length))
        if len(body) != int(length):
            raise Malformed(f"{status}: body of {len(body)} bytes, Content-Length {length}")
    if headers.get("content-type") != "application/json":
        raise Malformed(f"{status}: Content-Type {headers.get('content-type')!r}")
    try:
        doc = json.loads(body)
    except ValueError:
        raise Malformed(f"{status}: body is no JSON: {body[:200]!r}") from None
    if not isinstance(doc, dict):
        raise Malformed(f"{status}: body is no JSON object: {body[:200]!r}")
    if status >= 400 and not (isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str)):
        raise Malformed(f"{status}: error body without error and message: {body[:200]!r}")
    return Answer(status, headers, body, doc)


def _body_follows(rfile: Any) -> bool:
    """After the head of an answer that may have no body: does a JSON body come next (or another answer, or
    the end of the stream)? The daemon answers our end of the stream with a TLS alert, which also ends it."""
    try:
        return bool(rfile.peek(1)[:1] == b"{")
    except (ConnectionError, ssl.SSLError, TimeoutError, OSError):
        return False


@dataclass
class Exchange:
    """What came back for one case."""

    answers: list[Answer] = field(default_factory=list)
    end: str = "open"  # open, eof, reset, timeout, or the Malformed text
    malformed: str | None = None
    mode: str = "keep-alive"
    previous: Case | None = None  # the case before it on the same connection

    @property
    def finals(self) -> list[Answer]:
        return [a for a in self.answers if a.status >= 200]


class Conn:
    def __init__(self, ctx: ssl.SSLContext, source: str):
        raw = socket.create_connection((MAIN, PORT), timeout=CONNECT_TIMEOUT, source_address=(source, 0))
        raw.settimeout(READ_TIMEOUT)
        self.tls = ctx.wrap_socket(raw, server_hostname=MAIN)
        self.rfile = self.tls.makefile("rb")
        self.last: Case | None = None

    def close(self) -> None:
        for closer in (self.rfile.close, self.tls.close):
            try:
                closer()
            except OSError:
                pass


def read_answers(conn: Conn, ex: Exchange, head_ok: bool, finals: int | None, deadline: float) -> None:
    """Read answers until `finals` final ones came (None: until the server closes)."""
    try:
        while time.monotonic() < deadline and len(ex.answers) < 16:
            answer = read_answer(conn.rfile, head_ok)
            if answer is None:
                ex.end = "eof"
                return
            ex.answers.append(answer)
            if finals is not None and len(ex.finals) >= finals:
                return
        ex.end = "timeout"
    except Malformed as exc:
        ex.end, ex.malformed = "malformed", str(exc)
    except TimeoutError:
        ex.end = "timeout"
    except (ConnectionError, ssl.SSLError, OSError) as exc:
        ex.end = f"reset ({type(exc).__name__}: {exc})"


class Client:
    """One thread's connections to the daemon: a keep-alive connection per source address, reused while the
    server keeps it open, so most cases cost no handshake."""

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.conns: dict[str, Conn] = {}

    def run(self, case: Case) -> Exchange:
        source = POOL[case.index % len(POOL)] if case.bad_auth else MAIN
        if case.framed and case.owed == 1 and not case.head and len(case.data) <= KEEPALIVE_MAX:
            return self._keep_alive(case, source)
        return self._alone(case, source)

    def _keep_alive(self, case: Case, source: str) -> Exchange:
        for attempt in range(2):
            conn = self.conns.pop(source, None)
            reused = conn is not None
            conn = conn or Conn(self.ctx, source)
            ex = Exchange(previous=conn.last)
            try:
                conn.tls.sendall(case.data)
            except OSError:
                pass  # the server may have answered and closed early: what it said is still read
            read_answers(conn, ex, False, 1, time.monotonic() + READ_TIMEOUT)
            if not ex.answers and reused and attempt == 0:
                # The server may close an idle connection at any time (RFC 9112 section 9.5): one retry on a
                # fresh one, where no answer is a failure.
                conn.close()
                continue
            if ex.end == "open" and ex.finals and ex.finals[-1].headers.get("connection", "").lower() != "close":
                conn.last = case
                for other in [s for s in self.conns if s != MAIN and source != MAIN]:
                    self.conns.pop(other).close()  # one idle connection from the pool at most: slots are few
                self.conns[source] = conn
            else:
                conn.close()
            return ex
        raise AssertionError("unreachable")

    def _alone(self, case: Case, source: str) -> Exchange:
        """A connection of its own: send, end our side, and read whatever comes until the server closes."""
        conn = Conn(self.ctx, source)
        ex = Exchange(mode="alone")
        try:
            try:
                conn.tls.sendall(case.data)
            except OSError:
                pass  # the server may refuse early and close; what it said is still read below
            try:
                socket.socket.shutdown(conn.tls, socket.SHUT_WR)  # TCP FIN, the TLS session left as it is
            except OSError:
                pass
            read_answers(conn, ex, case.head, None, time.monotonic() + READ_TIMEOUT)
        finally:
            conn.close()
        return ex

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


# -- judging -----------------------------------------------------------------------------------------------

def problems_of(case: Case, ex: Exchange) -> list[str]:
    found = []
    if ex.malformed:
        found.append(f"malformed answer: {ex.malformed}")
    for a in ex.answers:
        if a.status >= 500:
            found.append(f"answered {a.summary()}")
    finals = ex.finals
    if case.refuse:
        found += [f"bad input answered {a.summary()}" for a in finals if not 400 <= a.status < 500]
    # Cases that may fail a login share a few addresses, which the daemon throttles: a 429 is right there.
    expect = case.expect if case.expect is None or not case.bad_auth else case.expect | {429}
    if expect is not None and finals and finals[0].status not in expect:
        found.append(f"expected {sorted(expect)}, answered {finals[0].summary()}")
    if len(finals) < case.owed and not ex.malformed:
        found.append(f"{case.owed} answer(s) owed, {len(finals)} came; the connection ended: {ex.end}")
    if case.items is not None and finals and finals[0].status == 200:
        results = finals[0].json.get("results") if isinstance(finals[0].json, dict) else None
        if not isinstance(results, list) or len(results) != len(case.items):
            found.append(f"bulk answer without one result per item: {finals[0].summary()}")
        else:
            for i, (want, got) in enumerate(zip(case.items, results)):
                status = got.get("status") if isinstance(got, dict) else None
                if not isinstance(status, int) or status >= 500 or (want == "ok" and status not in (200, 201)) \
                        or (want == "fail" and not 400 <= status < 500):
                    found.append(f"bulk item {i} should be {want}: {got!r}")
    return found


@dataclass
class Failure:
    case: Case
    problems: list[str]
    ex: Exchange

    def __str__(self) -> str:
        data = self.case.data
        text = [f"case {self.case.index} {self.case.family} ({len(data)} bytes, {self.ex.mode}, "
                f"owed {self.case.owed}, refuse {self.case.refuse}): {data[:600]!r}{'...' if len(data) > 600 else ''}"]
        text += [f"    {p}" for p in self.problems]
        text.append(f"    answers: {[a.summary() for a in self.ex.answers]}; end: {self.ex.end}")
        if self.ex.previous is not None:
            text.append(f"    after case {self.ex.previous.index} on the same connection: "
                        f"{self.ex.previous.data[:200]!r}")
        return "\n".join(text)


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)
    statuses: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    modes: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_by_variant: collections.Counter[str] = field(default_factory=collections.Counter)
    writes: int = 0
    blocks: set[tuple[str, str]] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def crashed(self, index: int, exc: Exception) -> None:
        with self.lock:
            self.sent += 1
            self.failed += 1
            self.errors.append(RuntimeError(f"case {index}: {type(exc).__name__}: {exc}"))
            if len(self.errors) > 20:
                raise RuntimeError("more than 20 cases could not be run") from exc

    def add(self, case: Case, ex: Exchange, problems: list[str]) -> None:
        with self.lock:
            self.sent += 1
            self.writes += case.writes
            self.blocks |= case.blocks
            self.modes[ex.mode] += 1
            family = case.family.split("/")[0]
            for label in [str(a.status) for a in ex.finals] or [ex.end.split(" ")[0]]:
                self.statuses[(family, label)] += 1
            if problems:
                self.failed += 1
                self.failed_by_variant[case.family] += 1
                if len(self.failures) < 25 and self.failed_by_variant[case.family] <= 3:  # a few of each kind
                    self.failures.append(Failure(case, problems, ex))


def fuzz(d: Daemon, generator: Generator, seed: int, count: int) -> tuple[Tally, float]:
    tally = Tally()
    ctx = d.context()
    counter = iter(range(count))
    counter_lock = threading.Lock()
    started = time.monotonic()
    deadline = started + RUN_LIMIT

    def work() -> None:
        client = Client(ctx)
        try:
            while time.monotonic() < deadline and tally.failed < ENOUGH:
                with counter_lock:
                    index = next(counter, None)
                if index is None:
                    return
                try:
                    case = generator.case(seed, index)
                    ex = client.run(case)
                except Exception as exc:  # the fuzzer's own failure: reported, and the run goes on
                    client.close()
                    tally.crashed(index, exc)
                    continue
                tally.add(case, ex, problems_of(case, ex))
        finally:
            client.close()

    def thread() -> None:
        try:
            d.ns.call(work)  # the whole loop runs in a thread that joined the daemon's namespace
        except BaseException as exc:  # handed to the test below
            tally.errors.append(exc)

    threads = [threading.Thread(target=thread, name=f"fuzz-{i}", daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_LIMIT + 2 * READ_TIMEOUT)
    return tally, time.monotonic() - started


# -- the kernel afterwards --------------------------------------------------------------------------------

def filter_table(d: Daemon, family: int) -> list[str]:
    """Chain declarations (without counters) and rules of the filter table."""
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    out = d.ns.run([tool, "-t", "filter"]).stdout
    return [line.split(" ")[0] + " " + line.split(" ")[1] if line.startswith(":") else line
            for line in out.splitlines() if line.startswith((":", "-A "))]


def made_by(generator: Generator, seed: int, network: Any) -> str:
    """Which case owns the addresses of a stray block, and its bytes: the reproducer."""
    index = generator.owner(network)
    if index is None:
        return "(no single case owns it)"
    case = generator.case(seed, index)
    return f"(case {index} {case.family}: {case.data[:400]!r})"


def other_tables(d: Daemon) -> dict[str, str]:
    """What the daemon's iptables chains must leave alone: the nftables ruleset and the ipset sets."""
    return {tool: d.ns.run(argv, check=False).stdout
            for tool, argv in (("nft", ["nft", "list", "ruleset"]), ("ipset", ["ipset", "list", "-n"]))}


def kernel_problems(d: Daemon, before: dict[Any, Any], blocks: set[tuple[str, str]], generator: Generator,
                    seed: int) -> list[str]:
    chains = d.config["chains"]
    never = [ipaddress.ip_network(n) for n in d.config["never_block"]]
    allowed = {(c, ipaddress.ip_network(n)) for c, n in blocks}
    found = []
    for family in (4, 6):
        after = filter_table(d, family)
        outside_before = sorted(r for r in before[family] if r.split(" ")[1] not in chains or r.startswith(":"))
        outside_after = sorted(r for r in after if r.split(" ")[1] not in chains or r.startswith(":"))
        if outside_after != outside_before:
            found.append(f"IPv{family} rules or chains outside the managed chains changed: "
                         f"{sorted(set(outside_after) ^ set(outside_before))[:10]}")
        for rule in after:
            words = rule.split(" ")
            if rule.startswith(":") or words[1] not in chains:
                continue
            if len(words) < 6 or words[2] != "-s" or words[4] != "-j" or words[5] != chains[words[1]]["target"]:
                found.append(f"a rule of another shape in a managed chain: {rule}")
                continue
            net = ipaddress.ip_network(words[3])
            if any(n.version == net.version and n.overlaps(net) for n in never):
                found.append(f"a block overlapping never_block: {rule}")
            if (words[1], net) not in allowed:
                found.append(f"a block no valid request asked for: {rule} {made_by(generator, seed, net)}")
    for tool, text in other_tables(d).items():
        if text != before[tool]:
            found.append(f"{tool} changed: before {before[tool][:500]!r}, after {text[:500]!r}")
    return found


def store_problems(d: Daemon, blocks: set[tuple[str, str]], generator: Generator, seed: int) -> list[str]:
    allowed = {(c, ipaddress.ip_network(n)) for c, n in blocks}
    found = []
    for chain in d.config["chains"]:
        # Read the store, the kernel, the store again: a block that expires meanwhile is in one list only.
        listed = d.request("GET", f"/chain/{chain}")
        kernel = {ipaddress.ip_network(n) for f in (4, 6) for n in d.kernel_entries(chain, f)}
        relisted = d.request("GET", f"/chain/{chain}")
        if listed.status != 200 or relisted.status != 200:
            found.append(f"GET /chain/{chain} afterwards: {listed}, {relisted}")
            continue
        first = {ipaddress.ip_network(e["network"]) for e in listed.json["entries"]}
        second = {ipaddress.ip_network(e["network"]) for e in relisted.json["entries"]}
        strays = sorted((n for n in first | second if (chain, n) not in allowed), key=str)
        found += [f"{chain}: a stored block no valid request asked for: {n} {made_by(generator, seed, n)}"
                  for n in strays[:10]]
        if (first & second) - kernel:
            found.append(f"{chain}: stored but not in the kernel: {sorted(map(str, (first & second) - kernel))[:10]}")
        if kernel - (first | second):
            found.append(f"{chain}: in the kernel but not stored: {sorted(map(str, kernel - (first | second)))[:10]}")
    return found


# -- the log afterwards -------------------------------------------------------------------------------------

AUTH_RECORDS = ("authentication failed", "throttling client=")
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def records(text: str, skip: int) -> list[str]:
    """The log file's records after its first `skip` lines, each with its continuation lines (a traceback)."""
    out: list[str] = []
    for line in text.splitlines()[skip:]:
        if RECORD_START.match(line) or not out:
            out.append(RECORD_START.sub("", line, count=1))
        else:
            out[-1] += "\n" + line
    return out


def log_problems(d: Daemon, file_start: int, stderr_start: int, tally: Tally, elapsed: float) -> tuple[list[str], str]:
    found = []
    new_stderr = d.stderr().splitlines()[stderr_start:]
    new_file = records(d.log(), file_start)
    for name, lines in (("log file", new_file), ("stderr", new_stderr)):
        bad = [line for line in lines if "Traceback" in line or re.match(r"(ERROR|CRITICAL) ", line)]
        if bad:
            found.append(f"{name}: {len(bad)} tracebacks or ERROR lines, the first: {bad[0][:3000]}")
    audit = [r for r in new_file if r.startswith("INFO webiptd.audit: ")]
    auth = [r for r in new_file if any(s in r for s in AUTH_RECORDS)]
    other = [r for r in new_file if r not in audit and r not in auth]
    limits = d.config["limits"]
    # A failed login is logged until the throttle stops its address: at most this often per address and window.
    auth_bound = len(POOL) * (limits["auth_failures"] + 1) * (1 + math.ceil(elapsed / limits["auth_window"]))
    other_bound = 20 + tally.sent // 200
    if len(audit) > tally.writes:
        found.append(f"{len(audit)} audit records, more than the {tally.writes} changes the valid requests may make")
    if len(auth) > auth_bound:
        found.append(f"{len(auth)} failed-login records, more than the throttle allows ({auth_bound})")
    if len(other) > other_bound:
        shapes = collections.Counter(re.sub(r"[0-9a-f.:/]{4,}|\d+", "N", r.splitlines()[0]) for r in other)
        found.append(f"the log grew by {len(other)} records that are neither audit nor failed logins for "
                     f"{tally.sent} requests (bound {other_bound}); the most common: {shapes.most_common(5)}")
    summary = (f"log: {len(new_file)} new records in the file ({len(audit)} audit, {len(auth)} failed logins, "
               f"{len(other)} other), {len(new_stderr)} new lines on stderr")
    return found, summary


def afterwards(d: Daemon) -> list[str]:
    """The daemon still answers as it should: /health, and a block and an unblock that nothing else made."""
    found = []
    health = d.request("GET", "/health", user=None)
    if health.status != 200 or health.json != {"status": "ok"}:
        found.append(f"GET /health afterwards: {health}")
    for path in ("/chain/f2b-web/ipv4/203.0.113.77", "/chain/admin-list/ipv6/2001:db8:feed::77"):
        put, delete = d.request("PUT", path), d.request("DELETE", path)
        if put.status != 201 or delete.status != 200 or delete.json.get("deleted") is not True:
            found.append(f"PUT and DELETE {path} afterwards: {put}, {delete}")
    return found


# -- the test ------------------------------------------------------------------------------------------------

def test_fuzzed_requests_get_4xx_and_change_nothing_they_should_not(fuzzed: Daemon) -> None:
    d = fuzzed
    print(f"\nwire fuzz: WEBIPTD_FUZZ_SEED={SEED} WEBIPTD_FUZZ_CASES={CASES}")
    generator = Generator(profile_of(d))
    before: dict[Any, Any] = {f: filter_table(d, f) for f in (4, 6)}
    before.update(other_tables(d))
    file_start, stderr_start = len(d.log().splitlines()), len(d.stderr().splitlines())

    tally, elapsed = fuzz(d, generator, SEED, CASES)

    by_family: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (family, status), n in sorted(tally.statuses.items()):
        by_family[family][status] = n
    report = [f"wire fuzz: seed {SEED}, {tally.sent} of {CASES} cases in {elapsed:.1f} s "
              f"({tally.sent / max(elapsed, 1e-9):.0f}/s, {THREADS} threads, {dict(tally.modes)}), "
              f"{tally.failed} failed; rerun: WEBIPTD_FUZZ_SEED={SEED} WEBIPTD_FUZZ_CASES={CASES}"]
    report += [f"  {family}: {statuses}" for family, statuses in by_family.items()]

    problems: list[str] = [f"the fuzzer failed: {exc}" for exc in tally.errors[:20]]
    if tally.sent < CASES:
        problems.append(f"only {tally.sent} of {CASES} cases were sent (a run stops after {RUN_LIMIT:.0f} s, "
                        f"{ENOUGH} failed cases, or 20 cases it could not run)")
    problems += [str(f) for f in tally.failures]
    if tally.failed > len(tally.failures):
        problems.append(f"... {tally.failed} failed cases in all: {dict(tally.failed_by_variant.most_common())}")

    assert d.proc is not None
    alive = d.proc.poll() is None
    if not alive:
        problems.append(f"the daemon died with {d.proc.returncode}; stderr tail: {d.stderr()[-3000:]}")
    else:
        try:
            problems += afterwards(d)
            problems += store_problems(d, tally.blocks, generator, SEED)
        except (OSError, ValueError) as exc:  # no answer at all: say so, and still look at the kernel and the log
            problems.append(f"the daemon does not answer afterwards: {exc!r}")
    problems += kernel_problems(d, before, tally.blocks, generator, SEED)
    found, summary = log_problems(d, file_start, stderr_start, tally, elapsed)
    problems += found
    report.append("  " + summary)
    print("\n".join(report))
    assert not problems, "\n".join(report + ["", "PROBLEMS:"] + problems)
