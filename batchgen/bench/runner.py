"""`run_benchmark`: our engine's rows, the floor and the peers, measured in one run, one process per row.

Order: the first row (main workload, float32) also builds the workloads (main, short, variable) and, when the
keras-hub peer will run, saves its model as a keras-hub preset; the float32 matmul rate is measured right after it
(its config is then known) and again after the last peer, and the floor uses their mean; then the other rows, then
the peers. Rows run one after another, never side by side, so they do not compete for the cores.
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
RESPONSE_FORMAT_ROW = "response_format"  # suffix of the row with structured output (BenchOptions.response_format)


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


def _workload_paths(options: BenchOptions, work: Path) -> dict[str, Path]:
    """The workloads this run builds, by name, and where their JSON goes."""
    paths = {"main": work / "workload_main.json"}
    if options.short_prompts:
        paths["short"] = work / "workload_short.json"
    if options.variable_prompts:
        paths["variable"] = work / "workload_variable.json"
    return paths


def _engine_runs(options: BenchOptions, work: Path, keras_hub_preset: Path | None) -> list[EngineRun]:
    paths = _workload_paths(options, work)
    prepare = PrepareWorkloads(
        main_path=str(paths["main"]), main_prompts=options.prompts, main_max_new_tokens=options.max_new_tokens,
        variable_path=str(paths["variable"]) if "variable" in paths else None,
        variable_prompts=options.variable_prompts, variable_max_new_tokens=options.variable_max_new_tokens,
        seed=options.seed, short_path=str(paths["short"]) if "short" in paths else None,
        short_prompts=options.short_prompts, short_max_new_tokens=options.short_max_new_tokens,
    )

    def run(name: str, path: Path, **kwargs) -> EngineRun:
        out = work / f"{name.replace(' ', '_')}.result.json"
        return EngineRun(
            name=name, preset=options.preset, workload_path=str(path), out=str(out), slots=options.slots,
            steps_per_call=options.steps_per_call, cache_tokens=options.cache_tokens, **kwargs,
        )

    runs = [run(REFERENCE_ROW, paths["main"], prepare=prepare,
                save_preset_to=str(keras_hub_preset) if keras_hub_preset else None)]
    # One row per dtype on each workload that stops at end of turn; "<workload> float32" is each one's reference.
    for workload in ("main", "short"):
        if workload not in paths:
            continue
        for dtype in options.dtypes:
            name = f"{workload} {dtype}"
            if name == REFERENCE_ROW:
                continue
            settings = {"int8": {"quantization": "int8"}, "bf16-cache": {"cache_dtype": "bfloat16"}}.get(
                dtype, {"dtype": dtype}
            )
            runs.append(run(name, paths[workload], **settings))
    if options.response_format is not None:
        runs.append(run(f"short float32 {RESPONSE_FORMAT_ROW}", paths["short"], response_format=options.response_format))
    if "variable" in paths:
        runs.append(run("variable continuous", paths["variable"], continuous=True))
        runs.append(run("variable static", paths["variable"], continuous=False))
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
    stem = peer.system.replace("-", "_").replace(" ", "_")
    spec_path, out = work / f"peer_{stem}.spec.json", work / f"peer_{stem}.result.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}), encoding="utf-8")
    try:
        data = run_json_process([python, str(peer.script), str(spec_path)], out, work / f"peer_{stem}.log", timeout)
    except BenchStepError as e:
        # The log's last lines hold the exception; the whole log is in the workdir (--workdir keeps it).
        return PeerResult(peer.system, "failed", reason=" | ".join(str(e).strip().splitlines()[-3:])[:600])
    runs = [PeerRun(**run) for run in data.pop("runs")]
    return PeerResult(**data, runs=runs)


def peer_specs(
    options: BenchOptions, work: Path, keras_hub_preset: Path
) -> tuple[list[tuple[peer_registry.Peer, str, dict]], list[PeerResult]]:
    """(peer, interpreter, SPEC.json without "out") for each peer to run, and a skipped result for each other one.

    Peers run every workload that stops at end of turn (main, and short unless left out) on the same prompt ids.
    """
    paths = _workload_paths(options, work)
    prompts = {"main": options.prompts, "short": options.short_prompts}
    gguf = gguf_file(options.preset)
    wanted, skipped = [], []
    for peer in peer_registry.PEERS:
        python = options.interpreter[peer.interpreter]
        if peer_registry.skipped_by(peer, options.skip_peers):
            reason = "left out by --skip-peers"
        else:
            reason = peer_registry.unavailable_reason(peer, python)
        if peer is peer_registry.KERAS_HUB:
            requested = options.keras_hub_batches
            spec: dict = {"preset_dir": str(keras_hub_preset)}
        else:
            # CTranslate2 and vLLM take as many prompts at once as our engine has slots.
            requested = options.transformers_batches if peer is peer_registry.TRANSFORMERS else (options.slots,)
            spec = {"gguf_path": gguf, "cache_dir": options.peer_cache_dir, **dict(peer.settings)}
            if reason is None and gguf is None:
                reason = f"{peer.system} reads the same weights from a GGUF file; {options.preset!r} is not one"
        spec["workloads"] = [
            {"path": str(paths[name]), "batches": _batches(requested, prompts[name])}
            for name in ("main", "short") if name in paths
        ]
        if reason is None:
            wanted.append((peer, python, spec))
        else:
            skipped.append(PeerResult(peer.system, "skipped", reason=reason))
    return wanted, skipped


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
        peers_wanted: list[tuple[peer_registry.Peer, str, dict]] = []
        results: list[PeerResult] = []
        keras_hub_preset: Path | None = None
        if options.peers:
            peers_wanted, results = peer_specs(options, work, work / "keras_hub_preset")
            for result in results:
                log(f"{result.system}: skipped: {result.reason}")
            if any(peer is peer_registry.KERAS_HUB for peer, _, _ in peers_wanted):
                keras_hub_preset = work / "keras_hub_preset"

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

        workloads = {name: Workload.read(path) for name, path in _workload_paths(options, work).items()}

        for peer, python, spec in peers_wanted:
            load = load_average()
            log(f"running peer {peer.system} with {python} (load average {load})")
            results.append(_run_peer(peer, python, spec, work, options.timeout_seconds))
            results[-1].load_average = load
            for run in results[-1].runs:
                log(f"  {run.workload} batch {run.batch}: {run.tokens_per_second:.1f} generated tok/s")
            if results[-1].status != "ran":
                log(f"  {results[-1].status}: {results[-1].reason}")

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
    # Each workload's float32 row is the reference for every other row and peer run on that workload.
    references = {r.workload: r for r in rows if r.name == f"{r.workload} float32"}
    rate = sum(r.flops_per_second for r in rates) / len(rates)
    contexts = {}
    for row in rows:
        workload = workloads[row.workload]
        if row.workload in references and row.response_format is None:
            row.identical_share, row.mean_prefix_tokens = agreement(row.outputs, references[row.workload].outputs)
        context = mean_context(workload.prompt_lengths(), generated_counts(workload, row.outputs))
        contexts[row.name] = context
        # The measured pass prefilled every prompt of the workload once and generated its tokens.
        work = prompt_flops(config, workload.prompt_lengths())
        work += row.steady.completion_tokens * flops_per_token(config, context).total
        row.achieved_flops_per_second = work / row.steady.wall_seconds
        row.floor_share = row.achieved_flops_per_second / rate
    for peer in peers:
        for run in peer.runs:
            if run.workload in references:
                run.identical_share, run.mean_prefix_tokens = agreement(run.outputs, references[run.workload].outputs)
    flops = flops_per_token(config, contexts[REFERENCE_ROW])
    main = workloads[reference.workload]
    prompt_share = prompt_flops(config, main.prompt_lengths()) / max(reference.steady.completion_tokens, 1)
    return FloorFigures(
        flops_per_token=flops.total, weight_flops=flops.weight_flops, attention_flops=flops.attention_flops,
        mean_context=flops.context, formula=flops.formula, rows=rates[0].rows, matmul_flops_per_second=rate,
        measurements=[r.to_dict() for r in rates], prompt_flops_per_token=prompt_share,
    )

