"""`run_benchmark`: our engine's rows, the floor and the peers, measured in one run, one process per row.

Order: the first row (main workload, float32) also builds the workloads and, when the keras-hub peer will run,
saves its model as a keras-hub preset; the float32 matmul rate is measured right after it (its config is then
known) and again after the last peer, and the floor uses their mean; then the other rows, then the peers. Rows run
one after another, never side by side, so they do not compete for the cores.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from batchgen.bench import peers as peer_registry
from batchgen.bench.floor import MatmulRate, flops_per_token, mean_context, measure_matmul_rate, prompt_flops
from batchgen.bench.machine import load_average, machine_info
from batchgen.bench.options import BenchOptions
from batchgen.bench.ours import EngineRun, PrepareWorkloads
from batchgen.bench.process import BenchStepError, run_json_process
from batchgen.bench.quality import agreement
from batchgen.bench.report import BenchReport, EngineRow, FloorFigures, PeerResult, PeerRun
from batchgen.bench.workloads import Workload
from model.config import LlamaConfig

REFERENCE_ROW = "main float32"


def _silent(message: str) -> None:
    del message


@contextlib.contextmanager
def _workdir(options: BenchOptions) -> Iterator[Path]:
    if options.workdir:
        path = Path(options.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        path = Path(tempfile.mkdtemp(prefix="batchgen-bench-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def gguf_file(preset: str) -> str | None:
    """The local GGUF file behind `preset` (a built-in name or a path), or None when it is not one."""
    from model.checkpoints.presets import BUILTIN_PRESETS, preset_location

    location = preset_location(preset) if preset in BUILTIN_PRESETS else preset
    return location if location.endswith(".gguf") and Path(location).is_file() else None


def generated_counts(workload: Workload, outputs: Mapping[str, Sequence[int]]) -> list[int]:
    """Tokens generated per request: its output, plus the stop token when it stopped before its budget."""
    counts = []
    for r in workload.requests:
        n = len(outputs[r.request_id])
        counts.append(n + 1 if workload.stop_token_ids and n < r.max_new_tokens else n)
    return counts


def _engine_runs(options: BenchOptions, work: Path, keras_hub_preset: Path | None) -> list[EngineRun]:
    main_path, variable_path = work / "workload_main.json", work / "workload_variable.json"
    prepare = PrepareWorkloads(
        main_path=str(main_path), main_prompts=options.prompts, main_max_new_tokens=options.max_new_tokens,
        variable_path=str(variable_path) if options.variable_prompts else None,
        variable_prompts=options.variable_prompts, variable_max_new_tokens=options.variable_max_new_tokens,
        seed=options.seed,
    )

    def run(name: str, path: Path, **kwargs) -> EngineRun:
        out = work / f"{name.replace(' ', '_')}.result.json"
        return EngineRun(
            name=name, preset=options.preset, workload_path=str(path), out=str(out), slots=options.slots,
            steps_per_call=options.steps_per_call, cache_tokens=options.cache_tokens, **kwargs,
        )

    runs = [run(REFERENCE_ROW, main_path, prepare=prepare,
                save_preset_to=str(keras_hub_preset) if keras_hub_preset else None)]
    if "bfloat16" in options.dtypes:
        runs.append(run("main bfloat16", main_path, dtype="bfloat16"))
    if "int8" in options.dtypes:
        runs.append(run("main int8", main_path, quantization="int8"))
    if options.variable_prompts:
        runs.append(run("variable continuous", variable_path, continuous=True))
        runs.append(run("variable static", variable_path, continuous=False))
    return runs


def _run_engine(run: EngineRun, work: Path, timeout: float) -> tuple[EngineRow, dict]:
    stem = Path(run.out).name.removesuffix(".result.json")
    spec = work / f"{stem}.spec.json"
    run.write(spec)
    result = run_json_process(
        [sys.executable, "-m", "batchgen.bench.ours", str(spec)], Path(run.out), work / f"{stem}.log", timeout,
        env={"KERAS_BACKEND": "jax"},
    )
    return EngineRow.from_dict(result["row"]), result["config"]


def _run_peer(
    peer: peer_registry.Peer, python: str, spec: dict, work: Path, timeout: float
) -> PeerResult:
    stem = peer.system.replace("-", "_")
    spec_path, out = work / f"peer_{stem}.spec.json", work / f"peer_{stem}.result.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}), encoding="utf-8")
    try:
        data = run_json_process([python, str(peer.script), str(spec_path)], out, work / f"peer_{stem}.log", timeout)
    except BenchStepError as e:
        # The log's last lines hold the exception; the whole log is in the workdir (--workdir keeps it).
        return PeerResult(peer.system, "failed", reason=" | ".join(str(e).strip().splitlines()[-3:])[:600])
    runs = [PeerRun(**run) for run in data.pop("runs")]
    return PeerResult(**data, runs=runs)


def _batches(requested: Sequence[int], prompts: int) -> list[int]:
    """Batch sizes capped at the number of prompts (a batch larger than the workload is the same run), deduplicated."""
    return sorted({min(b, prompts) for b in requested})


def run_benchmark(options: BenchOptions, log: Callable[[str], None] = _silent) -> BenchReport:
    """Measures our engine (and the peers, if asked) on the benchmark's workloads; see the module docstring.

    Example:
        >>> report = run_benchmark(BenchOptions.quick())  # doctest: +SKIP
        >>> print(report.render_text())  # doctest: +SKIP
    """
    started = time.perf_counter()
    machine = machine_info()
    with _workdir(options) as work:
        peers_wanted: list[tuple[peer_registry.Peer, dict]] = []
        results: list[PeerResult] = []
        keras_hub_preset: Path | None = None
        if options.peers:
            for peer in peer_registry.PEERS:
                reason = peer_registry.unavailable_reason(peer, options.peer_python)
                spec: dict = {"workload_path": str(work / "workload_main.json")}
                if reason is None and peer is peer_registry.TRANSFORMERS:
                    gguf = gguf_file(options.preset)
                    if gguf is None:
                        reason = f"transformers reads the same weights from a GGUF file; {options.preset!r} is not one"
                    spec.update(gguf_path=gguf, batches=_batches(options.transformers_batches, options.prompts))
                if reason is None and peer is peer_registry.KERAS_HUB:
                    keras_hub_preset = work / "keras_hub_preset"
                    batches = _batches(options.keras_hub_batches, options.prompts)
                    spec.update(preset_dir=str(keras_hub_preset), batches=batches)
                if reason is None:
                    peers_wanted.append((peer, spec))
                else:
                    log(f"{peer.system}: skipped: {reason}")
                    results.append(PeerResult(peer.system, "skipped", reason=reason))

        rows: list[EngineRow] = []
        config: LlamaConfig | None = None
        rates = []
        for run in _engine_runs(options, work, keras_hub_preset):
            load = load_average()
            log(f"running {run.name} (load average {load})")
            row, config_fields = _run_engine(run, work, options.timeout_seconds)
            row.load_average = load
            rows.append(row)
            log(f"  {row.tokens_per_second:.1f} generated tok/s, compile {row.warmup.compile_seconds:.1f} s, "
                f"peak RSS {row.peak_rss_bytes / 2**20:.0f} MB")
            if config is None:
                config = LlamaConfig(**config_fields)
                log(f"measuring the float32 matmul rate at {options.slots} rows")
                rates.append(measure_matmul_rate(config, options.slots, min_seconds=options.floor_seconds))

        workloads = {"main": Workload.read(work / "workload_main.json")}
        if options.variable_prompts:
            workloads["variable"] = Workload.read(work / "workload_variable.json")

        for peer, spec in peers_wanted:
            load = load_average()
            log(f"running peer {peer.system} with {options.peer_python} (load average {load})")
            results.append(_run_peer(peer, options.peer_python, spec, work, options.timeout_seconds))
            results[-1].load_average = load

        assert config is not None  # the reference row always runs
        log("measuring the float32 matmul rate again")
        rates.append(measure_matmul_rate(config, options.slots, min_seconds=options.floor_seconds))

    machine["load_after"] = load_average()
    floor = _score(rows, results, workloads, config, rates)
    order = {p.system: i for i, p in enumerate(peer_registry.PEERS)}
    results.sort(key=lambda p: order[p.system])
    return BenchReport(
        preset=options.preset, machine=machine, options=options.to_dict(),
        workloads={name: w.summary() for name, w in workloads.items()}, engine_rows=rows, floor=floor,
        peers=results, wall_seconds=time.perf_counter() - started,
    )


def _score(
    rows: list[EngineRow], peers: list[PeerResult], workloads: dict[str, Workload], config: LlamaConfig,
    rates: list[MatmulRate],
) -> FloorFigures:
    """Fills quality against float32, achieved FLOP/s and % of floor into the rows; returns the floor."""
    reference = next(r for r in rows if r.name == REFERENCE_ROW)
    rate = sum(r.flops_per_second for r in rates) / len(rates)
    contexts = {}
    for row in rows:
        workload = workloads[row.workload]
        if row.workload == reference.workload:
            row.identical_share, row.mean_prefix_tokens = agreement(row.outputs, reference.outputs)
        context = mean_context(workload.prompt_lengths(), generated_counts(workload, row.outputs))
        contexts[row.name] = context
        # The measured pass prefilled every prompt of the workload once and generated its tokens.
        work = prompt_flops(config, workload.prompt_lengths())
        work += row.steady.generated_tokens * flops_per_token(config, context).total
        row.achieved_flops_per_second = work / row.steady.wall_seconds
        row.floor_share = row.achieved_flops_per_second / rate
    for peer in peers:
        for run in peer.runs:
            run.identical_share, run.mean_prefix_tokens = agreement(run.outputs, reference.outputs)
    flops = flops_per_token(config, contexts[REFERENCE_ROW])
    main = workloads[reference.workload]
    prompt_share = prompt_flops(config, main.prompt_lengths()) / max(reference.steady.generated_tokens, 1)
    return FloorFigures(
        flops_per_token=flops.total, weight_flops=flops.weight_flops, attention_flops=flops.attention_flops,
        mean_context=flops.context, formula=flops.formula, rows=rates[0].rows, matmul_flops_per_second=rate,
        measurements=[r.to_dict() for r in rates], prompt_flops_per_token=prompt_share,
    )

