"""The daemon: one process per host, wiring the core, the cluster and the dataplane.

- `main`        `overlayd` itself: start-up order, tasks, the one shutdown path;
- `engine`      a change's path from admission to the reconciler, with gauges;
- `operations`  the admin API's changes (networks, endpoints, teardown);
- `report`      what the daemon says about itself (/status, peers, lists, diff);
- `registry`    the endpoints this host owns, on local disk;
- `runstate`    where the daemon stands, shared by its parts;
- `sdnotify`    systemd's notify protocol (READY, STATUS, WATCHDOG).
"""
