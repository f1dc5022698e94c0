"""overlayctl: the operator's command line, a thin client of the admin socket.

It imports nothing of the daemon: requests go through `overlayd.api.client`,
answers are the typed records of `overlayd.api.schema`, and the `lab`
commands load `overlayd.lab` only when they run. Output is an aligned table
(or key: value lines) for people, and the daemon's JSON (the record's
`to_json()`, exactly what the daemon sent) with `--json`.

Exit codes: 0 ok, 1 error (one line on stderr; for `doctor`, any FAIL),
2 usage, 3 `diff` found pending changes. Progress of long operations
(`teardown`, `lab up`) goes to stderr, so stdout stays the result.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeAlias, cast

from overlayd.api import schema
from overlayd.api.client import DEFAULT_SOCKET, AdminClient, ClientError
from overlayd.clients import completion, doctor
from overlayd.core import clusterkey

PROG = "overlayctl"
SOCKET_ENV = "OVERLAYD_SOCKET"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_CONVERGED = 3

# Duplicated from the model on purpose: the CLI must not import daemon code,
# and catching the obvious mistake here saves a round trip. The daemon decides.
_VNI_MIN, _VNI_MAX = 1, 2**24 - 1
_MODES = ("vxlan", "routed")
_EGRESSES = ("none", "nat")


class CommandError(Exception):
    """A failure of the CLI itself (not of the daemon); shown as one line."""


class UsageError(CommandError):
    """The command cannot run as given (exit 2), e.g. a confirmation it cannot ask for."""


@dataclass
class Context:
    args: argparse.Namespace
    json_out: bool
    socket_path: str

    def client(self) -> AdminClient:
        return AdminClient(self.socket_path)


Handler = Callable[[Context], int]
# Only a string at run time: _SubParsersAction is generic in typeshed, not in Python.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# --- output ---------------------------------------------------------------


def _timestamp(value: float) -> str:
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_cell(value: object, key: str = "") -> str:
    """One value as table text. Keys ending in "_at" hold Unix times, shown in UTC."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_at") and isinstance(value, int | float) and value > 0:
        return _timestamp(value)
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(format_cell(v) for v in value) if value else "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks; header only when empty."""
    table = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table)
    return "\n".join(line.rstrip() for line in lines)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _is_record_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _records_table(records: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for record in records:
        columns.extend(key for key in record if key not in columns)
    rows = ([format_cell(r.get(c), c) for c in columns] for r in records)
    return format_table([c.upper() for c in columns], rows)


def format_fields(data: Mapping[str, Any]) -> str:
    """A record of unknown shape as aligned "key: value" lines.

    Nested objects flatten to dotted keys; lists of objects (a network's
    endpoints, say) follow as tables of their own, so new fields the daemon
    adds show up without a CLI change.
    """
    fields = [(k, v) for k, v in _flatten(data) if not _is_record_list(v)]
    width = max((len(k) for k, _ in fields), default=0) + 1
    blocks = ["\n".join(f"{k + ':':<{width}} {format_cell(v, k)}".rstrip() for k, v in fields)]
    for key, value in _flatten(data):
        if _is_record_list(value):
            blocks.append(f"{key}:\n{_records_table(value)}")
    return "\n\n".join(block for block in blocks if block)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def _mtu_cell(value: object) -> str:
    # No MTU on the network: every host derives it from its underlay.
    return "auto" if value is None else str(value)


# --- daemon commands ------------------------------------------------------


def cmd_status(ctx: Context) -> int:
    status = ctx.client().status().to_json()
    if ctx.json_out:
        _print_json(status)
    else:
        print(format_fields(status))
    return EXIT_OK


def cmd_peers(ctx: Context) -> int:
    peers = ctx.client().peers()
    if ctx.json_out:
        _print_json([p.to_json() for p in peers])
        return EXIT_OK
    # With gossip on, each peer also has a SWIM state and a round-trip time.
    gossip = any(p.state is not None for p in peers)
    paths = any(p.path is not None for p in peers)
    rows = []
    for p in peers:
        row = [
            format_cell(p.name),
            format_cell(p.vtep),
            format_cell(p.endpoints),
            format_cell(p.started_at, "started_at"),
            "yes" if p.self else "",
        ]
        if paths:
            # Routed networks reach this peer directly (one segment) or over VXLAN.
            row.append("" if p.self else format_cell(p.path))
        if gossip:
            row += [format_cell(p.state), format_cell(p.rtt_ms)]
        rows.append(row)
    header = ["NAME", "VTEP", "ENDPOINTS", "STARTED", "SELF"] + (["ROUTED PATH"] if paths else [])
    header += ["STATE", "RTT MS"] if gossip else []
    print(format_table(header, rows))
    return EXIT_OK


def _network_summary(net: schema.NetworkInfo) -> str:
    return (
        f"VNI {net.vni}, subnet {net.subnet}, gateway {format_cell(net.gateway)}, MTU {_mtu_cell(net.mtu)}, "
        f"mode {net.mode}, egress {net.egress}"
    )


def cmd_network_create(ctx: Context) -> int:
    a = ctx.args
    net = ctx.client().network_create(
        name=a.name, subnet=a.subnet, vni=a.vni, gateway=a.gateway, mtu=a.mtu, mode=a.mode, egress=a.egress
    )
    if ctx.json_out:
        _print_json(net.to_json())
    else:
        print(f"created network {net.name}: {_network_summary(net)}")
    return EXIT_OK


def cmd_network_ls(ctx: Context) -> int:
    networks = ctx.client().network_list()
    if ctx.json_out:
        _print_json([n.to_json() for n in networks])
        return EXIT_OK
    rows = (
        [n.name, str(n.vni), str(n.subnet), format_cell(n.gateway), _mtu_cell(n.mtu), n.mode, n.egress]
        for n in networks
    )
    print(format_table(["NAME", "VNI", "SUBNET", "GATEWAY", "MTU", "MODE", "EGRESS"], rows))
    return EXIT_OK


def cmd_network_inspect(ctx: Context) -> int:
    net = ctx.client().network_inspect(ctx.args.name)
    if ctx.json_out:
        _print_json(net.to_json())
    else:
        print(format_fields({**net.to_json(), "mtu": _mtu_cell(net.mtu)}))
    return EXIT_OK


def cmd_network_rm(ctx: Context) -> int:
    ctx.client().network_remove(ctx.args.name)
    if ctx.json_out:
        _print_json({"network": ctx.args.name, "removed": True})
    else:
        print(f"removed network {ctx.args.name}")
    return EXIT_OK


def cmd_endpoint_add(ctx: Context) -> int:
    a = ctx.args
    ep = ctx.client().endpoint_add(network=a.network, name=a.name, netns=a.netns, ip=a.ip, ifname=a.ifname)
    if ctx.json_out:
        _print_json(ep.to_json())
    else:
        print(
            f"created endpoint {a.network}/{a.name}: IP {ep.ip}, MAC {ep.mac}, "
            f"netns {format_cell(ep.netns or a.netns)}, interface {format_cell(ep.ifname)}"
        )
    return EXIT_OK


def cmd_endpoint_ls(ctx: Context) -> int:
    endpoints = ctx.client().endpoint_list(ctx.args.network)
    if ctx.json_out:
        _print_json([e.to_json() for e in endpoints])
        return EXIT_OK
    rows = ([e.network, e.name, str(e.ip), e.mac, e.owner, format_cell(e.netns or None)] for e in endpoints)
    print(format_table(["NETWORK", "NAME", "IP", "MAC", "OWNER", "NETNS"], rows))
    return EXIT_OK


def cmd_endpoint_rm(ctx: Context) -> int:
    a = ctx.args
    ctx.client().endpoint_remove(network=a.network, name=a.name)
    if ctx.json_out:
        _print_json({"network": a.network, "endpoint": a.name, "removed": True})
    else:
        print(f"removed endpoint {a.network}/{a.name}")
    return EXIT_OK


def cmd_diff(ctx: Context) -> int:
    changes = ctx.client().diff().changes
    if ctx.json_out:
        _print_json(list(changes))
    else:
        # Like diff(1): silence when there is nothing to do, the exit code says it.
        for line in changes:
            print(line)
    return EXIT_NOT_CONVERGED if changes else EXIT_OK


# --- operator commands ----------------------------------------------------


def _progress(ctx: Context, message: str) -> None:
    if not ctx.json_out:
        print(message, file=sys.stderr, flush=True)


def cmd_doctor(ctx: Context) -> int:
    checks = doctor.run_checks(ctx.client(), gossip_port=ctx.args.gossip_port)
    failed = any(c.result == doctor.FAIL for c in checks)
    if ctx.json_out:
        _print_json({"ok": not failed, "checks": [c.to_dict() for c in checks]})
    else:
        width = max(len(c.check) for c in checks)
        for c in checks:
            print(f"{c.result:<4}  {c.check:<{width}}  {c.message}")
            if c.hint and c.result != doctor.OK:
                print(f"{'':<4}  {'':<{width}}  hint: {c.hint}")
    return EXIT_ERROR if failed else EXIT_OK


def _confirm_teardown(node: str, endpoints: int) -> bool:
    print(
        f"This takes node {node} out of the overlay: it deletes its {endpoints} local endpoint(s) "
        f"(their containers lose the network), every bridge, VXLAN device and port overlayd made "
        f"here, and releases its lease, so every other host drops it at once; then overlayd exits. "
        f"Networks stay.",
        file=sys.stderr,
    )
    print(f"Type the node name ({node}) to go on: ", end="", file=sys.stderr, flush=True)
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip() == node


def cmd_teardown(ctx: Context) -> int:
    if not ctx.args.yes and not sys.stdin.isatty():
        raise UsageError("teardown needs confirmation: run it on a terminal, or pass --yes")
    client = ctx.client()
    node = client.status().node
    local = [e for e in client.endpoint_list() if e.owner == node]
    if not ctx.args.yes and not _confirm_teardown(node, len(local)):
        raise CommandError("teardown aborted: nothing was changed")
    # One request per endpoint, so a host with many of them shows its progress;
    # the daemon's teardown removes whatever is left (or could not go here).
    removed: list[str] = []
    for i, ep in enumerate(local, 1):
        _progress(ctx, f"[{i}/{len(local)}] removing endpoint {ep.key}")
        try:
            client.endpoint_remove(network=ep.network, name=ep.name)
            removed.append(ep.key)
        except ClientError as exc:
            if exc.status != 404:
                _progress(ctx, f"  {exc.message} (the teardown will remove it locally)")
    _progress(ctx, f"removing overlay links and releasing the lease of {node}")
    answer = client.teardown(node)
    report = replace(answer, endpoints_removed=(*removed, *answer.endpoints_removed))
    if ctx.json_out:
        _print_json(report.to_json())
    else:
        print(
            f"tore down node {node}: {len(report.endpoints_removed)} endpoint(s), "
            f"{len(report.links_removed)} link(s) removed, lease "
            f"{'released' if report.lease_released else 'NOT released'}; overlayd is stopping"
        )
    errors = report.errors
    for err in errors:
        print(f"{PROG}: teardown: {err}", file=sys.stderr)
    return EXIT_ERROR if errors else EXIT_OK


def cmd_gossip_keygen(ctx: Context) -> int:
    """A new cluster key for `[gossip] keys` (base64 of 32 random bytes, AES-256)."""
    key = clusterkey.new_key()
    if ctx.json_out:
        _print_json({"key": key})
    else:
        print(key)
    return EXIT_OK


def cmd_completion(ctx: Context) -> int:
    text = completion.script(build_parser(), ctx.args.shell)
    if ctx.json_out:
        _print_json({"shell": ctx.args.shell, "script": text})
    else:
        print(text, end="")
    return EXIT_OK


# --- lab commands ---------------------------------------------------------


class _Lab(Protocol):
    """What overlayctl expects of `overlayd.lab` (it prints its own output)."""

    def lab_up(
        self, hosts: int, store: str, prefix: str, json_out: bool, egress: str = "none", mode: str = "vxlan"
    ) -> int: ...

    def lab_status(self, prefix: str, json_out: bool) -> int: ...

    def lab_down(self, prefix: str) -> int: ...


def _lab() -> _Lab:
    # Imported on use: the lab pulls in namespace and process machinery that
    # the daemon-facing commands have no need for.
    try:
        module = importlib.import_module("overlayd.lab")
    except ModuleNotFoundError as exc:
        if exc.name != "overlayd.lab":
            raise
        raise CommandError("the lab is not available in this installation (no overlayd.lab)") from None
    for name in ("lab_up", "lab_status", "lab_down"):
        if not callable(getattr(module, name, None)):
            raise CommandError(f"the lab is not available in this installation (no overlayd.lab.{name})")
    return cast(_Lab, module)


def cmd_lab_up(ctx: Context) -> int:
    a = ctx.args
    return _lab().lab_up(
        hosts=a.hosts, store=a.store, prefix=a.prefix, json_out=ctx.json_out, egress=a.egress, mode=a.mode
    )


def cmd_lab_status(ctx: Context) -> int:
    return _lab().lab_status(prefix=ctx.args.prefix, json_out=ctx.json_out)


def cmd_lab_down(ctx: Context) -> int:
    code = _lab().lab_down(prefix=ctx.args.prefix)
    if ctx.json_out:
        _print_json({"prefix": ctx.args.prefix, "removed": code == EXIT_OK})
    return code


# --- arguments ------------------------------------------------------------


def _vni(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not _VNI_MIN <= value <= _VNI_MAX:
        raise argparse.ArgumentTypeError(
            f"invalid VNI {text!r}: must be an integer in {_VNI_MIN}..{_VNI_MAX}"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a positive integer")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: must be 1..65535")
    return value


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text, strict=True))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid IPv4 subnet {text!r}: {exc}") from None


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IPv4 address {text!r}") from None


