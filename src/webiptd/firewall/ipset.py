"""The ipset backend: per chain and family, one iptables rule `-m set --match-set <chain>-v4 src -j DROP|REJECT`
(`dst` for a chain with `match: destination`) that matches a hash:net set of the blocked networks, with kernel
timeouts. See ipset(8), iptables-extensions(8).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import re
import shutil
import socket
import subprocess
import time
from typing import Callable, Iterable, Iterator, Mapping

import iptc

from webiptd.config import Chain
from webiptd.firewall.ipset_netlink import (
    IPSET_CMD_ADD, IPSET_CMD_DEL, IPSET_ERR_EXIST, IPSET_ERR_HASH_FULL, Element, Header, IpsetError, IpsetNetlink,
)
from webiptd.firewall.ops import Add, CapacityExceeded, Op, Remove, inverse, undo
from webiptd.firewall.xtables import ANY, LOCK_PATH, VERSIONS, Xtables, new_rule, per_address, verdict
from webiptd.net import Network

logger = logging.getLogger(__name__)

SET_TYPE = "hash:net"
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
FAMILY_NAMES = {4: "inet", 6: "inet6"}
# IPSET_MAX_TIMEOUT in include/linux/netfilter/ipset/ip_set_timeout.h, about 24.8 days; ipset silently
# clamps a longer timeout, which would unblock early.
MAX_TIMEOUT = 2_147_483
# A batch this big goes through one `ipset -exist restore` rather than netlink: from here on it takes no
# longer, and holds the GIL a third as long (the parsing is in the child); below it netlink is faster.
BULK_MIN = 8192
SWAP_NAME = "web-ipt-d-swap"  # ipset names are at most 31 characters; chain names at most 28
TOOL_TIMEOUT = 300.0
DIRECTION = {"source": "src", "destination": "dst"}  # a chain's match, as the set match's flag


def set_name(chain: str, version: int) -> str:
    """`<chain>-v4` and `<chain>-v6` hold a chain's entries."""
    return f"{chain}-v{version}"


def kernel_timeout(expires_at: float | None, now: float) -> int:
    """The entry's ipset timeout in seconds; 0 (none) when permanent or past ipset's cap.

    The kernel expires entries by itself, which keeps it in step with the worker's clock even while the
    daemon is down; the worker's own expiry, which runs for every backend, removes the others on time.
    """
    if expires_at is None:
        return 0
    left = math.ceil(expires_at - now)
    if left > MAX_TIMEOUT:
        return 0  # the worker's expiry removes it; a capped kernel timeout would unblock it early
    return max(1, left)


def _match_target(version: int, rule: iptc.Rule) -> tuple[str, str, str] | None:
    """(set, target, src or dst) for a rule of our match shape, `-m set --match-set SET src|dst -j DROP|REJECT`;
    else None."""
    if len(rule.matches) != 1 or rule.matches[0].name != "set":
        return None
    if rule.src != ANY[version] or rule.dst != ANY[version]:
        return None
    target = verdict(version, rule)
    if target is None:
        return None
    params = rule.matches[0].get_all_parameters()
    match_set = params.get("match-set", [])
    if set(params) != {"match-set"} or len(match_set) != 2 or match_set[1] not in DIRECTION.values():
        return None
    return match_set[0], target, match_set[1]


def _runs(ops: list[Op]) -> Iterator[list[Op]]:
    """The ops in order, cut where an entry comes again: within a run, messages may be retried out of order."""
    run: list[Op] = []
    seen: set[tuple[str, Network]] = set()
    for op in ops:
        key = (op.chain, op.network)
        if key in seen:
            yield run
            run, seen = [], set()
        seen.add(key)
        run.append(op)
    if run:
        yield run


def _element(op: Op, exclusive: bool, now: float) -> Element:
    """The netlink message for `op`; an exclusive add fails on a present entry rather than replace it."""
    name = set_name(op.chain, op.network.version)
    if isinstance(op, Remove):
        return Element(IPSET_CMD_DEL, name, op.network, True)
    return Element(IPSET_CMD_ADD, name, op.network, exclusive, kernel_timeout(op.expires_at, now))


