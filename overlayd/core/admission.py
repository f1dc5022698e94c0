"""Admission: which fact enters the cluster view. Pure: no I/O, no clock.

Three sources speak about the same records: the KV store (its watch and its
snapshots), gossip (what peers publish, in both modes), and this host itself
(the endpoints in its local registry, its node record, what it just created).
They disagree in flight — gossip runs ahead of the watch, a release and a
reuse cross, two sides of a partition claim one address — and one rule says
what the view holds.

The rule
--------
Every record a source gives is a *claim* (on an endpoint key and on an
address in its network; on a network name and its VNI), with a strength:

    CONFIRMED (3)  this host's own record, confirmed by compare-and-set in the store;
    STORE     (2)  what the store says;
    GOSSIP    (1)  what gossip says: every record in gossip-only mode (this host's
                   own included), or one the store has not confirmed (yet).

For one endpoint key, and then for each address it holds in its network
(its IP and its MAC), the strongest claim wins. Between claims of equal strength:

    GOSSIP: the first claim wins (oldest created_at, then owner, then name),
            so uncoordinated writers pick the same winner on every host;
    STORE and above: the latest claim wins, because the store's
            compare-and-set made it after the release of any earlier one.

A claim is released only by its holder: the store's delete, the owner's
tombstone, or the owner becoming inadmissible (`MemberAdmissible`): dead
according to SWIM beside a KV store, dead past its grace period in
gossip-only mode. So a host whose lease expired never comes back from
peers' gossip tables, and a host cut off from the store while its peers
still hear it keeps its endpoints everywhere. Records the store holds under
this node's name are admitted only through this host's own claims (the
local registry is the authority on what lives here).

A gossip claim of this host's own that loses comes out as a `Conflict`; the
daemon withdraws it and tells the operator (or fails the request that made
it, when the claim is still settling).

Networks follow the same rule per name and per VNI (a `NetworkRemovedMark`
hides every gossip claim of a name made at or before it), except that a
network's claim outlives its creator's admissibility: a network is the
cluster's, and live hosts' endpoints keep it while its creator is dead or
cut off. Nodes per name (own, then store, then the node's own gossip record).

Costs: an endpoint fact costs O(claims on its key and address), usually one;
an owner becoming (in)admissible costs O(its records); a network fact
O(networks); only a store snapshot costs O(everything).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from ipaddress import IPv4Address
from typing import Protocol

from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import (
    ClusterView,
    Delta,
    EndpointDeleted,
    EndpointPut,
    Fact,
    NetworkDeleted,
    NetworkPut,
    NodeDeleted,
    NodePut,
)


class Tier(IntEnum):
    """How strong a claim's evidence is."""

    GOSSIP = 1
    STORE = 2
    CONFIRMED = 3


# The members as module constants for the per-endpoint paths: `Tier.STORE` goes through
# the enum's class machinery on every read (Python 3.11), several times slower than a global.
_GOSSIP, _STORE, _CONFIRMED = Tier.GOSSIP, Tier.STORE, Tier.CONFIRMED

# Gossip withdrawals kept while the store's record of them may still be on its way
# (see `Admission._released_early`): far more than the deletions one watch round can lag.
EARLY_RELEASES = 4096


# --- gossip facts: what peers say ---------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointClaimed:
    """`endpoint.owner` publishes (or updates) an endpoint."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class EndpointReleased:
    """`owner` withdrew its record of endpoint `key` (a tombstone) at `at` (its clock)."""

    owner: str
    key: str
    at: float = float("inf")


@dataclass(frozen=True, slots=True)
class NodeHeard:
    node: Node


@dataclass(frozen=True, slots=True)
class NodeGone:
    name: str


@dataclass(frozen=True, slots=True)
class NetworkClaimed:
    owner: str
    network: Network
    created_at: float


@dataclass(frozen=True, slots=True)
class NetworkReleased:
    owner: str
    name: str


@dataclass(frozen=True, slots=True)
class NetworkRemovedMark:
    """Every claim of network `name` made at or before `created_at` is void, whoever made it."""

    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class MemberAdmissible:
    """Whether `name`'s gossip records may be in the view (its liveness, as the mode defines it)."""

    name: str
    admissible: bool


