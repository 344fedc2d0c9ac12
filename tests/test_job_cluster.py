"""The job on a real multi-node Ray cluster on this machine (tests/ray_cluster.py): a head with no CPUs and two
worker nodes, `a` and `b`, each its own raylet. Drivers are `batchgen run --address` subprocesses, as on a
real cluster; placement is read from Ray's state API. Run these alone with `pytest -m cluster`.

The module's cluster is shared; the tests that lose a node or the head come last, in that order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from batchgen.sink import Sink
from tests.batch_fixtures import TEST_XLA_CACHE, s3_server, tiny_preset, write_prompts  # noqa: F401
from tests.ray_cluster import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
# Each node's share of a custom device resource standing in for GPUs: a holds one 2-device replica, b none.
ACCEL = {"a": 3, "b": 1}
JOB_TIMEOUT = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="bgc-"))  # short: Ray's socket paths live below it
    with LocalCluster(root) as cluster:
        cluster.start_head()
        for name in "ab":  # one after the other: two raylets registering at once time out on a busy machine
            cluster.add_node(name, num_cpus=2, resources={"accel": ACCEL[name]})
        cluster.wait_for_nodes(3)
        cluster.ids = cluster.node_ids()  # kept: a node's id is still needed once it is lost
        yield cluster
    shutil.rmtree(root, ignore_errors=True)


def write_job(path: Path, input_url: str, output_url: str, preset: str, **sections: dict[str, Any]) -> Path:
    """A job spec file over columns `id` and `prompt` of a tiny model, with `sections` merged in."""
    tables: dict[str, dict[str, Any]] = {
        "model": {"preset": preset, "max_length": 64, "max_slots": 8},
        "input": {"url": input_url, "id_column": "id"},
        "sampling": {"sampler": "random", "seed": 3, "max_new_tokens": 4},
        "output": {"url": output_url},
        "execution": {"rows_per_shard": 3, "compilation_cache": TEST_XLA_CACHE},
    }
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values}
    text = "".join(
        f"[{name}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in table.items()) for name, table in tables.items()
    )
    path.write_text(text)
    return path


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)  # strings, numbers, booleans and lists of them read the same in TOML


def start_driver(cluster: LocalCluster, job: Path, faults: list[dict] | None = None) -> subprocess.Popen:
    """`batchgen run JOB --address <cluster> --json` in its own process; with `faults`, through
    `tests.run_with_faults`, which slows or breaks shards."""
    command = ["run", str(job), "--address", cluster.address, "--no-progress", "--json"]
    entry = ["batchgen.cli"] if not faults else ["tests.run_with_faults", json.dumps(faults)]
    return subprocess.Popen([sys.executable, "-m", *entry, *command], cwd=ROOT, env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(driver: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> tuple[int, dict[str, Any] | None, str]:
    """Wait for a driver; its exit code, its JSON summary (None when it printed none) and its stderr."""
    try:
        out, err = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        out, err = driver.communicate()
        pytest.fail(f"the driver did not end within {timeout} s: {err[-3000:]}")
    # Ray may print on stdout too (a warning when a node is lost): the summary is the JSON object in it.
    start = out.find("{\n")
    summary = json.JSONDecoder().raw_decode(out, start)[0] if start >= 0 else None
    return driver.returncode, summary, err + out


def run_to_end(cluster: LocalCluster, job: Path, faults: list[dict] | None = None) -> dict[str, Any]:
    code, summary, err = finish(start_driver(cluster, job, faults))
    assert code == 0 and summary is not None, err[-3000:]
    return summary


def worker_nodes(cluster: LocalCluster) -> dict[int, str]:
    """Node name of every batchgen worker this cluster ran (alive or dead), by pid, from Ray's state API."""
    from ray.util.state import list_actors

    names = {node_id: name for name, node_id in cluster.ids.items()}
    # A job run with faults runs them as FaultyShardWorker, the ShardWorker that fires them.
    actors = list_actors(address=cluster.dashboard_url, limit=10_000)
    workers = [a for a in actors if a.class_name in ("ShardWorker", "FaultyShardWorker")]
    return {actor.pid: names[actor.node_id] for actor in workers if actor.pid and actor.node_id}


