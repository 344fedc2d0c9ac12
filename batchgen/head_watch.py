"""Noticing that the Ray cluster's head is gone, so that a driver ends with a clear error instead of Ray's.

A driver that joined a cluster keeps running while its head (the GCS) is down: worker actors talk to it
directly, so shards may still finish. But no replacement worker can start and no death can be learnt, and after
`gcs_rpc_server_reconnect_timeout_s` (60 s by default) Ray's own core worker terminates the driver process
with a message about the GCS that says nothing of the job. `HeadWatch` asks the GCS for its node table once a
second and raises ClusterLostError once it has not answered for `lost_after` seconds: before Ray's timeout, yet
long after a GCS restart under fault tolerance (KubeRay with an external Redis) has come back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batchgen.errors import ClusterLostError

# Seconds without an answer from the GCS after which the cluster counts as lost (a third of Ray's default
# reconnect timeout, so the driver says so itself before Ray ends it).
HEAD_LOST_SECONDS = 20.0
# Seconds between probes, and how long one probe waits.
PROBE_EVERY = 1.0
PROBE_TIMEOUT = 2.0


def gcs_answers() -> bool:
    """Whether the GCS of the Ray this process joined answers a node-table request within PROBE_TIMEOUT."""
    import ray

    try:
        # Ray has no public liveness call; the driver's own GCS client with a timeout is the cheapest probe.
        ray._private.worker.global_worker.gcs_client.get_all_node_info(timeout=PROBE_TIMEOUT)
    except Exception:  # any failure to get an answer is the same to us: no answer
        return False
    return True


class HeadWatch:
    """Raises ClusterLostError from `check()` once the head has not answered for `lost_after` seconds.

    Example:
        >>> watch = HeadWatch()  # doctest: +SKIP
        >>> watch.check()  # in the driver's loop; cheap: probes at most once per PROBE_EVERY  # doctest: +SKIP
    """

    def __init__(
        self,
        lost_after: float = HEAD_LOST_SECONDS,
        probe: Callable[[], bool] = gcs_answers,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lost_after = lost_after
        self.probe = probe
        self.clock = clock
        self.last_answer = clock()
        self.last_probe = float("-inf")
        self.lost = False

    def check(self) -> None:
        now = self.clock()
        if now - self.last_probe < PROBE_EVERY:
            return
        self.last_probe = now
        if self.probe():
            self.last_answer = self.clock()
            return
        silent = self.clock() - self.last_answer
        if silent >= self.lost_after:
            self.lost = True
            raise ClusterLostError(
                f"lost the Ray cluster: its head (GCS) has not answered for {silent:.0f} s. Committed shards are "
                "kept; run the same command again against a running cluster to resume"
            )