def _without_retarget_removes(ops: list[Op]) -> list[Op]:
    """Drop each Remove that an Add of the same entry follows (the worker's way to change a target).

    The target belongs to the match rule, not to the entry; removing first would unblock it for a moment.
    """
    kept: list[Op] = []
    added: set[tuple[str, Network]] = set()
    for op in reversed(ops):
        key = (op.chain, op.network)
        if isinstance(op, Add):
            added.add(key)
        elif key in added:
            continue
        kept.append(op)
    return kept[::-1]


class IpsetBackend:
    """The sets through netlink (ipset_netlink.py), and `ipset` for what is rare or big: create, save, restore.

    ipset has no lock like the xtables one: the sets are ours, and only the worker thread writes them.
    """

    name = "ipset"

    def __init__(self, lock_path: str = LOCK_PATH, clock: Callable[[], float] = time.time):
        # The match rules live in the filter tables under the same lock, chains and hooks as the iptables backend's.
        self._xt = Xtables(lock_path)
        self._clock = clock
        self._nl = IpsetNetlink()  # its socket opens on first use, in the worker thread
        self._tool: str | None = None
        self._targets: dict[str, str] = {}  # chain -> target, as last prepared

    # -- the two ways in --------------------------------------------------------------

    def _run(self, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
        if self._tool is None:
            self._tool = shutil.which("ipset")
            if self._tool is None:
                raise RuntimeError("the ipset backend needs the ipset command (Debian and Ubuntu: apt install ipset)")
        return subprocess.run([self._tool, *args], input=script, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})

    # -- sets ---------------------------------------------------------------------------

    def _header(self, name: str) -> Header | None:
        return self._nl.header(name)

    def _create(self, name: str, version: int, maxelem: int) -> None:
        # Through the command, not netlink: a create names the type's revision, and the kernel may know
        # newer ones than the installed ipset command, which could then not `ipset save` the set. The
        # command picks the newest revision both know. It is rare: start-up, a reload, a lost set.
        # timeout 0: the set supports per-entry timeouts, and an entry added without one is permanent.
        created = self._run("create", name, SET_TYPE, "family", FAMILY_NAMES[version], "maxelem", str(maxelem),
                            "timeout", "0")
        if created.returncode != 0:
            raise RuntimeError(f"ipset create {name} failed: {created.stderr.strip()}")

    def _ensure_set(self, chain: Chain, version: int) -> None:
        """Create the set, or make an existing one fit the config.

        A set with another maxelem, or without timeout support, is rebuilt with its entries and swapped in;
        one holding more entries than the new maxelem keeps its own, with a WARNING. A set of our name with
        another type or family is not ours: start-up fails and says so.
        """
        name = set_name(chain.name, version)
        header = self._header(name)
        if header is None:
            self._create(name, version, chain.maxelem)
            logger.info("created ipset %s (%s family %s maxelem %d, with timeouts)", name, SET_TYPE,
                        FAMILY_NAMES[version], chain.maxelem)
            return
        if header.type != SET_TYPE or header.family != FAMILIES[version]:
            raise RuntimeError(f"ipset {name} exists as {header.type} (family {header.family}), but chain "
                               f"{chain.name} needs a {SET_TYPE} family {FAMILY_NAMES[version]} set of that "
                               f"name; rename or destroy the other set")
        if header.timeouts and header.maxelem == chain.maxelem:
            return
        maxelem = chain.maxelem
        if header.elements > maxelem:
            logger.warning("ipset %s holds %d entries, more than chains.%s.maxelem (%d); it keeps maxelem %d",
                           name, header.elements, chain.name, maxelem, header.maxelem)
            if header.timeouts:
                return
            maxelem = header.maxelem
        self._rebuild(name, version, maxelem)
        logger.warning("rebuilt ipset %s with maxelem %d and timeout support (it had maxelem %d%s), "
                       "keeping its %d entries", name, maxelem, header.maxelem,
                       "" if header.timeouts else " and no timeouts", header.elements)

    def _rebuild(self, name: str, version: int, maxelem: int) -> None:
        """ipset cannot change maxelem in place: fill a new set with the entries, then swap the two."""
        self._nl.destroy(SWAP_NAME)  # left over from an interrupted rebuild
        self._create(SWAP_NAME, version, maxelem)
        try:
            saved = self._run("save", name)
            if saved.returncode != 0:
                raise RuntimeError(f"ipset save {name} failed: {saved.stderr.strip()}")
            lines = [line.split(" ", 2) for line in saved.stdout.splitlines() if line.startswith("add ")]
            script = "".join(f"add {SWAP_NAME} {rest}\n" for _, _, rest in lines)
            restored = self._run("-exist", "restore", script=script)
            if restored.returncode != 0:
                raise RuntimeError(f"copying ipset {name} failed: {restored.stderr.strip()}")
            self._nl.swap(SWAP_NAME, name)  # the match rule follows the name, atomically
        finally:
            try:
                self._nl.destroy(SWAP_NAME)  # the old set after a swap, else the unused new one
            except (IpsetError, OSError):
                logger.warning("could not destroy the temporary ipset %s; the next rebuild will", SWAP_NAME)

    def _members(self, name: str) -> list[Network]:
        # One `ipset save`: 0.4 s for 100k entries.
        if self._header(name) is None:
            return []
        saved = self._run("save", name)
        if saved.returncode != 0:
            raise RuntimeError(f"ipset save {name} failed: {saved.stderr.strip()}")
        members = []
        for line in saved.stdout.splitlines():
            words = line.split()
            if len(words) < 3 or words[0] != "add":
                continue
            if "nomatch" in words[3:]:
                logger.warning("ipset %s holds a nomatch entry web-ipt-d did not make; leaving it alone: %s",
                               name, words[2])
                continue
            members.append(ipaddress.ip_network(words[2]))
        return members

    # -- the match rules ------------------------------------------------------------------

    def _ensure_rule(self, version: int, chain: Chain) -> None:
        """One match rule with the chain's target and match; our per-address rules move into the set. The caller
        commits.

        The target and the match (src or dst) belong to the match rule, so to the whole chain: when the config
        changes either, the rule is replaced and every entry takes the new one. Per-address rules (`-s` or `-d`)
        are what a chain that used the iptables backend holds: their networks go into the set (without a kernel
        timeout: the worker still expires them on time) before the rules go, in the commit that adds the match
        rule, so none is unblocked on the way. Rules of any other shape are left alone.
        """
        name = set_name(chain.name, version)
        direction = DIRECTION[chain.match]
        ipt_chain = iptc.Chain(self._xt.table(version), chain.name)
        kept = False
        stale: list[iptc.Rule] = []
        moved: list[tuple[iptc.Rule, Network, str]] = []
        for rule in ipt_chain.rules:
            matched = _match_target(version, rule)
            if matched is not None and matched[0] == name:
                if not kept and matched[1:] == (chain.target, direction):
                    kept = True
                else:
                    stale.append(rule)
                continue
            parsed = per_address(version, rule, chain.match)
            if parsed is not None:  # `-s` or `-d`: the set takes the chain's match, as it takes its target
                moved.append((rule, parsed[0], parsed[1]))
        if not kept:
            rule = new_rule(version)
            match = rule.create_match("set")
            match.match_set = [name, direction]
            rule.target = rule.create_target(chain.target)
            ipt_chain.append_rule(rule)
            logger.info("added rule %s -m set --match-set %s %s -j %s (ipv%d)", chain.name, name, direction,
                        chain.target, version)
        for rule in stale:
            ipt_chain.delete_rule(rule)
            logger.info("removed a stale match rule for %s from chain %s (ipv%d)", name, chain.name, version)
        if moved:
            # Into the set first; the rules go only with the commit that follows, so nothing is unblocked meanwhile.
            self._apply([Add(chain.name, network, target) for _, network, target in moved], {})
            for rule, _, _ in moved:
                ipt_chain.delete_rule(rule)
            retargeted = sum(target != chain.target for _, _, target in moved)
            logger.warning("moved %d per-address rules of chain %s (ipv%d) into ipset %s%s", len(moved),
                           chain.name, version, name,
                           f"; {retargeted} of them now take the chain's target {chain.target}" if retargeted else "")

    def _rule_targets(self, names: list[str]) -> dict[tuple[str, int], str]:
        found: dict[tuple[str, int], str] = {}
        with self._xt.lock():
            for version in VERSIONS:
                self._xt.table(version).refresh()
                found.update((key, target) for key, (target, _) in self._targets_in(version, names).items())
        return found

    def _targets_in(self, version: int, names: list[str]) -> dict[tuple[str, int], tuple[str, str]]:
        """(chain, version) -> the target and direction (src, dst) of its match rule, in the family's table as
        last refreshed."""
        found: dict[tuple[str, int], tuple[str, str]] = {}
        for name in names:
            for rule in self._xt.rules(version, name):
                matched = _match_target(version, rule)
                if matched is not None and matched[0] == set_name(name, version):
                    found.setdefault((name, version), matched[1:])
        return found

    # -- the Backend interface -----------------------------------------------------------

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        # The kernel lets an entry go at its timeout rounded up, so never before the worker's own expiry:
        # a set holding fewer entries than the worker has means some were taken out (`ipset flush`).
        chains = list(chains)
        for chain in chains:
            held = 0
            for version in VERSIONS:
                header = self._header(set_name(chain.name, version))
                if header is None:
                    return f"ipset {set_name(chain.name, version)} is gone"
                held += header.elements
            if held < counts.get(chain.name, 0):
                return f"the ipsets of chain {chain.name} hold {held} entries for {counts[chain.name]} blocks"
        with self._xt.lock():
            for version in VERSIONS:
                self._xt.table(version).refresh()
                targets = self._targets_in(version, [c.name for c in chains])
                for chain in chains:
                    gone = self._xt.structure_missing(version, chain)
                    if gone is not None:
                        return gone
                    found = targets.get((chain.name, version))
                    if found is None or found[1] != DIRECTION[chain.match]:
                        return f"the match rule of chain {chain.name} (ipv{version}) is gone"
        return None

    def expires_in_kernel(self, chain: str) -> bool:
        return True

    def shares_target(self, chain: str) -> bool:
        return True

    def prepare(self, chains: Iterable[Chain]) -> None:
        chains = list(chains)
        if not chains:
            return
        for chain in chains:
            self._targets[chain.name] = chain.target
            for version in VERSIONS:
                self._ensure_set(chain, version)  # before the rules: a match rule needs its set to exist
        with self._xt.lock():
            for version in VERSIONS:
                table = self._xt.table(version)
                table.refresh()
                for chain in chains:
                    self._xt.ensure_chain(version, chain)
                    self._ensure_rule(version, chain)
                table.commit()

    def read(self, chains: Iterable[str]) -> dict[tuple[str, Network], str]:
        names = list(chains)
        targets = self._rule_targets(names)
        found: dict[tuple[str, Network], str] = {}
        for name in names:
            for version in VERSIONS:
                target = targets.get((name, version), self._targets.get(name))
                members = self._members(set_name(name, version))
                if target is None:
                    if members:
                        logger.warning("ipset %s has %d entries but no match rule in chain %s; leaving them alone",
                                       set_name(name, version), len(members), name)
                    continue
                for network in members:
                    found[(name, network)] = target
        return found

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        self._apply(_without_retarget_removes(list(ops)), chains)

    def close(self) -> None:
        self._nl.close()
        self._xt.close()

    # -- applying ---------------------------------------------------------------------------

    def _apply(self, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        """An Add of an entry in the set replaces its timeout (as `ipset -exist add`); a Remove of one that is
        gone is not an error. A full set raises CapacityExceeded, once what the batch did is undone."""
        if len(ops) >= BULK_MIN:
            self._apply_bulk(ops, chains)
        else:
            self._apply_netlink(ops, chains)

    def _apply_netlink(self, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        """Every op over netlink, many to a send; on a failure, undo what was done (newest first) and raise.

        A socket error (no ack in time) leaves the messages in flight unknown; the worker's reconcile after
        a failed batch settles them.
        """
        now = self._clock()
        done: list[Op] = []  # the op that undoes each change made, in the order made
        try:
            for run in _runs(ops):
                self._apply_run(run, now, chains, done)
        except Exception:
            self._undo(done, now)
            raise

    def _apply_run(self, ops: list[Op], now: float, chains: Mapping[str, Chain], done: list[Op]) -> None:
        """Send every op's message; then, for the few that need it, a second: a refresh, or a retry.

        The undo of a change to an existing entry restores the entry without a kernel timeout (its old
        one is not known): the worker still expires it on time.
        """
        # (op, exclusive): an add that is not known to replace an entry goes in exclusively, so that its
        # ack says whether the entry was new; a del always does, so that it says whether one was there.
        pending = [(op, not (isinstance(op, Add) and op.replaces)) for op in ops]
        prepared: set[str] = set()
        while pending:
            codes = self._nl.apply([_element(op, exclusive, now) for op, exclusive in pending])
            again: list[tuple[Op, bool]] = []
            missing: dict[str, Chain] = {}
            missing_sets: set[str] = set()
            failure: Exception | None = None
            for (op, exclusive), code in zip(pending, codes):
                name = set_name(op.chain, op.network.version)
                if code == 0:
                    # An exclusive add made the entry and a del took one out: inverse() undoes them. An add
                    # that was not exclusive may have replaced an entry: its undo puts that back.
                    done.append(inverse(op) if exclusive else Add(op.chain, op.network, op.target))
                elif isinstance(op, Remove):
                    if code in (IPSET_ERR_EXIST, errno.ENOENT):  # not in the set, or no such set
                        logger.debug("%s was already gone from ipset %s", op.network, name)
                    else:
                        failure = failure or IpsetError(f"ipset del {name} {op.network}", code)
                elif code == IPSET_ERR_EXIST and exclusive:
                    again.append((op, False))  # already there: take the new timeout, as `ipset -exist add` does
                elif code == errno.ENOENT and op.chain in chains and op.chain not in prepared:
                    missing[op.chain] = chains[op.chain]
                    missing_sets.add(name)
                    again.append((op, exclusive))
                elif code == IPSET_ERR_HASH_FULL:
                    failure = failure or CapacityExceeded(f"ipset {name} is full (maxelem)")
                else:
                    failure = failure or IpsetError(f"ipset add {name} {op.network}", code)
            if failure is not None:
                raise failure
            if missing:
                # The set went away behind our back (its match rule must have gone first); make both again.
                logger.warning("ipset %s is missing; creating it and its match rule again",
                               ", ".join(sorted(missing_sets)))
                self.prepare(missing.values())
                prepared.update(missing)
            pending = again

    def _undo(self, done: list[Op], now: float) -> None:
        undo = done[::-1]
        try:
            codes = self._nl.apply([_element(op, False, now) for op in undo])
        except Exception:
            logger.exception("could not undo the %d changes of a failed batch", len(undo))
            return
        for op, code in zip(undo, codes):
            if code and not (isinstance(op, Remove) and code == IPSET_ERR_EXIST):
                logger.error("could not undo %s of a failed batch: %s", op,
                             IpsetError(set_name(op.chain, op.network.version), code))

    def _apply_bulk(self, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        """One `ipset -exist restore` for many ops, when every set they add to exists and has room."""
        adding: dict[str, int] = {}
        for op in ops:
            if isinstance(op, Add):
                name = set_name(op.chain, op.network.version)
                adding[name] = adding.get(name, 0) + 1
        for name, count in adding.items():
            header = self._header(name)
            # Conservative (some adds may replace entries); the precise path finds the one that does not fit.
            if header is None or header.elements + count > header.maxelem:
                self._apply_netlink(ops, chains)
                return
        now = self._clock()
        result = self._run("-exist", "restore", script="".join(self._line(op, now) for op in ops))
        if result.returncode == 0:
            return
        # restore stops at the first bad line: undo the ones before it. An add that only refreshed an
        # entry's timeout is undone as a removal; the worker's reconcile after the failed batch puts it back.
        failed = re.search(r"line (\d+)", result.stderr)
        back = undo(ops[: int(failed.group(1)) - 1] if failed else ops)
        if back:
            undone = self._run("-exist", "restore", script="".join(self._line(op, now) for op in back))
            if undone.returncode != 0:
                logger.error("could not undo a failed ipset restore: %s", undone.stderr.strip())
        if "is full" in result.stderr:
            raise CapacityExceeded(f"an ipset is full (maxelem): {result.stderr.strip()}")
        raise RuntimeError(f"ipset restore failed: {result.stderr.strip()}")

    @staticmethod
    def _line(op: Op, now: float) -> str:
        name = set_name(op.chain, op.network.version)
        if isinstance(op, Add):
            return f"add {name} {op.network} timeout {kernel_timeout(op.expires_at, now)}\n"
        return f"del {name} {op.network}\n"
