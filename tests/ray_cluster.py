"""A real multi-node Ray cluster on one machine, for the cluster tests: a head and worker nodes, each its own
`ray start --block` process tree on loopback.

Every node gets its own ports (all free ones picked at start, none of Ray's fixed defaults, so that another
Ray on this machine, e.g. another test run's, does not clash) and the cluster its own temp dir. A node is
stopped or killed through the pids of its own process tree, never with `ray stop`, which would stop every Ray
on the machine. Every wait is bounded.

Example:
    >>> with LocalCluster(tmp_path) as cluster:  # doctest: +SKIP
    ...     cluster.start_head()
    ...     a = cluster.add_node("a", num_cpus=1, resources={"node_a": 1})
    ...     cluster.wait_for_nodes(2)
    ...     cluster.kill(a)  # SIGKILL to the raylet and every worker of node a
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from collections.abc import Callable
from typing import Any

from tests.batch_fixtures import free_port

RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT = 120.0
# `ray start` gives its raylet a fixed 30 s to register with the GCS, which a busy 2-core machine can miss.
START_ATTEMPTS = 3
# The GCS marks a node dead after health checks fail for ~period x threshold: 1.5 s rather than Ray's 15 s
# default, so that a node-loss test waits seconds for Ray to notice, not minutes.
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}

# What drivers joining the cluster need in their environment too.
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled"}


@dataclasses.dataclass
class Node:
    """One `ray start --block` process (the node's processes are its descendants)."""

    name: str
    process: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        """The pids of this node's processes: `ray start`, its raylet (and GCS on the head), agents, workers."""
        return [self.process.pid, *_descendants(self.process.pid)]


class LocalCluster:
    """Starts and stops the nodes of one test cluster; `address` is the GCS address drivers join."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.temp_dir = self.root / "ray"  # Ray's session dirs; sockets must stay short, hence a short root
        self.nodes: dict[str, Node] = {}
        self.address = ""
        self.dashboard_url = ""
        self.ids: dict[str, str] = {}  # node ids by name, as a test last recorded them (kept after a node is lost)
        self.env = {**os.environ, **CLUSTER_ENV, "PATH": f"{Path(RAY).parent}:{os.environ['PATH']}"}
        for name in ("RAY_ADDRESS", "XLA_FLAGS"):
            self.env.pop(name, None)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start_head(self, num_cpus: int = 0) -> Node:
        """The head: GCS, dashboard (for the state API and job submission), by default no CPUs, so no workers."""

        def start() -> Node:
            port, dashboard = free_port(), free_port()
            self.address = f"127.0.0.1:{port}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard}"
            head = [
                "--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                f"--system-config={json.dumps(SYSTEM_CONFIG)}",
            ]
            return self._start("head", head, num_cpus)

        return self._retrying(start)

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None,
                 cpu_affinity: list[int] | None = None) -> Node:
        """A worker node joining the head, with one unit of the custom resource `node_resource(name)` besides
        `resources`; `cpu_affinity` pins all its processes to those cores (taskset)."""
        resources = {node_resource(name): 1, **(resources or {})}
        return self._retrying(lambda: self._start(name, [f"--address={self.address}"], num_cpus, resources, cpu_affinity))

    def _retrying(self, start: Callable[[], Node]) -> Node:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return start()
            except _StartFailed as failure:
                if attempt == START_ATTEMPTS:
                    self.stop()
                    raise RuntimeError(str(failure)) from None
        raise AssertionError("unreachable")

    def _start(self, name: str, role: list[str], num_cpus: int, resources: dict[str, float] | None = None,
               cpu_affinity: list[int] | None = None) -> Node:
        command = [
            RAY, "start", "--block", "--node-ip-address=127.0.0.1", *role, f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources or {})}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--object-store-memory=100000000", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        if cpu_affinity is not None:
            command = ["taskset", "-c", ",".join(map(str, cpu_affinity)), *command]
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, process, log)
        self.nodes[name] = node
        self._wait_started(node)
        return node

    def _wait_started(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while b"Ray runtime started" not in node.log.read_bytes():
            if node.process.poll() is not None or time.monotonic() > deadline:
                self._kill_all(node)
                self.nodes.pop(node.name)
                raise _StartFailed(f"ray node {node.name} did not start: {node.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The nodes the GCS holds alive, from the dashboard's state API."""
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard_url, detail=True) if n.state == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until exactly `count` nodes are alive (and the dashboard answers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.alive_nodes()) == count:
                    return
            except Exception:  # the dashboard is still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {count} alive nodes within {timeout:g} s")
            time.sleep(0.5)

    def node_ids(self) -> dict[str, str]:
        """The Ray node id of each alive node, by name ("head" and the names given to `add_node`)."""
        ids = {}
        for node in self.alive_nodes():
            if node.is_head_node:
                ids["head"] = node.node_id
            for name in self.nodes:
                if node_resource(name) in node.resources_total:
                    ids[name] = node.node_id
        return ids

    def kill(self, node: Node) -> None:
        """SIGKILL every process of `node` at once: the raylet, its agents and every worker on it (a lost machine)."""
        self._kill_all(node)
        self.nodes.pop(node.name, None)

    @staticmethod
    def _kill_all(node: Node) -> None:
        for pid in node.pids():
            _signal(pid, signal.SIGKILL)
        # Processes whose parent died first were re-parented away from the tree; they kept its process group.
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop every node: SIGTERM (ray start --block shuts its processes down), then SIGKILL what is left."""
        nodes = list(self.nodes.values())[::-1]  # worker nodes before the head
        pids = [pid for node in nodes for pid in node.pids()]
        for node in nodes:
            _signal(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in nodes:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for node in nodes:
            self._kill_all(node)
        self.nodes.clear()

    def dashboard_alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                return True
        except OSError:
            return False


class _StartFailed(RuntimeError):
    """A node's `ray start` ended or timed out before its node ran."""


def node_resource(name: str) -> str:
    """The custom resource that marks worker node `name` (a task can ask for it to land there)."""
    return f"node_{name}"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # The field after the command name (which may hold spaces) is the state, then the parent pid.
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
