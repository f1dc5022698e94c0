"""kazoo callbacks that only hand work to the event loop run where kazoo delivers them;
every other callback still goes through kazoo's worker threads (no server needed)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from kazoo.protocol.states import Callback

from overlayd.core.config import from_flat
from overlayd.store.zookeeper import ZooKeeperStore, _Handler, _Handoff


async def test_a_handoff_reaches_the_loop_from_the_setting_thread_and_others_use_kazoos_workers() -> None:
    loop = asyncio.get_running_loop()
    handler = _Handler()
    handler.start()
    try:
        got: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        threads: dict[str, str] = {}

        def on_loop(kind: str, value: Any) -> None:
            got.put_nowait((kind, value))

        class Recording(_Handoff):
            def __call__(self, *args: Any) -> None:
                threads[args[0] if isinstance(args[0], str) else "result"] = threading.current_thread().name
                super().__call__(*args)

        def plain(result: Any) -> None:
            threads["plain"] = threading.current_thread().name
            loop.call_soon_threadsafe(on_loop, "plain", result.value)

        result = handler.async_result()
        result.rawlink(Recording(loop, lambda r: on_loop("result", r.value)))
        result.rawlink(plain)
        setter = threading.Thread(target=result.set, args=(42,), name="setter")
        setter.start()
        setter.join()
        handler.dispatch_callback(Callback("watch", Recording(loop, on_loop), ("event", "/a")))
        seen = {await asyncio.wait_for(got.get(), 5) for _ in range(3)}
        assert seen == {("result", 42), ("plain", 42), ("event", "/a")}
        assert threads["result"] == "setter"  # no hop through a kazoo worker
        assert threads["event"] == threading.current_thread().name  # dispatched where it was delivered
        assert threads["plain"] not in ("setter", threading.current_thread().name)  # a kazoo worker
    finally:
        handler.stop()


async def test_a_handoff_to_a_closed_loop_is_dropped_quietly() -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    _Handoff(closed, print)("never printed")  # must not raise into kazoo's connection thread


class _Pending:
    """A kazoo request not answered yet: keeps the callback `_call` links to it."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def rawlink(self, callback: Any) -> None:
        self.callbacks.append(callback)


class _Answer:
    """What kazoo hands its callbacks: a successful AsyncResult."""

    value = ("data", "stat")

    def successful(self) -> bool:
        return True


class _LiveClient:
    connected = True


def _store(tmp_path: Path) -> ZooKeeperStore:
    config = from_flat(
        {
            "node.name": "h1",
            "underlay.address": "198.18.0.1",
            "store.url": "zookeeper://127.0.0.1:2181/ovt",
            "store.lease_ttl": 10,
        }
    )
    assert config.store is not None
    store = ZooKeeperStore(config.store, state_dir=str(tmp_path))
    store._client = _LiveClient()  # no server: requests go to `_Pending`
    store._connected.set()
    return store


async def test_a_request_answered_as_its_caller_is_cancelled_still_ends_the_caller(tmp_path: Path) -> None:
    """Python 3.11's `wait_for` returns an answer that came in the same loop iteration as a
    cancel and drops the cancel: a watch stopped at that moment ran on for ever."""
    store = _store(tmp_path)
    request = _Pending()
    caller = asyncio.create_task(store._call("get", lambda client: request))
    await asyncio.sleep(0)  # the request is out; its caller waits
    request.callbacks[0](_Answer())  # kazoo answers: handed to the loop ...
    await asyncio.sleep(0)  # ... which delivers it before the caller runs again
    caller.cancel()  # and the caller is stopped in that same iteration
    done, _ = await asyncio.wait({caller}, timeout=5)
    assert done and caller.cancelled()


async def test_keep_session_stops_when_cancelled_as_a_new_session_arrives(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store._connected.clear()  # the session is re-published only once connected
    keeper = asyncio.create_task(store.keep_session())
    await asyncio.sleep(0)  # waiting for a new session
    store._session_replaced.set()
    await asyncio.sleep(0)  # the wait ends ...
    keeper.cancel()  # ... in the loop iteration the daemon stops in
    done, _ = await asyncio.wait({keeper}, timeout=5)
    assert done and keeper.cancelled()
