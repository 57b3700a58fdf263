"""The iptables backend: one `-s NETWORK -j DROP|REJECT` rule per block (`-d NETWORK` for a chain with
`match: destination`), through python-iptables (libiptc), each batch committed once per table under the xtables lock.
A block scoped to a protocol adds `-p PROTO`, and its ports `-m multiport --dports 22,80:90` (a rule or a few).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Mapping

import iptc

from webiptd.config import MATCHES, Chain
from webiptd.firewall.ops import Add, Items, Key, Op, adds, apply_in_parts
from webiptd.firewall.xtables import LOCK_PATH, VERSIONS, Xtables, new_rule, per_address_scoped
from webiptd.net import Network
from webiptd.scope import PROTOCOLS, Ranges, Scope

logger = logging.getLogger(__name__)

# What one multiport rule holds (XT_MULTI_PORTS, iptables-extensions(8)): a port takes one place, a range two.
MULTIPORT_PLACES = 15


def multiport_parts(ranges: Ranges) -> list[Ranges]:
    """`ranges` cut, in order, into the port lists of as few multiport rules as hold them; [()] for no ports
    (one rule without multiport). Filling each rule before the next is the fewest, as the order is kept."""
    parts: list[Ranges] = []
    part: list[tuple[int, int]] = []
    used = 0
    for lo, hi in ranges:
        places = 1 if lo == hi else 2
        if used + places > MULTIPORT_PLACES:
            parts.append(tuple(part))
            part, used = [], 0
        part.append((lo, hi))
        used += places
    parts.append(tuple(part))
    return parts


class IptablesBackend:
    name = "iptables"

    def __init__(self, lock_path: str = LOCK_PATH):
        self._xt = Xtables(lock_path)
        # (family, target, match, protocol or None, with ports) -> a rule, and its multiport match if it has one
        self._templates: dict[tuple[int, str, str, str | None, bool], tuple[iptc.Rule, iptc.Match | None]] = {}
        self._matches: dict[str, str] = {}  # chain -> its match (source, destination), as last prepared

    def _rule(self, version: int, network: Network, target: str, match: str, proto: str | None = None,
              ports: Ranges = ()) -> iptc.Rule:
        """The rule for `network` (and `proto`, and `ports`: at most one multiport rule's worth): one reused rule
        per family, target, match and shape, with only its address and ports changed. Use it before the next call.

        libiptc copies a rule on insert and compares the whole rule, matches too, on delete, so reusing one is
        safe; building a new one (python-iptables loads the target's extension each time) was a fifth of the
        worker's time. The multiport match is reset before its ports are set: python-iptables keeps one extension
        module per match name, which every rule it reads points at its own buffer, and parsing goes through it;
        without the reset a rule made after a read() got the ports of a rule read (seen here: --dports 22 written
        for 80:90,100). The reset points it back and clears the ports of a longer list.
        """
        key = (version, target, match, proto, bool(ports))
        template = self._templates.get(key)
        if template is None:
            rule = new_rule(version)
            multiport = None
            if proto is not None:
                # By number: python-iptables knows no name for dccp and udplite. Before the match: multiport
                # checks the rule's protocol.
                rule.protocol = str(PROTOCOLS[proto])
                if ports:
                    multiport = rule.create_match("multiport")
            rule.target = rule.create_target(target)
            template = self._templates[key] = (rule, multiport)
        rule, multiport = template
        if match == "destination":
            rule.dst = str(network)
        else:
            rule.src = str(network)
        if multiport is not None:
            multiport.reset()
            multiport.dports = Scope(proto or "", ports).port_text
        return rule

    def _rules(self, version: int, network: Network, target: str, match: str,
               scope: Scope | None) -> Iterator[iptc.Rule]:
        """The rules of an atom, in order (a port list over MULTIPORT_PLACES takes several); each is the
        template of _rule(), so use one before taking the next."""
        if scope is None:
            yield self._rule(version, network, target, match)
            return
        for ports in multiport_parts(scope.ports):
            yield self._rule(version, network, target, match, scope.proto, ports)

    def _match_of(self, chain: str, chains: Mapping[str, Chain]) -> str:
        """The chain's match in the config; for a chain that left it, the one it had, else source."""
        return chains[chain].match if chain in chains else self._matches.get(chain, "source")

    def _turn(self, version: int, chain: Chain) -> None:
        """Re-make the chain's rules of our other shape (`-s` in a `match: destination` chain, or `-d` in a
        source one: what a config with the other match made) with the chain's match; the caller commits.

        The new rule goes in before the old one goes, in one commit, so no packet sees neither. Like the rules
        of our shape a start finds, they are ours: the reconcile that follows adopts the ones it did not know.
        A scoped rule is re-made on its own, with its own ports: the atom it is part of turns rule by rule.
        """
        ipt_chain = iptc.Chain(self._xt.table(version), chain.name)
        rules = [(rule, parsed) for rule in ipt_chain.rules
                 if (parsed := per_address_scoped(version, rule, chain.match)) is not None]
        have = {(network, target, scope) for _, (network, target, match, scope) in rules if match == chain.match}
        turned = 0
        for rule, (network, target, match, scope) in rules:
            if match == chain.match:
                continue
            if (network, target, scope) not in have:  # else it is there already: only the old one goes
                for new in self._rules(version, network, target, chain.match, scope):
                    ipt_chain.append_rule(new)
                have.add((network, target, scope))
            ipt_chain.delete_rule(rule)
            turned += 1
        if turned:
            flag = "-d" if chain.match == "destination" else "-s"
            logger.warning("re-made %d rules of chain %s (ipv%d) with %s: the chain's match is now %s", turned,
                           chain.name, version, flag, chain.match)

    def expires_in_kernel(self, chain: str) -> bool:
        return False  # one rule per network has no timeout; the worker expires them

    def shares_target(self, chain: str) -> bool:
        return False  # each rule has its own

    def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
        chains = list(chains)
        departed = self._xt.configure(chains)
        with self._xt.lock():
            for version in VERSIONS:
                table = self._xt.table(version)
                table.refresh()
                for chain in chains:
                    self._xt.ensure_chain(version, chain)
                    self._turn(version, chain)
                table.commit()
        self._xt.unhook([*departed, *retired])  # after the lock above is let go: it takes it again
        self._matches.update((c.name, c.match) for c in chains)

    def read(self, chains: Iterable[str]) -> Iterable[tuple[Key, str]]:
        found: dict[Key, str] = {}
        # (chain, network, proto, target) -> the ports of its multiport rules, merged into one atom below
        ported: dict[tuple[str, Network, str, str], list[tuple[int, int]]] = {}
        names = list(chains)
        with self._xt.lock():
            for version in VERSIONS:
                self._xt.table(version).refresh()
                for name in names:
                    match = self._matches.get(name)
                    for rule in self._xt.rules(version, name):
                        parsed = per_address_scoped(version, rule, match)
                        if parsed is None or (match is not None and parsed[2] != match):
                            logger.warning("chain %s (ipv%d) holds a rule web-ipt-d did not make; leaving it "
                                           "alone: src=%s dst=%s proto=%s target=%s", name, version, rule.src,
                                           rule.dst, rule.protocol, rule.target.name)
                            continue
                        network, target, _, scope = parsed
                        if scope is not None and scope.ports:
                            ported.setdefault((name, network, scope.proto, target), []).extend(scope.ports)
                        else:
                            found[(name, network, scope)] = target
        for (name, network, proto, target), ranges in ported.items():
            found[(name, network, Scope.of(proto, ranges))] = target
        return found.items()

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        # Each atom is one rule or more, and the kernel never drops one by itself: fewer rules than atoms means
        # some went (rules of other shapes, left alone, and atoms of several rules only make the count larger).
        chains = list(chains)
        with self._xt.lock():
            have = dict.fromkeys((c.name for c in chains), 0)
            for version in VERSIONS:
                self._xt.table(version).refresh()
                for chain in chains:
                    gone = self._xt.structure_missing(version, chain)
                    if gone is not None:
                        return gone
                    have[chain.name] += self._xt.count_rules(version, chain.name)
        for chain in chains:
            if have[chain.name] < counts.get(chain.name, 0):
                return f"chain {chain.name} has {have[chain.name]} rules for {counts[chain.name]} blocks"
        return None

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        by_version: dict[int, list[Op]] = {}
        for op in ops:
            by_version.setdefault(op.network.version, []).append(op)
        with self._xt.lock():
            # Each table commits on its own; a failure undoes the ones that did, so the batch fails as a whole.
            apply_in_parts(by_version, lambda version, part: self._commit(version, part, chains),
                           label=lambda version: f"ipv{version}")

    def load(self, chain: str, target: str, expires_at: float | None, scope: Scope | None, items: Items,
             chains: Mapping[str, Chain], replaces: bool = False) -> None:
        # a rule an entry: no faster way
        self.apply(adds(chain, target, expires_at, scope, items, replaces), chains)

    def _commit(self, version: int, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        table = self._xt.table(version)
        table.refresh()  # drops whatever a failed attempt left uncommitted
        for name in {op.chain for op in ops}:
            if name in chains:  # a chain someone removed comes back; pruning old hooks is prepare's
                self._xt.ensure_chain(version, chains[name], prune=False)
        for op in ops:
            match = self._match_of(op.chain, chains)
            chain = iptc.Chain(table, op.chain)
            if isinstance(op, Add):
                for rule in self._rules(version, op.network, op.target, match, op.scope):
                    chain.append_rule(rule)
            elif not self._delete(chain, version, op, [match] + [m for m in MATCHES if m != match]):
                # Someone removed it behind our back; the end state is what was asked for.
                logger.warning("rule for %s%s was already gone from chain %s", op.network,
                               "" if op.scope is None else f" ({op.scope})", op.chain)
        table.commit()

    def _delete(self, chain: iptc.Chain, version: int, op: Op, matches: list[str]) -> bool:
        """Delete the atom's rules, of the first of `matches` it has any of (a chain that left the config may hold
        either); False when it has none. A rule of the atom already gone is no error."""
        for match in matches:
            rules = self._rules(version, op.network, op.target, match, op.scope)
            deleted = sum(self._delete_rule(chain, rule) for rule in rules)
            if op.scope is not None and op.scope.ports and deleted < len(multiport_parts(op.scope.ports)):
                deleted += self._delete_ported(chain, version, op, match)
            if deleted:
                return True
        return False

    @staticmethod
    def _delete_rule(chain: iptc.Chain, rule: iptc.Rule) -> bool:
        try:
            chain.delete_rule(rule)
            return True
        except iptc.IPTCError:
            return False

    def _delete_ported(self, chain: iptc.Chain, version: int, op: Op, match: str) -> int:
        """Delete the multiport rules of the atom's network, protocol and target whose ports are all the atom's:
        an atom read() merged from rules cut otherwise than ours (written by hand, say) is deleted whole too. The
        worker keeps one such atom per network and protocol, so they are all this one's. A look through the
        chain, only when the atom's own rules were not all there."""
        assert op.scope is not None
        atom = op.scope.ports
        gone = 0
        for rule in chain.rules:
            parsed = per_address_scoped(version, rule, match)
            if parsed is None or parsed[:3] != (op.network, op.target, match):
                continue
            scope = parsed[3]
            if scope is None or scope.proto != op.scope.proto or not scope.ports:
                continue
            if all(any(a <= lo and hi <= b for a, b in atom) for lo, hi in scope.ports):
                gone += self._delete_rule(chain, rule)
        return gone

    def seal(self) -> str | None:
        return None  # nothing tells that nobody changed the kernel since: a start reads it back

    def sealed(self, token: str) -> bool:
        return False

    def close(self) -> None:
        self._xt.close()
