"""The admin API: JSON over HTTP on a root-only unix socket.

`overlayctl` and the CNI plugin are its clients. Handlers only translate
between HTTP and the `AdminService` protocol; every decision is the daemon's.
Errors leave as {"error": message} with a status taken from the exception:
`ApiError` subclasses carry their own, a `model.ValidationError` is a 400, and
anything unexpected is a 500 whose details go to the log, not to the client.

Routes (all JSON; lists are JSON arrays, records JSON objects):

    GET    /v1/status                        daemon status
    GET    /v1/peers                         known nodes
    GET    /v1/networks                      list networks
    POST   /v1/networks                      create {name, subnet, vni?, gateway?, mtu?, mode?,
                                             egress?} -> 201
    GET    /v1/networks/{name}               one network plus its endpoints
    DELETE /v1/networks/{name}               remove -> 204
    GET    /v1/endpoints[?network=N]         list endpoints
    POST   /v1/endpoints                     create {network, name, netns, ip?, ifname?} -> 201
    DELETE /v1/endpoints/{network}/{name}    remove -> 204
    GET    /v1/endpoints/{network}/{name}/check  what this host's endpoint's namespace holds
                                             now: interface, MAC, state, addresses (CNI CHECK)
    GET    /v1/diff                          pending reconciler changes, one string each
    GET    /v1/store/probe                   time one read of the store: {url, ok, latency_ms, error}
    POST   /v1/teardown                      {node} (must name this node): remove this host's
                                             overlay, release the lease, then the daemon exits
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from overlayd.api.service import JSON, AdminService, ApiError, BadRequest
from overlayd.core.model import ValidationError

log = logging.getLogger(__name__)

# In-flight requests get this long to finish at shutdown; an endpoint being
# created may be waiting on the KV store, but shutdown must stay bounded.
_SHUTDOWN_TIMEOUT = 5.0
# How long to wait for an existing socket to answer before calling it stale.
_PROBE_TIMEOUT = 1.0

_JSON_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


class ServerError(RuntimeError):
    """A server could not start: the message names the address and the reason."""


class RunningServer:
    """A started server: the address it actually listens on, and how to stop it."""

    def __init__(
        self,
        runner: web.AppRunner,
        address: str,
        *,
        after_close: Callable[[], None] | None = None,
    ) -> None:
        self._runner = runner
        self.address = address
        self._after_close = after_close

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), release the address."""
        try:
            await self._runner.cleanup()
        finally:
            if self._after_close is not None:
                self._after_close()
                self._after_close = None