GossipFact = (
    EndpointClaimed
    | EndpointReleased
    | NodeHeard
    | NodeGone
    | NetworkClaimed
    | NetworkReleased
    | NetworkRemovedMark
    | MemberAdmissible
)


# --- what comes out -------------------------------------------------------------


class Contested(StrEnum):
    """What a lost claim lost: its name (key), its IP, its MAC, or its VNI."""

    NAME = "name"
    IP = "IP"
    MAC = "MAC"
    VNI = "VNI"


@dataclass(frozen=True, slots=True)
class Conflict:
    """A claim of this host's lost to another one: `kind` "endpoint" or "network"."""

    kind: str
    key: str
    lost: Contested
    why: str


@dataclass
class Outcome:
    deltas: list[Delta] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.deltas or self.conflicts)

    def extend(self, other: Outcome) -> None:
        self.deltas += other.deltas
        self.conflicts += other.conflicts


_Claim = tuple[Tier, Endpoint]
# An address claimed in a network: ("ip", network, IPv4Address) or ("mac", network, mac).
_Group = tuple[str, str, IPv4Address | str]


def _groups(ep: Endpoint) -> tuple[_Group, _Group]:
    # `Admission._first_holder` builds these same two inline (the admission tests fail if
    # the two differ).
    return (("ip", ep.network, ep.ip), ("mac", ep.network, ep.mac))


def rank(tier: Tier, created_at: float, owner: str, name: str) -> tuple[int, float, str, str]:
    """Sort key of a claim: the smallest wins (see the module docstring)."""
    order = created_at if tier == _GOSSIP else -created_at
    return (-tier, order, owner, name)


def _endpoint_rank(claim: _Claim) -> tuple[int, float, str, str]:
    tier, ep = claim
    return rank(tier, ep.created_at, ep.owner, ep.name)


@dataclass(frozen=True, slots=True)
class _NetworkClaim:
    tier: Tier
    owner: str
    network: Network
    created_at: float

    def rank(self) -> tuple[int, float, str, str]:
        return rank(self.tier, self.created_at, self.owner, self.network.name)


