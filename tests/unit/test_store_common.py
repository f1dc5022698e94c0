"""The plumbing the KV backends share (store/common.py), without a server."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from overlayd.core.model import Endpoint, Network
from overlayd.core.view import NetworkPut
from overlayd.store import common
from overlayd.store.base import AlreadyExists, StoreError, StoreUnavailable
from overlayd.store.keys import KeyLayout, encode
from overlayd.util.metrics import Metrics

log = logging.getLogger("overlayd.store.test")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    plain = common.Backoff(0.2, 1.0, jitter=0)
    assert [plain.next_delay() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    plain.reset()
    assert plain.next_delay() == 0.2
    spread = common.Backoff(1.0, 1.0)
    delays = [spread.next_delay() for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays) and len(set(delays)) > 1


def test_renew_interval() -> None:
    assert common.renew_interval(9) == 3 and common.renew_interval(9, failing=True) == 1.5
    assert common.renew_interval(1) == 0.5 and common.renew_interval(1, failing=True) == 0.3


async def test_retry_while_unavailable_retries_only_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def no_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(common.asyncio, "sleep", no_sleep)
    answers = [StoreUnavailable("down"), StoreUnavailable("down"), "ok"]

    async def op() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await common.retry_while_unavailable(op) == "ok"
    assert slept == [common.RETRY_MIN, 2 * common.RETRY_MIN]

    async def refused() -> str:
        raise StoreError("denied")

    with pytest.raises(StoreError, match="denied"):
        await common.retry_while_unavailable(refused)


def test_session_file_saves_atomically_and_loads_stripped(tmp_path: Path) -> None:
    lease = common.SessionFile(str(tmp_path / "state"), "etcd-lease")
    assert lease.load() is None
    lease.save("694d7a1b2c")
    assert lease.path.read_text() == "694d7a1b2c\n" and lease.load() == "694d7a1b2c"
    assert not lease.path.with_suffix(".tmp").exists()
    lease.remove()
    lease.remove()  # already gone: fine
    assert lease.load() is None

    secret = common.SessionFile(str(tmp_path / "state"), "zookeeper-session", private=True)
    old = os.umask(0)
    try:
        secret.save("1f 00ff")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(secret.path).st_mode) == 0o600


def test_health_logs_changes_and_exports_them(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    health = common.Health("etcd", metrics=metrics, log=log)
    with caplog.at_level(logging.INFO, logger=log.name):
        health.set(True)
        health.set(True)
        health.set(False)
    assert [r.getMessage() for r in caplog.records] == ["etcd reachable", "etcd unreachable"]
    assert caplog.records[0].name == log.name  # the backend's own logger
    assert not health.up and sample(metrics, "overlayd_store_up") == 0
    health.count_error("txn")
    health.count_event(NetworkPut(Network("demo", 42, IPv4Network("10.1.0.0/24"))), "put")
    assert sample(metrics, "overlayd_store_errors_total", operation="txn") == 1
    assert sample(metrics, "overlayd_store_watch_events_total", kind="network", action="put") == 1
    common.Health("consul", metrics=None, log=log).set(True)  # no metrics: fine


def test_record_decoder_reports_and_skips_what_is_not_ours() -> None:
    metrics, reported = Metrics(), []
    layout = KeyLayout("/t/v1/")
    decoder = common.RecordDecoder(layout, metrics=metrics, on_invalid=reported.append, log=log)
    network = Network("demo", 42, IPv4Network("10.1.0.0/24"))
    assert decoder.put(layout.network("demo"), encode(network)) == NetworkPut(network)
    assert decoder.put(layout.network("junk"), b"\xff not json" * 100) is None
    assert len(reported) == 1 and "junk" in reported[0]
    assert sample(metrics, "overlayd_store_invalid_records_total") == 1


async def test_republish_skips_an_ip_taken_meanwhile_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    endpoints = [
        Endpoint("demo", name, IPv4Address(f"10.1.0.{k}"), f"02:00:00:00:00:0{k}", "h1")
        for k, name in ((1, "a"), (2, "b"), (3, "c"))
    ]
    published: list[str] = []

    async def publish(ep: Endpoint) -> None:
        if ep.name == "b":
            raise AlreadyExists("IP", str(ep.ip), "demo/other")
        published.append(ep.name)

    owned = {ep.key: ep for ep in endpoints}
    writes = common.EndpointWrites(owned)
    reported: list[str] = []
    with caplog.at_level(logging.ERROR, logger=log.name):
        await common.republish(writes, owned, publish, log=log, report=reported.append)
    assert published == ["a", "c"]
    assert "endpoint demo/b cannot be re-published" in caplog.text
    # Reported, not only logged: /status shows it among the store's invalid records.
    assert len(reported) == 1 and reported[0].startswith("endpoint demo/b cannot be re-published: ")
    assert "10.1.0.2" in reported[0]

    async def down(ep: Endpoint) -> None:
        raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):  # an outage is the caller's to retry
        await common.republish(writes, owned, down, log=log)


def _endpoints(*names: str) -> dict[str, Endpoint]:
    made = [
        Endpoint("demo", name, IPv4Address(f"10.1.0.{k}"), f"02:00:00:00:00:0{k}", "h1")
        for k, name in enumerate(names, 1)
    ]
    return {ep.key: ep for ep in made}


async def test_republish_never_brings_back_an_endpoint_deleted_meanwhile() -> None:
    """The daemon deletes endpoints while a re-publish after a new lease walks them: one
    deleted before its turn is skipped, and a delete that comes while its re-publish is in
    flight waits for it and then goes through (the store ends without the record)."""
    owned = _endpoints("a", "b", "c")
    writes = common.EndpointWrites(owned)
    store: dict[str, str] = {}  # what the server would hold
    a_in_flight, a_may_finish = asyncio.Event(), asyncio.Event()

    async def put(ep: Endpoint) -> None:
        if ep.name == "a":
            a_in_flight.set()
            await a_may_finish.wait()
        store[ep.key] = ep.mac
        owned[ep.key] = ep  # as a store's publish does

    async def delete(ep: Endpoint) -> None:
        async with writes.hold(ep.key):
            store.pop(ep.key, None)
            owned.pop(ep.key, None)

    walk = asyncio.create_task(common.republish(writes, owned, put, log=log))
    await a_in_flight.wait()
    deletes = [asyncio.create_task(delete(owned[key])) for key in ("demo/a", "demo/b")]
    await asyncio.sleep(0)
    a_may_finish.set()
    await asyncio.gather(walk, *deletes)
    assert sorted(store) == ["demo/c"] and sorted(owned) == ["demo/c"]
    assert not writes._locks  # no lock left behind per key


async def test_republish_skips_an_endpoint_replaced_meanwhile() -> None:
    """An endpoint published anew (another record under the same key) since the walk began
    is the daemon's write, not the walk's: the walk leaves it."""
    owned = _endpoints("a")
    writes = common.EndpointWrites(owned)
    old = owned["demo/a"]
    put_seen: list[Endpoint] = []

    async def put(ep: Endpoint) -> None:
        put_seen.append(ep)

    endpoints_then = dict(owned)
    owned["demo/a"] = Endpoint("demo", "a", old.ip, "02:00:00:00:00:99", "h1")
    for ep in endpoints_then.values():
        await writes.republish_one(ep, put)
    assert put_seen == []


def test_first_line() -> None:
    assert common.first_line(RuntimeError("one\ntwo")) == "one"
    assert common.first_line(TimeoutError()) == "TimeoutError"
    assert common.first_line("  text\nmore") == "text" and common.first_line("") == ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_round_pace_holds_back_only_a_round_that_follows_the_last_one_closely() -> None:
    clock = FakeClock()
    pace = common.RoundPace(0.1, clock)
    assert pace.delay() == 0.0  # no round yet
    pace.started()
    assert pace.delay() == pytest.approx(0.1)
    clock.now += 0.04
    assert pace.delay() == pytest.approx(0.06)
    clock.now += 0.5  # a quiet spell: the next round starts at once
    assert pace.delay() == 0.0
    pace.started()
    clock.now += 0.1
    assert pace.delay() == 0.0


def test_round_pace_zero_never_waits() -> None:
    clock = FakeClock()
    pace = common.RoundPace(0.0, clock)
    pace.started()
    assert pace.delay() == 0.0
    asyncio.run(asyncio.wait_for(pace.wait(), 1.0))


def test_stream_pace_closes_the_stream_only_after_a_response_that_follows_the_last_closely() -> None:
    clock = FakeClock()
    pace = common.StreamPace(0.3, clock)
    assert not pace.hold_back()  # the first response: a change after a quiet spell
    clock.now += 0.01
    assert pace.hold_back()  # a burst: closed for 0.3 s
    clock.now += 0.3 + 0.05  # the reopened stream's first response, with what changed meanwhile
    assert not pace.hold_back()
    clock.now += 0.299
    assert pace.hold_back()
    clock.now += 5.0
    assert not pace.hold_back()


def test_stream_pace_zero_never_holds_back() -> None:
    clock = FakeClock()
    pace = common.StreamPace(0.0, clock)
    assert not pace.hold_back()
    assert not pace.hold_back()
