"""The KV store's own round trip: a raw put seen by a raw watch on the same server.

    ip netns exec HOST_NS python -m bench.kvprobe --store etcd --server 198.18.0.1:2379 \
        --prefix /P/probe/ --samples 20

Run inside a lab host's namespace, so the put and the watch take the path a
daemon's do (host -> underlay -> KV server), with the client libraries the
daemon uses (aetcd, aiohttp for Consul's HTTP API, kazoo). Prints one JSON
object: {"samples": [seconds, ...]}, each from just before the put is sent to
the watch delivering it. Keys go under `--prefix`, outside the daemons'
prefix, so they never see them.

This is the floor of the store path of a convergence figure: no control
plane that learns of a change through this store can beat it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any


async def _etcd(host: str, port: int, prefix: str, samples: int, interval: float) -> list[float]:
    import aetcd

    client = aetcd.Client(host=host, port=port, timeout=5)
    await client.connect()
    try:
        arrived: dict[bytes, float] = {}
        seen = asyncio.Event()
        stream = await client.watch_prefix(prefix.encode())

        async def read() -> None:
            async for event in stream:
                arrived[event.kv.key] = time.monotonic()
                seen.set()

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.2)  # the watch is registered on the server
        out: list[float] = []
        for i in range(samples):
            key = f"{prefix}k{i}".encode()
            seen.clear()
            start = time.monotonic()
            await client.put(key, b"x")
            while key not in arrived:
                await asyncio.wait_for(seen.wait(), 5)
                seen.clear()
            out.append(arrived[key] - start)
            await asyncio.sleep(interval)
        reader.cancel()
        await client.delete_prefix(prefix.encode())
        return out
    finally:
        await client.close()


async def _consul(host: str, port: int, prefix: str, samples: int, interval: float) -> list[float]:
    import aiohttp

    base = f"http://{host}:{port}/v1/kv/{prefix.lstrip('/')}"
    out: list[float] = []
    async with aiohttp.ClientSession() as http:
        async with http.get(base, params={"recurse": "true"}) as resp:
            index = resp.headers.get("X-Consul-Index", "0")
        for i in range(samples):
            # A blocking query from the current index returns at the next change
            # under the prefix: issued before the put, it returns with it.
            watch = asyncio.create_task(_consul_wait(http, base, index))
            await asyncio.sleep(0.05)  # let the query reach the server
            start = time.monotonic()
            async with http.put(f"{base}k{i}", data=b"x") as resp:
                resp.raise_for_status()
            index, arrived = await asyncio.wait_for(watch, 10)
            out.append(arrived - start)
            await asyncio.sleep(interval)
        async with http.delete(base, params={"recurse": "true"}) as resp:
            resp.raise_for_status()
    return out


async def _consul_wait(http: Any, base: str, index: str) -> tuple[str, float]:
    params = {"recurse": "true", "index": index, "wait": "10s"}
    async with http.get(base, params=params) as resp:
        await resp.read()
        return resp.headers.get("X-Consul-Index", index), time.monotonic()


def _zookeeper(host: str, port: int, prefix: str, samples: int, interval: float) -> list[float]:
    from kazoo.client import KazooClient

    client = KazooClient(hosts=f"{host}:{port}", timeout=5)
    client.start(timeout=10)
    try:
        base = prefix.rstrip("/")
        client.ensure_path(base)
        out: list[float] = []
        for i in range(samples):
            path = f"{base}/k{i}"
            client.create(path, b"")
            fired = threading.Event()
            arrived: list[float] = []

            def changed(_event: Any, box: list[float] = arrived, done: threading.Event = fired) -> None:
                box.append(time.monotonic())
                done.set()

            client.get(path, watch=changed)  # a one-shot watch, as the daemon's
            start = time.monotonic()
            client.set(path, b"x")
            if not fired.wait(5):
                raise TimeoutError(f"no watch event for {path} within 5 s")
            out.append(arrived[0] - start)
            time.sleep(interval)
        client.delete(base, recursive=True)
        return out
    finally:
        client.stop()
        client.close()


def probe(store: str, server: str, prefix: str, samples: int, interval: float) -> list[float]:
    host, _, port_text = server.rpartition(":")
    port = int(port_text)
    if store == "etcd":
        return asyncio.run(_etcd(host, port, prefix, samples, interval))
    if store == "consul":
        return asyncio.run(_consul(host, port, prefix, samples, interval))
    if store == "zookeeper":
        return _zookeeper(host, port, prefix, samples, interval)
    raise ValueError(f"unknown store {store!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--store", required=True, choices=("etcd", "consul", "zookeeper"))
    parser.add_argument("--server", required=True, help="host:port")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args(argv)
    out = probe(args.store, args.server, args.prefix, args.samples, args.interval)
    print(json.dumps({"samples": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