def wait_for_commits(sink: Sink, driver: subprocess.Popen, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(sink.committed()) < count:
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"fewer than {count} shards committed within {timeout} s"
        time.sleep(0.2)


def assert_exactly_once(sink: Sink, rows: int) -> None:
    table = sink.read_output()
    assert sorted(table["id"].to_pylist()) == list(range(rows))


def test_workers_spread_over_nodes_and_write_one_s3_output(tmp_path, cluster, tiny_preset, s3_server):
    bucket = f"cluster-{uuid.uuid4().hex[:12]}"
    s3 = fsspec.filesystem("s3", **s3_server)
    s3.mkdir(bucket)
    rows = 12
    write_prompts(f"{bucket}/in/p.parquet", [f"prompt {i}" for i in range(rows)], ids=range(rows), filesystem=s3)
    storage = {"storage_options": s3_server}
    job = write_job(
        tmp_path / "job.toml", f"s3://{bucket}/in/", f"s3://{bucket}/out", tiny_preset,
        input=storage, output=storage, execution={"replicas": 2, "rows_per_shard": 2},
    )
    # Each shard waits 2 s before it starts, so that the first worker up cannot take every shard alone.
    summary = run_to_end(cluster, job, [{"action": "delay", "shard": -1, "attempts": [], "seconds": 2}])

    assert summary["shards_committed"] == 6 and summary["rows_ok"] == rows
    # Placement: the two replicas run on the two worker nodes, one each (nodes a and b both have room for
    # both, so only spreading puts them apart), and none on the head.
    placement = worker_nodes(cluster)
    sink = Sink(f"s3://{bucket}/out", s3_server)
    entries = sink.committed().values()
    assert sorted(placement[entry["worker_pid"]] for entry in {e["worker_pid"]: e for e in entries}.values()) == ["a", "b"]
    # Parts written by both nodes' workers land whole on the shared store, every row once, then _SUCCESS.
    assert_exactly_once(sink, rows)
    assert sink.succeeded()


def test_a_replicas_devices_come_from_one_node(tmp_path, cluster, tiny_preset):
    rows = 6
    data = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(rows)], ids=range(rows), row_group_size=3)
    # 2 replicas x 2 "accel" devices: the cluster has 4 (a: 3, b: 1), but only node a holds 2 on one node. A
    # replica split over nodes would run a second worker on a 1 + b 1; a replica stays on one node, so only one.
    job = write_job(
        tmp_path / "job.toml", data, str(tmp_path / "out"), tiny_preset,
        model={"devices_per_replica": 2, "device_resource": "accel"}, execution={"replicas": 2},
    )
    summary = run_to_end(cluster, job)

    assert summary["rows_ok"] == rows and summary["shards_failed"] == 0
    from ray.util.state import list_actors

    pids = {entry["worker_pid"] for entry in Sink(str(tmp_path / "out")).committed().values()}
    actors = {a.pid: a for a in list_actors(address=cluster.dashboard_url, detail=True, limit=10_000) if a.pid in pids}
    assert len(actors) == len(pids) >= 1
    # Every worker that wrote a shard ran on node a, holding 2 accel there; none ever ran on b.
    assert {actor.node_id for actor in actors.values()} == {cluster.ids["a"]}, summary
    assert all(actor.required_resources.get("accel") == 2 for actor in actors.values())


def test_losing_a_worker_node_requeues_its_shards_and_every_row_comes_out_once(tmp_path, cluster, tiny_preset):
    rows = 24
    data = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(rows)], ids=range(rows), row_group_size=3)
    job = write_job(tmp_path / "job.toml", data, str(tmp_path / "out"), tiny_preset, execution={"replicas": 2})
    # 8 shards, each 3 s or more: when node b is lost, its worker is in the middle of one.
    driver = start_driver(cluster, job, [{"action": "delay", "shard": -1, "attempts": [], "seconds": 3}])
    sink = Sink(str(tmp_path / "out"))
    wait_for_commits(sink, driver, 2)
    on_b = [pid for pid, node in worker_nodes(cluster).items() if node == "b"]
    assert on_b, "no worker ran on node b before it was lost"
    cluster.kill(cluster.nodes["b"])  # its raylet, agents and every worker on it, by pid, SIGKILL
    code, summary, err = finish(driver)

    assert code == 0, err[-3000:]
    assert summary["shards_committed"] == 8 and summary["shards_failed"] == 0
    assert summary["shards_retried"] >= 1 and summary["workers_replaced"] >= 1
    placement = worker_nodes(cluster)
    entries = sink.committed().values()
    # The shard that was on b when it died finished on a, on a later attempt.
    retried = [e for e in entries if e["attempt"] > 1]
    assert retried and all(placement[e["worker_pid"]] == "a" for e in retried)
    assert_exactly_once(sink, rows)
    assert sink.succeeded()


def test_losing_the_head_ends_the_driver_clearly_and_a_fresh_cluster_resumes(tmp_path, cluster, tiny_preset):
    rows = 24
    data = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(rows)], ids=range(rows), row_group_size=3)
    job = write_job(tmp_path / "job.toml", data, str(tmp_path / "out"), tiny_preset, execution={"replicas": 1})
    # 8 shards of 4 s or more on one worker: the job is far from done when the head goes.
    driver = start_driver(cluster, job, [{"action": "delay", "shard": -1, "attempts": [], "seconds": 4}])
    sink = Sink(str(tmp_path / "out"))
    wait_for_commits(sink, driver, 1)
    cluster.kill(cluster.nodes["head"])
    killed = time.monotonic()
    with LocalCluster(Path(tempfile.mkdtemp(prefix="bgc-"))) as fresh:
        # The fresh cluster's head starts while the old driver notices its loss.
        fresh.start_head()
        code, summary, err = finish(driver, timeout=120)
        assert code == 1 and summary is None
        assert "lost the Ray cluster" in err and "resume" in err, err[-3000:]
        assert time.monotonic() - killed < 90
        cluster.kill(cluster.nodes["a"])  # the rest of the old cluster, its orphaned worker with it
        before = sink.committed()
        assert 1 <= len(before) < 8 and not sink.succeeded()

        fresh.add_node("a", num_cpus=2)
        fresh.wait_for_nodes(2)
        again = run_to_end(fresh, job)
    assert again["shards_skipped"] == len(before) and again["shards_run"] == 8 - len(before)
    after = sink.committed()
    assert all(after[shard_id] == entry for shard_id, entry in before.items())  # not regenerated
    assert_exactly_once(sink, rows)
    assert sink.succeeded()
