"""Running and validating a whole job: plan, claim the output, drive the workers on Ray, summarise.

Example:
    >>> from batchgen.spec import load_spec
    >>> summary = run_job(load_spec("jobs/demo.toml"), progress=True)  # doctest: +SKIP
    >>> print(summary.render())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from rich.console import Console

from batchgen.driver import DriverReport, ShardDriver
from batchgen.errors import SpecError, WorkerStartError
from batchgen.faults import FaultPlan, FaultyShardWorker
from batchgen.manifest import ShardResult
from batchgen.planning import Plan, Shard, plan_job
from batchgen.progress import JobProgress
from batchgen.ray_runtime import ray_session
from batchgen.sink import Sink, job_record
from batchgen.spec import JobSpec
from batchgen.summary import JobSummary, summarize
from batchgen.worker import ShardWorker


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    console: Console | None = None,
    faults: FaultPlan | None = None,
) -> JobSummary:
    """Run `spec` to the end and return its summary (also written to `_summary.json`).

    Shards committed by an earlier run of the same job are skipped. `address` joins a Ray cluster (else
    RAY_ADDRESS, else an embedded local Ray; a Ray already initialised in this process is used as it is).
    Raises SpecError / InputError / OutputConflictError before any work starts, WorkerStartError when no
    worker can load the model; shards that fail are reported in the summary, not raised. `faults` is for tests:
    a `FaultPlan` (batchgen.faults) whose faults the workers fire.
    """
    started = time.monotonic()
    plan = plan_job(spec)
    sink = Sink.for_output(spec.output)
    record = job_record(spec.fingerprint(), spec.to_dict(), spec.source, [_shard_record(s) for s in plan.shards])
    committed = dict(sink.prepare(record, overwrite))
    skipped = len(committed)
    pending = [shard for shard in plan.shards if shard.shard_id not in committed]
    report = DriverReport()
    total = plan.total_rows * spec.outputs_per_row
    done = sum(ShardResult.from_entry(entry).output_rows for entry in committed.values())
    with JobProgress(total, done, enabled=progress, console=console) as bar:
        for warning in plan.warnings:
            bar.note(warning)
        if pending:
            with ray_session(address, num_cpus=spec.execution.replicas * spec.model.devices_per_replica) as how:
                # A test's fault plan runs FaultyShardWorkers, which fire its faults around the real work.
                if faults and faults.faults:
                    actor_class, worker_args = ray.remote(FaultyShardWorker), (spec, plan.schema, faults)
                else:
                    actor_class, worker_args = ray.remote(ShardWorker), (spec, plan.schema)
                options = _worker_resources(spec)
                _check_placeable(options, how, bar.note)

                def start_worker() -> Any:
                    return actor_class.options(**options, max_restarts=0).remote(*worker_args)

                def on_result(result: ShardResult) -> None:
                    entry = result.manifest_entry()
                    sink.commit(entry)
                    committed[result.shard_id] = entry
                    bar.shard_done(result)

                report = ShardDriver(start_worker, spec.execution, on_result, bar.note).run(pending)
    summary = summarize(spec, plan, committed, skipped, report, started, time.monotonic())
    sink.finish(summary.to_dict(), summary.exit_code == 0, [shard.shard_id for shard in plan.shards])
    return summary


@dataclasses.dataclass(frozen=True)
class Validation:
    """What `validate_job` found: the plan, the state of the output location, and warnings."""

    spec: JobSpec
    plan: Plan
    committed_shards: int
    warnings: tuple[str, ...]

    def render(self) -> str:
        plan, spec = self.plan, self.spec
        names = ", ".join(config.name for config in spec.sampling)
        if self.committed_shards:
            output = f"holds this job: {self.committed_shards} of {len(plan.shards)} shards committed (a run resumes)"
        else:
            output = "free for this job"
        lines = [
            f"spec {spec.source}: ok (fingerprint {spec.fingerprint()})",
            *(f"  model   {m.preset} ({m.dtype}, quantization {m.quantization})"
              + (f" as {m.name!r}" if spec.model_sweep else "") for m in spec.models),
            f"  task    {spec.task.kind}" + (f", metric {spec.task.metric}" if spec.task.metric != "none" else ""),
            f"  input   {len(plan.files)} file(s), {plan.total_rows} rows -> {len(plan.shards)} shards",
            f"  samples {spec.outputs_per_row} output rows per input row (configurations: {names}) -> "
            f"{plan.total_rows * spec.outputs_per_row} output rows",
            f"  output  {spec.output.url}: {output}",
        ]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def validate_job(spec: JobSpec, *, check_model: bool = True) -> Validation:
    """Check the spec, the input (footers and columns) and the output location, without loading the model.

    Raises SpecError, InputError or OutputConflictError (all exit code 2 on the command line).
    """
    warnings: list[str] = []
    if check_model:
        warnings += _check_preset(spec)
    plan = plan_job(spec)
    sink = Sink.for_output(spec.output)
    resuming = sink.check_owner(spec.fingerprint())
    committed = 0
    if resuming:
        planned = {shard.shard_id for shard in plan.shards}
        committed = len(planned & sink.committed().keys())
    return Validation(spec, plan, committed, tuple(warnings) + plan.warnings)


def _shard_record(shard: Shard) -> dict[str, Any]:
    return {
        "shard_id": shard.shard_id,
        "index": shard.index,
        "file_url": shard.file_url,
        "row_start": shard.row_start,
        "row_stop": shard.row_stop,
        "rows": shard.num_rows,
    }


def _worker_resources(spec: JobSpec) -> dict[str, Any]:
    """Each worker asks for its replica's devices in one actor's resource request, so they come from one node.

    Ray places an actor whole on one node, so the devices of a replica (all devices_per_replica of them, GPUs,
    CPUs or the custom resource `model.device_resource`) are never split across machines; a replica that no
    node can hold stays pending while the others work. Replicas spread over the nodes (SPREAD) rather than
    packing onto the first: that is what gives a job more memory bandwidth and host cores per replica.

    On CPUs a model split over N devices needs N host devices in the worker's JAX, which XLA only creates when
    told before JAX starts: the flag goes into the actor's environment. It only shapes JAX's host platform, so
    it is set for custom resources too (stand-ins for accelerators in tests, or TPUs, where it is harmless).
    """
    devices = spec.model.devices_per_replica
    resource = spec.model.device_resource or ("GPU" if ray.cluster_resources().get("GPU", 0) > 0 else "CPU")
    options: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
    if resource == "GPU":
        return {**options, "num_gpus": devices, "num_cpus": 1}
    if resource == "CPU":
        options["num_cpus"] = devices
    else:
        options.update(num_cpus=1, resources={resource: devices})
    if devices > 1:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        options["runtime_env"] = {"env_vars": {"XLA_FLAGS": flags}}
    return options


def _check_placeable(options: dict[str, Any], how: str, note: Callable[[str], None]) -> None:
    """Say so when no node can hold one worker: Ray would keep it pending, and the job would wait forever.

    On a Ray this job started itself nothing can join later, so that is an error; on a cluster an autoscaler
    may still add a node that fits, so it is a note.
    """
    wanted = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    wanted = {name: amount for name, amount in wanted.items() if amount}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(name, 0) >= amount for name, amount in wanted.items()) for node in nodes):
        return
    message = f"no node of this Ray holds one worker's resources {wanted} (nodes: {nodes})"
    if how == "embedded":
        raise WorkerStartError(f"{message}; on one machine, model.device_resource can only be CPU or GPU")
    note(f"{message}; workers wait until a node that does joins")


def _check_preset(spec: JobSpec) -> list[str]:
    """Raise SpecError when model.preset cannot load here, resolved as a worker would (built-in name, hub
    handle, local path or fsspec URL; no weights read); warn when it loads only after a download."""
    from model.checkpoints.availability import check_preset
    from model.checkpoints.presets import BUILTIN_PRESETS

    preset = spec.model.preset
    looks_like_path = "/" in preset or "\\" in preset or "://" in preset or preset.endswith(".gguf")
    if not looks_like_path and preset not in BUILTIN_PRESETS:
        names = ", ".join(BUILTIN_PRESETS)
        raise SpecError(f"{spec.source}: model.preset {preset!r} is no built-in preset ({names}) nor a path")
    found = check_preset(preset)
    if found.problem is not None:
        raise SpecError(f"{spec.source}: model.preset {preset!r} cannot load here: {found.problem}")
    if not found.offline:
        return [f"model.preset {preset!r} comes from {found.source}; each worker downloads it when it loads"]
    return []
