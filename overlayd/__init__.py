"""overlayd: a control plane for multi-host VXLAN overlay networks on Linux.

How the parts fit, from pure to I/O:

- `model`      records (Network, Node, Endpoint) and their validation. Pure.
- `state`      the merged cluster view: facts in, "did it change?" out. Pure.
- `dataplane.desired` / `dataplane.diff`
               desired kernel state as a function of the view, and the
               commands that turn observed kernel state into it. Pure.
- `dataplane.kernel`   the only code that speaks netlink (pyroute2): reads
               what overlayd owns, executes commands in batches.
- `reconciler` level-triggered loop: observe, diff, execute; after changes,
               periodically, and at start-up (adopting what is already right).
- `store`      backends behind one async interface: etcd, ZooKeeper, Consul
               (the authority, leases/sessions binding a node's records to its
               liveness) and `store.gossip`, the embedded mode with no server.
- `gossip`     SWIM membership, AEAD framing, push + anti-entropy (a library);
               `peering` speaks overlayd's records over it, beside a KV store
               (changes arrive before the watch) or as the store itself.
- `api`        admin API on a unix socket, HTTP status/metrics server;
               `api.schema` types every answer (pure), `api.client` reads them.
- `daemon`     wires the parts, owns the tasks and the one shutdown path.
- `cli`/`cni`  overlayctl and the CNI plugin: thin clients of the admin API;
               `lab` builds a multi-host lab out of network namespaces.

These layers are import contracts in pyproject.toml, checked by `make lint`.
"""
