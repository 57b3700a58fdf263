"""The OpenAPI contract (src/webiptd/openapi.yaml): valid OpenAPI 3.1, in step with the routes and the error table,
and true of a live daemon, which schemathesis, an external API fuzzer, checks against it case by case."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from openapi_spec_validator import validate

from tests.conftest import FAST_HASH, PORT, Daemon
from webiptd.http.app import ROUTES
from webiptd.http.listing import decode_cursor
from webiptd.http.responses import ERRORS

METHODS = ("get", "head", "put", "delete", "post", "patch", "options", "trace")

FUZZ_USER, FUZZ_PASSWORD = "fuzz", "fuzz-pw"
FUZZ_CHAIN = "fuzz-web"
# Cases for each operation and phase (examples, coverage, fuzzing; the stateful phase makes its own). Over the 29
# operations that comes to about 3,000 requests in 30 to 60 s on 2 cores; the test asserts 1,000.
MAX_EXAMPLES = 60
SEED = 20250901
FUZZ_TIMEOUT = 420  # seconds for the whole schemathesis run: a backstop


def load() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(files("webiptd").joinpath("openapi.yaml").read_text(encoding="utf-8"))
    return doc


def route_key(path: str) -> tuple[str, int]:
    """The ROUTES key a documented path maps to: its first segment and its number of segments."""
    segments = path.strip("/").split("/")
    return segments[0], len(segments)


def operations(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {path: {m.upper() for m in item if m in METHODS} for path, item in doc["paths"].items()}


# -- pure: the document --------------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = load()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)  # openapi-spec-validator picks the 3.1 validator from the version


def test_the_document_is_plain_json_once_loaded() -> None:
    """GET /openapi.json serves it converted: nothing YAML-only may be in it (a date, an unquoted status code
    as a number key)."""
    doc = load()
    assert json.loads(json.dumps(doc)) == doc


def test_every_route_is_documented_with_exactly_its_methods() -> None:
    documented: dict[tuple[str, int], set[str]] = {}
    for path, methods in operations(load()).items():
        key = route_key(path)
        assert key in ROUTES, f"{path} is documented but not routed"
        # OPTIONS and the rest get 405 with Allow naming ROUTES' methods: the document must list the same.
        assert methods == set(ROUTES[key]), (path, methods, set(ROUTES[key]))
        documented.setdefault(key, set()).update(methods)
    for key, methods in ROUTES.items():
        assert documented.get(key) == set(methods), f"route {key} is not documented with {set(methods)}"


def test_every_get_has_its_head() -> None:
    for path, methods in operations(load()).items():
        assert ("GET" in methods) == ("HEAD" in methods), path


def test_every_error_code_is_documented_with_its_status() -> None:
    doc = load()
    schemas = doc["components"]["schemas"]
    found: dict[str, set[int]] = {}
    for response in doc["components"]["responses"].values():
        schema_ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
        if schema_ref is None:
            continue
        schema = schemas[schema_ref.rsplit("/", 1)[1]]
        error = schema.get("properties", {}).get("error")
        if error is None:
            continue
        codes = error["enum"] if "enum" in error else [error["const"]]
        for code in codes:
            found.setdefault(code, set()).add(ERRORS[code])
    assert set(found) == set(ERRORS)
    # And where each error's response is used, it is under the status the code has.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            for status, response in op["responses"].items():
                name = response.get("$ref", "").rsplit("/", 1)[-1]
                body = doc["components"]["responses"].get(name, {})
                schema_ref = body.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                if schema_ref is None:
                    continue
                error = schemas[schema_ref.rsplit("/", 1)[1]].get("properties", {}).get("error")
                if error is not None:
                    codes = error["enum"] if "enum" in error else [error["const"]]
                    assert {ERRORS[c] for c in codes} == {int(status)}, (path, method, status, codes)


def test_the_headers_that_go_with_401_405_and_429() -> None:
    responses = load()["components"]["responses"]
    assert "WWW-Authenticate" in responses["Unauthorized"]["headers"]
    assert "WWW-Authenticate" in responses["HeadUnauthorized"]["headers"]
    assert "Allow" in responses["MethodNotAllowed"]["headers"]
    assert "Retry-After" in responses["Throttled"]["headers"]
    assert "Retry-After" in responses["HeadThrottled"]["headers"]


def test_only_health_and_the_document_need_no_credentials() -> None:
    doc = load()
    assert doc["security"], "the default is to need a user"
    open_paths = {path for path, item in doc["paths"].items()
                  if any(op.get("security") == [] for m, op in item.items() if m in METHODS)}
    assert open_paths == {"/health", "/openapi.json"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                assert ("401" in op["responses"]) == (path not in open_paths), (path, method)


def test_the_patterns_are_the_codes() -> None:
    """The document's patterns accept what the code's do (spot checks on both sides of each)."""
    from webiptd.config import CHAIN_NAME_RE
    from webiptd.http.app import MAX_TIMEOUT, OWNER_LABEL_RE
    schemas = load()["components"]["schemas"]
    chain = re.compile(schemas["ChainName"]["pattern"])
    owner = re.compile(schemas["OwnerLabel"]["pattern"])
    for name in ("f2b-web", "a", "x" * 28, "x" * 29, "", "a.b", "a b", "ä"):
        assert bool(chain.fullmatch(name)) == bool(CHAIN_NAME_RE.match(name)), name
    for label in ("sshd", "a:b.c_d-e", "x" * 64, "x" * 65, "", "*", "a/b", "a b"):
        assert bool(owner.fullmatch(label)) == bool(OWNER_LABEL_RE.match(label)), label
    assert schemas["Seconds"]["maximum"] == MAX_TIMEOUT
    from webiptd.scope import PROTOCOLS
    assert set(schemas["Proto"]["enum"]) == {*PROTOCOLS, "all"}
    ports = re.compile(schemas["PortList"]["pattern"])
    for good in ("22", "0:65535", "ssh,http,https", "8000:8100,22", "x-y.z_1", ",".join(["1"] * 100)):
        assert ports.fullmatch(good), good
    for bad in ("", "22;80", "22,", ":22", "022", "1ssh", "a b", "a+b", ",".join(["1"] * 101)):
        assert not ports.fullmatch(bad), bad


def test_the_document_version_is_the_package_version() -> None:
    from webiptd import __version__
    assert load()["info"]["version"] == __version__


# -- root: schemathesis against a live daemon ----------------------------------------------------------------
#
# Every check schemathesis has runs, but two whose premise the API does not share, each by design and documented:
# - use_after_free wants a DELETE that answered 2xx to leave nothing behind. Here a DELETE releases the caller's
#   claim, always with 200, and the entry stays while another claim holds it (docs/api.md, "Owners").
# - positive_data_acceptance wants every request the document allows to succeed, but OpenAPI cannot state some
#   rules the API keeps on purpose. `allowed_requests_are_taken` replaces it: such a request may get a 400 only
#   for one of those rules, each explained by the request itself (`unstated_rules`); any other 400 is a
#   difference between the daemon and its contract.
EXCLUDED_CHECKS = ("use_after_free", "positive_data_acceptance")
NUMBER_RE = re.compile(r"0|[1-9][0-9]{0,4}")


def unstated_rules(case: Any) -> set[str] | None:
    """The 400 codes that rules the document cannot state may give `case`: rules between parameters (port needs
    a protocol, and not proto=all; timeout or expire, not both), a listing's cursor (opaque: only one the daemon
    gave), ports (a service name /etc/services lacks for the protocol, a number over 65535, a range that ends
    before it starts), and addresses (host bits set under a prefix; an IPv4-mapped IPv6 address). None when the
    case is not one the document allows after all."""
    query = case.query or {}
    path = case.path_parameters or {}
    codes = set()
    if "timeout" in query and "expire" in query:
        codes.add("bad_query")
    port = query.get("port")
    if port is not None:
        if query.get("proto", "all") == "all":
            codes.add("bad_query")
        for item in str(port).split(","):
            ends = item.split(":")
            if not all(NUMBER_RE.fullmatch(e) and int(e) <= 65535 for e in ends) or int(ends[0]) > int(ends[-1]):
                codes.add("bad_query")
    after = query.get("after")
    if after is not None:
        try:
            decode_cursor(str(after))
        except ValueError:  # a cursor is opaque: only one the daemon gave is taken
            codes.add("bad_query")
    if "prefix" in path:
        codes.add("bad_address")
    if "address" in path:
        family = ipaddress.IPv6Address if "/ipv6/" in case.operation.path else ipaddress.IPv4Address
        try:
            address = family(unquote(str(path["address"])))
        except ValueError:
            # Not an address of the path's family: the stateful phase filled it in from a response (a network
            # there, say), so the case is not one the document allows, whatever the fuzzer marked it.
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            codes.add("bad_address")
    return codes


def allowed_requests_are_taken(ctx: Any, response: Any, case: Any) -> None:
    """A schemathesis check (registered below when the fuzzer loads this module as its hooks): a request whose
    every part the document allows gets no 400 but for a rule the document cannot state."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return
    explained = unstated_rules(case)
    if explained is None:
        return
    if case.method == "HEAD":
        code = "(HEAD: no body)"
        if explained:
            return
    else:
        code = json.loads(response.content).get("error")
        if code in explained:
            return
    raise AssertionError(f"a request the document allows was refused ({code}): {response.content[:300]!r}")


