"""The Consul session keeper ends when the daemon stops it, even when the stop comes in the
same loop iteration as a nudge to renew (Python 3.11's `wait_for` lost such a cancel, and
the keeper ran on past the daemon's stop). No server: the renewal would only fail."""

from __future__ import annotations

import asyncio
from pathlib import Path

from overlayd.core.config import from_flat
from overlayd.store.consul import ConsulStore


def _store(tmp_path: Path) -> ConsulStore:
    config = from_flat(
        {
            "node.name": "h1",
            "underlay.address": "198.18.0.1",
            "store.url": "consul://127.0.0.1:9",  # discard port: nothing answers
            "store.lease_ttl": 10,
        }
    )
    assert config.store is not None
    return ConsulStore(config.store, state_dir=str(tmp_path))


async def test_keep_session_stops_when_cancelled_as_a_renewal_is_asked_for(tmp_path: Path) -> None:
    store = _store(tmp_path)
    keeper = asyncio.create_task(store.keep_session())
    await asyncio.sleep(0)  # waiting for the renewal interval or a nudge
    store._session_suspect.set()
    await asyncio.sleep(0)  # the wait ends ...
    keeper.cancel()  # ... in the loop iteration the daemon stops in
    done, _ = await asyncio.wait({keeper}, timeout=5)
    try:
        assert done and keeper.cancelled()
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await store.close()
