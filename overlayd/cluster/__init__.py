"""How a host takes part in the cluster: what it hears, and how it claims.

- `peering`        overlayd's records over the gossip layer, as admission facts;
- `feeds`          the store's watch and what gossip hears, into the engine;
- `claims`         claiming names and addresses with compare-and-set in a KV store
                   (and the outage write-behind);
- `gossip_claims`  the same without a store: first claim wins, address blocks.
"""
