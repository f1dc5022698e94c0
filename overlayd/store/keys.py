"""Key layout under the store prefix, and decoding of stored values into facts.

Pure: no I/O. Shared by every backend, so all of them store the same bytes.

    <prefix>networks/<name>          Network JSON          permanent
    <prefix>vni/<vni>                network name          permanent (claim)
    <prefix>nodes/<name>             Node JSON             owned by the node's lease
    <prefix>endpoints/<net>/<name>   Endpoint JSON         owned by the owner's lease
    <prefix>ipam/<net>/<ip>          endpoint key          owned by the owner's lease (claim)
    <prefix>generation               random token          permanent (made by the first watch)

The generation marker tells a watch that the server is not the one it watched
any more, when nothing else can: a server emptied (or restored) and written to
again past the revision the watch stood at before it looked again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from overlayd.core.model import NAME_PATTERN, UNICAST_LAA_PATTERN, Endpoint, Network, Node, ValidationError
from overlayd.core.view import (
    EndpointDeleted,
    EndpointPut,
    Fact,
    NetworkDeleted,
    NetworkPut,
    NodeDeleted,
    NodePut,
    endpoint_put,
)

GENERATION = "generation"  # the key (under the prefix) of the generation marker


@dataclass(frozen=True)
class KeyLayout:
    prefix: str
    # "<prefix>endpoints/", made once: `fact_for_put` matches every key of a watch with it.
    endpoints: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", f"{self.prefix}endpoints/")

    def network(self, name: str) -> str:
        return f"{self.prefix}networks/{name}"

    def vni(self, vni: int) -> str:
        return f"{self.prefix}vni/{vni}"

    def node(self, name: str) -> str:
        return f"{self.prefix}nodes/{name}"

    def endpoint(self, network: str, name: str) -> str:
        return f"{self.prefix}endpoints/{network}/{name}"

    def ip_claim(self, network: str, ip: IPv4Address) -> str:
        return f"{self.prefix}ipam/{network}/{ip}"

    def generation(self) -> str:
        return f"{self.prefix}{GENERATION}"

    def ip_claim_prefix(self) -> str:
        return f"{self.prefix}ipam/"

    def vni_prefix(self) -> str:
        return f"{self.prefix}vni/"


def encode(record: Network | Node | Endpoint) -> bytes:
    return json.dumps(record.to_dict(), sort_keys=True, separators=(",", ":")).encode()


class InvalidRecord(ValueError):
    """A value under the prefix that is not valid overlayd data."""


def fact_for_put(layout: KeyLayout, key: str, value: bytes) -> Fact | None:
    """Decode a stored value; None for keys that are not records (claims, the marker).

    An endpoint as every writer of ours stores it (UTF-8 JSON of an object of the usual
    shape, under its own name) is decoded here without a call per step: a join decodes
    thousands in a row. Anything else, valid or not, takes `_fact_for_put`, whose checks
    accept it or raise the InvalidRecord they always raised.
    """
    endpoints = layout.endpoints
    if value[:1] == b"{" and key.startswith(endpoints):
        try:
            text = value.decode()
        except ValueError:  # not UTF-8: the full path says why
            return _fact_for_put(layout, key, value)
        canonical = _ENCODED_ENDPOINT.fullmatch(text)
        if canonical is not None:
            created_at, ifname, ip, mac, name, netns, network, owner, version = canonical.group(*_FIELDS)
            endpoint = Endpoint.from_shaped_fields(
                network, owner, name, mac, ip, float(created_at), int(version), netns, ifname or "eth0"
            )
            if endpoint is not None and endpoint.key == key[len(endpoints) :]:
                return endpoint_put(endpoint)
            # The scanner would give these same fields, and the same answer: skip it.
            return _fact_for_put(layout, key, value)
        try:
            # What `json.loads` does for a value that opens with "{" and ends where the
            # object does; anything else (trailing blanks, extra data) falls through.
            data, end = _scan_json(text, 0)
        except (ValueError, StopIteration):  # not JSON: the full path says why
            pass
        else:
            if end == len(text) and data.__class__ is dict:
                endpoint = Endpoint.from_common_dict(data)
                if endpoint is not None and endpoint.key == key[len(endpoints) :]:
                    return EndpointPut(endpoint)
    return _fact_for_put(layout, key, value)


def _fact_for_put(layout: KeyLayout, key: str, value: bytes) -> Fact | None:
    """`fact_for_put` with every check in turn, each failure named."""
    kind, name = _split(layout, key)
    if kind in ("vni", "ipam") or kind is None or (kind == GENERATION and not name):
        return None
    try:
        data = _json_object(value)
        if kind == "networks":
            network = Network.from_dict(data)
            _check_name(name, network.name)
            return NetworkPut(network)
        if kind == "nodes":
            node = Node.from_dict(data)
            _check_name(name, node.name)
            return NodePut(node)
        if kind == "endpoints":
            endpoint = Endpoint.from_dict(data)
            _check_name(name, endpoint.key)
            return EndpointPut(endpoint)
    except (ValueError, ValidationError, TypeError) as exc:
        raise InvalidRecord(f"{key}: {exc}") from None
    raise InvalidRecord(f"{key}: unknown record kind {kind!r}")


_decoder = json.JSONDecoder()  # json.loads's own settings
_decode_json = _decoder.decode
# The C scanner under `decode`: (value, end) of the JSON value at an index, without
# `decode`'s two whitespace matches and its Python frames.
_scan_json: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def _string(name: str, pattern: str = r'[^"\\\x00-\x1f]*') -> str:
    """A JSON string field of the encoded endpoint: no escapes, no control characters."""
    return f'"{name}":"(?P<{name}>{pattern})"'


# An endpoint's value exactly as `encode` writes it: sorted keys, no blanks, strings with
# no escapes and no control characters, a float `created_at` and an int `version`, in
# ASCII digits, a name and a MAC of the shapes `from_common_dict` checks. Its groups are
# the very values `json.loads` gives for such text (a JSON string without escapes is its
# characters; a number is `float` or `int` of its text), found by one match instead of the
# scanner, a dict, a lookup per field and two more matches: a join decodes thousands of
# records in a row. Every other text takes the scanner, as before.
_ENCODED_ENDPOINT = re.compile(
    r'\{"created_at":(?P<created_at>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)),'
    + ",".join(
        (
            _string("ifname"),
            _string("ip", r"[0-9.]{7,15}"),
            _string("mac", UNICAST_LAA_PATTERN),
            _string("name", NAME_PATTERN),
            _string("netns"),
            _string("network"),
            _string("owner"),
        )
    )
    + r',"version":(?P<version>[1-9][0-9]{0,17})\}'
)
# Their group numbers, in this order (a number is found faster than a name).
_FIELDS = tuple(
    _ENCODED_ENDPOINT.groupindex[name]
    for name in ("created_at", "ifname", "ip", "mac", "name", "netns", "network", "owner", "version")
)


def _json_object(value: bytes) -> object:
    """`json.loads(value)`, without its encoding detection for what every writer of ours
    stores: UTF-8 text of an object. Anything else (UTF-16/32, a BOM, escaped surrogates)
    takes `json.loads`'s own path, so the same values decode or fail as before."""
    if value[:1] == b"{" and value[1:2] != b"\0":
        try:
            text = value.decode()
        except UnicodeDecodeError:
            return json.loads(value)
        return _decode_json(text)
    return json.loads(value)


def fact_for_delete(layout: KeyLayout, key: str) -> Fact | None:
    kind, name = _split(layout, key)
    if kind == "networks":
        return NetworkDeleted(name)
    if kind == "nodes":
        return NodeDeleted(name)
    if kind == "endpoints":
        return EndpointDeleted(name)
    return None


def _split(layout: KeyLayout, key: str) -> tuple[str | None, str]:
    if not key.startswith(layout.prefix):
        return None, ""
    kind, _, name = key[len(layout.prefix) :].partition("/")
    return kind, name


def _check_name(name_in_key: str, name_in_value: str) -> None:
    # A record stored under another record's key would let one writer shadow another.
    # (The caller puts the key before the message, as for every other failure.)
    if name_in_key != name_in_value:
        raise InvalidRecord(f"value names {name_in_value!r}, key names {name_in_key!r}")
