"""Records and their validation (overlayd.core.model): pure, no I/O."""

from __future__ import annotations

import pickle
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from overlayd.core.model import (
    MTU_MAX,
    MTU_MIN,
    VNI_MAX,
    VNI_MIN,
    Endpoint,
    Ip4,
    Network,
    Node,
    ValidationError,
    endpoint_key,
    first_free_ip,
    is_ipv4_network,
    open_twin,
    parse_ipv4,
    parse_mac,
    parse_subnet,
    random_mac,
    stable_mac,
    usable_ips,
    validate_mtu,
    validate_name,
    validate_vni,
)

A = IPv4Address


def net(**kw: Any) -> Network:
    args: dict[str, Any] = {"name": "blue", "vni": 100, "subnet": "10.1.0.0/24"}
    args.update(kw)
    return Network(**args)


def ep(**kw: Any) -> Endpoint:
    args: dict[str, Any] = {
        "network": "blue",
        "name": "web-1",
        "ip": "10.1.0.5",
        "mac": "02:00:00:00:00:05",
        "owner": "host-a",
    }
    args.update(kw)
    return Endpoint(**args)


# --- VNI --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vni", [VNI_MIN, 2, 4096, VNI_MAX])
def test_valid_vni(vni: int) -> None:
    assert validate_vni(vni) == vni
    assert net(vni=vni).vni == vni


def test_vni_bounds_are_the_24_bit_range() -> None:
    assert (VNI_MIN, VNI_MAX) == (1, 16777215)


@pytest.mark.parametrize("vni", [0, 16777216, -1, -100, True, False, "100", 100.0, None])
def test_invalid_vni(vni: object) -> None:
    with pytest.raises(ValidationError, match="invalid VNI"):
        validate_vni(vni)
    with pytest.raises(ValidationError, match="invalid VNI"):
        net(vni=vni)


# --- subnet and gateway -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["10.1.0.0/33", "10.1.0.0/abc", "300.1.0.0/24", "", "fd00::/64", None, "nonsense"]
)
def test_bad_subnet(value: object) -> None:
    with pytest.raises(ValidationError, match="invalid subnet"):
        parse_subnet(value)
    with pytest.raises(ValidationError, match="invalid subnet"):
        net(subnet=value)


def test_subnet_with_host_bits_set_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"invalid subnet '10\.1\.0\.1/24'.*host bits"):
        net(subnet="10.1.0.1/24")


@pytest.mark.parametrize("value", ["10.1.0.0/31", "10.1.0.0/32", IPv4Network("10.1.0.0/31")])
def test_subnet_too_small_for_endpoints(value: object) -> None:
    with pytest.raises(ValidationError, match="prefix must be /30 or shorter"):
        parse_subnet(value)


@pytest.mark.parametrize("value", ["10.1.0.0/30", "10.0.0.0/8", IPv4Network("192.168.7.0/24")])
def test_good_subnet(value: object) -> None:
    assert parse_subnet(value) == IPv4Network(str(value))
    assert net(subnet=value).subnet == IPv4Network(str(value))


def test_subnet_string_is_parsed_into_a_network() -> None:
    n = net(subnet="10.1.0.0/24")
    assert isinstance(n.subnet, IPv4Network)
    assert n.subnet == IPv4Network("10.1.0.0/24")


def test_gateway_inside_subnet() -> None:
    n = net(gateway="10.1.0.1")
    assert n.gateway == A("10.1.0.1")
    assert isinstance(n.gateway, IPv4Address)
    assert net(gateway=A("10.1.0.254")).gateway == A("10.1.0.254")


@pytest.mark.parametrize("gateway", ["10.2.0.1", "10.1.0.0", "10.1.0.255", "192.168.0.1"])
def test_gateway_outside_or_network_or_broadcast(gateway: str) -> None:
    with pytest.raises(ValidationError, match=f"gateway {gateway} is not a usable address"):
        net(gateway=gateway)


def test_gateway_not_an_address() -> None:
    with pytest.raises(ValidationError, match="invalid gateway 'x'"):
        net(gateway="x")