class Admission:
    """Holds every source's claims and keeps `view` equal to what the rule admits.

    `authority`: a KV store exists (own records are CONFIRMED once created);
    without one, own records are gossip claims like everyone else's.
    `admit_unknown`: whether a gossip owner no `MemberAdmissible` has spoken
    of yet is admissible (gossip-only: yes, records may travel ahead of
    membership; beside a store: no, only members SWIM sees alive).
    """

    def __init__(self, *, node: str, authority: bool, admit_unknown: bool | None = None) -> None:
        self.node = node
        self.authority = authority
        self.admit_unknown = (not authority) if admit_unknown is None else admit_unknown
        self.view = ClusterView()
        # Endpoint claims per key.
        self._own: dict[str, Endpoint] = {}
        self._store: dict[str, Endpoint] = {}
        self._gossip: dict[str, dict[str, Endpoint]] = {}  # key -> owner -> record
        self._gossip_keys: dict[str, set[str]] = {}  # owner -> keys it claims by gossip
        # Keys whose owner withdrew them by gossip while the store still lists them: key -> (owner, when).
        self._released: dict[str, tuple[str, float]] = {}
        # Withdrawals heard before the store's record of them came: the store's watch lags
        # gossip (a paced watch by up to its pace), and its record of an endpoint already
        # deleted must come in withdrawn, not put the entries back until the store's delete
        # follows. The store may never show such a record (it read the put and the delete in
        # one round), so at most EARLY_RELEASES are kept, the oldest forgotten first.
        self._released_early: dict[str, tuple[str, float]] = {}
        # The winning claim per key, and the keys whose winners claim each address.
        self._winner: dict[str, _Claim] = {}
        # Holders per address: one key (the rule: an address has one claimant), or a dict
        # of keys when several claim it; a dict per address would cost ~200 bytes and one
        # more object for the collector per endpoint, twice (IP and MAC).
        self._by_addr: dict[_Group, str | dict[str, None]] = {}
        self._lost: dict[str, Conflict] = {}  # own endpoint key -> why it is not in the view
        # Networks and nodes: few, recomputed per event.
        self._net_store: dict[str, Network] = {}
        self._net_gossip: dict[tuple[str, str], _NetworkClaim] = {}  # (owner, name)
        self._net_removed: dict[str, float] = {}
        self._net_lost: dict[str, Conflict] = {}  # own network name -> why
        self._node_own: Node | None = None
        self._node_store: dict[str, Node] = {}
        self._node_gossip: dict[str, Node] = {}
        self._admissible: dict[str, bool] = {}

    # ------------------------------------------------------------------ inputs

    def from_own(self, facts: Iterable[Fact | NetworkClaimed]) -> Outcome:
        """This host's own records: its registry's endpoints, its node, its network claims."""
        out = Outcome()
        for fact in facts:
            match fact:
                case EndpointPut(ep):
                    if ep.owner != self.node:
                        raise ValueError(f"own endpoint {ep.key} is owned by {ep.owner}")
                    if self.authority:
                        self._own[ep.key] = ep
                    else:
                        self._gossip_put(ep)
                    self._settle(ep.key, out)
                case EndpointDeleted(key):
                    if self.authority:
                        self._own.pop(key, None)
                    else:
                        self._gossip_drop(self.node, key)
                    self._lost.pop(key, None)
                    self._settle(key, out)
                case NodePut(node):
                    self._node_own = node
                    self._settle_node(node.name, out)
                case NetworkClaimed(owner, network, at):
                    if self.authority:
                        self._net_store[network.name] = network
                    else:
                        self._net_gossip[(owner, network.name)] = _NetworkClaim(
                            Tier.GOSSIP, owner, network, at
                        )
                    self._settle_networks(out)
                case NetworkDeleted(name):
                    if self.authority:
                        self._net_store.pop(name, None)
                    else:
                        self._net_gossip.pop((self.node, name), None)
                    self._net_lost.pop(name, None)
                    self._settle_networks(out)
                case _:
                    raise TypeError(f"not an own fact: {fact!r}")
        return out

    def from_store(self, facts: Iterable[Fact]) -> Outcome:
        """Changes the store's watch reported, in its order."""
        out = Outcome()
        networks_changed = False
        me, store, settle = self.node, self._store, self._settle
        for fact in facts:
            if type(fact) is EndpointPut:  # nearly every fact of a watch: no match for it
                put = fact.endpoint
                if put.owner != me:
                    store[put.key] = put
                    if self._released_early:
                        self._released_before(put)
                    settle(put.key, out)
                continue
            match fact:
                case EndpointDeleted(key):
                    self._released.pop(key, None)
                    self._released_early.pop(key, None)
                    if self._store.pop(key, None) is not None:
                        self._settle(key, out)
                case NodePut(node):
                    if node.name != self.node:
                        self._node_store[node.name] = node
                        self._settle_node(node.name, out)
                case NodeDeleted(name):
                    if self._node_store.pop(name, None) is not None:
                        self._settle_node(name, out)
                case NetworkPut(network):
                    self._net_store[network.name] = network
                    networks_changed = True
                case NetworkDeleted(name):
                    networks_changed |= self._net_store.pop(name, None) is not None
                case _:
                    raise TypeError(f"not a store fact: {fact!r}")
        if networks_changed:
            self._settle_networks(out)
        return out

    def store_snapshot(self, facts: Iterable[Fact]) -> Outcome:
        """The store's whole content: every store claim not in it is released."""
        endpoints: dict[str, Endpoint] = {}
        nodes: dict[str, Node] = {}
        networks: dict[str, Network] = {}
        for fact in facts:
            match fact:
                case EndpointPut(ep) if ep.owner != self.node:
                    endpoints[ep.key] = ep
                case EndpointDeleted(key):
                    endpoints.pop(key, None)
                case NodePut(node) if node.name != self.node:
                    nodes[node.name] = node
                case NodeDeleted(name):
                    nodes.pop(name, None)
                case NetworkPut(network):
                    networks[network.name] = network
                case NetworkDeleted(name):
                    networks.pop(name, None)
        out = Outcome()
        touched = {k for k, ep in self._store.items() if endpoints.get(k) != ep}
        touched |= {k for k in endpoints if k not in self._store}
        node_touched = {n for n, nd in self._node_store.items() if nodes.get(n) != nd}
        node_touched |= {n for n in nodes if n not in self._node_store}
        self._store, self._node_store = endpoints, nodes
        self._released = {k: v for k, v in self._released.items() if k in endpoints}
        for key in [k for k in self._released_early if k in endpoints]:
            self._released_before(endpoints[key])
        networks_changed = networks != self._net_store
        self._net_store = networks
        if networks_changed:
            self._settle_networks(out)
        for name in sorted(node_touched):
            self._settle_node(name, out)
        for key in sorted(touched):
            self._settle(key, out)
        return out

    def from_gossip(self, facts: Iterable[GossipFact]) -> Outcome:
        """What peers published (records of this node from peers are the caller's to handle)."""
        out = Outcome()
        networks_changed = False
        for fact in facts:
            match fact:
                case EndpointClaimed(ep):
                    self._gossip_put(ep)
                    self._settle(ep.key, out)
                case EndpointReleased(owner, key, at):
                    dropped = self._gossip_drop(owner, key)
                    stored = self._store.get(key)
                    if stored is not None and stored.owner == owner and stored.created_at <= at:
                        # The owner's own word that it let go: the store will say so too,
                        # unless it is unreachable just now (then not for a while).
                        self._released[key] = (owner, at)
                        dropped = True
                    elif stored is None and self.authority:
                        self._remember_early_release(key, owner, at)
                    if dropped:
                        self._settle(key, out)
                case NodeHeard(node):
                    self._node_gossip[node.name] = node
                    self._settle_node(node.name, out)
                case NodeGone(name):
                    if self._node_gossip.pop(name, None) is not None:
                        self._settle_node(name, out)
                case NetworkClaimed(owner, network, at):
                    self._net_gossip[(owner, network.name)] = _NetworkClaim(Tier.GOSSIP, owner, network, at)
                    networks_changed = True
                case NetworkReleased(owner, name):
                    networks_changed |= self._net_gossip.pop((owner, name), None) is not None
                case NetworkRemovedMark(name, at):
                    if at > self._net_removed.get(name, float("-inf")):
                        self._net_removed[name] = at
                        networks_changed = True
                case MemberAdmissible(name, admissible):
                    if self.is_admissible(name) != admissible:
                        self._admissible[name] = admissible
                        for key in sorted(self._gossip_keys.get(name, ())):
                            self._settle(key, out)
                        self._settle_node(name, out)
                    else:
                        self._admissible[name] = admissible
                case _:
                    raise TypeError(f"not a gossip fact: {fact!r}")
        if networks_changed:
            self._settle_networks(out)
        return out

    # ------------------------------------------------------------------ queries

    def is_admissible(self, owner: str) -> bool:
        if owner == self.node:
            return True
        return self._admissible.get(owner, self.admit_unknown)

    def lost(self, key: str) -> Conflict | None:
        """Why this host's own endpoint `key` is not in the view, or None if it is (or is not ours)."""
        return self._lost.get(key)

    def network_lost(self, name: str) -> Conflict | None:
        return self._net_lost.get(name)

    def claims_of(self, owner: str) -> set[str]:
        """Endpoint keys `owner` claims by gossip (its records in the gossip table)."""
        return set(self._gossip_keys.get(owner, ()))

    # ------------------------------------------------------------------ endpoints

    def _gossip_put(self, ep: Endpoint) -> None:
        self._gossip.setdefault(ep.key, {})[ep.owner] = ep
        self._gossip_keys.setdefault(ep.owner, set()).add(ep.key)

    def _gossip_drop(self, owner: str, key: str) -> bool:
        claims = self._gossip.get(key)
        if claims is None or claims.pop(owner, None) is None:
            return False
        if not claims:
            del self._gossip[key]
        keys = self._gossip_keys.get(owner)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._gossip_keys[owner]
        return True

    def _claims(self, key: str) -> Iterator[_Claim]:
        own = self._own.get(key)
        if own is not None:
            yield (_CONFIRMED, own)
        stored = self._store.get(key)
        if stored is not None and not self._withdrawn(stored):
            yield (_STORE, stored)
        for owner, ep in self._gossip.get(key, {}).items():
            if self.is_admissible(owner):
                yield (_GOSSIP, ep)

    def _remember_early_release(self, key: str, owner: str, at: float) -> None:
        early = self._released_early
        early.pop(key, None)  # re-inserted: the newest goes last
        early[key] = (owner, at)
        if len(early) > EARLY_RELEASES:
            del early[next(iter(early))]

    def _released_before(self, put: Endpoint) -> None:
        """The store's record `put` came: withdrawn if its owner let it go before we saw it."""
        early = self._released_early.pop(put.key, None)
        if early is not None and early[0] == put.owner and put.created_at <= early[1]:
            self._released[put.key] = early

    def _withdrawn(self, stored: Endpoint) -> bool:
        """The store's record is one its owner has withdrawn by gossip since."""
        released = self._released.get(stored.key)
        return released is not None and released[0] == stored.owner and stored.created_at <= released[1]

    def _best(self, key: str) -> _Claim | None:
        gossip = self._gossip.get(key)
        if gossip is None and key not in self._released:  # the common case: one source, no ranking
            own = self._own.get(key)
            if own is not None:
                return (_CONFIRMED, own)
            stored = self._store.get(key)
            return (_STORE, stored) if stored is not None else None
        if gossip is not None and len(gossip) == 1 and key not in self._own and key not in self._store:
            # Gossip-only mode's common case: one peer's claim and nothing else to rank it
            # against (what `_claims` would yield alone, without the generator and `min`).
            ((owner, ep),) = gossip.items()
            return (_GOSSIP, ep) if self.is_admissible(owner) else None
        return min(self._claims(key), key=_endpoint_rank, default=None)

    def _settle(self, key: str, out: Outcome) -> None:
        """Re-decide key `key` (and whoever shares an address with it); record what changed."""
        old = self._winner.get(key)
        new = self._best(key)
        if old is new:
            return
        if old is None and new is not None and self._first_holder(key, new, out):
            return
        if old is not None and new is not None and old == new:
            self._winner[key] = new  # the same claim heard again: nothing changes
            return
        if (
            self.authority
            and old is not None
            and new is not None
            and old[1] == new[1]
            and self._sole(key, new[1])
        ):
            # The same record from another source (gossip ahead of the store's watch, or the
            # watch ahead of gossip): its addresses keep their one holder, the view its record.
            self._winner[key] = new
            return
        groups: list[_Group] = []
        if old is not None:
            for group in _groups(old[1]):
                self._unhold(group, key)
                groups.append(group)
        if new is None:
            self._winner.pop(key, None)
        else:
            self._winner[key] = new
            for group in _groups(new[1]):
                self._hold(group, key)
                if group not in groups:
                    groups.append(group)
        affected = {key}
        for group in groups:
            affected.update(self._holders(group))
        if len(affected) == 1:  # nobody shares its addresses: the common case
            ep = self._shown(key)
            delta = self.view.put_endpoint(ep) if ep is not None else self.view.remove_endpoint(key)
            if delta is not None:
                out.deltas.append(delta)
            self._check_own(key, ep, out)
            return
        # Removals first: the view never holds two endpoints on one address, not even
        # between two deltas of one outcome (followers may rely on that).
        shown = {k: self._shown(k) for k in sorted(affected)}
        for k, ep in shown.items():
            if ep is None and (delta := self.view.remove_endpoint(k)) is not None:
                out.deltas.append(delta)
        for ep in shown.values():
            if ep is not None and (delta := self.view.put_endpoint(ep)) is not None:
                out.deltas.append(delta)
        for k, ep in shown.items():
            self._check_own(k, ep, out)

    def _first_holder(self, key: str, claim: _Claim, out: Outcome) -> bool:
        """A key heard of for the first time whose addresses nobody holds (every record of a
        join): it holds them and is shown, at no more cost than that. False, and nothing
        changed, if anyone holds either address (then `_settle` weighs them all)."""
        ep = claim[1]
        # `_groups(ep)` and `_check_own` (nothing to check for an authority) inline: a call
        # less each per record of a join.
        network = ep.network
        ip_group, mac_group = ("ip", network, ep.ip), ("mac", network, ep.mac)
        by_addr = self._by_addr
        if ip_group in by_addr or mac_group in by_addr:
            return False
        self._winner[key] = claim
        by_addr[ip_group] = key
        by_addr[mac_group] = key
        delta = self.view.put_endpoint(ep)
        if delta is not None:
            out.deltas.append(delta)
        if not self.authority:
            self._check_own(key, ep, out)
        return True

    def _sole(self, key: str, ep: Endpoint) -> bool:
        """`key` is the only holder of both of `ep`'s addresses."""
        ip_group, mac_group = _groups(ep)
        return self._by_addr.get(ip_group) == key and self._by_addr.get(mac_group) == key

    def _hold(self, group: _Group, key: str) -> None:
        holders = self._by_addr.get(group)
        if holders is None:
            self._by_addr[group] = key
        elif isinstance(holders, str):
            if holders != key:
                self._by_addr[group] = {holders: None, key: None}
        else:
            holders[key] = None

    def _unhold(self, group: _Group, key: str) -> None:
        holders = self._by_addr.get(group)
        if holders is None:
            return
        if isinstance(holders, str):
            if holders == key:
                del self._by_addr[group]
            return
        holders.pop(key, None)
        if len(holders) == 1:
            self._by_addr[group] = next(iter(holders))
        elif not holders:
            del self._by_addr[group]

    def _holders(self, group: _Group) -> Iterable[str]:
        holders = self._by_addr.get(group)
        if holders is None:
            return ()
        return (holders,) if isinstance(holders, str) else holders

    def _group_winner(self, group: _Group) -> str | None:
        holders = self._by_addr.get(group)
        if holders is None or isinstance(holders, str):
            return holders
        if not holders:
            return None
        return min(holders, key=lambda k: _endpoint_rank(self._winner[k]))

    def _shown(self, key: str) -> Endpoint | None:
        """What the view holds for `key`: its winning claim, if that also wins its address and MAC."""
        claim = self._winner.get(key)
        if claim is None:
            return None
        ip_group, mac_group = _groups(claim[1])  # (not all() over a generator: once per change)
        if self._group_winner(ip_group) == key and self._group_winner(mac_group) == key:
            return claim[1]
        return None

    def _check_own(self, key: str, shown: Endpoint | None, out: Outcome) -> None:
        """A gossip claim of ours that is not what the view shows has lost: say why, once."""
        if self.authority:
            return
        mine = self._gossip.get(key, {}).get(self.node)
        if mine is None or shown is mine:
            self._lost.pop(key, None)
            return
        claim = self._winner.get(key)
        if claim is not None and claim[1] is not mine:
            conflict = Conflict(
                "endpoint", key, Contested.NAME, f"endpoint {key} already exists (held by {claim[1].owner})"
            )
        else:
            conflict = Conflict("endpoint", key, Contested.IP, f"endpoint {key} lost its address")
            for group in _groups(mine):
                holder = self._group_winner(group)
                if holder is not None and holder != key:
                    held = self._winner[holder][1]
                    lost = Contested.IP if group[0] == "ip" else Contested.MAC
                    value = mine.ip if lost == Contested.IP else mine.mac
                    why = f"{lost} {value} is already taken in network {mine.network} "
                    why += f"(by {held.owner}'s {holder})"
                    conflict = Conflict("endpoint", key, lost, why)
                    break
        if self._lost.get(key) != conflict:
            self._lost[key] = conflict
            out.conflicts.append(conflict)

    # ------------------------------------------------------------------ nodes

    def _settle_node(self, name: str, out: Outcome) -> None:
        node: Node | None
        if name == self.node:
            node = self._node_own
        else:
            node = self._node_store.get(name)
            if node is None and self.is_admissible(name):
                node = self._node_gossip.get(name)
        delta = self.view.put_node(node) if node is not None else self.view.remove_node(name)
        if delta is not None:
            out.deltas.append(delta)

    # ------------------------------------------------------------------ networks

    def _settle_networks(self, out: Outcome) -> None:
        """Re-decide every network (there are few): per name, then per VNI."""
        # A network is cluster-wide, not its creator's: its claim stands while the creator
        # is dead or cut off (the endpoints of live hosts keep their network); only a
        # release or a removal mark ends it.
        claims = [_NetworkClaim(Tier.STORE, "", net, 0.0) for net in self._net_store.values()] + [
            c
            for (_owner, name), c in self._net_gossip.items()
            if c.created_at > self._net_removed.get(name, float("-inf"))
        ]
        winners: dict[str, Network] = {}
        by_vni: dict[int, str] = {}
        lost: dict[str, Conflict] = {}
        for claim in sorted(claims, key=_NetworkClaim.rank):
            name = claim.network.name
            if name in winners:
                conflict = Conflict("network", name, Contested.NAME, f"network {name} already exists")
            elif claim.network.vni in by_vni:
                holder = by_vni[claim.network.vni]
                why = f"VNI {claim.network.vni} is already used by network {holder}"
                conflict = Conflict("network", name, Contested.VNI, why)
            else:
                winners[name] = claim.network
                by_vni[claim.network.vni] = name
                continue
            if claim.tier == Tier.GOSSIP and claim.owner == self.node:
                lost[name] = conflict
        for network in winners.values():
            if (d := self.view.put_network(network)) is not None:
                out.deltas.append(d)
        for name in [n for n in self.view.networks if n not in winners]:
            if (r := self.view.remove_network(name)) is not None:
                out.deltas.append(r)
        for name, conflict in lost.items():
            if self._net_lost.get(name) != conflict:
                out.conflicts.append(conflict)
        self._net_lost = lost


class FactSink(Protocol):
    """Where claims go once made: the engine (`overlayd.daemon.engine.Engine`) in the daemon.

    Claiming code (`claims`, `store.gossip`) sees only this, not the kernel side behind it.
    """

    @property
    def view(self) -> ClusterView: ...

    @property
    def admission(self) -> Admission: ...

    def from_own(self, facts: Iterable[Fact | NetworkClaimed]) -> Outcome: ...

    def from_gossip(self, facts: Iterable[GossipFact]) -> Outcome: ...

    def from_store(self, facts: Iterable[Fact]) -> Outcome: ...

    def store_snapshot(self, facts: Iterable[Fact]) -> Outcome: ...