# --- errors ---------------------------------------------------------------


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"no such API route: {request.method} {request.path}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {request.method} not allowed on {request.path} (allowed: {allowed})"
    return exc.reason


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into {"error": message} with the right status."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except ValidationError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _http_error_message(request, exc))
    except Exception as exc:
        # The exception text may carry internals (store URLs, keys); the client
        # gets only its type, the operator gets the traceback in the log.
        log.exception("admin API %s %s failed", request.method, request.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the overlayd log for details")


# --- request bodies -------------------------------------------------------


def _json_type(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


async def _read_object(request: web.Request, allowed: frozenset[str]) -> JSON:
    """The request body as a JSON object holding no field outside `allowed`."""
    try:
        body = json.loads(await request.text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        # A misspelt optional field would otherwise be silently ignored.
        raise BadRequest(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return body


def _required_str(body: JSON, key: str) -> str:
    if key not in body:
        raise BadRequest(f"missing field {key!r}")
    value = body[key]
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string, got {_json_type(value)}")
    return value


def _optional_str(body: JSON, key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string, got {_json_type(value)}")
    return value


def _optional_int(body: JSON, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python but never a VNI or an MTU.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {key!r} must be an integer, got {_json_type(value)}")
    return value


# --- handlers -------------------------------------------------------------

_NETWORK_FIELDS = frozenset({"name", "subnet", "vni", "gateway", "mtu", "mode", "egress"})
_ENDPOINT_FIELDS = frozenset({"network", "name", "netns", "ip", "ifname"})


class _AdminHandlers:
    def __init__(self, service: AdminService) -> None:
        self._service = service

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._service.status())

    async def peers(self, request: web.Request) -> web.Response:
        return web.json_response(self._service.peers())

    async def network_list(self, request: web.Request) -> web.Response:
        return web.json_response(self._service.network_list())

    async def network_create(self, request: web.Request) -> web.Response:
        body = await _read_object(request, _NETWORK_FIELDS)
        record = await self._service.network_create(
            name=_required_str(body, "name"),
            subnet=_required_str(body, "subnet"),
            vni=_optional_int(body, "vni"),
            gateway=_optional_str(body, "gateway"),
            mtu=_optional_int(body, "mtu"),
            mode=_optional_str(body, "mode"),
            egress=_optional_str(body, "egress"),
        )
        return web.json_response(record, status=201)

    async def network_inspect(self, request: web.Request) -> web.Response:
        return web.json_response(self._service.network_inspect(request.match_info["name"]))

    async def network_remove(self, request: web.Request) -> web.Response:
        await self._service.network_remove(request.match_info["name"])
        return web.Response(status=204)

    async def endpoint_list(self, request: web.Request) -> web.Response:
        network = request.query.get("network") or None
        return web.json_response(self._service.endpoint_list(network))

    async def endpoint_add(self, request: web.Request) -> web.Response:
        body = await _read_object(request, _ENDPOINT_FIELDS)
        record = await self._service.endpoint_add(
            network=_required_str(body, "network"),
            name=_required_str(body, "name"),
            netns=_required_str(body, "netns"),
            ip=_optional_str(body, "ip"),
            ifname=_optional_str(body, "ifname") or "eth0",
        )
        return web.json_response(record, status=201)

    async def endpoint_remove(self, request: web.Request) -> web.Response:
        await self._service.endpoint_remove(
            network=request.match_info["network"], name=request.match_info["name"]
        )
        return web.Response(status=204)

    async def endpoint_check(self, request: web.Request) -> web.Response:
        return web.json_response(
            await self._service.endpoint_check(
                network=request.match_info["network"], name=request.match_info["name"]
            )
        )

    async def diff(self, request: web.Request) -> web.Response:
        return web.json_response(await self._service.diff())

    async def store_probe(self, request: web.Request) -> web.Response:
        return web.json_response(await self._service.store_probe())

    async def teardown(self, request: web.Request) -> web.Response:
        # Naming the node is the confirmation: a request meant for another host
        # (a wrong --socket) cannot tear this one down.
        body = await _read_object(request, frozenset({"node"}))
        node = _required_str(body, "node")
        this = self._service.status().get("node")
        if node != this:
            raise BadRequest(f"teardown names node {node!r}, but this is node {this!r}")
        return web.json_response(await self._service.teardown())


def make_admin_app(service: AdminService) -> web.Application:
    h = _AdminHandlers(service)
    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/v1/status", h.status)
    app.router.add_get("/v1/peers", h.peers)
    app.router.add_get("/v1/networks", h.network_list)
    app.router.add_post("/v1/networks", h.network_create)
    app.router.add_get("/v1/networks/{name}", h.network_inspect)
    app.router.add_delete("/v1/networks/{name}", h.network_remove)
    app.router.add_get("/v1/endpoints", h.endpoint_list)
    app.router.add_post("/v1/endpoints", h.endpoint_add)
    app.router.add_delete("/v1/endpoints/{network}/{name}", h.endpoint_remove)
    app.router.add_get("/v1/endpoints/{network}/{name}/check", h.endpoint_check)
    app.router.add_get("/v1/diff", h.diff)
    app.router.add_get("/v1/store/probe", h.store_probe)
    app.router.add_post("/v1/teardown", h.teardown)
    return app


# --- the unix socket ------------------------------------------------------


async def _socket_answers(path: str) -> bool:
    """True if a live process accepts connections on the unix socket `path`."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), _PROBE_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _clear_socket_path(path: str) -> None:
    """Create the parent directory and remove a stale socket left by a dead daemon.

    A live socket is left alone (two daemons on one host would fight over the
    kernel), and so is anything that is not a socket: it is not ours to delete.
    """
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ServerError(f"cannot prepare admin socket {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"cannot use admin socket {path}: it exists and is not a socket")
    if await _socket_answers(path):
        raise ServerError(
            f"cannot use admin socket {path}: another process is serving on it (is overlayd already running?)"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ServerError(f"cannot remove stale admin socket {path}: {exc.strerror}") from exc


def _bind_private_socket(path: str) -> socket.socket:
    """A unix socket bound at `path` with mode 0600, not yet listening.

    The mode is set between bind() and listen(): no client can connect before
    listen(), so there is no window in which the socket is open to others
    (unlike chmod after aiohttp's UnixSite has started, or a process-wide umask).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot bind admin socket {path}: {exc.strerror or exc}") from exc
    return sock


def _unlinker(path: str, inode: int) -> Callable[[], None]:
    """Removes `path` at shutdown, unless another daemon has since replaced it."""

    def unlink() -> None:
        try:
            if os.lstat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove admin socket %s: %s", path, exc)

    return unlink


async def start_admin_server(service: AdminService, socket_path: str) -> RunningServer:
    """Serve the admin API on `socket_path` (root only); raises ServerError if it cannot."""
    await _clear_socket_path(socket_path)
    sock = _bind_private_socket(socket_path)
    inode = os.lstat(socket_path).st_ino
    # No access log: a burst of CNI adds would write a line each for nothing the daemon's
    # own log does not already say (every change is logged where it is made).
    runner = web.AppRunner(make_admin_app(service), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except OSError as exc:
        await runner.cleanup()
        sock.close()
        _unlinker(socket_path, inode)()
        raise ServerError(f"cannot serve admin socket {socket_path}: {exc.strerror or exc}") from exc
    log.info("admin API listening on %s", socket_path)
    return RunningServer(runner, socket_path, after_close=_unlinker(socket_path, inode))