# --- MTU --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", [MTU_MIN, 1450, 1500, MTU_MAX])
def test_valid_mtu(mtu: int) -> None:
    assert validate_mtu(mtu) == mtu
    assert net(mtu=mtu).mtu == mtu


def test_mtu_none_means_underlay() -> None:
    assert net().mtu is None


@pytest.mark.parametrize("mtu", [MTU_MIN - 1, MTU_MAX + 1, 0, -1, True, "1500", 1500.0])
def test_invalid_mtu(mtu: object) -> None:
    with pytest.raises(ValidationError, match="invalid MTU"):
        validate_mtu(mtu)
    with pytest.raises(ValidationError, match="invalid MTU"):
        net(mtu=mtu)


# --- MAC --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("02:00:00:00:00:01", "02:00:00:00:00:01"),
        ("02:AB:CD:EF:01:23", "02:ab:cd:ef:01:23"),
        ("0A:00:00:00:00:00", "0a:00:00:00:00:00"),
        ("fe:ff:ff:ff:ff:ff", "fe:ff:ff:ff:ff:ff"),
    ],
)
def test_mac_normalised_to_lowercase(value: str, expected: str) -> None:
    assert parse_mac(value) == expected
    assert ep(mac=value).mac == expected


@pytest.mark.parametrize("value", ["00:11:22:33:44:55", "a8:00:00:00:00:01", "fc:00:00:00:00:01"])
def test_mac_not_locally_administered(value: str) -> None:
    with pytest.raises(ValidationError, match="locally administered"):
        parse_mac(value)


@pytest.mark.parametrize("value", ["03:00:00:00:00:01", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"])
def test_mac_multicast(value: str) -> None:
    with pytest.raises(ValidationError, match="multicast bit set"):
        parse_mac(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "02-00-00-00-00-01",
        "0200.0000.0001",
        "02:00:00:00:00:0g",
        "2:0:0:0:0:1",
        " 02:00:00:00:00:01",
        "02:00:00:00:00:01 ",
        "02:00:00:00:00:01\n",
        None,
        123,
    ],
)
def test_mac_malformed(value: object) -> None:
    with pytest.raises(ValidationError, match="expected six hex octets"):
        parse_mac(value)
    with pytest.raises(ValidationError, match="invalid MAC"):
        ep(mac=value)


def test_random_mac_is_locally_administered_unicast() -> None:
    for _ in range(200):
        mac = random_mac()
        assert parse_mac(mac) == mac
        first = int(mac[:2], 16)
        assert first & 0x01 == 0
        assert first & 0x02 == 0x02


def test_random_mac_differs_between_calls() -> None:
    macs = {random_mac() for _ in range(100)}
    assert len(macs) == 100


def test_stable_mac_is_deterministic() -> None:
    assert stable_mac("host-a", "100") == stable_mac("host-a", "100")
    assert parse_mac(stable_mac("host-a", "100")) == stable_mac("host-a", "100")
    assert stable_mac("host-a", "100") != stable_mac("host-a", "101")
    assert stable_mac("host-a", "100") != stable_mac("host-b", "100")
    # Parts are separated, not concatenated.
    assert stable_mac("ab", "c") != stable_mac("a", "bc")


def test_stable_mac_known_value() -> None:
    # sha256("host-a\0" "100")[:6] with the first octet forced to local unicast; a change
    # here renames every bridge MAC in a running cluster.
    import hashlib

    raw = hashlib.sha256(b"host-a\x00100").digest()[:6]
    expected = ":".join(f"{b:02x}" for b in bytes([(raw[0] & 0xFC) | 0x02]) + raw[1:])
    assert stable_mac("host-a", "100") == expected


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A", "0", "blue", "web-1", "a.b_c-d", "x" * 63, "9lives"])
def test_valid_names(name: str) -> None:
    assert validate_name(name, "network name") == name
    assert net(name=name).name == name
    assert ep(name=name).name == name
    assert Node(name=name, vtep=A("198.18.0.1"), started_at=0).name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 64,
        "-lead",
        ".lead",
        "_lead",
        "has space",
        "slash/y",
        "colon:y",
        "uni\u00e9",
        "trail\n",
        "nul\0",
        None,
        7,
    ],
)
def test_invalid_names(name: object) -> None:
    with pytest.raises(ValidationError, match="invalid network name"):
        validate_name(name, "network name")
    with pytest.raises(ValidationError, match="invalid network name"):
        net(name=name)
    with pytest.raises(ValidationError, match="invalid endpoint name"):
        ep(name=name)
    with pytest.raises(ValidationError, match="invalid owner node name"):
        ep(owner=name)
    with pytest.raises(ValidationError, match="invalid node name"):
        Node(name=name, vtep=A("198.18.0.1"), started_at=0)  # type: ignore[arg-type]


