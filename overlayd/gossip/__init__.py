"""Gossip between overlayd peers: SWIM membership, push dissemination, anti-entropy.

Layers, pure to I/O:

- `schema`      the wire messages and the `Record` envelope; strict decoding,
                one error type (SchemaError). Pure.
- `merge`       which record wins, per-owner watermarks, digests and their diff. Pure.
- `membership`  SWIM member table: merge rules, suspicion, piggyback queue. Pure
                (time comes in from the caller).
- `sumtree`     the hash trees anti-entropy compares, so a round costs
                O(differences), not the whole table. Pure.
- `skew`        peers' clock offsets from probe round trips, NTP-style. Pure.
- `framing`     AEAD (AES-256-GCM) sealing with a keyring, skew and replay checks.
- `node`        `GossipNode`: the UDP socket and the loops (probe, anti-entropy)
                that drive the parts above.
- `metrics`     Prometheus counters, in a registry the caller gives.
- `clock`, `transport`  the seams: which clocks and which network a node uses.
- `virtualtime`, `simnet`  for simulations and tests only (nothing in the daemon
                imports them): an event loop in virtual time and a simulated
                LAN, on which bench/gossip_scale.py runs a thousand real nodes.

Wiring into the daemon:

- keys: `Keyring.from_base64(config keys)` (first one seals; all are accepted;
  rotate by installing, then switching primary, then removing), or
  `Keyring.insecure()` only when the config says `insecure = true`.
- `GossipNode(name, keyring=..., bind=..., port=7946, advertise=<underlay IP>,
  seeds=[(ip, port), ...], on_change=..., on_member=..., metrics=GossipMetrics(registry))`;
  `await start()`, `await stop()` (leave=True announces a clean leave);
  `add_seeds()` for addresses learnt later (the KV store's node records).
- the daemon maps its Network/Endpoint/Node records to
  `publish(kind, key, payload_dict)` / `delete(kind, key)` for what this node
  owns; the node stamps them (owner = its name, its incarnation, the next
  version). Records are identified by (owner, kind, key): two owners claiming
  one key are two records, and the daemon's own rule picks between them.
- `on_change(record)` reports what peers own (puts and tombstones); after a
  restart it also reports this node's own records from its previous life that
  peers still hold, so the daemon re-publishes or deletes them.
- `members()` gives state, incarnation and RTT per peer for `overlayctl peers`
  and /status; `on_member(info)` reports changes (e.g. to start the grace period
  after which a dead host's endpoints are removed in gossip-only mode).
- clock skew: `MemberInfo.clock_offset` is the peer's wall clock minus ours in
  seconds (positive: the peer is ahead), measured on every direct probe to
  within half a round trip and filtered NTP-style; None until a probe of that
  peer came back. Put it in `overlayctl peers --json` as `clock_offset` (float
  seconds or null): `overlayctl doctor` reads that key.
- the watchdog: pass the daemon's TaskGroup, `GossipNode(..., tasks=self.tasks)`
  (keyword-only; `Peering` must hand it through). The probe and anti-entropy
  loops then run in it as `gossip-probe-<name>` and `gossip-anti-entropy-<name>`,
  and one that dies lands in `tasks.failures` like any other task, which stops
  the watchdog pings. `stop()` cancels only the node's own loops. Without it the
  node keeps a group of its own; either way `node.failures` lists its dead loops.
"""

from overlayd.gossip.clock import SYSTEM, Clock, ShiftedClock
from overlayd.gossip.framing import FrameError, Keyring
from overlayd.gossip.membership import MemberInfo
from overlayd.gossip.metrics import GossipMetrics
from overlayd.gossip.node import GossipConfig, GossipNode
from overlayd.gossip.schema import MemberState, Record, SchemaError

__all__ = [
    "SYSTEM",
    "Clock",
    "FrameError",
    "GossipConfig",
    "GossipMetrics",
    "GossipNode",
    "Keyring",
    "MemberInfo",
    "MemberState",
    "Record",
    "SchemaError",
    "ShiftedClock",
]
