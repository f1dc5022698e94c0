"""overlayd: a control plane for multi-host VXLAN overlay networks on Linux.

One change travels, each step O(change):

    store watch / gossip / admin API / this host's registry
      -> admission      which claim wins (pure)            -> view deltas
      -> desired state  the entries a delta touches (pure)  -> dirty keys
      -> reconciler     dirty keys against the kernel mirror -> commands
      -> kernel         batched netlink writes; notifications feed the mirror back

The parts, pure to I/O:

- `model`      records (Network, Node, Endpoint) and their validation.        Pure.
- `state`      the cluster view, indexed, and its typed deltas.               Pure.
- `admission`  the one rule for which fact enters the view, for every source. Pure.
- `ipam`       choosing addresses; gossip-only address blocks.               Pure.
- `dataplane.desired` / `dataplane.diff` / `dataplane.mirror` / `dataplane.netlink` / `dataplane.nft`
               desired state kept per delta (bridges, VXLAN entries, and a network's
               gateway side: routes, addresses, gateway namespaces, nftables tables),
               the plan over dirty keys, the kernel mirror kept from dumps and
               notifications, the wire format, the nftables tables.          Pure.
- `dataplane.kernel` / `rtnl` / `monitor` / `endpoints`
               the only code that speaks netlink (and runs `ip netns`, `nft -j`):
               dumps, batched writes, the notification sockets, a local endpoint's veth.
- `reconciler` drives desired state against the mirror, in batches; a full read
               and compare is the rare safety net.
- `engine`     the path above, with gauges and the convergence clock.
- `store`      KV backends behind one async interface (etcd, ZooKeeper, Consul:
               leases bind a host's records to its liveness); `store.gossip` is
               the embedded mode's way to claim names and addresses without one.
- `gossip`     SWIM membership, AEAD framing, push + anti-entropy (a library);
               `peering` speaks overlayd's records over it; `feeds` turns the
               store's watch and what gossip hears into facts for the engine.
- `claims` / `operations` / `report`
               claiming cluster-wide (compare-and-set or gossip), the admin API's
               changes, and what the daemon says about itself.
- `api`        admin API on a unix socket, HTTP status/metrics server;
               `api.schema` types every answer (pure), `api.client` reads them.
- `daemon`     wires the parts, owns the tasks and the one shutdown path.
- `cli`/`cni`  overlayctl and the CNI plugin: thin clients of the admin API;
               `lab` builds a multi-host lab out of network namespaces.
"""
