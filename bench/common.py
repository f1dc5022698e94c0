"""Small helpers the benchmarks share: which entries a lab should hold, notes for figures."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from overlayd.lab import Endpoint, Host, Lab
from overlayd.lab.kwatch import FLOOD_MAC, Entry, Expectation, Fdb, KernelWatch, Neigh


def network_vni(lab: Lab, network: str) -> int:
    for record in lab.networks:
        if record.get("name") == network:
            return int(record["vni"])
    raise KeyError(f"lab {lab.prefix} has no network {network!r}")


def vxlan_device(vni: int) -> str:
    """The VXLAN device overlayd makes for a network (its naming: `ovvx<vni>`)."""
    return f"ovvx{vni}"


def remote_entries(device: str, vtep: str, ip: str, mac: str) -> list[Entry]:
    """What every other host's kernel holds for one endpoint: MAC -> VTEP and IP -> MAC."""
    return [Fdb(device, mac, vtep), Neigh(device, ip, mac)]


def expected_view(
    lab: Lab, endpoints: Iterable[Endpoint], device: str, hosts: Sequence[Host] | None = None
) -> dict[str, list[Entry]]:
    """Per host namespace: the entries (and flood entries) it must hold for the others' endpoints.

    `hosts`: the hosts to check (default all); a host programs a network only
    while it has an endpoint of its own in it.
    """
    vteps = {h.name: h.address for h in lab.hosts}
    checked = list(lab.hosts if hosts is None else hosts)
    wanted: dict[str, list[Entry]] = {h.netns: [] for h in checked}
    eps = list(endpoints)
    for host in checked:
        owners = set()
        for ep in eps:
            if ep.host == host.name:
                continue
            wanted[host.netns] += remote_entries(device, vteps[ep.host], ep.ip, ep.mac)
            owners.add(vteps[ep.host])
        wanted[host.netns] += [Fdb(device, FLOOD_MAC, vtep) for vtep in sorted(owners)]
    return wanted


def incomplete(exp: Expectation, waited: float) -> str:
    return f"did not complete in {waited:g} s ({exp.total - exp.remaining} of {exp.total} entries)"


def overrun_note(watch: KernelWatch, since: float, until: float) -> str | None:
    """A note withholding a figure if the listener overran while it was measured."""
    found = watch.overruns(since=since, until=until)
    if not found:
        return None
    where = ", ".join(sorted({ns for ns, _t in found}))
    return f"withheld: listener overran (ENOBUFS) {len(found)}x in {where}"


def ms(values: Sequence[float]) -> list[float]:
    return [v * 1000.0 for v in values]
