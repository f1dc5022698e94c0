"""A new endpoint announces its own address (a gratuitous ARP, flooded to every port of the
host's bridge) only where a container here may have cached another MAC for it: real daemon,
real kernel, the announcements seen on the bridge."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from overlayd.dataplane.kstate import bridge_name
from overlayd.lab import Endpoint, Lab
from overlayd.util.nsutil import socket_in_netns

pytestmark = pytest.mark.root

NET = "garp"


def gratuitous_arps(sock: socket.socket) -> set[IPv4Address]:
    """The addresses announced (ARP with sender IP = target IP) in the frames queued on `sock`."""
    seen: set[IPv4Address] = set()
    while True:
        try:
            frame = sock.recv(2048)
        except BlockingIOError:
            return seen
        arp = frame[14:42]
        if frame[12:14] == b"\x08\x06" and len(arp) == 28 and arp[14:18] == arp[24:28]:
            seen.add(IPv4Address(arp[14:18]))


def announced_until(sniffer: socket.socket, ip: IPv4Address, timeout: float = 5.0) -> set[IPv4Address]:
    """Every address announced on `sniffer` until `ip` is (or `timeout` seconds pass)."""
    seen: set[IPv4Address] = set()
    deadline = time.monotonic() + timeout
    while ip not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen |= gratuitous_arps(sniffer)
    return seen


def assert_taken_again_and_heard(lab: Lab, *, freed: Endpoint, beside: Endpoint) -> None:
    """h1's next endpoint gets `freed`'s address with a new MAC, and its announcement is heard
    where it matters: in the container `beside` it, which may have cached the old MAC."""
    sniffer = socket_in_netns(beside.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    with sniffer:
        sniffer.bind(("eth0", 0))
        sniffer.setblocking(False)
        again = lab.add_endpoint("h1", "g3", network=NET)
        assert again.ip == freed.ip and again.mac != freed.mac
        seen = announced_until(sniffer, IPv4Address(again.ip))
    assert IPv4Address(again.ip) in seen


def test_an_address_freed_and_taken_again_is_announced_and_a_fresh_one_is_not(
    make_lab: Callable[..., Lab],
) -> None:
    """A /30 holds two endpoints, so the allocator must hand the first one's address out
    again once it is removed. The fresh address goes in unannounced; the reused one, which a
    container here may still know by the old MAC, is announced with the new one. The quiet
    endpoint comes up first: once the later announcement is in, the earlier one's would be
    too."""
    lab = make_lab(1, store="gossip", up=False).up(demo=False)
    client = lab.admin("h1")
    vni = int(client.network_create(name=NET, subnet="10.77.0.0/30").vni)
    first = lab.add_endpoint("h1", "g1", network=NET)
    # The bridge exists once the host has an endpoint in the network.
    sniffer = socket_in_netns(lab.host("h1").netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    with sniffer:
        sniffer.bind((bridge_name(vni), 0))
        sniffer.setblocking(False)
        fresh = lab.add_endpoint("h1", "g2", network=NET)
        client.endpoint_remove(network=NET, name=first.name)
        lab.forget_endpoint(first)
        again = lab.add_endpoint("h1", "g3", network=NET)
        assert again.ip == first.ip and again.mac != first.mac
        seen = announced_until(sniffer, IPv4Address(again.ip))
    assert seen == {IPv4Address(again.ip)}, (seen, fresh.ip, again.ip)
    # Both reach each other: no announcement is needed for that.
    assert lab.ping(fresh.netns, again.ip) and lab.ping(again.netns, fresh.ip)


def test_an_address_freed_before_a_crash_is_announced_after_it(make_lab: Callable[..., Lab]) -> None:
    """The memory of removals outlives the daemon (the local registry keeps it): an address
    freed just before a SIGKILL and handed out again just after the restart is announced.
    (Two hosts: a restarted daemon takes adds once it has synced with a live peer.)"""
    lab = make_lab(2, store="gossip", up=False).up(demo=False)
    client = lab.admin("h1")
    client.network_create(name=NET, subnet="10.77.0.0/30")
    first = lab.add_endpoint("h1", "g1", network=NET)
    neighbour = lab.add_endpoint("h1", "g2", network=NET)
    client.endpoint_remove(network=NET, name=first.name)
    lab.forget_endpoint(first)
    lab.kill_daemon("h1")
    lab.start_daemon("h1")
    assert_taken_again_and_heard(lab, freed=first, beside=neighbour)


def test_a_remote_address_freed_before_a_clean_restart_is_announced_after_it(
    make_lab: Callable[..., Lab],
) -> None:
    """Only the reconciler knew that a remote endpoint's address left this host's kernel; a
    clean stop keeps that for the next life. The store hands out addresses cluster-wide:
    h1 takes the /30's first address, h2 the second; h2's goes, h1 restarts (SIGTERM) and
    its next endpoint gets the freed address with a new MAC, which the container beside it
    may know by the old one."""
    lab = make_lab(2, store="etcd", up=False).up(demo=False)
    client = lab.admin("h1")
    client.network_create(name=NET, subnet="10.77.0.0/30")
    neighbour = lab.add_endpoint("h1", "g1", network=NET)
    remote = lab.add_endpoint("h2", "g2", network=NET)

    def in_h1_kernel() -> bool:
        return any(entry.get("dst") == remote.ip for entry in lab.neighbours("h1"))

    lab.wait_for(in_h1_kernel, 10.0, "h2's endpoint in h1's kernel")
    lab.admin("h2").endpoint_remove(network=NET, name=remote.name)
    lab.forget_endpoint(remote)
    lab.wait_for(lambda: not in_h1_kernel(), 10.0, "its removal in h1's kernel")
    assert lab.stop_daemon("h1") == 0
    lab.start_daemon("h1")
    assert_taken_again_and_heard(lab, freed=remote, beside=neighbour)
