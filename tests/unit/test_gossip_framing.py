"""AEAD framing: sealed packets open; tampered, foreign-key, replayed and stale ones do not."""

from __future__ import annotations

import base64

import pytest

from overlayd.gossip.framing import FrameError, Framer, Keyring, key_id


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


K1, K2 = Keyring.generate(), Keyring.generate()


def pair(send_keys: list[bytes], recv_keys: list[bytes], clock: Clock | None = None) -> tuple[Framer, Framer]:
    clock = clock or Clock()
    return (
        Framer("h1", Keyring(send_keys), clock=clock),
        Framer("h2", Keyring(recv_keys), clock=clock),
    )


def reason(framer: Framer, packet: bytes) -> str:
    with pytest.raises(FrameError) as e:
        framer.open(packet)
    return e.value.reason


def test_round_trip() -> None:
    a, b = pair([K1], [K1])
    opened = b.open(a.seal(b"hello"))
    assert (opened.sender, opened.body) == ("h1", b"hello")
    assert b"hello" not in a.seal(b"hello")  # encrypted, not just signed


def test_every_tampered_byte_is_rejected() -> None:
    a, b = pair([K1], [K1])
    packet = a.seal(b"some body worth protecting")
    reasons = set()
    for i in range(len(packet)):
        bad = bytearray(packet)
        bad[i] ^= 0x01
        reasons.add(reason(b, bytes(bad)))
    # byte 0 is the version, 1..4 the key id (bound by the associated data), the rest the AEAD.
    assert reasons == {"bad_version", "unknown_key", "auth"}


def test_truncated_and_garbage_rejected() -> None:
    a, b = pair([K1], [K1])
    packet = a.seal(b"x")
    for n in range(len(packet)):
        assert reason(b, packet[:n]) in {"malformed", "auth", "unknown_key", "bad_version"}
    assert reason(b, b"\x01" + key_id(K1).to_bytes(4, "big") + b"\x00" * 40) == "auth"


def test_wrong_key_rejected() -> None:
    a, b = pair([K2], [K1])
    assert reason(b, a.seal(b"x")) == "unknown_key"


def test_forged_key_id_rejected() -> None:
    """A packet sealed with another key but carrying our key id fails authentication."""
    a, b = pair([K2], [K1])
    packet = bytearray(a.seal(b"x"))
    packet[1:5] = key_id(K1).to_bytes(4, "big")
    assert reason(b, bytes(packet)) == "auth"


def test_replay_rejected_reordering_allowed() -> None:
    a, b = pair([K1], [K1])
    p1, p2, p3 = a.seal(b"1"), a.seal(b"2"), a.seal(b"3")
    b.open(p1)
    b.open(p3)
    b.open(p2)  # late but new: fine
    for p in (p1, p2, p3):
        assert reason(b, p) == "replay"


def test_far_behind_counts_as_replay() -> None:
    a, b = pair([K1], [K1])
    old = a.seal(b"old")
    for _ in range(1100):
        b.open(a.seal(b"x"))
    assert reason(b, old) == "replay"


def test_stale_and_future_rejected() -> None:
    clock = Clock()
    a, b = pair([K1], [K1], clock)
    packet = a.seal(b"x")
    clock.t += 61
    assert reason(b, packet) == "stale"
    clock.t -= 61 + 61
    assert reason(b, packet) == "future"
    clock.t += 61 + 59  # 59 s old: within the default 60 s
    assert b.open(packet).body == b"x"


def test_a_sender_whose_clock_jumps_while_running_is_still_heard() -> None:
    sender_clock, receiver_clock = Clock(), Clock()
    a = Framer("h1", Keyring([K1]), clock=sender_clock)
    b = Framer("h2", Keyring([K1]), clock=receiver_clock)
    assert b.open(a.seal(b"first")).body == b"first"  # first contact: within the skew
    for jump in (+300.0, -600.0, +300.0):  # 5 minutes forward, back past the start, home
        sender_clock.t += jump
        packet = a.seal(b"x")
        assert b.open(packet).body == b"x"  # a known session: its counter window guards it
        assert reason(b, packet) == "replay"
    # A new session (a restart) with its clock 5 minutes off is refused at first contact.
    sender_clock.t += 300
    assert reason(b, Framer("h1", Keyring([K1]), clock=sender_clock).seal(b"y")) == "future"


def test_restarted_sender_is_not_a_replay() -> None:
    clock = Clock()
    a, b = pair([K1], [K1], clock)
    for _ in range(100):
        b.open(a.seal(b"x"))
    clock.t -= 30  # even if its clock stepped back meanwhile
    again = Framer("h1", Keyring([K1]), clock=clock)  # same name, new process
    assert b.open(again.seal(b"y")).body == b"y"


def test_key_rotation_without_downtime() -> None:
    clock = Clock()
    ring1, ring2 = Keyring([K1]), Keyring([K1])
    a, b = Framer("h1", ring1, clock=clock), Framer("h2", ring2, clock=clock)
    # 1. install K2 everywhere (still sealing with K1)
    ring1.install(K2)
    ring2.install(K2)
    assert b.open(a.seal(b"1")).body == b"1" and a.open(b.seal(b"1")).body == b"1"
    # 2. switch h1 to K2 first: h2 still reads it, and h1 still reads h2's K1
    ring1.use(K2)
    assert b.open(a.seal(b"2")).body == b"2" and a.open(b.seal(b"2")).body == b"2"
    ring2.use(K2)
    # 3. drop K1 everywhere: K1 packets are now refused
    old = Framer("h3", Keyring([K1]), clock=clock).seal(b"old")
    ring1.remove(K1)
    ring2.remove(K1)
    assert b.open(a.seal(b"3")).body == b"3"
    assert reason(b, old) == "unknown_key"


def test_keyring_rules() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        Keyring([])
    with pytest.raises(ValueError, match="32 bytes"):
        Keyring([b"short"])
    ring = Keyring([K1, K2])
    assert ring.primary_id == key_id(K1)
    with pytest.raises(ValueError, match="primary"):
        ring.remove(K1)
    assert Keyring([K1, K2], primary=K2).primary_id == key_id(K2)


def test_keyring_from_config_text() -> None:
    ring = Keyring.from_base64([base64.b64encode(K2).decode(), base64.b64encode(K1).decode()])
    assert ring.primary_id == key_id(K2) and set(ring.ids) == {key_id(K1), key_id(K2)}
    with pytest.raises(ValueError, match="key #2 is not base64"):
        Keyring.from_base64([base64.b64encode(K1).decode(), "not base64!"])
    with pytest.raises(ValueError, match="key #1 is 3 bytes"):
        Keyring.from_base64([base64.b64encode(b"abc").decode()])


def test_insecure_only_when_asked_and_never_mixed() -> None:
    clock = Clock()
    plain = Framer("h1", Keyring.insecure(), clock=clock)
    packet = plain.seal(b"hello")
    assert b"hello" in packet
    assert Framer("h2", Keyring.insecure(), clock=clock).open(packet).body == b"hello"
    assert reason(Framer("h2", Keyring([K1]), clock=clock), packet) == "unknown_key"
    assert reason(plain, Framer("h3", Keyring([K1]), clock=clock).seal(b"x")) == "unknown_key"


def test_replay_memory_is_bounded() -> None:
    clock = Clock()
    b = Framer("h0", Keyring([K1]), clock=clock, max_senders=10)
    for i in range(50):
        b.open(Framer(f"s{i}", Keyring([K1]), clock=clock).seal(b"x"))
    assert len(b._windows) == 10
