"""The core: what overlayd knows and decides, with no I/O at all.

- `model`      records (Network, Node, Endpoint) and their validation;
- `view`       the cluster view, indexed, and its typed deltas;
- `admission`  the one rule for which fact enters the view, for every source;
- `ipam`       choosing addresses, and gossip-only address blocks;
- `config`     the daemon's configuration, validated with one-line errors;
- `clusterkey` the gossip cluster key's format.
"""
