"""Stored values as facts (store/keys.py): the fast path for the usual endpoint record
decodes exactly what the full checks decode, and leaves everything else to them."""

from __future__ import annotations

import json
import re
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


def _text(**changes: str) -> bytes:
    """The usual record as `encode` lays it out, with some fields' JSON text replaced."""
    fields = {k: json.dumps(v) for k, v in sorted(FIELDS.items())} | changes
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


# Values in `encode`'s layout whose text is unusual: the one-match decoder takes some of
# them, the scanner the others; either way the outcome must be the scanner's.
ENCODED_CASES = [
    (KEY, _text()),
    (KEY, encode(Endpoint("blue", "web-1", IPv4Address("10.1.0.5"), "02:00:00:00:00:05", "host-a", 1, 1e16))),
    (KEY, _text(created_at="1e999")),  # inf, as json.loads reads it
    (KEY, _text(created_at="-0.0")),
    (KEY, _text(created_at="12.5E-3")),
    (KEY, _text(created_at="012.5")),  # not JSON
    (KEY, _text(created_at="NaN")),
    (KEY, _text(created_at="12")),  # an int
    (KEY, _text(version="123456789012345678")),
    (KEY, _text(version="1234567890123456789")),
    (KEY, _text(version="1.0")),
    (KEY, _text(version="-1")),
    (KEY, _text(ifname='""')),  # the default interface name
    (KEY, _text(netns=r'"n\u00e9"')),  # an escape: the scanner's
    (KEY, _text(netns='"né"')),  # the same text unescaped
    (KEY, _text(netns=r'"a\"b"')),  # an escaped quote
    (KEY, _text(netns=r'"a\u0001"')),  # an escaped control character
    (KEY, _text(netns='"a\x01"')),  # a raw control character: not JSON
    (KEY, _text(name=r'"web\u002d1"')),  # "web-1" escaped
    (KEY, _text(name='"Web-1"')),
    (LAYOUT.endpoint("blue", "Web-1"), _text(name='"Web-1"')),
    (KEY, _text(name='"-web"')),
    (KEY, _text(name='"' + "w" * 64 + '"')),
    (KEY, _text(mac='"02:00:00:00:00:0A"')),
    (KEY, _text(mac='"03:00:00:00:00:05"')),
    (KEY, _text(ip='"10.1.0.5.6"')),
    (KEY, _text(ip='"10.1.0.256"')),
    (KEY, _text(ip='"1.2.3"')),
    (LAYOUT.endpoint("green", "web-1"), _text(network='"green"')),  # a network name not seen yet
    (KEY, _text(owner='"Host a"')),
    (KEY, _text(owner="null")),
    (KEY, _text() + b" "),
]


def _outcome(decode: object, key: str, value: bytes) -> object:
    try:
        return decode(key, value)  # type: ignore[operator]
    except InvalidRecord as exc:
        return ("InvalidRecord", str(exc))


@pytest.mark.parametrize(("key", "value"), CASES + ENCODED_CASES)
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


@pytest.mark.parametrize(("key", "value"), CASES + ENCODED_CASES)
def test_the_one_match_decoder_gives_what_the_scanner_gives(
    key: str, value: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    matched = _outcome(lambda k, v: fact_for_put(LAYOUT, k, v), key, value)
    monkeypatch.setattr(keys, "_ENCODED_ENDPOINT", re.compile(r"(?!)"))  # matches nothing
    scanned = _outcome(lambda k, v: fact_for_put(LAYOUT, k, v), key, value)
    assert matched == scanned
    if isinstance(matched, EndpointPut):
        for field in ("network", "owner", "netns", "ifname", "created_at", "version"):
            got, want = getattr(matched.endpoint, field), getattr(scanned.endpoint, field)  # type: ignore[attr-defined]
            assert got.__class__ is want.__class__, field
            assert got == want or (got != got and want != want), field  # NaN equals NaN here


def test_the_encoded_record_needs_no_scanner(monkeypatch: pytest.MonkeyPatch) -> None:
    fact_for_put(LAYOUT, KEY, USUAL)  # its network and owner names are known from here on

    def scan(text: str, at: int) -> None:
        raise AssertionError("scanned")

    monkeypatch.setattr(keys, "_scan_json", scan)
    assert fact_for_put(LAYOUT, KEY, USUAL) == EndpointPut(ENDPOINT)
    with pytest.raises(AssertionError):
        fact_for_put(LAYOUT, KEY, _text(netns=r'"n\u00e9"'))
