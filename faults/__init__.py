"""The fault suite (`make faults`): issue 9's scenarios on the lab, on every backend.

- `harness`    one scenario on one backend: lab, 10 ms ping checker, kernel watch,
               before/after tables, the verdict as a `Row`.
- `scenarios`  1-13: store, host, gossip and dataplane faults.
- `extra`      14-16: hostile input, permissions and secrets, clock jumps.
- `storedump`  what the KV store holds, read inside a lab namespace.
- `__main__`   the runner: the table, and `faults/results/latest.json`.
"""
