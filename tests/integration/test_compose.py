"""docker-compose.yml: valid for docker-compose, and everything it names exists in the repo.

No Docker engine runs here, so the file is checked, not run: `docker-compose
config` (Debian's docker-compose, see .ci/run) validates it and prints it
normalised (paths absolute, anchors merged); the checks then read that
output. docker-compose's own YAML library (python3-yaml, a dependency of the
package) turns it into JSON, since the project's venv has no YAML parser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from overlayd.core import config as config_mod

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
LAB_SPACE = IPv4Network("198.18.0.0/15")
NODES = ("node1", "node2", "node3")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose not found: install Debian's `docker-compose` package (see .ci/run)")
    result = subprocess.run(
        [tool, "--project-directory", str(REPO), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    to_json = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=result.stdout,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(to_json.stdout)
    return data


def test_services_and_pinned_public_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"etcd", "consul", "zookeeper", *NODES}
    for name in ("etcd", "consul", "zookeeper"):
        image = services[name]["image"]
        assert re.fullmatch(r"[a-z0-9./-]+:v?[0-9][\w.-]*", image), (
            f"{name}: pin a version tag, not {image!r}"
        )
        assert "build" not in services[name]


def test_nodes_build_from_the_repo(compose: dict[str, Any]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in NODES:
        node = compose["services"][name]
        context = Path(node["build"]["context"])
        dockerfile = context / node["build"]["dockerfile"]
        assert context == REPO and dockerfile == REPO / "deploy" / "Dockerfile"
        assert node.get("privileged") is True or "NET_ADMIN" in node.get("cap_add", [])
        # The command is a console script the image installs.
        assert node["command"][0] in scripts, node["command"]
        assert node["command"][1:] == ["--config", config_mod.DEFAULT_PATH]
    # Everything the Dockerfile copies exists; what it runs is installed by it.
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
    assert re.search(r'^CMD \["overlayd", "--config", "/etc/overlayd/overlayd.toml"\]$', text, re.M)
    assert "ln -s /opt/overlayd/bin/overlayd /opt/overlayd/bin/overlayctl /usr/local/bin/" in text


def test_node_configs_exist_load_and_point_at_etcd(compose: dict[str, Any]) -> None:
    services = compose["services"]
    underlay = IPv4Network(compose["networks"]["underlay"]["ipam"]["config"][0]["subnet"])
    assert underlay.subnet_of(LAB_SPACE)
    etcd_flags = dict(flag.split("=", 1) for flag in services["etcd"]["command"][1:])
    etcd_port = int(etcd_flags["--listen-client-urls"].rsplit(":", 1)[1])
    for name in NODES:
        node = services[name]
        # docker-compose 1.x prints short syntax: SOURCE:TARGET:MODE, SOURCE made absolute.
        mounts = [v.split(":") for v in node["volumes"] if v.split(":")[1] == config_mod.DEFAULT_PATH]
        assert len(mounts) == 1 and mounts[0][2] == "ro", node["volumes"]
        source = Path(mounts[0][0])
        assert source.parent == REPO / "deploy" / "compose" and source.is_file(), source
        cfg = config_mod.load(str(source), env={})
        address = IPv4Address(node["networks"]["underlay"]["ipv4_address"])
        assert address in underlay
        assert cfg.node_name == name and cfg.vtep_address == address
        assert cfg.store.scheme == "etcd"
        assert [(e.host, e.port) for e in cfg.store.endpoints] == [("etcd", etcd_port)]
        assert "etcd" in node["depends_on"]
