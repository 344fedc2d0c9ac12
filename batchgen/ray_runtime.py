"""Where the job's Ray comes from: the one already running in this process, a cluster, or an embedded one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[str]:
    """Connect to Ray for the length of a job; yields how ("existing", "cluster <address>" or "embedded").

    - Ray already initialised in this process (a notebook, a test): use it and leave it running.
    - `address` given, or RAY_ADDRESS set (as under `ray job submit`): join that cluster.
    - Otherwise: start an embedded local Ray with `num_cpus` CPUs, and stop it afterwards.
    Worker output goes to Ray's log files rather than the terminal, which belongs to the progress bar.
    """
    if ray.is_initialized():
        yield "existing"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
        how = f"cluster {address}"
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        how = "embedded"
    try:
        yield how
    finally:
        ray.shutdown()