if os.environ.get("SCHEMATHESIS_HOOKS") == __name__:
    import schemathesis

    schemathesis.check(allowed_requests_are_taken)


def ruleset(d: Daemon) -> list[str]:
    """Every netfilter rule of the namespace outside the fuzzed chain, counters and comments left out."""
    lines = []
    for family in (4, 6):
        for line in d.ns.iptables_save(family).splitlines():
            if line.startswith("#") or line.startswith(f"-A {FUZZ_CHAIN} "):
                continue
            lines.append(f"v{family} " + re.sub(r"\[\d+:\d+\]", "[-]", line))
    lines += ["nft " + line for line in d.ns.run(["nft", "list", "ruleset"]).stdout.splitlines()]
    return lines


def fuzz_document() -> dict[str, Any]:
    """The document as the fuzzer gets it: the chain parameter limited to the one chain the fuzz user may use,
    so that every write it makes lands there."""
    doc = load()
    doc["components"]["parameters"]["Chain"]["schema"] = {"type": "string", "enum": [FUZZ_CHAIN]}
    return doc


def statuses(report: Path) -> Counter[int]:
    """The status of every response in schemathesis' NDJSON report, its probes left out."""
    found: Counter[int] = Counter()
    with report.open(encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            recorder = event.get("ScenarioFinished", {}).get("recorder", {})
            for interaction in recorder.get("interactions", {}).values():
                if interaction.get("response"):
                    found[interaction["response"]["status_code"]] += 1
    return found


@pytest.mark.root
def test_schemathesis_finds_no_difference_between_the_daemon_and_its_contract(daemon: Daemon) -> None:
    d = daemon
    d.config["users"][FUZZ_USER] = {"password_hash": FAST_HASH.hash(FUZZ_PASSWORD), "chains": ["fuzz-*"],
                                    "override": True, "metrics": True}
    d.config["chains"][FUZZ_CHAIN] = {"hooks": ["INPUT"], "target": "DROP"}
    # The fuzzer sends wrong credentials on purpose (ignored_auth): no throttle, so that the cases after them
    # still reach the routes. request_timeout: the harness' 3 s is short for a loaded 2-core machine.
    d.config["limits"].update(auth_failures=100000, request_timeout=10)
    d.start()
    before = ruleset(d)
    assert f"v4 -A INPUT -j {FUZZ_CHAIN}" in before, "the comparison does not see the filter table"
    spec = d.workdir / "openapi.json"
    spec.write_text(json.dumps(fuzz_document()), encoding="utf-8")
    reports = d.workdir / "reports"
    argv = [str(Path(sys.executable).with_name("st")), "run", str(spec),
            "--url", f"https://127.0.0.1:{PORT}", "--tls-verify", str(d.pki.ca),
            "--auth", f"{FUZZ_USER}:{FUZZ_PASSWORD}",
            "--checks", "all", "--exclude-checks", ",".join(EXCLUDED_CHECKS),
            "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--generation-database", "none",
            "--workers", "2", "--request-timeout", "15", "--max-failures", "50",
            "--no-color", "--output-truncate", "false",
            "--report", "ndjson", "--report-dir", str(reports)]
    repo = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(d.workdir), "SCHEMATHESIS_HOOKS": __name__,
           "PYTHONPATH": str(repo)}
    result = d.ns.run(argv, check=False, timeout=FUZZ_TIMEOUT, cwd=d.workdir, env=env)
    output = result.stdout[-30000:] + result.stderr[-5000:]
    assert result.returncode == 0, output
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    assert "internal error" not in d.log()
    assert ruleset(d) == before, "a rule outside the fuzzed chain changed"
    seen = statuses(next(reports.glob("*.ndjson")))
    print(f"schemathesis: {sum(seen.values())} responses, by status {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 1000, seen
    assert seen[201] > 0 and seen[200] > 0, "no request got far enough to block anything"
    assert not any(status >= 500 for status in seen), seen
