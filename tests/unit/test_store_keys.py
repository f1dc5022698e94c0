"""Stored values as facts (store/keys.py): the fast path for the usual endpoint record
decodes exactly what the full checks decode, and leaves everything else to them."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

import pytest

from overlayd.core.model import Endpoint
from overlayd.core.view import EndpointPut
from overlayd.store import keys
from overlayd.store.keys import InvalidRecord, KeyLayout, encode, fact_for_put

LAYOUT = KeyLayout("/t/v1/")
ENDPOINT = Endpoint("blue", "web-1", IPv4Address("10.1.0.5"), "02:00:00:00:00:05", "host-a", 3, 12.5, "ns1")
KEY = LAYOUT.endpoint("blue", "web-1")
USUAL = encode(ENDPOINT)
FIELDS = json.loads(USUAL)


def _with(**changes: object) -> bytes:
    return json.dumps(FIELDS | changes).encode()


# (key, value) pairs: the usual record and its neighbours, valid or not.
CASES = [
    (KEY, USUAL),
    (KEY, USUAL + b" \n"),  # trailing blanks: valid JSON
    (KEY, USUAL + b"{}"),  # extra data
    (KEY, USUAL[:-1]),  # cut short
    (KEY, b"{not json"),
    (KEY, b"{\xff}"),  # not UTF-8
    (KEY, USUAL.decode().encode("utf-16-le")),
    (KEY, USUAL.decode().encode("utf-16")),  # with a BOM
    (KEY, b"\xef\xbb\xbf" + USUAL),  # UTF-8 BOM
    (KEY, b"  " + USUAL),  # leading blanks
    (KEY, b"[]"),
    (LAYOUT.endpoint("blue", "web-2"), USUAL),  # a record under another's key
    (LAYOUT.endpoint("red", "web-1"), USUAL),
    (LAYOUT.endpoint("blue", "web-1/x"), USUAL),
    (KEY, _with(mac="02:AA:00:00:00:05")),  # valid, normalised by the full checks
    (KEY, _with(mac="03:00:00:00:00:05")),  # multicast
    (KEY, _with(created_at=7)),  # an int: valid, made a float
    (KEY, _with(created_at="soon")),
    (KEY, _with(version=0)),
    (KEY, _with(version=True)),
    (KEY, _with(ip="10.1.0.256")),
    (KEY, _with(ip="010.1.0.5")),
    (KEY, _with(name="web 1")),
    (KEY, _with(network="Bad net")),
    (KEY, _with(netns=5)),
    (KEY, _with(extra="ignored")),
    (KEY, b'{"network": "blue", "name": "web-1"}'),  # fields missing
    (KEY, json.dumps({k: v for k, v in FIELDS.items() if k != "owner"}).encode()),
    (LAYOUT.network("blue"), USUAL),  # an endpoint's value under a network's key
    (LAYOUT.ip_claim("blue", IPv4Address("10.1.0.5")), b"blue/web-1"),
    ("/other/endpoints/blue/web-1", USUAL),
]


def _outcome(decode: object, key: str, value: bytes) -> object:
    try:
        return decode(key, value)  # type: ignore[operator]
    except InvalidRecord as exc:
        return ("InvalidRecord", str(exc))


@pytest.mark.parametrize(("key", "value"), CASES)
def test_fact_for_put_decodes_or_rejects_as_the_full_checks_do(key: str, value: bytes) -> None:
    fast = _outcome(lambda k, v: fact_for_put(LAYOUT, k, v), key, value)
    full = _outcome(lambda k, v: keys._fact_for_put(LAYOUT, k, v), key, value)
    assert fast == full
    if isinstance(fast, EndpointPut):
        assert fast.endpoint.ip.__class__ is full.endpoint.ip.__class__  # type: ignore[attr-defined]


def test_a_forged_record_is_rejected_with_both_names() -> None:
    key = LAYOUT.endpoint("blue", "web-2")
    with pytest.raises(InvalidRecord) as raised:
        fact_for_put(LAYOUT, key, USUAL)
    assert str(raised.value) == f"{key}: value names 'blue/web-1', key names 'blue/web-2'"  # the key once


def test_the_usual_record_needs_no_full_check(monkeypatch: pytest.MonkeyPatch) -> None:
    fact_for_put(LAYOUT, KEY, USUAL)  # its network and owner names are known from here on

    def full(layout: KeyLayout, key: str, value: bytes) -> None:
        raise AssertionError(f"full checks for {key}")

    monkeypatch.setattr(keys, "_fact_for_put", full)
    assert fact_for_put(LAYOUT, KEY, USUAL) == EndpointPut(ENDPOINT)
    with pytest.raises(AssertionError):
        fact_for_put(LAYOUT, KEY, USUAL + b" ")