def test_endpoint_network_name_validated() -> None:
    with pytest.raises(ValidationError, match="invalid network name 'a b'"):
        ep(network="a b")


# --- endpoint IP within a network -------------------------------------------------------------


def test_check_endpoint_ip_accepts_host_addresses() -> None:
    n = net(gateway="10.1.0.1")
    for ip in ("10.1.0.2", "10.1.0.100", "10.1.0.254"):
        n.check_endpoint_ip(A(ip))  # no exception


@pytest.mark.parametrize("ip", ["10.2.0.5", "10.1.0.0", "10.1.0.255", "8.8.8.8"])
def test_check_endpoint_ip_outside_subnet(ip: str) -> None:
    n = net(gateway="10.1.0.1")
    with pytest.raises(ValidationError, match=rf"IP {ip} is not a usable address in network blue"):
        n.check_endpoint_ip(A(ip))


def test_check_endpoint_ip_equal_to_gateway() -> None:
    n = net(gateway="10.1.0.1")
    with pytest.raises(ValidationError, match=r"IP 10\.1\.0\.1 is the gateway of network blue"):
        n.check_endpoint_ip(A("10.1.0.1"))


def test_check_endpoint_ip_without_gateway_allows_first_host() -> None:
    net().check_endpoint_ip(A("10.1.0.1"))


def test_is_host_address() -> None:
    n = net(subnet="10.1.0.0/30")
    assert [n.is_host_address(A(f"10.1.0.{i}")) for i in range(5)] == [
        False,
        True,
        True,
        False,
        False,
    ]


# --- allocation -------------------------------------------------------------------------------


def test_first_free_ip_skips_gateway() -> None:
    assert first_free_ip(net(gateway="10.1.0.1"), set()) == A("10.1.0.2")
    assert first_free_ip(net(), set()) == A("10.1.0.1")


def test_first_free_ip_skips_taken() -> None:
    n = net(gateway="10.1.0.1")
    taken = {A("10.1.0.2"), A("10.1.0.3"), A("10.1.0.5")}
    assert first_free_ip(n, taken) == A("10.1.0.4")
    assert first_free_ip(n, taken | {A("10.1.0.4")}) == A("10.1.0.6")


def test_first_free_ip_gateway_in_the_middle() -> None:
    n = net(gateway="10.1.0.3")
    assert first_free_ip(n, {A("10.1.0.1"), A("10.1.0.2")}) == A("10.1.0.4")


def test_first_free_ip_full_network_raises() -> None:
    n = net(name="tiny", subnet="10.9.0.0/30", gateway="10.9.0.1")
    assert first_free_ip(n, set()) == A("10.9.0.2")
    with pytest.raises(ValidationError, match=r"network tiny \(10\.9\.0\.0/30\) has no free address"):
        first_free_ip(n, {A("10.9.0.2")})


def test_first_free_ip_full_without_gateway() -> None:
    n = net(name="tiny", subnet="10.9.0.0/30")
    with pytest.raises(ValidationError, match="has no free address"):
        first_free_ip(n, {A("10.9.0.1"), A("10.9.0.2")})


