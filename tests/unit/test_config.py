"""Config: every problem is one line naming the key; good files load with defaults."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overlayd.core import config
from overlayd.daemon.main import main as overlayd_main

GOOD = """
[node]
name = "h1"
[underlay]
interface = "ul0"
[store]
url = "etcd://198.18.0.1:2379,198.18.0.2:2379"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "overlayd.toml"
    path.write_text(text)
    return str(path)


def test_good_file_loads_with_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD), env={})
    assert cfg.node_name == "h1" and cfg.underlay_interface == "ul0" and cfg.vtep_address is None
    assert [(e.host, e.port) for e in cfg.store.endpoints] == [("198.18.0.1", 2379), ("198.18.0.2", 2379)]
    assert cfg.store.prefix == "/overlayd/v1/" and cfg.store.lease_ttl == 10
    assert cfg.admin_socket == "/run/overlayd/overlayd.sock" and cfg.status_listen == "127.0.0.1:9480"
    assert cfg.reconcile_interval == 300.0


def test_example_config_in_deploy_is_valid() -> None:
    example = Path(__file__).parents[2] / "deploy" / "overlayd.toml"
    cfg = config.load(str(example), env={})
    assert cfg.store.url.startswith("etcd://")


def test_a_polling_watch_is_paced_beside_gossip_unless_told_otherwise(tmp_path: Path) -> None:
    alone = config.load(write(tmp_path, GOOD), env={})
    beside = config.load(write(tmp_path, GOOD + "[gossip]\ninsecure = true\n"), env={})
    told = config.load(write(tmp_path, GOOD + "watch_pace = 0.5\n[gossip]\ninsecure = true\n"), env={})
    off = config.load(write(tmp_path, GOOD + "watch_pace = 0\n[gossip]\ninsecure = true\n"), env={})
    assert alone.store.watch_pace == 0.0  # the watch is the only way changes arrive: never held back
    assert beside.store.watch_pace == config.WATCH_PACE_BESIDE_GOSSIP > 0
    assert (told.store.watch_pace, off.store.watch_pace) == (0.5, 0.0)


def test_environment_overrides(tmp_path: Path) -> None:
    env = {"OVERLAYD_STORE_LEASE_TTL": "4", "OVERLAYD_UNDERLAY_ADDRESS": "198.18.0.11"}
    cfg = config.load(write(tmp_path, GOOD), env=env)
    assert cfg.store.lease_ttl == 4 and cfg.vtep_address == IPv4Address("198.18.0.11")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOOD + "lease_ttl = 0\n", "store.lease_ttl"),
        (GOOD + 'lease_ttl = "ten"\n', "store.lease_ttl"),
        (GOOD.replace("etcd://", "redis://"), "store.url"),
        (GOOD.replace("198.18.0.1:2379,", "198.18.0.1,"), "store.url"),
        (GOOD.replace('url = "etcd://198.18.0.1:2379,198.18.0.2:2379"', ""), "store.url"),
        (GOOD.replace('interface = "ul0"', 'address = "not-an-ip"'), "underlay.address"),
        (GOOD.replace('interface = "ul0"', ""), "underlay"),
        (GOOD.replace('name = "h1"', 'name = "bad name"'), "node.name"),
        (GOOD + '[status]\nlisten = "nowhere"\n', "status.listen"),
        (GOOD + '[log]\nlevel = "loud"\n', "log.level"),
        (GOOD + "[store2]\nx = 1\n", "store2.x"),
        (GOOD + 'prefix = "no-slashes"\n', "store.prefix"),
        (GOOD + "watch_pace = -0.1\n", "store.watch_pace"),
        (GOOD + "watch_pace = 60\n", "store.watch_pace"),
        (GOOD + 'watch_pace = "fast"\n', "store.watch_pace"),
        ("node = 3\n", "node"),
    ],
)
def test_each_problem_is_one_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, text), env={})
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert "\n" not in message


def test_unreadable_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(str(tmp_path / "missing.toml"), env={})
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load(write(tmp_path, "[node\n"), env={})
    with pytest.raises(config.ConfigError, match="OVERLAYD_STORE_LEASE_TTL must be an integer"):
        config.load(write(tmp_path, GOOD), env={"OVERLAYD_STORE_LEASE_TTL": "x"})


