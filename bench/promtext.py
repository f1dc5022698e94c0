"""The daemon's own reconcile timings, read from its /metrics. Pure parsing.

Only two figures are internal by nature: the time of an incremental pass
with nothing to do and of a full verify (dump the kernel, compare). The
daemon exports them as `overlayd_reconcile_duration_seconds{kind="incremental"|"full"}`;
a daemon that does not (yet) label its passes gives None, and the report
says "n/a" rather than guess which pass was which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METRIC = "overlayd_reconcile_duration_seconds"
_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Passes:
    """Sum of seconds and count of one kind of pass (cumulative since the daemon started)."""

    seconds: float
    count: float

    def minus(self, earlier: Passes) -> Passes:
        return Passes(self.seconds - earlier.seconds, self.count - earlier.count)

    @property
    def mean(self) -> float | None:
        return self.seconds / self.count if self.count > 0 else None


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` in a Prometheus text exposition: (labels, value)."""
    out: list[tuple[dict[str, str], float]] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or m.group("name") != name:
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        try:
            out.append((labels, float(m.group("value"))))
        except ValueError:
            continue
    return out


def reconcile_passes(text: str, kind: str) -> Passes | None:
    """The histogram's sum and count for passes labelled kind=`kind`, or None if unlabelled/absent."""
    total = [v for labels, v in samples(text, f"{METRIC}_sum") if labels.get("kind") == kind]
    count = [v for labels, v in samples(text, f"{METRIC}_count") if labels.get("kind") == kind]
    if not total or not count:
        return None
    return Passes(sum(total), sum(count))


def unlabelled_passes(text: str) -> Passes | None:
    """Sum and count of reconcile passes without a kind label (today's daemon), for a note."""
    total = [v for labels, v in samples(text, f"{METRIC}_sum") if "kind" not in labels]
    count = [v for labels, v in samples(text, f"{METRIC}_count") if "kind" not in labels]
    if not total or not count:
        return None
    return Passes(sum(total), sum(count))
