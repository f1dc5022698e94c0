"""Which failed Consul answers mean "try again" (the watch and session loops retry them)
and which are a refusal that retrying cannot change."""

from __future__ import annotations

import pytest

from overlayd.store.consul import passing_failure


@pytest.mark.parametrize(
    "status, text",
    [
        (500, "No cluster leader"),
        (500, "rpc error making call: EOF"),
        (500, "raft is already shutdown"),  # a write racing a server's stop
        (500, "leadership lost while committing log"),
        (500, "timed out enqueuing operation"),
        (502, "Bad Gateway"),
        (503, "Service Unavailable"),
    ],
)
def test_a_server_passing_through_a_restart_or_election_is_unavailable(status: int, text: str) -> None:
    assert passing_failure(status, text)


@pytest.mark.parametrize(
    "status, text",
    [
        (500, "Missing session"),
        (500, "invalid session \"abc\""),
        (400, "Request decode failed"),
        (413, "Request body too large"),
    ],
)
def test_a_refusal_is_not_retried(status: int, text: str) -> None:
    assert not passing_failure(status, text)
