"""AEAD framing of gossip datagrams: who sent it, when, and that nobody forged or replayed it.

A packet on the wire is

    version (1 byte) | key id (4 bytes) | nonce (12 bytes) | ciphertext + tag

sealed with AES-256-GCM; the version byte and key id are the associated data, so
neither can be changed without failing authentication. The plaintext is

    timestamp (float64, sender's wall clock) | session (uint64) | counter (uint64)
    | name length (1 byte) | name | body

The session is random per sender process and the counter counts its packets,
so (sender, session, counter) names a packet uniquely: a restarted sender
starts a new session and is never mistaken for a replay of its previous life,
whatever its clock did meanwhile.

Order of checks when opening: header, key, authentication, then skew and replay.
Nothing an unauthenticated packet says is believed, and only packets that pass
every check update the replay window, so forged traffic cannot poison it.

Insecure mode (no key, key id 0, body in clear) exists for labs and must be asked
for explicitly with `Keyring.insecure()`; a keyring with keys never accepts it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

WIRE_VERSION = 1
KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct("!BI")  # version, key id
_INNER = struct.Struct("!dQQB")  # timestamp, session, counter, name length
INSECURE_KEY_ID = 0


# Bytes a frame adds to a body, for a sender name of `n` bytes (callers size bodies to the MTU).
def overhead(name_len: int) -> int:
    return _HEADER.size + NONCE_SIZE + TAG_SIZE + _INNER.size + name_len


class FrameError(Exception):
    """A packet that must be dropped; `reason` is the metrics label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def key_id(key: bytes) -> int:
    """The id a key travels under: 4 bytes of its SHA-256 (never 0, which means insecure)."""
    kid = int.from_bytes(hashlib.sha256(b"overlayd-gossip-key-id" + key).digest()[:4], "big")
    return kid or 1


class Keyring:
    """Keys this node accepts; the primary one seals what it sends.

    Rotation without downtime: install the new key everywhere, then make it
    primary everywhere, then remove the old one. Every step keeps every pair of
    nodes able to read each other.
    """

    def __init__(self, keys: Iterable[bytes], *, primary: bytes | None = None) -> None:
        self._keys: dict[int, AESGCM] = {}
        self._raw: dict[int, bytes] = {}
        self._primary: int | None = None
        for k in keys:
            self.install(k)
        if not self._keys and not isinstance(self, _InsecureKeyring):
            raise ValueError("a keyring needs at least one key (or use Keyring.insecure() explicitly)")
        if primary is not None:
            self.use(primary)

    @classmethod
    def from_base64(cls, keys: Sequence[str]) -> Keyring:
        """Keys as a config file holds them (base64 of 32 bytes each); the first is primary."""
        raw = []
        for i, text in enumerate(keys, 1):
            try:
                key = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"gossip key #{i} is not base64") from None
            if len(key) != KEY_SIZE:
                raise ValueError(f"gossip key #{i} is {len(key)} bytes, must be {KEY_SIZE}")
            raw.append(key)
        return cls(raw)

    @classmethod
    def insecure(cls) -> Keyring:
        """No encryption, no authentication: for labs only, and only when asked for."""
        return _InsecureKeyring([])

    @staticmethod
    def generate() -> bytes:
        return AESGCM.generate_key(bit_length=KEY_SIZE * 8)

    @property
    def is_insecure(self) -> bool:
        return False

    def install(self, key: bytes) -> int:
        """Accept `key` from now on (the first key installed becomes primary); its id."""
        if len(key) != KEY_SIZE:
            raise ValueError(f"a gossip key must be {KEY_SIZE} bytes, got {len(key)}")
        kid = key_id(key)
        if kid in self._raw and self._raw[kid] != key:
            raise ValueError("two different keys share a key id; generate another key")
        self._keys[kid] = AESGCM(key)
        self._raw[kid] = key
        if self._primary is None:
            self._primary = kid
        return kid

    def use(self, key: bytes) -> None:
        """Seal with `key` from now on (installing it if needed)."""
        self._primary = self.install(key)

    def remove(self, key: bytes) -> None:
        kid = key_id(key)
        if kid == self._primary:
            raise ValueError("cannot remove the primary key; make another key primary first")
        self._keys.pop(kid, None)
        self._raw.pop(kid, None)

    @property
    def primary_id(self) -> int:
        if self._primary is None:
            return INSECURE_KEY_ID
        return self._primary

    @property
    def ids(self) -> list[int]:
        return list(self._keys)

    def cipher(self, kid: int) -> AESGCM | None:
        return self._keys.get(kid)


class _InsecureKeyring(Keyring):
    @property
    def is_insecure(self) -> bool:
        return True

    def install(self, key: bytes) -> int:
        raise ValueError("an insecure keyring takes no keys")


class Opened(NamedTuple):
    """What `Framer.open` vouches for. A named tuple: one is built per datagram received,
    at a fraction of a frozen dataclass's cost."""

    sender: str
    timestamp: float
    counter: int
    body: bytes


