"""Gossip between overlayd peers: SWIM membership, push dissemination, anti-entropy.

Layers, pure to I/O:

- `schema`      the wire messages and the `Record` envelope; strict decoding,
                one error type (SchemaError). Pure.
- `merge`       which record wins, per-owner watermarks, digests and their diff. Pure.
- `membership`  SWIM member table: merge rules, suspicion, piggyback queue. Pure
                (time comes in from the caller).
- `framing`     AEAD (AES-256-GCM) sealing with a keyring, skew and replay checks.
- `node`        `GossipNode`: the UDP socket and the loops (probe, anti-entropy)
                that drive the parts above.
- `metrics`     Prometheus counters, in a registry the caller gives.

The daemon maps its Network/Endpoint/Node records to `Record(kind, key, ...)`,
calls `GossipNode.publish`/`delete` for what it owns, and gets what peers own
through `on_change`.
"""

from overlayd.gossip.framing import FrameError, Keyring
from overlayd.gossip.membership import MemberInfo
from overlayd.gossip.metrics import GossipMetrics
from overlayd.gossip.node import GossipConfig, GossipNode
from overlayd.gossip.schema import MemberState, Record, SchemaError

__all__ = [
    "FrameError",
    "GossipConfig",
    "GossipMetrics",
    "GossipNode",
    "Keyring",
    "MemberInfo",
    "MemberState",
    "Record",
    "SchemaError",
]
