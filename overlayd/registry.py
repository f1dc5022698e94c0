"""The endpoints this host owns, kept on local disk.

The local registry, not the store, is the truth about which endpoints live on
this host: after a restart, or after the lease lapsed while the store was
unreachable, the daemon re-publishes from here. Written atomically (temp file
plus rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from overlayd.model import Endpoint, ValidationError

log = logging.getLogger(__name__)


class LocalRegistry:
    def __init__(self, state_dir: str) -> None:
        self._path = Path(state_dir) / "endpoints.json"
        self._endpoints: dict[str, Endpoint] = {}

    def load(self) -> None:
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{self._path}: cannot read local endpoint registry: {exc}") from None
        for item in raw.get("endpoints", []):
            try:
                endpoint = Endpoint.from_dict(item)
            except ValidationError as exc:
                log.error("%s: skipping invalid entry: %s", self._path, exc)
                continue
            self._endpoints[endpoint.key] = endpoint

    def all(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def get(self, key: str) -> Endpoint | None:
        return self._endpoints.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._endpoints

    def add(self, endpoint: Endpoint) -> None:
        self._endpoints[endpoint.key] = endpoint
        self._save()

    def remove(self, key: str) -> None:
        if self._endpoints.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        data = {"endpoints": [ep.to_dict() for ep in self._endpoints.values()]}
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._path)