def test_usable_ips() -> None:
    assert usable_ips(net(subnet="10.9.0.0/29", gateway="10.9.0.1")) == [
        A(f"10.9.0.{i}") for i in range(2, 7)
    ]
    assert len(usable_ips(net(subnet="10.9.0.0/24"))) == 254


# --- small helpers ----------------------------------------------------------------------------


def test_parse_ipv4() -> None:
    assert parse_ipv4("10.0.0.1", "x") == A("10.0.0.1")
    assert parse_ipv4(A("10.0.0.1"), "x") == A("10.0.0.1")
    for bad in ("10.0.0", "::1", "", None, 167772161, "10.0.0.256"):
        with pytest.raises(ValidationError, match="invalid VTEP address"):
            parse_ipv4(bad, "VTEP address")


def test_is_ipv4_network() -> None:
    assert is_ipv4_network("10.0.0.0/8")
    assert not is_ipv4_network("10.0.0.1/8")
    assert not is_ipv4_network("fd00::/8")
    assert not is_ipv4_network("junk")


def test_endpoint_key() -> None:
    assert endpoint_key("blue", "web-1") == "blue/web-1"
    assert ep().key == "blue/web-1"


def test_endpoint_version_must_be_positive_int() -> None:
    assert ep(version=7).version == 7
    for bad in (0, -1, True, "2", 1.0):
        with pytest.raises(ValidationError, match="invalid endpoint version"):
            ep(version=bad)


def test_endpoint_ip_parsed() -> None:
    e = ep(ip="10.1.0.9")
    assert e.ip == A("10.1.0.9")
    with pytest.raises(ValidationError, match="invalid endpoint IP"):
        ep(ip="10.1.0")


def test_node_validation() -> None:
    n = Node(name="host-a", vtep="198.18.0.1", started_at=12)  # type: ignore[arg-type]
    assert n.vtep == A("198.18.0.1")
    with pytest.raises(ValidationError, match="invalid VTEP address"):
        Node(name="host-a", vtep="nope", started_at=1.0)  # type: ignore[arg-type]
    for bad in (True, "1", None):
        with pytest.raises(ValidationError, match="invalid started_at"):
            Node(name="host-a", vtep=A("198.18.0.1"), started_at=bad)  # type: ignore[arg-type]


def test_records_are_frozen() -> None:
    n = net()
    with pytest.raises(AttributeError):
        n.vni = 5  # type: ignore[misc]


@pytest.mark.parametrize("shaped", [True, False])
def test_a_decoded_endpoint_is_a_frozen_endpoint_like_a_constructed_one(shaped: bool) -> None:
    made = Endpoint("blue", "web", A("10.1.0.5"), "02:00:00:00:00:05", "host-a", 3, 7.0, "/run/ns", "eth1")
    data = made.to_dict()
    if not shaped:
        data["created_at"] = 7  # an int: not the shape every writer gives, `from_dict`'s own checks
    decoded = Endpoint.from_dict(data)
    assert type(decoded) is Endpoint
    assert decoded == made and hash(decoded) == hash(made) and decoded.key == "blue/web"
    assert [getattr(decoded, f) for f in Endpoint.__slots__] == [getattr(made, f) for f in Endpoint.__slots__]
    with pytest.raises(AttributeError):
        decoded.mac = "02:00:00:00:00:06"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del decoded.owner
    assert decoded.mac == "02:00:00:00:00:05" and decoded.owner == "host-a"
    assert replace(decoded, version=4) == replace(made, version=4)
    assert pickle.loads(pickle.dumps(decoded)) == made


def test_an_open_twin_is_only_made_of_a_slotted_record() -> None:
    with pytest.raises(TypeError, match="Network has an instance dict"):
        open_twin(Network)
    twin = open_twin(Endpoint)
    assert issubclass(twin, Endpoint) and not twin.__dict__["__slots__"]


# --- to_dict / from_dict ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24")),
        Network(
            name="red",
            vni=VNI_MAX,
            subnet=IPv4Network("10.2.0.0/16"),
            gateway=A("10.2.0.1"),
            mtu=1400,
        ),
    ],
)
def test_network_round_trip(record: Network) -> None:
    d = record.to_dict()
    assert Network.from_dict(d) == record
    assert Network.from_dict(d).to_dict() == d


