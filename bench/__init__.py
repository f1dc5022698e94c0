"""overlayd's benchmarks, timed from the kernel, each beside a baseline from the same run.

    make bench           # everything, full scale (under 15 minutes on 2 cores), as root
    make bench-quick     # the same code at small scale, for development
    .venv/bin/python -m bench [--quick] [--only NAME,...] [--out DIR]

Every timing comes from `overlayd.lab.kwatch`: an rtnetlink listener in each
host namespace that stamps the moment an FDB or neighbour entry appears in
(or leaves) that kernel; clocks start when the client sends its request. The
only figures read from the daemon itself are the times of an incremental
no-op pass and a full verify, which are internal by nature.

The runner (`bench.__main__`) runs the benchmarks in `SUITE` order, writes
`bench/results/latest.json` (shape: `bench.report`), prints one table and
draws `bench/results/latest.png` (`bench.plot`).

A benchmark is a module with `NAME: str` and `run(ctx: Context) -> BenchResult`
(`bench.context`, `bench.report`): it builds or takes over labs through the
context, bounds every wait it makes, and reports "did not complete in X s
(N of M)" rather than hang. The whole run has a budget (`Scale.run_budget`,
14 minutes at full scale): a benchmark that would start after it is
reported as skipped, so each should stay within a minute or two. A module
listed in `SUITE` that does not exist yet is reported as missing; one with
another contract goes through `bench.adapters` (`bench.gossip_scale`, built
separately, offers `run(quick) -> dict`).
"""

# In the order they run: consecutive benchmarks hand labs over (see bench.context).
SUITE = (
    "gossip_scale",  # no lab: many gossip nodes in one process (bench/gossip_scale.py), on a quiet machine
    "coldstart",  # builds the biggest gossip lab, hands it to convergence
    "convergence",  # ends with the smallest gossip lab, which the next three take over
    "drift",
    "dataplane",
    "churn",  # gossip, then a new etcd lab
    "join",  # its etcd lab, with 10,000 endpoints, goes to idle
    "idle",
)
