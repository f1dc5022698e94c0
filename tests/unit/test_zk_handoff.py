"""kazoo callbacks that only hand work to the event loop run where kazoo delivers them;
every other callback still goes through kazoo's worker threads (no server needed)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from kazoo.protocol.states import Callback

from overlayd.store.zookeeper import _Handler, _Handoff


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