def test_network_to_dict_is_plain_json() -> None:
    n = Network(name="red", vni=7, subnet=IPv4Network("10.2.0.0/16"), gateway=A("10.2.0.1"), mtu=1400)
    assert n.to_dict() == {
        "name": "red",
        "vni": 7,
        "subnet": "10.2.0.0/16",
        "gateway": "10.2.0.1",
        "mtu": 1400,
        "mode": "vxlan",
        "egress": "none",
    }
    assert net().to_dict() == {
        "name": "blue",
        "vni": 100,
        "subnet": "10.1.0.0/24",
        "gateway": None,
        "mtu": None,
        "mode": "vxlan",
        "egress": "none",
    }


def test_network_from_dict_optional_fields() -> None:
    n = Network.from_dict({"name": "blue", "vni": 100, "subnet": "10.1.0.0/24"})
    assert (n.gateway, n.mtu) == (None, None)


def test_node_round_trip() -> None:
    n = Node(name="host-a", vtep=A("198.18.0.1"), started_at=1700000000.5)
    d = n.to_dict()
    assert d == {"name": "host-a", "vtep": "198.18.0.1", "started_at": 1700000000.5}
    assert Node.from_dict(d) == n


def test_endpoint_round_trip() -> None:
    e = Endpoint(
        network="blue",
        name="web-1",
        ip=A("10.1.0.5"),
        mac="02:aa:bb:cc:dd:ee",
        owner="host-a",
        version=3,
        created_at=1700000000.25,
        netns="/run/netns/web-1",
        ifname="eth1",
    )
    d = e.to_dict()
    assert d == {
        "network": "blue",
        "name": "web-1",
        "ip": "10.1.0.5",
        "mac": "02:aa:bb:cc:dd:ee",
        "owner": "host-a",
        "version": 3,
        "created_at": 1700000000.25,
        "netns": "/run/netns/web-1",
        "ifname": "eth1",
    }
    back = Endpoint.from_dict(d)
    assert back == e
    # Fields excluded from equality must survive the trip too.
    assert (back.created_at, back.netns, back.ifname) == (1700000000.25, "/run/netns/web-1", "eth1")


def test_endpoint_from_dict_defaults() -> None:
    e = Endpoint.from_dict(
        {"network": "blue", "name": "w", "ip": "10.1.0.5", "mac": "02:00:00:00:00:05", "owner": "h"}
    )
    assert (e.version, e.created_at, e.netns, e.ifname) == (1, 0.0, "", "eth0")


def test_endpoint_from_dict_int_created_at_becomes_float() -> None:
    d = ep().to_dict() | {"created_at": 5}
    e = Endpoint.from_dict(d)
    assert e.created_at == 5.0
    assert isinstance(e.created_at, float)


@pytest.mark.parametrize("bad", ["yesterday", True, None, [1]])
def test_endpoint_from_dict_invalid_created_at(bad: object) -> None:
    with pytest.raises(ValidationError, match="invalid created_at"):
        Endpoint.from_dict(ep().to_dict() | {"created_at": bad})


NETWORK_DICT = {"name": "blue", "vni": 100, "subnet": "10.1.0.0/24"}
NODE_DICT = {"name": "host-a", "vtep": "198.18.0.1", "started_at": 1.0}
ENDPOINT_DICT = {
    "network": "blue",
    "name": "web-1",
    "ip": "10.1.0.5",
    "mac": "02:00:00:00:00:05",
    "owner": "host-a",
}


