"""A small synchronous client of the admin socket, for overlayctl and the CNI plugin.

Standard library and the API's schema only, nothing of the daemon: a CNI
plugin is exec'd for every container, so importing it must be cheap, and the
admin API's JSON, described by `api.schema`, is the whole contract between
the two sides. Each method returns the answer as its schema record. Every
failure, an answer of the wrong shape included, surfaces as one `ClientError`
whose message is a single line fit to show an operator.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from overlayd.api import schema

DEFAULT_SOCKET = "/run/overlayd/overlayd.sock"
# Creating an endpoint waits on the KV store and the kernel; still, never hang forever.
DEFAULT_TIMEOUT = 60.0

Record = dict[str, Any]
T = TypeVar("T")


class ClientError(Exception):
    """The request failed; `message` is one line, `status` the HTTP status if the daemon answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        # The host only fills the Host header; the socket path is the address.
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _segment(value: str) -> str:
    """One path segment, escaped so a name can never change the route."""
    return quote(value, safe="")


class AdminClient:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # --- transport --------------------------------------------------------

    def request(self, method: str, path: str, body: Record | None = None) -> Any:
        """Send one request; the decoded JSON answer, or None for an empty one."""
        status, raw = self._exchange(method, path, body)
        if not raw:
            if status >= 400:
                raise ClientError(f"overlayd answered HTTP {status}", status)
            return None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError(f"overlayd answered HTTP {status} with a non-JSON body", status) from None
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise ClientError(str(message) if message else f"overlayd answered HTTP {status}", status)
        return data

    def _exchange(self, method: str, path: str, body: Record | None) -> tuple[int, bytes]:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if payload is None else {"Content-Type": "application/json"}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except FileNotFoundError:
            raise self._unreachable("no such file (is the daemon running?)") from None
        except ConnectionRefusedError:
            raise self._unreachable("connection refused (is the daemon running?)") from None
        except PermissionError:
            raise self._unreachable("permission denied (the admin socket is root-only)") from None
        except TimeoutError:
            raise ClientError(
                f"overlayd at {self.socket_path} did not answer within {self.timeout:g}s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ClientError(f"lost connection to overlayd at {self.socket_path}: {reason}") from None
        finally:
            conn.close()

    def _unreachable(self, reason: str) -> ClientError:
        return ClientError(f"cannot reach overlayd at {self.socket_path}: {reason}")

    # --- the API ----------------------------------------------------------

    def status(self) -> schema.Status:
        return _answer(schema.Status.from_json, self.request("GET", "/v1/status"))

    def peers(self) -> tuple[schema.Peer, ...]:
        return _answer(schema.Peer.list_from_json, self.request("GET", "/v1/peers"))

    def network_create(
        self,
        *,
        name: str,
        subnet: str,
        vni: int | None = None,
        gateway: str | None = None,
        mtu: int | None = None,
        mode: str | None = None,
        egress: str | None = None,
    ) -> schema.NetworkInfo:
        body = _without_none(
            name=name, subnet=subnet, vni=vni, gateway=gateway, mtu=mtu, mode=mode, egress=egress
        )
        return _answer(schema.NetworkInfo.from_json, self.request("POST", "/v1/networks", body))

    def network_list(self) -> tuple[schema.NetworkListItem, ...]:
        return _answer(schema.NetworkListItem.list_from_json, self.request("GET", "/v1/networks"))

    def network_inspect(self, name: str) -> schema.NetworkInspect:
        answer = self.request("GET", f"/v1/networks/{_segment(name)}")
        return _answer(schema.NetworkInspect.from_json, answer)

    def network_remove(self, name: str) -> None:
        self.request("DELETE", f"/v1/networks/{_segment(name)}")

    def endpoint_add(
        self,
        *,
        network: str,
        name: str,
        netns: str,
        ip: str | None = None,
        ifname: str | None = None,
    ) -> schema.EndpointInfo:
        body = _without_none(network=network, name=name, netns=netns, ip=ip, ifname=ifname)
        return _answer(schema.EndpointInfo.from_json, self.request("POST", "/v1/endpoints", body))

    def endpoint_list(self, network: str | None = None) -> tuple[schema.EndpointInfo, ...]:
        query = f"?{urlencode({'network': network})}" if network else ""
        return _answer(schema.EndpointInfo.list_from_json, self.request("GET", f"/v1/endpoints{query}"))

    def endpoint_remove(self, *, network: str, name: str) -> None:
        self.request("DELETE", f"/v1/endpoints/{_segment(network)}/{_segment(name)}")

    def endpoint_check(self, *, network: str, name: str) -> schema.EndpointCheck:
        """What the daemon finds in a local endpoint's namespace now (the CNI plugin's CHECK)."""
        path = f"/v1/endpoints/{_segment(network)}/{_segment(name)}/check"
        return _answer(schema.EndpointCheck.from_json, self.request("GET", path))

    def diff(self) -> schema.Diff:
        return _answer(schema.Diff.from_json, self.request("GET", "/v1/diff"))

    def store_probe(self) -> schema.StoreProbe:
        return _answer(schema.StoreProbe.from_json, self.request("GET", "/v1/store/probe"))

    def teardown(self, node: str) -> schema.TeardownResult:
        """Tear this host's overlay down; `node` must be the daemon's node name (the confirmation)."""
        answer = self.request("POST", "/v1/teardown", {"node": node})
        return _answer(schema.TeardownResult.from_json, answer)


def _without_none(**fields: Any) -> Record:
    return {key: value for key, value in fields.items() if value is not None}


def _answer(parse: Callable[[object], T], data: Any) -> T:
    """The daemon's answer read through its schema; a mismatch is one ClientError line."""
    try:
        return parse(data)
    except schema.SchemaError as exc:
        raise ClientError(f"unexpected answer from overlayd: {exc}") from None
