"""The ipset backend: per chain and family, hash sets of the blocked networks with kernel timeouts, and one iptables
rule per set in the chain that matches it. See ipset(8), iptables-extensions(8) (the set match).

The sets of chain C (names at most 31 characters: a chain name is at most 28, and each suffix is 3), for family 4
(6 alike), with `src` as written here and `dst` for a chain with `match: destination`:

    C-v4  hash:net       all traffic of a network         -m set --match-set C-v4 src -j TARGET
    C-p4  hash:net,port  some ports of one protocol        -m set --match-set C-p4 src,dst -j TARGET
                         (elements NET,PROTO:PORT; the ports are destination ports: `dst,dst` matches the
                         destination address, then the port)
    C-t4 C-u4 C-s4 C-d4 C-l4  hash:net  every port of tcp, udp, sctp, dccp, udplite
                                                          -p PROTO -m set --match-set C-t4 src -j TARGET

A port set cannot say "every port" (port 0 is a port for tcp), hence a set per protocol for that. C-v4 and its rule
are made at prepare; the port and protocol sets and their rules are made by the first block that needs them and are
kept (prepare keeps the ones that exist fitting the config, and never destroys a set), so a chain without scoped
blocks holds exactly one set and one rule per family, and costs a packet no more rules than before. ipset can match
ports of tcp, udp, sctp and udplite only (ip_set_get_port()): dccp has its protocol set, and no ports.
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import iptc

from webiptd.config import TARGETS, Chain
from webiptd.firewall.ipset_netlink import (
    IPSET_CMD_ADD, IPSET_CMD_DEL, IPSET_ERR_EXIST, IPSET_ERR_HASH_FULL, Element, Header, IpsetError, IpsetNetlink,
)
from webiptd.firewall.ops import Add, CapacityExceeded, Items, Key, Op, Remove, adds, key_of
from webiptd.firewall.xtables import ANY, DEFAULT_REJECT, LOCK_PATH, VERSIONS, Xtables, new_rule, per_address, verdict
from webiptd.net import Network, parse_listed, unpacked
from webiptd.scope import PROTOCOL_NAMES, PROTOCOLS, Ranges, Scope

logger = logging.getLogger(__name__)

SET_TYPE = "hash:net"
PORT_SET_TYPE = "hash:net,port"
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
PORT_PROTOCOLS = ("tcp", "udp", "sctp", "udplite")  # what ip_set_get_port() finds ports in


@dataclass(frozen=True)
class SetKind:
    """One of a chain's sets in a family: its name's suffix letter, its type, and the protocol of its rule."""

    letter: str
    type: str
    proto: str | None = None  # a protocol set's rule has `-p PROTO`

    @property
    def ports(self) -> bool:
        return self.type == PORT_SET_TYPE


ALL = SetKind("v", SET_TYPE)
PORTS = SetKind("p", PORT_SET_TYPE)
PROTOCOL_SETS = {proto: SetKind(letter, SET_TYPE, proto)
                 for proto, letter in (("tcp", "t"), ("udp", "u"), ("sctp", "s"), ("dccp", "d"), ("udplite", "l"))}
SCOPED = (PORTS, *PROTOCOL_SETS.values())  # made when first needed
KINDS = (ALL, *SCOPED)


def set_name(chain: str, version: int, kind: SetKind = ALL) -> str:
    """`<chain>-v4` holds a chain's entries for all traffic, `<chain>-p4` its port entries, `<chain>-t4` ... its
    protocol entries (see the module's docstring)."""
    return f"{chain}-{kind.letter}{version}"


def kind_of(scope: Scope | None) -> SetKind:
    if scope is None:
        return ALL
    if not scope.ports:
        return PROTOCOL_SETS[scope.proto]
    if scope.proto not in PORT_PROTOCOLS:
        raise ValueError(f"ipset cannot match {scope.proto} ports (only {', '.join(PORT_PROTOCOLS)})")
    return PORTS


def flags(match: str, kind: SetKind) -> str:
    """The set match's flags: the address (src or dst, the chain's match), then for a port set the destination port."""
    return f"{DIRECTION[match]},dst" if kind.ports else DIRECTION[match]


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


def _protocol_name(text: str) -> str | None:
    """Our name of a protocol as python-iptables or ipset writes it (a name, or a number it has none for)."""
    if text in PROTOCOLS:
        return text
    return PROTOCOL_NAMES.get(int(text)) if text.isdigit() else None


def _verdict(version: int, rule: iptc.Rule) -> tuple[str, str | None] | None:
    """(target, protocol) of a rule of our shapes' common part: no interface, no fragment, DROP or REJECT with its
    default reply, and any protocol or one of ours (`-p tcp`, not negated); None for any other rule."""
    protocol = rule.protocol
    if protocol in (None, "ip", "all"):
        target = verdict(version, rule)
        return None if target is None else (target, None)
    name = _protocol_name(protocol)
    if name is None or rule.in_interface or rule.out_interface or (version == 4 and rule.fragment):
        return None
    target = rule.target.name
    if target not in TARGETS:
        return None
    if target == "REJECT" and rule.target.get_all_parameters().get("reject-with") != [DEFAULT_REJECT[version]]:
        return None
    return target, name


class MatchRule(NamedTuple):
    set: str
    target: str
    flags: str  # src, dst, src,dst or dst,dst
    proto: str | None


def _match_rule(version: int, rule: iptc.Rule) -> MatchRule | None:
    """The parts of a rule of our match shape, `[-p PROTO] -m set --match-set SET FLAGS -j DROP|REJECT`; else None."""
    if len(rule.matches) != 1 or rule.matches[0].name != "set":
        return None
    if rule.src != ANY[version] or rule.dst != ANY[version]:
        return None
    found = _verdict(version, rule)
    if found is None:
        return None
    params = rule.matches[0].get_all_parameters()
    match_set = params.get("match-set", [])
    if set(params) != {"match-set"} or len(match_set) != 2:
        return None
    if match_set[1] not in {flags(match, kind) for match in DIRECTION for kind in (ALL, PORTS)}:
        return None
    return MatchRule(match_set[0], found[0], match_set[1], found[1])


def _fits(found: MatchRule, kind: SetKind) -> bool:
    """Whether a match rule has the shape of `kind`'s rule (whatever its target and match)."""
    return found.proto == kind.proto and ("," in found.flags) == kind.ports


# -- port ranges ---------------------------------------------------------------------------------

def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return tuple((max(lo, blo), min(hi, bhi)) for lo, hi in a for blo, bhi in b if max(lo, blo) <= min(hi, bhi))


def _subtract(a: Ranges, b: Ranges) -> Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in a:
        for blo, bhi in b:
            if bhi < lo or blo > hi:
                continue
            if blo > lo:
                out.append((lo, blo - 1))
            lo = bhi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return tuple(out)


# -- what a batch is, message by message -----------------------------------------------------------

class _Step(NamedTuple):
    """One message of a batch: the op it is (part of), the element, and the elements that take back what it did."""

    op: Op
    kind: SetKind
    element: Element
    undo: tuple[Element, ...]


def _put_back(element: Element) -> Element:
    """Put an element back that was there, without a kernel timeout (its old one is not known; the worker still
    expires it on time)."""
    return element._replace(cmd=IPSET_CMD_ADD, exclusive=False, timeout=0)


def _take_out(element: Element) -> Element:
    return element._replace(cmd=IPSET_CMD_DEL, exclusive=False, timeout=None)


def _steps(op: Op, held: Ranges, now: float) -> list[_Step]:
    """The messages of `op`.

    An entry of all traffic or of a whole protocol is one element: an add that is not known to replace one goes in
    exclusively, so that its ack says whether the element was new; a del always does, so that it says whether one
    was there. A port entry is one element per port: a Remove is one message per port range, not exclusive (a
    partly missing range is no error); an Add is one message per range of the ports in `held` (those the kernel
    holds already: the atom it replaces), not exclusive, whose undo puts them back, and one exclusive message per
    other port, so that its ack says whether that port was new (the kernel stops an exclusive range at the
    first port it holds, having added the ones before, which an undo could not tell apart).
    """
    kind = kind_of(op.scope)
    name = set_name(op.chain, op.network.version, kind)
    if not kind.ports:  # the elements are made directly: this is the path of a million Adds
        network = op.network
        if isinstance(op, Remove):
            return [_Step(op, kind, Element(IPSET_CMD_DEL, name, network, True),
                          (Element(IPSET_CMD_ADD, name, network, False, 0),))]
        element = Element(IPSET_CMD_ADD, name, network, not op.replaces, kernel_timeout(op.expires_at, now))
        return [_Step(op, kind, element, (Element(IPSET_CMD_DEL, name, network, False) if element.exclusive
                                          else Element(IPSET_CMD_ADD, name, network, False, 0),))]
    assert op.scope is not None
    proto = PROTOCOLS[op.scope.proto]
    steps = []
    for ports in op.scope.ports:
        if isinstance(op, Remove):
            element = Element(IPSET_CMD_DEL, name, op.network, False, None, proto, ports)
            steps.append(_Step(op, kind, element, (_put_back(element),)))
            continue
        element = Element(IPSET_CMD_ADD, name, op.network, False, kernel_timeout(op.expires_at, now), proto, ports)
        for r in _intersect((ports,), held):
            part = element._replace(ports=r)
            steps.append(_Step(op, kind, part, (_put_back(part),)))
        for lo, hi in _subtract((ports,), held):
            for port in range(lo, hi + 1):
                part = element._replace(ports=(port, port), exclusive=True)
                steps.append(_Step(op, kind, part, (_take_out(part),)))
    return steps


def _whole_steps(ops: list[Op], now: float) -> list[_Step]:
    """_steps of many ops of whole networks (scope None), made in one loop: a million Adds pass here."""
    names: dict[tuple[str, int], str] = {}
    steps = []
    for op in ops:
        network = op.network
        name = names.get((op.chain, network.version))
        if name is None:
            name = names[(op.chain, network.version)] = set_name(op.chain, network.version)
        if isinstance(op, Remove):
            steps.append(_Step(op, ALL, Element(IPSET_CMD_DEL, name, network, True),
                               (Element(IPSET_CMD_ADD, name, network, False, 0),)))
        elif op.replaces:
            steps.append(_Step(op, ALL, Element(IPSET_CMD_ADD, name, network, False,
                                                kernel_timeout(op.expires_at, now)),
                               (Element(IPSET_CMD_ADD, name, network, False, 0),)))
        else:
            steps.append(_Step(op, ALL, Element(IPSET_CMD_ADD, name, network, True,
                                                kernel_timeout(op.expires_at, now)),
                               (Element(IPSET_CMD_DEL, name, network, False),)))
    return steps


Slot = tuple[str, Network, SetKind, str | None]  # the elements an op touches: chain, network, set, protocol


def _slot(op: Op) -> Slot:
    kind = kind_of(op.scope)
    return op.chain, op.network, kind, op.scope.proto if kind.ports and op.scope is not None else None


def _plan(ops: list[Op]) -> list[tuple[Op, Ranges]]:
    """The ops to send, each with the ports it holds already (port Adds), in order.

    A Remove followed by an Add of the same entry is how the worker changes a target: the target belongs to the
    match rule, not to the entry, so the Remove is dropped (removing first would unblock it for a moment). For
    ports, a Remove of an atom followed by an Add of another of the same network and protocol (the union of its
    ports changed) becomes the Add, then a Remove of only the ports the new atom leaves out: the ports in both
    stay blocked throughout.
    """
    plan: list[tuple[Op, Ranges]] = []
    nxt: dict[int, int] = {}  # index of an op -> index of the next op of its slot
    last: dict[Slot, int] = {}
    for i in range(len(ops) - 1, -1, -1):
        slot = _slot(ops[i])
        if slot in last:
            nxt[i] = last[slot]
        last[slot] = i
    paired: dict[int, Remove] = {}  # index of an Add -> the Remove before it that it replaces
    for i, op in enumerate(ops):
        j = nxt.get(i)
        if isinstance(op, Remove) and j is not None and isinstance(ops[j], Add):
            if kind_of(op.scope).ports or key_of(op) == key_of(ops[j]):
                paired[j] = op
                continue
        if isinstance(op, Add) and i in paired:
            old = paired[i]
            if not kind_of(op.scope).ports:
                plan.append((op, ()))
                continue
            assert op.scope is not None and old.scope is not None
            new_ports, old_ports = op.scope.ports, old.scope.ports
            plan.append((op, new_ports if op.replaces else _intersect(new_ports, old_ports)))
            gone = _subtract(old_ports, new_ports)
            if gone:
                plan.append((Remove(old.chain, old.network, old.target, Scope(old.scope.proto, gone)), ()))
            continue
        plan.append((op, op.scope.ports if isinstance(op, Add) and op.replaces and op.scope is not None else ()))
    return plan


def _runs(plan: list[tuple[Op, Ranges]]) -> Iterator[list[tuple[Op, Ranges]]]:
    """The plan in order, cut where a slot comes again (an Add and the Remove that follows it from _plan excepted,
    their ports are apart): within a run, messages may be retried out of order."""
    run: list[tuple[Op, Ranges]] = []
    seen: set[Slot] = set()
    previous: Op | None = None
    for op, held in plan:
        slot = _slot(op)
        follows = (isinstance(op, Remove) and isinstance(previous, Add) and kind_of(op.scope).ports
                   and _slot(previous) == slot)
        if slot in seen and not follows:
            yield run
            run, seen = [], set()
        seen.add(slot)
        run.append((op, held))
        previous = op
    if run:
        yield run


def _entry_text(element: Element) -> str:
    """An element as ipset(8) writes it: `198.51.100.0/24`, `198.51.100.0/24,tcp:80-90`."""
    if element.ports is None or element.proto is None:
        return str(element.network)
    lo, hi = element.ports
    return f"{element.network},{PROTOCOL_NAMES[element.proto]}:{lo}" + (f"-{hi}" if hi != lo else "")


def _line(element: Element) -> str:
    """An `ipset -exist restore` line."""
    if element.cmd == IPSET_CMD_ADD:
        return f"add {element.set} {_entry_text(element)} timeout {element.timeout or 0}\n"
    return f"del {element.set} {_entry_text(element)}\n"


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

    def _command(self) -> str:
        if self._tool is None:
            self._tool = shutil.which("ipset")
            if self._tool is None:
                raise RuntimeError("the ipset backend needs the ipset command (Debian and Ubuntu: apt install ipset)")
        return self._tool

    def _run(self, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._command(), *args], input=script, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})

    # -- sets ---------------------------------------------------------------------------

    def _header(self, name: str) -> Header | None:
        return self._nl.header(name)

    def _create(self, name: str, version: int, maxelem: int, set_type: str) -> None:
        # Through the command, not netlink: a create names the type's revision, and the kernel may know
        # newer ones than the installed ipset command, which could then not `ipset save` the set. The
        # command picks the newest revision both know. It is rare: start-up, a reload, a lost set.
        # timeout 0: the set supports per-entry timeouts, and an entry added without one is permanent.
        created = self._run("create", name, set_type, "family", FAMILY_NAMES[version], "maxelem", str(maxelem),
                            "timeout", "0")
        if created.returncode != 0:
            raise RuntimeError(f"ipset create {name} failed: {created.stderr.strip()}")

    def _ensure_set(self, chain: Chain, version: int, kind: SetKind = ALL) -> None:
        """Create the set, or make an existing one fit the config.

        A set with another maxelem, or without timeout support, is rebuilt with its entries and swapped in;
        one holding more entries than the new maxelem keeps its own, with a WARNING. A set of our name with
        another type or family is not ours: start-up fails and says so.
        """
        name = set_name(chain.name, version, kind)
        header = self._header(name)
        if header is None:
            self._create(name, version, chain.maxelem, kind.type)
            logger.info("created ipset %s (%s family %s maxelem %d, with timeouts)", name, kind.type,
                        FAMILY_NAMES[version], chain.maxelem)
            return
        if header.type != kind.type or header.family != FAMILIES[version]:
            raise RuntimeError(f"ipset {name} exists as {header.type} (family {header.family}), but chain "
                               f"{chain.name} needs a {kind.type} family {FAMILY_NAMES[version]} set of that "
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
        self._rebuild(name, version, maxelem, kind.type)
        logger.warning("rebuilt ipset %s with maxelem %d and timeout support (it had maxelem %d%s), "
                       "keeping its %d entries", name, maxelem, header.maxelem,
                       "" if header.timeouts else " and no timeouts", header.elements)

    def _rebuild(self, name: str, version: int, maxelem: int, set_type: str) -> None:
        """ipset cannot change maxelem in place: fill a new set with the entries, then swap the two."""
        self._nl.destroy(SWAP_NAME)  # left over from an interrupted rebuild
        self._create(SWAP_NAME, version, maxelem, set_type)
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

    def _saved_lines(self, name: str | None = None) -> Iterator[list[str]]:
        """The words of each element line of `ipset save` (of one set, or of every set), read as the command
        writes them, never whole (a million entries are 40 MB of text). The command starts here, at the call, in
        the caller's network namespace, whoever reads the lines."""
        saved = subprocess.Popen([self._command(), "save", *([name] if name else [])], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
        return self._lines_of(saved, name or "")

    @staticmethod
    def _lines_of(saved: subprocess.Popen[str], name: str) -> Iterator[list[str]]:
        with saved:
            assert saved.stdout is not None and saved.stderr is not None
            try:
                for line in saved.stdout:
                    words = line.split()
                    if len(words) < 3 or words[0] != "add":
                        continue
                    if "nomatch" in words[3:]:
                        logger.warning("ipset %s holds a nomatch entry web-ipt-d did not make; leaving it alone: %s",
                                       words[1], words[2])
                        continue
                    yield words
                error = saved.stderr.read()
                if saved.wait(timeout=TOOL_TIMEOUT) != 0:
                    raise RuntimeError(f"ipset save {name} failed: {error.strip()}")
            finally:
                if saved.poll() is None:  # the reader stopped early: the command is ours to end
                    saved.kill()

    @staticmethod
    def _port_member(name: str, element: str) -> tuple[Network, str, int] | None:
        """(network, protocol, port) of a port set's `NET,PROTO:PORT` element; None (and a warning) for another."""
        network, _, proto_port = element.rpartition(",")
        proto, _, port = proto_port.partition(":")
        name_of = _protocol_name(proto)
        if name_of not in PORT_PROTOCOLS or not port.isdigit():
            logger.warning("ipset %s holds an entry web-ipt-d did not make; leaving it alone: %s", name, element)
            return None
        return parse_listed(network), name_of, int(port)

    def _kinds_present(self, chain: str, version: int) -> list[SetKind]:
        """The chain's port and protocol sets that exist in `version`."""
        return [kind for kind in SCOPED if self._header(set_name(chain, version, kind)) is not None]

    # -- the match rules ------------------------------------------------------------------

    def _ensure_rule(self, version: int, chain: Chain, kind: SetKind = ALL) -> None:
        """One match rule for the set with the chain's target and match; for the set of all traffic, our per-address
        rules move into the set. The caller commits.

        The target and the match (src or dst) belong to the match rule, so to the whole chain: when the config
        changes either, the rule is replaced and every entry takes the new one. Per-address rules (`-s` or `-d`)
        are what a chain that used the iptables backend holds: their networks go into the set (without a kernel
        timeout: the worker still expires them on time) before the rules go, in the commit that adds the match
        rule, so none is unblocked on the way. Rules of any other shape are left alone.
        """
        name = set_name(chain.name, version, kind)
        wanted = flags(chain.match, kind)
        ipt_chain = iptc.Chain(self._xt.table(version), chain.name)
        kept = False
        stale: list[iptc.Rule] = []
        moved: list[tuple[iptc.Rule, Network, str]] = []
        for rule in ipt_chain.rules:
            matched = _match_rule(version, rule)
            if matched is not None and matched.set == name:
                if not kept and _fits(matched, kind) and (matched.target, matched.flags) == (chain.target, wanted):
                    kept = True
                else:
                    stale.append(rule)
                continue
            parsed = per_address(version, rule, chain.match) if kind is ALL else None
            if parsed is not None:  # `-s` or `-d`: the set takes the chain's match, as it takes its target
                moved.append((rule, parsed[0], parsed[1]))
        if not kept:
            rule = new_rule(version)
            if kind.proto is not None:
                rule.protocol = str(PROTOCOLS[kind.proto])
            match = rule.create_match("set")
            match.match_set = [name, wanted]
            rule.target = rule.create_target(chain.target)
            ipt_chain.append_rule(rule)
            logger.info("added rule %s%s -m set --match-set %s %s -j %s (ipv%d)", chain.name,
                        f" -p {kind.proto}" if kind.proto else "", name, wanted, chain.target, version)
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

    def _rule_targets(self, names: list[str]) -> dict[str, str]:
        """Set name -> the target of its match rule."""
        found: dict[str, str] = {}
        with self._xt.lock():
            for version in VERSIONS:
                self._xt.table(version).refresh()
                found.update((name, rule.target) for name, rule in self._rules_in(version, names).items())
        return found

    def _rules_in(self, version: int, names: list[str]) -> dict[str, MatchRule]:
        """Set name -> its (first) match rule in the chains `names`, in the family's table as last refreshed."""
        kinds = {set_name(name, version, kind): (name, kind) for name in names for kind in KINDS}
        found: dict[str, MatchRule] = {}
        for name in names:
            for rule in self._xt.rules(version, name):
                matched = _match_rule(version, rule)
                if matched is None or kinds.get(matched.set, ("", ALL))[0] != name:
                    continue
                if _fits(matched, kinds[matched.set][1]):
                    found.setdefault(matched.set, matched)
        return found

    def _prepare_sets(self, wanted: list[tuple[Chain, int, SetKind]]) -> None:
        """Create or fit each set, then its match rule (and the chain and its jumps), in one commit per family."""
        for chain, version, kind in wanted:
            self._targets[chain.name] = chain.target
            self._ensure_set(chain, version, kind)  # before the rules: a match rule needs its set to exist
        with self._xt.lock():
            for version in VERSIONS:
                mine = [(chain, kind) for chain, v, kind in wanted if v == version]
                if not mine:
                    continue
                table = self._xt.table(version)
                table.refresh()
                done: set[str] = set()
                for chain, kind in mine:
                    if chain.name not in done:
                        self._xt.ensure_chain(version, chain)
                        done.add(chain.name)
                    self._ensure_rule(version, chain, kind)
                table.commit()

    # -- the Backend interface -----------------------------------------------------------

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        # The kernel lets an entry go at its timeout rounded up, so never before the worker's own expiry:
        # sets holding fewer elements than the worker has atoms means some were taken out (`ipset flush`).
        chains = list(chains)
        present: dict[tuple[str, int], list[SetKind]] = {}
        for chain in chains:
            held = 0
            for version in VERSIONS:
                header = self._header(set_name(chain.name, version))
                if header is None:
                    return f"ipset {set_name(chain.name, version)} is gone"
                held += header.elements
                kinds = present[(chain.name, version)] = [ALL]
                for kind in SCOPED:
                    header = self._header(set_name(chain.name, version, kind))
                    if header is not None:
                        held += header.elements
                        kinds.append(kind)
            if held < counts.get(chain.name, 0):
                return f"the ipsets of chain {chain.name} hold {held} entries for {counts[chain.name]} blocks"
        with self._xt.lock():
            for version in VERSIONS:
                self._xt.table(version).refresh()
                rules = self._rules_in(version, [c.name for c in chains])
                for chain in chains:
                    gone = self._xt.structure_missing(version, chain)
                    if gone is not None:
                        return gone
                    for kind in present[(chain.name, version)]:
                        found = rules.get(set_name(chain.name, version, kind))
                        if found is None or found.flags != flags(chain.match, kind):
                            return (f"the match rule of chain {chain.name} for ipset "
                                    f"{set_name(chain.name, version, kind)} is gone")
        return None

    def expires_in_kernel(self, chain: str) -> bool:
        return True

    def shares_target(self, chain: str) -> bool:
        return True

    def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
        chains = list(chains)
        departed = self._xt.configure(chains)  # every chain of this backend, in config order: the order of the jumps
        self._prepare_chains(chains)
        self._xt.unhook([*departed, *retired])

    def _prepare_chains(self, chains: Iterable[Chain]) -> None:
        """prepare() without telling Xtables the configured chains: for a few chains whose sets went missing."""
        wanted = []
        for chain in chains:
            for version in VERSIONS:
                wanted += [(chain, version, kind) for kind in (ALL, *self._kinds_present(chain.name, version))]
        if wanted:
            self._prepare_sets(wanted)

    def read(self, chains: Iterable[str]) -> Iterator[tuple[Key, str]]:
        """Each atom as one `ipset save` of every set lists it, consumed as it comes; a port set's elements are
        grouped by network and protocol (one port is one element), so port atoms come last. The match rules are
        read, and the command started, before this returns."""
        names = list(chains)
        targets = self._rule_targets(names)
        ours = {set_name(name, version, kind): (name, kind, targets.get(set_name(name, version, kind),
                                                                      self._targets.get(name)))
                for name in names for version in VERSIONS for kind in KINDS}
        return self._atoms(ours, self._saved_lines())

    def _atoms(self, ours: dict[str, tuple[str, SetKind, str | None]],
               lines: Iterator[list[str]]) -> Iterator[tuple[Key, str]]:
        ports: dict[tuple[str, Network, str], tuple[str, list[tuple[int, int]]]] = {}
        orphans: dict[str, int] = {}  # a set of ours without a match rule -> how many entries it has
        for words in lines:
            found = ours.get(words[1])
            if found is None:
                continue
            chain, kind, target = found
            if target is None:
                orphans[words[1]] = orphans.get(words[1], 0) + 1
                continue
            if kind.ports:
                member = self._port_member(words[1], words[2])
                if member is not None:
                    network, proto, port = member
                    ports.setdefault((chain, network, proto), (target, []))[1].append((port, port))
                continue
            yield (chain, parse_listed(words[2]), None if kind.proto is None else Scope(kind.proto)), target
        for (chain, network, proto), (target, ranges) in ports.items():
            yield (chain, network, Scope.of(proto, ranges)), target
        for sname, held in orphans.items():
            logger.warning("ipset %s has %d entries but no match rule in chain %s; leaving them alone", sname, held,
                           ours[sname][0])

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        self._apply(list(ops), chains)

    def load(self, chain: str, target: str, expires_at: float | None, scope: Scope | None, items: Items,
             chains: Mapping[str, Chain], replaces: bool = False) -> None:
        """Whole networks straight into the chain's sets over netlink (IpsetNetlink.add_packed: a non-exclusive ADD,
        so one there takes the new timeout, `replaces` or not); anything else, or a set that is not there, as
        apply() of their Adds."""
        if scope is not None:
            self._apply(adds(chain, target, expires_at, scope, items, replaces), chains)
            return
        timeout = kernel_timeout(expires_at, self._clock())
        done: list[tuple[str, Items]] = []
        for version, size in ((4, 4), (6, 16)):
            part = [item for item in items if len(item[1]) == size]
            if not part:
                continue
            name = set_name(chain, version)
            codes = self._nl.add_packed(name, part, timeout)
            if any(codes) and replaces:  # held blocks: none is taken out, whatever went wrong
                self._apply(adds(chain, target, expires_at, scope, items, replaces), chains)
                return
            if any(codes):
                self._undo([Element(IPSET_CMD_DEL, done_name, unpacked(packed, length), False)
                            for done_name, taken in done for _, packed, length in taken]
                           + [Element(IPSET_CMD_DEL, name, unpacked(packed, length), False)
                              for (_, packed, length), code in zip(part, codes) if not code])
                if IPSET_ERR_HASH_FULL in codes:
                    raise CapacityExceeded(f"ipset {name} is full (maxelem)")
                self._apply(adds(chain, target, expires_at, scope, items), chains)  # its errors, its remedies
                return
            done.append((name, part))

    def seal(self) -> str | None:
        return None  # nothing tells that nobody changed the kernel since: a start reads it back

    def sealed(self, token: str) -> bool:
        return False

    def close(self) -> None:
        self._nl.close()
        self._xt.close()

    # -- applying ---------------------------------------------------------------------------

    def _apply(self, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        """An Add of an entry in the set replaces its timeout (as `ipset -exist add`); a Remove of one that is
        gone is not an error. A full set raises CapacityExceeded, once what the batch did is undone."""
        now = self._clock()
        if ops and all(op.scope is None for op in ops) and (all(isinstance(op, Add) for op in ops)
                                                            or all(isinstance(op, Remove) for op in ops)):
            # Only Adds (a bulk load, a restore) or only Removes (an expiry sweep) of whole networks: no op takes
            # another's place, so _plan would change nothing and one run holds them all (an element twice is
            # told apart by its ack: already there, or already gone).
            self._apply_netlink([_whole_steps(ops, now)], chains)
            return
        # Every message made before any change, so that a ValueError (ports ipset cannot match) changes nothing.
        runs = [[step for op, held in run for step in _steps(op, held, now)] for run in _runs(_plan(ops))]
        self._apply_netlink(runs, chains)

    def _apply_netlink(self, runs: list[list[_Step]], chains: Mapping[str, Chain]) -> None:
        """Every step over netlink, in runs (see _runs), many to a message; on a failure, undo what was done (newest
        first) and raise.

        A socket error (no ack in time) leaves the messages in flight unknown; the worker's reconcile after
        a failed batch settles them.
        """
        done: list[Element] = []  # what undoes each change made, in the order made
        made: set[tuple[str, int, SetKind]] = set()  # sets made during this batch: made once at most
        try:
            for steps in runs:
                self._apply_run(steps, chains, done, made)
        except Exception:
            self._undo(done)
            raise

    def _apply_run(self, pending: list[_Step], chains: Mapping[str, Chain], done: list[Element],
                   made: set[tuple[str, int, SetKind]]) -> None:
        """Send every step's message; then, for the few that need it, a second: a refresh, or a retry."""
        while pending:
            codes = self._nl.apply([step.element for step in pending])
            again: list[_Step] = []
            missing: dict[tuple[str, int, SetKind], Chain] = {}
            failure: Exception | None = None
            for step, code in zip(pending, codes):
                element, op = step.element, step.op
                if code == 0:
                    done.extend(step.undo)
                elif element.cmd == IPSET_CMD_DEL:
                    if code in (IPSET_ERR_EXIST, errno.ENOENT):  # not in the set, or no such set
                        logger.debug("%s was already gone from ipset %s", _entry_text(element), element.set)
                    else:
                        failure = failure or IpsetError(f"ipset del {element.set} {_entry_text(element)}", code)
                elif code == IPSET_ERR_EXIST and element.exclusive:
                    # Already there: take the new timeout, as `ipset -exist add` does; the undo puts it back.
                    again.append(step._replace(element=element._replace(exclusive=False), undo=(_put_back(element),)))
                elif (code == errno.ENOENT and op.chain in chains
                      and (op.chain, op.network.version, step.kind) not in made):
                    missing[(op.chain, op.network.version, step.kind)] = chains[op.chain]
                    again.append(step)
                else:
                    if element.ports is not None and element.ports[0] != element.ports[1] and code != errno.ENOENT:
                        done.extend(step.undo)  # a port range stops part way: take back the ports it did
                    if code == IPSET_ERR_HASH_FULL:
                        failure = failure or CapacityExceeded(f"ipset {element.set} is full (maxelem)")
                    else:
                        failure = failure or IpsetError(f"ipset add {element.set} {_entry_text(element)}", code)
            if failure is not None:
                raise failure
            if missing:
                self._make_missing(missing, chains)
                made.update(missing)
            pending = again

    def _make_missing(self, missing: dict[tuple[str, int, SetKind], Chain], chains: Mapping[str, Chain]) -> None:
        """A port or protocol set the first time it is needed; a set of all traffic that went away behind our back
        (its match rule must have gone first): make each, and its match rule."""
        lost = sorted(set_name(name, version) for name, version, kind in missing if kind is ALL)
        if lost:
            logger.warning("ipset %s is missing; creating it and its match rule again", ", ".join(lost))
            self._prepare_chains([chains[name] for name in sorted({name for name, _, kind in missing if kind is ALL})])
        self._prepare_sets([(chain, version, kind) for (_, version, kind), chain in missing.items() if kind is not ALL])

    def _undo(self, done: list[Element]) -> None:
        undo = done[::-1]
        try:
            codes = self._nl.apply(undo)
        except Exception:
            logger.exception("could not undo the %d changes of a failed batch", len(undo))
            return
        for element, code in zip(undo, codes):
            if code:
                logger.error("could not undo a change to ipset %s of a failed batch: %s", element.set,
                             IpsetError(_entry_text(element), code))