@pytest.mark.parametrize(
    ("cls", "kind", "full", "field"),
    [(Network, "network", NETWORK_DICT, f) for f in ("name", "vni", "subnet")]
    + [(Node, "node", NODE_DICT, f) for f in ("name", "vtep", "started_at")]
    + [(Endpoint, "endpoint", ENDPOINT_DICT, f) for f in ("network", "name", "ip", "mac", "owner")],
)
def test_from_dict_missing_field_is_named(
    cls: type[Network | Node | Endpoint], kind: str, full: dict[str, Any], field: str
) -> None:
    assert cls.from_dict(dict(full)) is not None  # the full dict is valid
    data = {k: v for k, v in full.items() if k != field}
    with pytest.raises(ValidationError, match=f"^{kind} record is missing field '{field}'$"):
        cls.from_dict(data)


@pytest.mark.parametrize(
    ("cls", "full", "field", "value", "message"),
    [
        (Network, NETWORK_DICT, "name", "bad name", "invalid network name 'bad name'"),
        (Network, NETWORK_DICT, "vni", 0, "invalid VNI 0"),
        (Network, NETWORK_DICT, "vni", "100", "invalid VNI '100'"),
        (Network, NETWORK_DICT, "subnet", "10.1.0.1/24", "invalid subnet '10.1.0.1/24'"),
        (Network, NETWORK_DICT, "gateway", "10.9.9.9", "gateway 10.9.9.9 is not a usable"),
        (Network, NETWORK_DICT, "gateway", "gw", "invalid gateway 'gw'"),
        (Network, NETWORK_DICT, "mtu", 100, "invalid MTU 100"),
        (Node, NODE_DICT, "vtep", "1.2.3", "invalid VTEP address '1.2.3'"),
        (Node, NODE_DICT, "started_at", "now", "invalid started_at 'now'"),
        (Node, NODE_DICT, "name", "", "invalid node name ''"),
        (Endpoint, ENDPOINT_DICT, "ip", "10.1.0.500", "invalid endpoint IP '10.1.0.500'"),
        (Endpoint, ENDPOINT_DICT, "mac", "00:00:00:00:00:01", "invalid MAC '00:00:00:00:00:01'"),
        (Endpoint, ENDPOINT_DICT, "owner", "a/b", "invalid owner node name 'a/b'"),
        (Endpoint, ENDPOINT_DICT, "version", 0, "invalid endpoint version 0"),
        (Endpoint, ENDPOINT_DICT, "network", "x y", "invalid network name 'x y'"),
    ],
)
def test_from_dict_invalid_field_is_named(
    cls: type[Network | Node | Endpoint],
    full: dict[str, Any],
    field: str,
    value: object,
    message: str,
) -> None:
    with pytest.raises(ValidationError) as info:
        cls.from_dict(full | {field: value})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(("cls", "kind"), [(Network, "network"), (Node, "node"), (Endpoint, "endpoint")])
@pytest.mark.parametrize(("data", "type_name"), [([], "list"), ("x", "str"), (None, "NoneType")])
def test_from_dict_requires_a_dict(
    cls: type[Network | Node | Endpoint], kind: str, data: object, type_name: str
) -> None:
    with pytest.raises(ValidationError, match=f"^{kind} record must be an object, got {type_name}$"):
        cls.from_dict(data)


def test_validation_error_is_a_value_error() -> None:
    assert issubclass(ValidationError, ValueError)


BAD_ENDPOINT_FIELDS: dict[str, object] = {
    "network": "x y",
    "name": "a/b",
    "ip": "1.2.3",
    "mac": "01:00:00:00:00:02",
    "owner": "o o",
    "created_at": "now",
    "version": 0,
}


@pytest.mark.parametrize("field", sorted(BAD_ENDPOINT_FIELDS))
def test_endpoint_from_dict_and_constructor_reject_a_field_alike(field: str) -> None:
    # from_dict checks each field once and builds the record without the constructor's
    # checks: both doors must still turn the same bad value away with the same words.
    data = ENDPOINT_DICT | {field: BAD_ENDPOINT_FIELDS[field]}
    with pytest.raises(ValidationError) as by_dict:
        Endpoint.from_dict(data)
    with pytest.raises(ValidationError) as by_constructor:
        Endpoint(**data)  # type: ignore[arg-type]
    assert str(by_dict.value) == str(by_constructor.value)


