"""The read-only HTTP status server: health, readiness, status and metrics.

Meant for load balancers, systemd watchdogs and Prometheus, so it answers
only GET (and HEAD) and never changes anything:

    /healthz   200 "ok" while the event loop answers at all
    /readyz    200 "ready" once the first reconcile is done, else 503
    /status    the daemon's status as JSON
    /metrics   Prometheus text exposition of the daemon's own registry
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from overlayd.api.admin import RunningServer, ServerError, json_errors
from overlayd.api.service import JSON
from overlayd.util.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9480"

# Scrapes and probes are short; a stuck one must not hold up daemon shutdown.
_SHUTDOWN_TIMEOUT = 1.0


class StatusSource(Protocol):
    """The part of `AdminService` the status server reads."""

    def status(self) -> JSON: ...

    def is_ready(self) -> bool: ...


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6addr]:port") into host and port; ValueError names the input."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"invalid listen address {listen!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"invalid listen address {listen!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid listen address {listen!r}: port must be in 0..65535")
    return host, port


def _format_address(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[0], sockname[1]  # IPv6 socknames carry flowinfo and scope too
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _StatusHandlers:
    def __init__(self, source: StatusSource, metrics: Metrics) -> None:
        self._source = source
        self._metrics = metrics

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self._source.is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: first reconcile not done yet\n")

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._source.status())

    async def metrics(self, request: web.Request) -> web.Response:
        # aiohttp's content_type= refuses a charset parameter, so set the header itself.
        return web.Response(
            body=generate_latest(self._metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


def make_status_app(source: StatusSource, metrics: Metrics) -> web.Application:
    h = _StatusHandlers(source, metrics)
    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    app.router.add_get("/status", h.status)
    app.router.add_get("/metrics", h.metrics)
    return app


async def start_status_server(
    service: StatusSource, metrics: Metrics, listen: str = DEFAULT_LISTEN
) -> RunningServer:
    """Serve status on `listen` ("host:port"; port 0 picks a free one).

    Raises ServerError naming the address when it is malformed or cannot be bound.
    The returned server's `address` is the one actually bound.
    """
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ServerError(str(exc)) from None
    # Probes and scrapes arrive every few seconds; logging each would drown the log.
    runner = web.AppRunner(
        make_status_app(service, metrics), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ServerError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    address = _format_address(runner.addresses[0])
    log.info("status server listening on http://%s", address)
    return RunningServer(runner, address)
