"""Allow chains (`target: ACCEPT`) through the real daemon: a peer a block chain drops gets through while it is in an
allow chain at the same hook (all traffic, or one port), on every backend and with iptables and ipset mixed; our
jumps at a hook keep the allow chains first, across a reload and after someone moved one; never_allow; the configs
-check_config refuses or warns of; and a reload that takes a hook from a chain takes its jump from there.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import APP_PORT, PEER4, PEER6, PKI, SERVER4, SERVER6, Daemon, Listener, base_config
from tests.netns import NetNS, veth_pair
from tests.test_packets import attempt, block, resolve_neighbours, unblock
from tests.test_tls import web_ipt_d

ALLOW = "allow-in"
OTHER_PORT = APP_PORT + 1  # a second service: a scoped allow leaves it blocked
ADDRESSES = [(SERVER4, f"ipv4/{PEER4}"), (SERVER6, f"ipv6/{PEER6}")]
LEGACY = ("iptables", "ipset")


def add_allow_chain(config: dict[str, Any], backend: str) -> None:
    """The allow chain at INPUT, last in the config: its jump must still come first."""
    config["chains"][ALLOW] = {"hooks": ["INPUT"], "target": "ACCEPT", "backend": backend}


def in_config_order(d: Daemon, hook: str = "INPUT") -> list[str]:
    """The chains at `hook` in the order our jumps take there: allow chains, then block chains, each in the order
    of the config file (the harness writes it with yaml.safe_dump, which sorts the names)."""
    chains = yaml.safe_load(d.config_path.read_text(encoding="utf-8"))["chains"]
    at_hook = [name for name, body in chains.items() if hook in body.get("hooks", ["INPUT"])]
    return sorted(at_hook, key=lambda name: chains[name].get("target", "DROP") != "ACCEPT")


def start_linked(d: Daemon, peer: NetNS) -> list[Listener]:
    """Link the daemon's namespace to the peer, start the daemon, and listen on APP_PORT and OTHER_PORT. The
    neighbours are resolved first: a block of the peer drops its neighbour discovery too (IPv6), which a scoped
    allow does not let through."""
    veth_pair(d.ns, peer)
    d.start()
    resolve_neighbours(peer, SERVER4, SERVER6)
    return [Listener(d.ns, host, port) for host in (SERVER4, SERVER6) for port in (APP_PORT, OTHER_PORT)]


@pytest.fixture
def allowed(daemon: Daemon, peer: NetNS) -> Iterator[tuple[Daemon, NetNS]]:
    """The daemon with the allow chain on its backend, linked to a peer that has two services to reach."""
    add_allow_chain(daemon.config, daemon.backend)
    listeners = start_linked(daemon, peer)
    try:
        yield daemon, peer
    finally:
        for listener in listeners:
            listener.close()


# -- packets ---------------------------------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.backends
@pytest.mark.parametrize("server, rest", ADDRESSES)
def test_an_allowed_peer_gets_past_a_block_until_the_allow_goes(allowed, server, rest):
    d, peer = allowed
    block(d, "f2b-web", rest)
    assert attempt(peer, server, APP_PORT) == "timeout"
    block(d, ALLOW, rest)
    assert attempt(peer, server, APP_PORT) == "ok"
    assert attempt(peer, server, OTHER_PORT) == "ok"
    unblock(d, ALLOW, rest)
    assert attempt(peer, server, APP_PORT) == "timeout"
    unblock(d, "f2b-web", rest)
    assert attempt(peer, server, APP_PORT) == "ok"


@pytest.mark.root
@pytest.mark.backends
@pytest.mark.parametrize("server, rest", ADDRESSES)
def test_a_scoped_allow_lets_only_its_port_through(allowed, server, rest):
    d, peer = allowed
    block(d, "admin-list", rest)
    scoped = f"{rest}?proto=tcp&port={APP_PORT}"
    block(d, ALLOW, scoped)
    assert attempt(peer, server, APP_PORT) == "ok"
    assert attempt(peer, server, OTHER_PORT) == "timeout"
    r = d.request("GET", f"/chain/{ALLOW}")
    assert r.status == 200 and [(e["proto"], e["port"]) for e in r.json["entries"]] == [("tcp", str(APP_PORT))], r
    unblock(d, ALLOW, scoped)
    assert attempt(peer, server, APP_PORT) == "timeout"


@pytest.mark.root
@pytest.mark.parametrize("allow_backend, block_backend", [("iptables", "ipset"), ("ipset", "iptables")])
def test_iptables_and_ipset_mixed_at_one_hook(daemon, peer, allow_backend, block_backend):
    """The two share the legacy tables' hook chains: one order over both."""
    for chain in daemon.config["chains"].values():
        chain["backend"] = block_backend
    add_allow_chain(daemon.config, allow_backend)
    listeners = start_linked(daemon, peer)
    try:
        for family in (4, 6):
            assert legacy_jumps(daemon, "INPUT", family) == in_config_order(daemon), family
            assert legacy_jumps(daemon, "INPUT", family)[0] == ALLOW
        for server, rest in ADDRESSES:
            block(daemon, "f2b-ssh", rest)
            assert attempt(peer, server, APP_PORT, timeout=5) == "refused"
            block(daemon, ALLOW, rest)
            assert attempt(peer, server, APP_PORT) == "ok"
            unblock(daemon, ALLOW, rest)
            assert attempt(peer, server, APP_PORT, timeout=5) == "refused"
    finally:
        for listener in listeners:
            listener.close()