def test_endpoint_from_dict_names_the_first_bad_field_in_its_order() -> None:
    data = ENDPOINT_DICT | BAD_ENDPOINT_FIELDS
    messages = []
    for field in ("network", "ip", "owner", "name", "mac", "created_at", "version"):
        with pytest.raises(ValidationError) as info:
            Endpoint.from_dict(data)
        messages.append(str(info.value))
        data = data | {field: ENDPOINT_DICT.get(field, {"created_at": 1.0, "version": 1}.get(field))}
    assert [m.split(" ")[1] for m in messages] == [
        "network",
        "endpoint",
        "owner",
        "endpoint",
        "MAC",
        "created_at",
        "endpoint",
    ]
    assert Endpoint.from_dict(data).key == "blue/web-1"


def test_endpoint_from_dict_is_the_constructor_s_record() -> None:
    data = ENDPOINT_DICT | {
        "version": 4,
        "created_at": 7,
        "netns": "ns1",
        "ifname": "eth2",
        "mac": "02:AA:00:00:00:05",
    }
    decoded, built = Endpoint.from_dict(data), Endpoint(**data)  # type: ignore[arg-type]
    assert decoded == built
    assert hash(decoded) == hash(built)
    for name in ("network", "name", "ip", "mac", "owner", "version", "created_at", "netns", "ifname", "key"):
        assert getattr(decoded, name) == getattr(built, name)
        assert type(getattr(decoded, name)) is type(getattr(built, name))
    assert decoded.mac == "02:aa:00:00:00:05"
    assert decoded.created_at == 7.0
    assert hash(decoded.ip) == hash(IPv4Address("10.1.0.5"))


@pytest.mark.parametrize("field", sorted(BAD_ENDPOINT_FIELDS))
def test_endpoint_from_dict_rejects_a_bad_field_of_a_record_like_those_before(field: str) -> None:
    # A record whose network and owner were seen before is checked inline (a join's
    # thousands): a bad field in it still comes out as the full check words it.
    assert Endpoint.from_dict(ENDPOINT_DICT | {"created_at": 1.0}).key == "blue/web-1"
    data = ENDPOINT_DICT | {"created_at": 1.0, field: BAD_ENDPOINT_FIELDS[field]}
    with pytest.raises(ValidationError) as info:
        Endpoint.from_dict(data)
    with pytest.raises(ValidationError) as by_constructor:
        Endpoint(**data)  # type: ignore[arg-type]
    assert str(info.value) == str(by_constructor.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"mac": "02:AB:00:00:00:05"}, {"mac": "02:ab:00:00:00:05"}),
        ({"created_at": 3}, {"created_at": 3.0}),
        ({"netns": None, "ifname": ""}, {"netns": "", "ifname": "eth0"}),
        ({"netns": 7}, {"netns": "7"}),
        ({"ip": IPv4Address("10.1.0.5")}, {"ip": IPv4Address("10.1.0.5")}),
        ({"version": 2}, {"version": 2}),
    ],
)
def test_endpoint_from_dict_uncommon_shapes_normalise_alike(
    changes: dict[str, object], expected: dict[str, object]
) -> None:
    Endpoint.from_dict(ENDPOINT_DICT | {"created_at": 1.0})  # its names seen before
    ep = Endpoint.from_dict(ENDPOINT_DICT | {"created_at": 1.0} | changes)
    for name, value in expected.items():
        assert getattr(ep, name) == value
        assert type(getattr(ep, name)) is type(value) or name == "ip"


@pytest.mark.parametrize("value", [0, 1, 255, 256, 0x0A010005, 0x7FFFFFFF, 0x80000000, 2**32 - 1])
def test_ip4_packs_as_an_ipv4_address_does(value: int) -> None:
    # Ip4 packs its integer itself (netlink messages carry it): the same four bytes.
    assert Ip4(value).packed == Ip4._of_int(value).packed == IPv4Address(value).packed
    assert Ip4(str(IPv4Address(value))).packed == IPv4Address(value).packed
