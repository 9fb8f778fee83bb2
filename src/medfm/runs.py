"""Deprecated alias of :mod:`medfm.rundir` (kept while modules still import it; import medfm.rundir)."""

from medfm.rundir import environment, read_json, update_metrics, write_json

__all__ = ["environment", "read_json", "update_metrics", "write_json"]
