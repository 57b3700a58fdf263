"""The iptables backend: one `-s NETWORK -j DROP|REJECT` rule per block (`-d NETWORK` for a chain with
`match: destination`), through python-iptables (libiptc), each batch committed once per table under the xtables lock.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import iptc

from webiptd.config import MATCHES, Chain
from webiptd.firewall.ops import Add, Op, apply_in_parts
from webiptd.firewall.xtables import LOCK_PATH, VERSIONS, Xtables, new_rule, per_address
from webiptd.net import Network

logger = logging.getLogger(__name__)


class IptablesBackend:
    name = "iptables"

    def __init__(self, lock_path: str = LOCK_PATH):
        self._xt = Xtables(lock_path)
        self._templates: dict[tuple[int, str, str], iptc.Rule] = {}
        self._matches: dict[str, str] = {}  # chain -> its match (source, destination), as last prepared

    def _rule(self, version: int, network: Network, target: str, match: str) -> iptc.Rule:
        """The rule for `network`: one reused rule per family, target and match, with only its address changed.

        libiptc copies a rule on insert and compares on delete, so reusing one is safe; building a new
        one (python-iptables loads the target's extension each time) was a fifth of the worker's time.
        """
        rule = self._templates.get((version, target, match))
        if rule is None:
            rule = new_rule(version)
            rule.target = rule.create_target(target)
            self._templates[(version, target, match)] = rule
        if match == "destination":
            rule.dst = str(network)
        else:
            rule.src = str(network)
        return rule

    def _match_of(self, chain: str, chains: Mapping[str, Chain]) -> str:
        """The chain's match in the config; for a chain that left it, the one it had, else source."""
        return chains[chain].match if chain in chains else self._matches.get(chain, "source")

    def _turn(self, version: int, chain: Chain) -> None:
        """Re-make the chain's rules of our other shape (`-s` in a `match: destination` chain, or `-d` in a
        source one: what a config with the other match made) with the chain's match; the caller commits.

        The new rule goes in before the old one goes, in one commit, so no packet sees neither. Like the rules
        of our shape a start finds, they are ours: the reconcile that follows adopts the ones it did not know.
        """
        ipt_chain = iptc.Chain(self._xt.table(version), chain.name)
        rules = [(rule, parsed) for rule in ipt_chain.rules
                 if (parsed := per_address(version, rule, chain.match)) is not None]
        have = {(network, target) for _, (network, target, match) in rules if match == chain.match}
        turned = 0
        for rule, (network, target, match) in rules:
            if match == chain.match:
                continue
            if (network, target) not in have:  # else it is there already: only the old one goes
                ipt_chain.append_rule(self._rule(version, network, target, chain.match))
                have.add((network, target))
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

    def prepare(self, chains: Iterable[Chain]) -> None:
        chains = list(chains)
        with self._xt.lock():
            for version in VERSIONS:
                table = self._xt.table(version)
                table.refresh()
                for chain in chains:
                    self._xt.ensure_chain(version, chain)
                    self._turn(version, chain)
                table.commit()
        self._matches.update((c.name, c.match) for c in chains)

    def read(self, chains: Iterable[str]) -> dict[tuple[str, Network], str]:
        found: dict[tuple[str, Network], str] = {}
        names = list(chains)
        with self._xt.lock():
            for version in VERSIONS:
                self._xt.table(version).refresh()
                for name in names:
                    match = self._matches.get(name)
                    for rule in self._xt.rules(version, name):
                        parsed = per_address(version, rule, match)
                        if parsed is None or (match is not None and parsed[2] != match):
                            logger.warning("chain %s (ipv%d) holds a rule web-ipt-d did not make; leaving it "
                                           "alone: src=%s dst=%s target=%s", name, version, rule.src, rule.dst,
                                           rule.target.name)
                            continue
                        found[(name, parsed[0])] = parsed[1]
        return found

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        # Each entry is one rule, and the kernel never drops one by itself: fewer rules than entries means
        # some went (rules of other shapes, left alone, can only make the count larger).
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

    def _commit(self, version: int, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        table = self._xt.table(version)
        table.refresh()  # drops whatever a failed attempt left uncommitted
        for name in {op.chain for op in ops}:
            if name in chains:
                self._xt.ensure_chain(version, chains[name])
        for op in ops:
            match = self._match_of(op.chain, chains)
            chain = iptc.Chain(table, op.chain)
            if isinstance(op, Add):
                chain.append_rule(self._rule(version, op.network, op.target, match))
            elif not self._delete(chain, version, op, [match] + [m for m in MATCHES if m != match]):
                # Someone removed it behind our back; the end state is what was asked for.
                logger.warning("rule for %s was already gone from chain %s", op.network, op.chain)
        table.commit()

    def _delete(self, chain: iptc.Chain, version: int, op: Op, matches: list[str]) -> bool:
        """Delete the entry's rule, of the first of `matches` it has (a chain that left the config may hold
        either); False when it has none."""
        for match in matches:
            try:
                chain.delete_rule(self._rule(version, op.network, op.target, match))
                return True
            except iptc.IPTCError:
                continue
        return False

    def close(self) -> None:
        self._xt.close()
