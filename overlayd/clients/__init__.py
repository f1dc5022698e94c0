"""Clients of the admin API: `overlayctl` (cli, doctor, completion) and the CNI plugin (cni).

They import nothing of the daemon but the API's client and schema (checked by
the import contracts in pyproject.toml).
"""