# -- the order of our jumps ------------------------------------------------------------------------------------

def legacy_jumps(d: Daemon, hook: str, family: int = 4) -> list[str]:
    """The managed chains the hook chain jumps to, in its order (iptables-legacy-save)."""
    managed = set(d.config["chains"])
    found = []
    for line in d.rules(family):
        words = line.split()
        if words[1] == hook and words[-2] == "-j" and words[-1] in managed:
            found.append(words[-1])
    return found


def nft_table(d: Daemon) -> list[dict[str, Any]]:
    out = d.ns.run(["nft", "-j", "-a", "list", "table", "inet", "web-ipt-d"]).stdout
    items: list[dict[str, Any]] = json.loads(out)["nftables"]
    return items


def nft_jumps(d: Daemon, hook: str) -> dict[str, list[str]]:
    """Base chain of our table at `hook` -> the chains its rules jump to, in order."""
    items = nft_table(d)
    bases = [i["chain"]["name"] for i in items if i.get("chain", {}).get("hook") == hook.lower()]
    found: dict[str, list[str]] = {name: [] for name in bases}
    for item in items:
        rule = item.get("rule")
        if rule is not None and rule["chain"] in found:
            found[rule["chain"]] += [e["jump"]["target"] for e in rule["expr"] if "jump" in e]
    return found


def jumps(d: Daemon, family: int = 4) -> list[str]:
    """The chains our jumps at INPUT go to, in order: in the filter table of `family`, or in nftables' one base
    chain at input (inet: both families)."""
    if d.backend in LEGACY:
        return legacy_jumps(d, "INPUT", family)
    bases = nft_jumps(d, "INPUT")
    assert len(bases) == 1, f"one base chain at input, shared by all our chains (an accept ends only its own): {bases}"
    return next(iter(bases.values()))