class _ReplayWindow:
    """Highest counter seen in one sender session plus a bitmap of the `size` below it."""

    __slots__ = ("bits", "highest", "mask", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.mask = (1 << size) - 1  # the window's bits (built once, not per packet)
        self.highest = -1
        self.bits = 0  # bit i set: counter highest - i was seen

    def seen(self, counter: int) -> bool:
        if counter > self.highest:
            return False
        offset = self.highest - counter
        if offset >= self.size:
            return True  # too far behind to tell: treat as a replay
        return bool(self.bits >> offset & 1)

    def mark(self, counter: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & self.mask if shift < self.size else 1
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)


class Framer:
    """Seals this node's messages and opens its peers', with replay and skew checks.

    Memory is bounded: one window of `replay_window` bits per sender session, for
    at most `max_senders` sessions (least recently heard dropped first). A replay
    of a forgotten session would still have to pass the skew check.
    """

    def __init__(
        self,
        name: str,
        keyring: Keyring,
        *,
        max_skew: float = 60.0,
        replay_window: int = 1024,
        max_senders: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        encoded = name.encode()
        if not 0 < len(encoded) < 256:
            raise ValueError(f"gossip node name must be 1..255 bytes: {name!r}")
        self.name = name
        self._name = encoded
        self.keyring = keyring
        # Fixed by the keyring's class (an insecure one never takes a key): asked per packet.
        self._insecure = keyring.is_insecure
        self.max_skew = max_skew
        self._clock = clock
        self._session = int.from_bytes(os.urandom(8), "big")
        self._counter = 0
        self._window_size = replay_window
        self._max_senders = max_senders
        self._windows: OrderedDict[tuple[str, int], _ReplayWindow] = OrderedDict()

    @property
    def overhead(self) -> int:
        return overhead(len(self._name))

    def seal(self, body: bytes) -> bytes:
        self._counter += 1
        inner = _INNER.pack(self._clock(), self._session, self._counter, len(self._name)) + self._name + body
        kid = self.keyring.primary_id
        header = _HEADER.pack(WIRE_VERSION, kid)
        if self._insecure:
            return header + inner
        cipher = self.keyring.cipher(kid)
        assert cipher is not None  # the primary key is always installed
        nonce = os.urandom(NONCE_SIZE)
        return header + nonce + cipher.encrypt(nonce, inner, header)

    def open(self, packet: bytes) -> Opened:
        """The authenticated content of `packet`, or FrameError with the reason to count."""
        if len(packet) < _HEADER.size:
            raise FrameError("malformed", "shorter than a header")
        version, kid = _HEADER.unpack_from(packet)
        if version != WIRE_VERSION:
            raise FrameError("bad_version", f"wire version {version}")
        header = packet[: _HEADER.size]
        if self._insecure:
            if kid != INSECURE_KEY_ID:
                raise FrameError("unknown_key", "encrypted packet but this node runs insecure")
            inner = packet[_HEADER.size :]
        else:
            cipher = self.keyring.cipher(kid)
            if cipher is None:
                raise FrameError("unknown_key", f"key id {kid:08x}")
            if len(packet) < _HEADER.size + NONCE_SIZE + TAG_SIZE:
                raise FrameError("malformed", "shorter than nonce and tag")
            nonce = packet[_HEADER.size : _HEADER.size + NONCE_SIZE]
            try:
                inner = cipher.decrypt(nonce, packet[_HEADER.size + NONCE_SIZE :], header)
            except InvalidTag:
                raise FrameError("auth", "authentication failed") from None
        if len(inner) < _INNER.size:
            raise FrameError("malformed", "short plaintext")
        timestamp, session, counter, name_len = _INNER.unpack_from(inner)
        end = _INNER.size + name_len
        if name_len == 0 or len(inner) < end:
            raise FrameError("malformed", "bad sender name")
        try:
            sender = inner[_INNER.size : end].decode()
        except UnicodeDecodeError:
            raise FrameError("malformed", "sender name not UTF-8") from None
        source = (sender, session)
        window = self._windows.get(source)
        if window is None:
            # The skew check guards first contact (and a session forgotten since): a
            # replay from outside every window. A session already heard is guarded by
            # its counter window, so a sender's clock that jumps while it runs (NTP
            # stepping it, a VM resumed) does not cut it off.
            age = self._clock() - timestamp
            if not age <= self.max_skew:  # also catches NaN
                raise FrameError("stale", f"{age:.1f}s old")
            if age < -self.max_skew:
                raise FrameError("future", f"{-age:.1f}s ahead")
        elif window.seen(counter):
            raise FrameError("replay", f"counter {counter} from {sender}")
        if window is None:
            window = self._windows[source] = _ReplayWindow(self._window_size)
            if len(self._windows) > self._max_senders:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(source)
        window.mark(counter)
        return Opened(sender, timestamp, counter, inner[end:])