def test_daemon_refuses_bad_config_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = overlayd_main(["--config", write(tmp_path, GOOD + "lease_ttl = 1\n")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "overlayd: config error: store.lease_ttl: must be >= 2 seconds (got 1)\n"


GOSSIP_ONLY = """
[node]
name = "h1"
[underlay]
address = "198.18.0.11"
[store]
url = "gossip"
[gossip]
keys = ["{key}"]
peers = ["198.18.0.12", "198.18.0.13:8000"]
dead_grace = 5
"""


def test_gossip_only_config(tmp_path: Path) -> None:
    import base64
    import os

    key = base64.b64encode(os.urandom(32)).decode()
    cfg = config.load(write(tmp_path, GOSSIP_ONLY.replace("{key}", key)), env={})
    assert cfg.store is None and cfg.gossip is not None
    assert cfg.gossip.peers == (("198.18.0.12", 7946), ("198.18.0.13", 8000))
    assert cfg.gossip.keys == (key,) and cfg.gossip.dead_grace == 5.0 and not cfg.gossip.insecure
    assert key not in repr(cfg)  # keys never show up in logs of the config


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOSSIP_ONLY.replace('keys = ["{key}"]', ""), "gossip.keys"),
        (GOSSIP_ONLY.replace("{key}", "bm90LWEta2V5"), "gossip.keys"),
        (GOSSIP_ONLY.replace('"198.18.0.12"', '"somewhere"').replace("{key}", "x" * 44), "gossip.keys"),
        (
            GOSSIP_ONLY.replace('keys = ["{key}"]', "insecure = true").replace('"198.18.0.12"', '"h2"'),
            "gossip.peers",
        ),
        (GOSSIP_ONLY.replace('keys = ["{key}"]', 'insecure = "yes"'), "gossip.insecure"),
        (GOSSIP_ONLY.replace('keys = ["{key}"]', "insecure = true\nenabled = false"), "store.url"),
    ],
)
def test_gossip_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, text), env={})
    assert str(info.value).startswith(f"{key}:"), str(info.value)


def test_keygen_makes_a_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    from overlayd.clients.cli import main as overlayctl
    from overlayd.gossip import Keyring

    assert overlayctl(["gossip", "keygen"]) == 0
    key = capsys.readouterr().out.strip()
    Keyring.from_base64([key])  # raises if it is not a 32-byte base64 key


def _wrong_value(expected: type | tuple[type, ...]) -> object:
    # A string is wrong for every type but str; a number is wrong for str.
    return 3 if expected is str else "x"


@pytest.mark.parametrize("key", sorted(config._KEYS))
def test_type_errors_name_the_type_in_plain_words(key: str) -> None:
    flat = {"node.name": "h1", "underlay.interface": "ul0", "store.url": "gossip", "gossip.insecure": True}
    flat[key] = _wrong_value(config._KEYS[key])
    with pytest.raises(config.ConfigError) as info:
        config.from_flat(flat)
    wording = ("a string", "an integer", "a number", "true or false", "a list of strings")
    assert any(str(info.value).startswith(f"{key}: must be {w} (got ") for w in wording), str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + 'lease_ttl = "ten"\n', "store.lease_ttl: must be an integer (got 'ten')"),
        (GOOD + "lease_ttl = true\n", "store.lease_ttl: must be an integer (got True)"),
        (GOOD + '[reconcile]\ninterval = "soon"\n', "reconcile.interval: must be a number (got 'soon')"),
        (GOOD.replace('name = "h1"', "name = 7"), "node.name: must be a string (got 7)"),
        (GOOD + "[gossip]\ninsecure = 1\n", "gossip.insecure: must be true or false (got 1)"),
        (
            GOOD + '[gossip]\npeers = "198.18.0.2"\n',
            "gossip.peers: must be a list of strings (got '198.18.0.2')",
        ),
    ],
)
def test_type_error_wording(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, text), env={})
    assert str(info.value) == message


@pytest.mark.parametrize("text", ["", "bm90LWEta2V5", "x" * 44, "not base64!", "A" * 43 + "="])
def test_key_check_agrees_with_the_gossip_keyring(text: str) -> None:
    """The config checks keys without the crypto module, exactly as gossip will take them."""
    from overlayd.core import clusterkey
    from overlayd.gossip import Keyring

    outcomes = []
    for check in (clusterkey.decode_keys, Keyring.from_base64):
        try:
            check([text])
            outcomes.append("ok")
        except ValueError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    assert clusterkey.decode_keys([clusterkey.new_key()])


def test_loading_a_gossip_config_imports_no_crypto_or_gossip(tmp_path: Path) -> None:
    import base64
    import os
    import subprocess
    import sys

    key = base64.b64encode(os.urandom(32)).decode()
    path = write(tmp_path, GOSSIP_ONLY.replace("{key}", key))
    probe = (
        "import sys; from overlayd.core import config; config.load(sys.argv[1], env={}); "
        "print(sorted(m for m in sys.modules if m.startswith(('cryptography', 'overlayd.gossip'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_config_with_secrets_readable_by_others_is_warned_about() -> None:
    held = config.secrets_held(["node.name", "gossip.keys", "store.password", "store.url"])
    assert held == ["gossip.keys", "store.password"]
    warning = config.exposure_warning("/etc/o.toml", 0o100644, held)
    assert warning is not None and "readable by others (mode 644)" in warning and "chmod 600" in warning
    assert config.exposure_warning("/etc/o.toml", 0o100600, held) is None
    assert config.exposure_warning("/etc/o.toml", 0o100640, held) is not None  # the group reads it too
    assert config.exposure_warning("/etc/o.toml", 0o100644, []) is None  # nothing secret in it