def wait_for(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def move_allow_jump_last(d: Daemon) -> None:
    """What an admin (or a script) might do: take our allow chain's jump out and put it back at the end."""
    if d.backend in LEGACY:
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            d.ns.run([tool, "-w", "-D", "INPUT", "-j", ALLOW])
            d.ns.run([tool, "-w", "-A", "INPUT", "-j", ALLOW])
        return
    for item in nft_table(d):
        rule = item.get("rule")
        if rule is not None and any(e.get("jump", {}).get("target") == ALLOW for e in rule["expr"]):
            base = rule["chain"]
            d.ns.run(["nft", "delete", "rule", "inet", "web-ipt-d", base, "handle", str(rule["handle"])])
            d.ns.run(["nft", "add", "rule", "inet", "web-ipt-d", base, "jump", ALLOW])
            return
    raise AssertionError("no jump to the allow chain")


@pytest.mark.root
@pytest.mark.backends
def test_the_allow_jump_stays_first_across_a_reload_and_after_someone_moved_it(allowed):
    d, _ = allowed
    families = (4, 6) if d.backend in LEGACY else (4,)
    for family in families:
        assert jumps(d, family) == in_config_order(d) and jumps(d, family)[0] == ALLOW, family
    # A reload that adds a block chain at the hook, first of all in the config: the allow chain stays first.
    d.config["chains"]["a-block"] = {"hooks": ["INPUT"], "target": "DROP", "backend": d.backend}
    d.reload()
    expected = in_config_order(d)
    assert expected[:2] == [ALLOW, "a-block"]
    for family in families:
        assert jumps(d, family) == expected, family
    # Moved behind our back: the kernel check sees it and puts it back in order. (A restart, not a reload: the
    # worker schedules the next check with the old kernel_check, an hour here.)
    d.config["limits"]["kernel_check"] = 0.5
    assert d.stop() == 0, d.stderr()
    d.start()
    block(d, "f2b-web", "ipv4/203.0.113.9")  # nftables looks at chains that hold something
    move_allow_jump_last(d)
    assert wait_for(lambda: all(jumps(d, f) == expected for f in families)), [jumps(d, f) for f in families]


@pytest.mark.root
@pytest.mark.backends(*LEGACY)
def test_a_reload_that_takes_a_hook_from_a_chain_takes_its_jump(running):
    d = running
    for family in (4, 6):
        assert legacy_jumps(d, "FORWARD", family) == ["admin-list"]
    d.config["chains"]["admin-list"]["hooks"] = ["INPUT"]
    d.reload()
    for family in (4, 6):
        assert legacy_jumps(d, "FORWARD", family) == []
        assert legacy_jumps(d, "INPUT", family) == ["admin-list", "f2b-ssh", "f2b-web"]
    d.config["chains"]["admin-list"]["hooks"] = ["FORWARD"]
    d.reload()
    for family in (4, 6):
        assert legacy_jumps(d, "FORWARD", family) == ["admin-list"]
        assert legacy_jumps(d, "INPUT", family) == ["f2b-ssh", "f2b-web"]
    # and a restart leaves it so
    assert d.stop() == 0, d.stderr()
    d.start()
    for family in (4, 6):
        assert legacy_jumps(d, "INPUT", family) == ["f2b-ssh", "f2b-web"]
        assert legacy_jumps(d, "FORWARD", family) == ["admin-list"]


# -- never_allow -----------------------------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.backends
def test_never_allow_refuses_an_allow_and_never_block_does_not_apply(daemon):
    d = daemon
    add_allow_chain(d.config, d.backend)
    d.config["never_allow"] = ["203.0.113.0/24", "2001:db8:ffff::/48"]
    d.start()
    for rest in ("ipv4/203.0.113.7", "ipv4/203.0.0.0/16", "ipv6/2001:db8:ffff::1",
                 f"ipv4/203.0.113.7?proto=tcp&port={APP_PORT}"):
        r = d.request("PUT", f"/chain/{ALLOW}/{rest}")
        assert r.status == 409 and r.json["error"] == "never_allow", (rest, r)
    r = d.request("GET", f"/chain/{ALLOW}")
    assert r.status == 200 and r.json["entries"] == [], r
    assert d.kernel_entries(ALLOW, 4) == set() and d.kernel_entries(ALLOW, 6) == set()
    # never_block is the block chains' rule, never_allow the allow chains'.
    block(d, ALLOW, "ipv4/127.0.0.1")
    assert d.kernel_entries(ALLOW, 4) == {"127.0.0.1/32"}
    r = d.request("PUT", "/chain/f2b-web/ipv4/127.0.0.1")
    assert r.status == 409 and r.json["error"] == "never_block", r
    block(d, "f2b-web", "ipv4/203.0.113.7")


# -- the config ------------------------------------------------------------------------------------------------

def check_config(workdir: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    # -check_config never binds or touches netfilter, so it runs directly, outside any namespace.
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return subprocess.run([*web_ipt_d(), "-check_config", "-config", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_check_config_refuses_an_allow_chain_that_cannot_overrule_a_block_chain(workdir: Path, pki: PKI,
                                                                                  user_hashes: dict[str, str]) -> None:
    config = base_config(workdir, pki, user_hashes)
    config["chains"] = {"f2b-web": {"hooks": ["INPUT"], "target": "DROP", "backend": "ipset"},
                        ALLOW: {"hooks": ["INPUT"], "target": "ACCEPT", "backend": "nftables"}}
    result = check_config(workdir, config)
    assert result.returncode == 1, result
    problems = [line for line in result.stderr.splitlines() if f"chains.{ALLOW}.hooks" in line]
    assert len(problems) == 1 and "f2b-web" in problems[0], result.stderr
    # Both on the legacy tables is fine; on nftables at two priorities it is not.
    config["chains"][ALLOW]["backend"] = "iptables"
    assert check_config(workdir, config).returncode == 0
    config["chains"]["f2b-web"] = {"hooks": ["INPUT"], "target": "DROP", "backend": "nftables", "priority": -20}
    config["chains"][ALLOW]["backend"] = "nftables"
    result = check_config(workdir, config)
    assert result.returncode == 1 and "f2b-web" in result.stderr and f"chains.{ALLOW}.hooks" in result.stderr, result


def test_check_config_warns_of_an_allow_chain_any_user_may_write(workdir: Path, pki: PKI,
                                                                  user_hashes: dict[str, str]) -> None:
    config = base_config(workdir, pki, user_hashes)
    add_allow_chain(config, "iptables")
    result = check_config(workdir, config)
    assert result.returncode == 0, result
    warnings = [line for line in result.stderr.splitlines() if ": warning: allow chain" in line]
    # admin and faraway may use every chain ('*'); reader too, but only to read.
    assert len(warnings) == 1 and "admin" in warnings[0] and "faraway" in warnings[0], result.stderr
    assert "reader" not in warnings[0]
    for user in ("admin", "faraway"):
        config["users"][user]["chains"] = ["f2b-*", "admin-list", ALLOW]
    result = check_config(workdir, config)
    assert result.returncode == 0 and ": warning: allow chain" not in result.stderr, result


@pytest.mark.root
@pytest.mark.backends
def test_a_chain_that_leaves_the_config_is_unhooked_and_keeps_its_entries(daemon: Daemon) -> None:
    """On every backend alike: a reload without the chain takes its jumps out at once (its blocks stop blocking),
    the entries stay in the store and come back hooked with the chain; after a restart without it, too."""
    d = daemon
    d.start()
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.60").status == 201

    def hooked() -> bool:
        if d.backend == "nftables":
            out = d.ns.run(["nft", "list", "table", "inet", "web-ipt-d"]).stdout
            return "jump f2b-ssh" in out
        return any(r == "-A INPUT -j f2b-ssh" for r in d.rules(4))

    assert hooked()
    kept = d.config["chains"].pop("f2b-ssh")
    d.reload()
    assert not hooked()
    assert d.request("GET", "/chain/f2b-ssh").status == 404       # no longer managed through the API
    d.stop()
    d.start()                                                     # a start without it unhooks it too
    assert not hooked()
    d.config["chains"]["f2b-ssh"] = kept
    d.reload()
    assert hooked()
    assert [e["network"] for e in d.request("GET", "/chain/f2b-ssh").json["entries"]] == ["203.0.113.60/32"]
