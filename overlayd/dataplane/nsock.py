"""Kept for the dataplane modules that import from here; the helpers live in `overlayd.util.nsutil`."""

from __future__ import annotations

from overlayd.util.nsutil import netns_path, socket_in_netns

__all__ = ["netns_path", "socket_in_netns"]
