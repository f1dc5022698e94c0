"""Print what a lab's KV store holds, as JSON: `python -m faults.storedump CONFIG`.

Run inside a lab host's namespace (the store is reachable from there): it
reads the host's own config for the store URL and prefix, takes one snapshot
with overlayd's own store client and prints networks, nodes and endpoints.
The fault suite uses it to ask "what does the store say now?" without
trusting any daemon's view.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile

from overlayd.core import config as config_mod
from overlayd.core.view import EndpointPut, NetworkPut, NodePut
from overlayd.store.factory import make_store


async def dump(path: str) -> dict[str, object]:
    config = config_mod.load(path, env={})
    assert config.store is not None, "a gossip-only host has no store to dump"
    with tempfile.TemporaryDirectory(prefix="faults-storedump-") as state:
        store = make_store(config.store, state_dir=state)
        try:
            await asyncio.wait_for(store.connect(), 15)
            snapshot = await asyncio.wait_for(store.snapshot(), 15)
        finally:
            await store.close()
    out: dict[str, list[dict[str, object]]] = {"networks": [], "nodes": [], "endpoints": []}
    for fact in snapshot.facts:
        if isinstance(fact, NetworkPut):
            n = fact.network
            out["networks"].append({"name": n.name, "vni": n.vni, "subnet": str(n.subnet)})
        elif isinstance(fact, NodePut):
            out["nodes"].append({"name": fact.node.name, "vtep": str(fact.node.vtep)})
        elif isinstance(fact, EndpointPut):
            e = fact.endpoint
            out["endpoints"].append(
                {"key": e.key, "name": e.name, "ip": str(e.ip), "mac": e.mac, "owner": e.owner}
            )
    return {"revision": snapshot.revision, **out}


def main() -> int:
    print(json.dumps(asyncio.run(dump(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
