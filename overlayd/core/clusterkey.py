"""Gossip cluster keys in the form a config file holds them: base64 of 32 random bytes.

Pure and without the crypto library, so the config can check a key's format
and overlayctl can make one without importing the gossip layer;
`gossip.framing.Keyring` turns checked keys into AES-256-GCM ciphers.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Sequence

KEY_SIZE = 32  # AES-256


def decode_keys(texts: Sequence[str]) -> list[bytes]:
    """The raw keys; ValueError naming the first bad one by its position (1-based)."""
    keys = []
    for i, text in enumerate(texts, 1):
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"gossip key #{i} is not base64") from None
        if len(key) != KEY_SIZE:
            raise ValueError(f"gossip key #{i} is {len(key)} bytes, must be {KEY_SIZE}")
        keys.append(key)
    return keys


def new_key() -> str:
    """A fresh random key, base64-encoded for `[gossip] keys`."""
    return base64.b64encode(secrets.token_bytes(KEY_SIZE)).decode()