def _global_options() -> argparse.ArgumentParser:
    """--socket and --json, accepted before and after any subcommand.

    Defaults are SUPPRESS so that a subcommand's copy of an option, when not
    given, does not overwrite the value given before the subcommand; `main`
    fills in the real defaults afterwards.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"admin socket of overlayd (default: ${SOCKET_ENV} or {DEFAULT_SOCKET})",
    )
    options.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    return options


def _add_network_commands(commands: _Commands, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("network", parents=[common], help="manage overlay networks")
    sub = group.add_subparsers(dest="network_command", metavar="COMMAND", required=True)

    create = sub.add_parser("create", parents=[common], help="create a network")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--subnet", required=True, type=_cidr, metavar="CIDR")
    create.add_argument("--vni", type=_vni, metavar="N", help="VXLAN ID (default: allocated)")
    create.add_argument("--gateway", type=_ipv4, metavar="IP")
    create.add_argument("--mtu", type=_positive_int, metavar="N", help="default: underlay MTU minus 50")
    create.add_argument(
        "--mode",
        choices=_MODES,
        help="vxlan (default): every pair of hosts over VXLAN; routed: hosts on one underlay "
        "segment route without encapsulation (needs --gateway)",
    )
    create.add_argument(
        "--egress",
        choices=_EGRESSES,
        help="nat: endpoints reach the outside through the gateway, masqueraded to their host's "
        "address (needs --gateway); default none",
    )
    create.set_defaults(handler=cmd_network_create)

    ls = sub.add_parser("ls", aliases=["list"], parents=[common], help="list networks")
    ls.set_defaults(handler=cmd_network_ls)

    inspect = sub.add_parser("inspect", parents=[common], help="show a network and its endpoints")
    inspect.add_argument("name", metavar="NAME")
    inspect.set_defaults(handler=cmd_network_inspect)

    rm = sub.add_parser("rm", aliases=["remove"], parents=[common], help="remove a network")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(handler=cmd_network_rm)


def _add_endpoint_commands(commands: _Commands, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("endpoint", parents=[common], help="manage endpoints")
    sub = group.add_subparsers(dest="endpoint_command", metavar="COMMAND", required=True)

    add = sub.add_parser("add", parents=[common], help="create a local endpoint in a netns")
    add.add_argument("network", metavar="NETWORK")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--netns", required=True, metavar="NS", help="namespace name or path")
    add.add_argument("--ip", type=_ipv4, metavar="IP", help="default: first free address")
    add.add_argument("--ifname", metavar="IF", help="interface in the namespace (default: eth0)")
    add.set_defaults(handler=cmd_endpoint_add)

    ls = sub.add_parser("ls", aliases=["list"], parents=[common], help="list endpoints")
    ls.add_argument("--network", metavar="N", help="only endpoints of this network")
    ls.set_defaults(handler=cmd_endpoint_ls)

    rm = sub.add_parser("rm", aliases=["remove"], parents=[common], help="remove a local endpoint")
    rm.add_argument("network", metavar="NETWORK")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(handler=cmd_endpoint_rm)


def _add_lab_commands(commands: _Commands, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser(
        "lab", parents=[common], help="simulated multi-host lab on this machine (needs root)"
    )
    sub = group.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)
    prefix = argparse.ArgumentParser(add_help=False)
    prefix.add_argument("--prefix", default="ovl", metavar="P", help="name prefix of the lab's namespaces")

    up = sub.add_parser("up", parents=[common, prefix], help="build the lab and start overlayd")
    up.add_argument("--hosts", type=_positive_int, default=3, metavar="N")
    up.add_argument(
        "--store",
        default="gossip",
        metavar="KIND",
        help="gossip (no KV server; the default), etcd, zookeeper or consul",
    )
    up.add_argument(
        "--egress",
        choices=_EGRESSES,
        default="none",
        help="nat: the demo network gets egress, and the lab an outside namespace to reach",
    )
    up.add_argument(
        "--mode",
        choices=_MODES,
        default="vxlan",
        help="routed: the demo network is routed, with the last host behind a router namespace",
    )
    up.set_defaults(handler=cmd_lab_up)

    status = sub.add_parser("status", parents=[common, prefix], help="describe the running lab")
    status.set_defaults(handler=cmd_lab_status)

    down = sub.add_parser("down", parents=[common, prefix], help="remove everything the lab made")
    down.set_defaults(handler=cmd_lab_down)


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Control overlayd, the VXLAN overlay daemon, through its admin socket.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = commands.add_parser("status", parents=[common], help="daemon status")
    status.set_defaults(handler=cmd_status)
    peers = commands.add_parser("peers", parents=[common], help="known nodes")
    peers.set_defaults(handler=cmd_peers)
    _add_network_commands(commands, common)
    _add_endpoint_commands(commands, common)
    diff = commands.add_parser(
        "diff", parents=[common], help="what the reconciler would change now (exit 3 if anything)"
    )
    diff.set_defaults(handler=cmd_diff)
    _add_operator_commands(commands, common)
    _add_lab_commands(commands, common)
    return parser


def _add_operator_commands(commands: _Commands, common: argparse.ArgumentParser) -> None:
    doc = commands.add_parser(
        "doctor", parents=[common], help="check this host and its daemon: OK/WARN/FAIL (exit 1 on FAIL)"
    )
    doc.add_argument("--gossip-port", type=_port, metavar="PORT", help="default: the daemon's, else 7946")
    doc.set_defaults(handler=cmd_doctor)

    teardown = commands.add_parser(
        "teardown",
        parents=[common],
        help="remove this host's overlay (endpoints, links, lease) and stop overlayd",
    )
    teardown.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    teardown.set_defaults(handler=cmd_teardown)

    gossip = commands.add_parser("gossip", parents=[common], help="gossip helpers")
    gossip_commands = gossip.add_subparsers(dest="gossip_command", metavar="COMMAND", required=True)
    keygen = gossip_commands.add_parser(
        "keygen", parents=[common], help="print a new cluster key for [gossip] keys"
    )
    keygen.set_defaults(handler=cmd_gossip_keygen)

    comp = commands.add_parser("completion", parents=[common], help="print a shell completion script")
    comp.add_argument("shell", choices=completion.SHELLS, metavar="SHELL", help="bash or zsh")
    comp.set_defaults(handler=cmd_completion)


def _exit_code(code: object) -> int:
    """The int behind a SystemExit code (argparse exits 0 on --help, 2 on bad usage)."""
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc.code)
    ctx = Context(
        args=args,
        json_out=getattr(args, "json", False),
        socket_path=getattr(args, "socket", None) or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET,
    )
    handler: Handler = args.handler
    try:
        return handler(ctx)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ClientError, CommandError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`overlayctl ... | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
