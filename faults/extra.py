"""Scenarios 14-16: hostile input, permissions and secrets, clock jumps.

14 fuzzes with hypothesis (strategies run as a plain function, `max_examples`
bounded, no database): the admin API over its unix socket, the CNI plugin's
stdin and environment, the gossip port with random and forged datagrams, and
config files with every field wrong. Only clear errors may come back.

16 jumps one daemon's wall clock with libfaketime (`LD_PRELOAD`, the offset
read from a file on every call, CLOCK_MONOTONIC left alone): the machine's
clock is never touched. This is the seam that exists for a whole daemon;
the gossip node's own injected clock is the one unit tests use.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import random
import re
import socket
import string
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from faults.harness import KV_BACKENDS, Run, Scenario
from overlayd.lab import netns
from overlayd.lab.lab import STATUS_LISTEN, overlayd_argv
from overlayd.lab.nshttp import NetnsHTTPConnection, request

# Debian's libfaketime, wherever the architecture puts it.
FAKETIME_LIB = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), "libfaketime.so.1")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _raw_admin(path: str, method: str, url: str, body: bytes | None) -> int:
    conn = _UnixConnection(path)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, url, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _traceback_in(lines: list[str]) -> list[str]:
    return [line for line in lines if "Traceback" in line]


# --- 14: hostile input ----------------------------------------------------------------------


def hostile_input(run: Run) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    lab = run.lab
    examples = int(run.options.get("examples", 150))
    h1 = lab.host("h1")
    sock = str(h1.admin_socket)
    # Hostile input, not a start-up race: h1's view is complete (no 503 "try again" due).
    run.wait(lambda: run.status("h1").view.complete, 20, "h1's view complete")
    mark = len(run.log_lines("h1"))
    nets_before = {n.name for n in run.admin("h1").network_list()}
    bad: list[str] = []
    created: list[tuple[str, str]] = []

    names = st.one_of(
        st.text(max_size=40),
        st.sampled_from(["../x", "a/b", "x\x00y", "..", ".", "/", "ovl" * 30, "ep;rm -rf", "é"]),
    )
    netns_values = st.one_of(
        st.sampled_from(
            [
                "/proc/1/ns/net",
                "/proc/self/ns/net",
                "/var/run/netns/../../proc/1/ns/net",
                "../../proc/1/ns/net",
                "",
                "\x00",
                "/etc/passwd",
                "/run/netns/" + "x" * 300,
            ]
        ),
        st.text(max_size=30),
    )
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=10,
    )
    endpoint_bodies = st.fixed_dictionaries(
        {},
        optional={
            "network": st.one_of(st.just("demo"), names, json_values),
            "name": st.one_of(names, json_values),
            "netns": st.one_of(netns_values, json_values),
            "ip": st.one_of(
                st.sampled_from(["10.100.0.250", "10.100.0.0", "10.100.0.255", "1.2.3.4", "x"]), json_values
            ),
            "ifname": st.one_of(names, json_values),
        },
    )
    network_bodies = st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(names, json_values),
            "subnet": st.one_of(
                st.sampled_from(["10.0.0.0/8", "0.0.0.0/0", "10.1.0.0/33", "x"]), json_values
            ),
            "vni": st.one_of(st.integers(-5, 1 << 25), json_values),
            "mtu": st.one_of(st.integers(-5, 70000), json_values),
            "gateway": json_values,
        },
    )
    requests = st.one_of(
        st.tuples(
            st.just("POST"), st.just("/v1/endpoints"), endpoint_bodies.map(lambda b: json.dumps(b).encode())
        ),
        st.tuples(
            st.just("POST"), st.just("/v1/networks"), network_bodies.map(lambda b: json.dumps(b).encode())
        ),
        st.tuples(
            st.sampled_from(["POST", "PUT", "DELETE", "GET", "PATCH"]),
            st.sampled_from(
                [
                    "/v1/endpoints",
                    "/v1/networks",
                    "/v1/endpoints/demo/x",
                    "/v1/networks/%00",
                    "/v1/endpoints/..%2F..%2Fx/y",
                    "/v1/teardown/x",
                    "/v1/status?x=%ff",
                ]
            ),
            st.one_of(st.none(), st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
        ),
    )

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests)
    def admin_api(req: tuple[str, str, bytes | None]) -> None:
        method, url, body = req
        status = _raw_admin(sock, method, url, body)
        if status >= 500:
            bad.append(f"{method} {url} {body!r:.80} -> {status}")
        if 200 <= status < 300 and method == "POST" and url == "/v1/endpoints" and body:
            data = json.loads(body)
            created.append((str(data.get("network")), str(data.get("name"))))

    admin_api()
    # A huge body: refused, not read into memory.
    status = _raw_admin(sock, "POST", "/v1/endpoints", b"{" + b" " * (64 << 20) + b"}")
    if status >= 500:
        bad.append(f"64 MiB body -> {status}")
    run.check(lab.daemon_alive("h1"), f"h1 died under admin API fuzzing: {lab.log_tail('h1', 5)}")
    run.check(not bad, f"admin API answered 5xx: {bad[:3]}")
    nets_after = {n.name for n in run.admin("h1").network_list()}
    added = len(nets_after - nets_before)
    run.note(f"admin: {examples} requests, {len(created)} accepted endpoints, networks +{added}")
    # Nothing half-created: every veth in h1's namespace belongs to a listed endpoint.
    listed = run.admin("h1").endpoint_list()
    local = [e for e in listed if e.owner == "h1"]
    shown = lab.exec(h1.netns, ["ip", "-o", "link", "show", "type", "veth"]).stdout.splitlines()
    veths = [line for line in shown if " ul0@" not in line]  # the underlay is a veth too
    run.check(len(veths) == len(local), f"{len(veths)} veths on h1 for {len(local)} local endpoints")
    run.check(
        not any(e.netns.startswith("/proc") for e in listed), "an endpoint in a /proc namespace was accepted"
    )

    # The CNI plugin: malformed stdin and environment for every command.
    cni = [str(Path(overlayd_argv()[0]).parent / "overlayd-cni")]
    cni_bad: list[str] = []
    envs = st.fixed_dictionaries(
        {
            "CNI_COMMAND": st.sampled_from(
                ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS", "", "add", "X\x01"]
            )
        },
        optional={
            "CNI_CONTAINERID": st.text(string.printable, max_size=20),
            "CNI_NETNS": netns_values.filter(lambda v: "\x00" not in v),
            "CNI_IFNAME": st.text(string.printable, max_size=20),
            "CNI_ARGS": st.text(string.printable, max_size=40),
            "CNI_PATH": st.text(string.printable, max_size=20),
        },
    )
    stdins = st.one_of(
        st.binary(max_size=100),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {
                "cniVersion": st.sampled_from(["1.0.0", "0.4.0", "9", ""]),
                "name": names,
                "type": st.just("overlayd-cni"),
                "network": st.one_of(names, json_values),
                "socket": st.sampled_from([sock, "/nonexistent", "", "../x"]),
            }
        ).map(lambda v: json.dumps(v).encode()),
    )

    @settings(
        max_examples=max(10, examples // 5),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(envs, stdins)
    def cni_plugin(env: dict[str, str], stdin: bytes) -> None:
        env = {k: v.replace("\x00", "") for k, v in env.items()}
        proc = subprocess.run(
            cni, input=stdin, env={"PATH": os.environ["PATH"], **env}, capture_output=True, timeout=60
        )
        text = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        if "Traceback" in text:
            cni_bad.append(f"{env} {stdin[:60]!r}: traceback")
        elif proc.returncode != 0:
            try:
                err = json.loads(proc.stdout)
                assert "code" in err and "msg" in err
            except (ValueError, AssertionError, TypeError):
                cni_bad.append(
                    f"{env} {stdin[:60]!r}: exit {proc.returncode} without a CNI error: {text[:100]!r}"
                )

    cni_plugin()
    run.check(not cni_bad, f"CNI plugin: {cni_bad[:2]}")

    # The gossip port: random, truncated and forged datagrams from another namespace.
    from overlayd.gossip.framing import Framer, Keyring

    h2 = lab.host("h2")
    sender = netns.socket_in_netns(h2.netns, socket.AF_INET, socket.SOCK_DGRAM)
    foreign = Framer("h2", Keyring([os.urandom(32)]))
    rnd = random.Random(9)
    try:
        for k in range(2000):
            kind = k % 4
            if kind == 0:
                data = rnd.randbytes(rnd.randrange(0, 1400))
            elif kind == 1:
                data = foreign.seal(rnd.randbytes(rnd.randrange(0, 600)))
            elif kind == 2:
                data = foreign.seal(b"")[: rnd.randrange(0, 40)]
            else:
                data = bytes([1]) + rnd.randbytes(rnd.randrange(0, 100))
            sender.sendto(data, (h1.address, 7946))
    finally:
        sender.close()
    run.wait(
        lambda: run.status("h1").gossip.members.get("alive") == 2, 10, "h1's gossip still sees h2, h3 alive"
    )
    run.check(lab.daemon_alive("h1"), "h1 died under gossip fuzzing")

    # Config files with every field wrong: a clear one-line error and exit, never a traceback.
    cfg_bad = _fuzz_configs(run)
    run.check(not cfg_bad, f"config: {cfg_bad[:2]}")
    new = run.log_lines("h1")[mark:]
    run.check(not _traceback_in(new), f"a traceback in h1's log: {_traceback_in(new)[:1]}")
    run.check(lab.daemon_alive("h1"), "h1 died")


_CONFIG_FIELDS: dict[str, list[Any]] = {
    "node.name": [5, "", "a/b", "x" * 300, ["x"]],
    "underlay.interface": [1, "", "no-such-if", "x" * 40],
    "underlay.address": ["x", 7, "999.1.1.1", "::1"],
    "store.url": [1, "", "ftp://x", "etcd://", "etcd://:99999", "zookeeper://a:b"],
    "store.prefix": [1, "", "no-slash"],
    "store.lease_ttl": ["x", -1, 0, 10**9, 1.5],
    "admin.socket": [1, "", "relative/path"],
    "status.listen": [1, "x", "127.0.0.1:99999", ":"],
    "state.dir": [1, ""],
    "reconcile.interval": ["x", -1, 0],
    "log.level": [1, "shout"],
    "gossip.port": ["x", -1, 70000],
    "gossip.keys": ["x", ["short"], [1], "!!!"],
    "gossip.peers": ["x", [1], ["nohost"], ["1.2.3.4:99999"]],
    "gossip.dead_grace": ["x", -3],
}


def _toml_value(value: Any) -> str:
    return json.dumps(value)


def _fuzz_configs(run: Run) -> list[str]:
    bad: list[str] = []
    scratch = f"{run.lab.prefix}-cfg"
    run.lab.add_namespaces([scratch])
    with tempfile.TemporaryDirectory(prefix="faults-config-") as tmp:
        base = {
            "node.name": "fz",
            "underlay.interface": "lo",
            "underlay.address": "127.0.0.1",
            "store.url": "gossip",
            "admin.socket": f"{tmp}/a.sock",
            "status.listen": "127.0.0.1:9481",
            "state.dir": f"{tmp}/state",
            "gossip.port": 7950,
            "gossip.keys": ["AAAA"],
            "gossip.peers": [],
        }
        for key, values in _CONFIG_FIELDS.items():
            for value in values[:2] if run.short else values:
                fields = {**base, key: value}
                sections: dict[str, list[str]] = {}
                for k, v in fields.items():
                    section, name = k.split(".")
                    sections.setdefault(section, []).append(f"{name} = {_toml_value(v)}")
                text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
                path = Path(tmp) / "c.toml"
                path.write_text(text)
                os.chmod(path, 0o600)
                argv = netns.exec_argv(scratch, [*overlayd_argv(), "--config", str(path)])
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                try:
                    out, err = proc.communicate(timeout=4)
                except subprocess.TimeoutExpired:
                    proc.kill()  # by its own PID: it started, so this value was accepted
                    out, err = proc.communicate()
                    continue
                if "Traceback" in err + out:
                    bad.append(f"{key}={value!r}: traceback: {err.strip().splitlines()[-1][:120]}")
                elif proc.returncode == 0:
                    bad.append(f"{key}={value!r}: exit 0")
                elif len(err.strip().splitlines()) > 3:
                    bad.append(f"{key}={value!r}: {len(err.strip().splitlines())} lines of error")
    return bad


# --- 15: permissions and secrets -----------------------------------------------------------


def permissions_and_secrets(run: Run) -> None:
    lab = run.lab
    h1 = lab.host("h1")
    overlayctl = str(Path(overlayd_argv()[0]).parent / "overlayctl")
    # An unprivileged client: an unused uid, no groups.
    uid = 64999
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--",
            overlayctl,
            "--socket",
            str(h1.admin_socket),
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    run.check(proc.returncode != 0, f"a non-root client got an answer: {proc.stdout[:200]}")
    run.check("Traceback" not in proc.stderr, f"overlayctl as uid {uid}: traceback")
    said = proc.stderr.strip().splitlines()[-1][:80] if proc.stderr.strip() else proc.returncode
    run.note(f"as uid {uid}: {said}")
    # The socket itself refuses, even with the directory open: mode and owner.
    st = os.stat(h1.admin_socket)
    run.check(
        st.st_uid == 0 and st.st_mode & 0o007 == 0, f"admin socket mode {oct(st.st_mode)} owner {st.st_uid}"
    )
    # The status server is read-only and shows no secret.
    secrets_ = [lab.gossip_key] if lab.gossip_key else []
    address, port = STATUS_LISTEN.rsplit(":", 1)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/status", "/metrics", "/v1/teardown", "/v1/endpoints"):
            code, _ = request(NetnsHTTPConnection(h1.netns, address, int(port)), method, path, {"x": 1})
            run.check(code in (404, 405), f"{method} {path} on the status server answered {code}")
    for path in ("/status", "/metrics", "/healthz", "/readyz"):
        _, body = lab.status_get("h1", path)
        for secret in secrets_:
            run.check(secret.encode() not in body, f"{path} shows the gossip key")
    # The lab's config holds the gossip key: readable by others, it must be warned about.
    os.chmod(h1.config_path, 0o644)
    mark = len(run.log_lines("h1"))
    lab.stop_daemon("h1")
    lab.start_daemon("h1", rewrite_config=False)  # as it is now: readable by others
    warned = [line for line in run.log_lines("h1")[mark:] if "readable" in line and "config" in line]
    run.check(warned, "no warning at start about a config with secrets readable by others")
    doctor = lab.exec(h1.netns, [overlayctl, "--socket", str(h1.admin_socket), "doctor"], check=False)
    run.check(
        re.search(r"WARN.*(readable|permission)", doctor.stdout),
        f"doctor says nothing: {doctor.stdout[-400:]}",
    )
    os.chmod(h1.config_path, 0o600)


# --- 16: clock jumps -----------------------------------------------------------------------


def clock_jumps(run: Run) -> None:
    lab = run.lab
    run.check(os.path.exists(FAKETIME_LIB), f"{FAKETIME_LIB} missing: install Debian's faketime")
    h1 = lab.host("h1")
    offset = h1.dir / "faketime"
    offset.write_text("+0\n")
    saved = dict(lab.daemon_env)
    lab.daemon_env.update(
        LD_PRELOAD=FAKETIME_LIB,
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        FAKETIME_DONT_RESET="1",
    )
    try:
        lab.stop_daemon("h1")
        lab.start_daemon("h1")
    finally:
        lab.daemon_env.clear()
        lab.daemon_env.update(saved)
    run.wait(run.all_converged, 20, "h1 converged under faketime")
    ep1 = run.endpoint("h1")
    for shift in ("+300", "+0", "-300", "+0"):
        offset.write_text(f"{shift}\n")
        t = time.monotonic()
        # Hold the jump for longer than a gossip round trip, a keepalive and a probe period.
        while time.monotonic() - t < 6:
            for h in ("h2", "h3"):
                run.check(run.knows(h, ep1), f"{h} lost h1's endpoint with h1's clock at {shift} s")
            time.sleep(0.2)
        run.check(lab.daemon_alive("h1"), f"h1 died with its clock at {shift} s")
        if lab.gossip:
            members = run.status("h1").gossip.members
            run.check(members.get("alive") == 2, f"h1's gossip with its clock at {shift} s: {members}")
            for h in ("h2", "h3"):
                members = run.status(h).gossip.members
                run.check(members.get("alive") == 2, f"{h}'s gossip with h1's clock at {shift} s: {members}")
        if lab.kv is not None:
            run.check(run.status("h1").store.healthy, f"h1's store unhealthy with its clock at {shift} s")
    run.wait(run.all_converged, 20, "every daemon converged after the jumps")


EXTRA: list[Scenario] = [
    Scenario(
        14, "hostile input (hypothesis)", hostile_input, ("gossip",), "gossip", short_options={"examples": 60}
    ),
    # Gossip beside etcd too: its keys are the config's secrets.
    Scenario(
        15,
        "permissions and secrets",
        permissions_and_secrets,
        ("gossip", "etcd"),
        "gossip",
        gossip_beside=True,
    ),
    Scenario(
        16,
        "clock jumps +-5 min (faketime)",
        clock_jumps,
        ("gossip", *KV_BACKENDS),
        "gossip",
        gossip_beside=True,
    ),
]
