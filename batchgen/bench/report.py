"""What a benchmark run measured, as dataclasses, a rich table and JSON.

Every figure here comes from one run of `run_benchmark`: our engine's rows, the peers' rows and the floor were
measured side by side, so their ratios mean something even on a busy machine (the load average before and after
is part of the report).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text


@dataclasses.dataclass
class PassFigures:
    """One pass of a workload through the engine: wall time and the engine's own counters."""

    wall_seconds: float
    first_result_seconds: float
    prompt_tokens: int  # computed by prefill: the workload's, less those prompt sharing copied
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_calls: int
    programs_compiled: int
    compile_seconds: float
    prompt_tokens_shared: int = 0  # copied from cached pages instead of computed (`prefix_cache.py`)


@dataclasses.dataclass
class EngineRow:
    """Our engine on one workload in one configuration (its own process), warm-up pass then steady pass."""

    name: str
    workload: str
    dtype: str
    quantization: str | None
    continuous: bool
    slots: int
    steps_per_call: int
    max_length: int
    load_seconds: float
    warmup: PassFigures
    steady: PassFigures
    peak_rss_bytes: int
    outputs: dict[str, list[int]] = dataclasses.field(default_factory=dict, repr=False)
    response_format: str | None = None  # structured output: its text differs from float32's by design
    cache_dtype: str | None = None  # the KV cache's dtype, as the engine allocated it
    # Filled by the runner:
    load_average: str = ""  # 1, 5 and 15 minute load averages as the row started (above the core count: noisy)
    identical_share: float | None = None  # share of prompts whose greedy output equals float32's
    mean_prefix_tokens: float | None = None  # mean tokens the output shares with float32's from the start
    achieved_flops_per_second: float | None = None
    floor_share: float | None = None  # achieved FLOP/s over the measured float32 matmul rate

    @property
    def tokens_per_second(self) -> float:
        return self.steady.completion_tokens / self.steady.wall_seconds

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.steady.prompt_tokens / self.steady.prefill_seconds if self.steady.prefill_seconds else 0.0

    @property
    def compile_wall_seconds(self) -> float:
        """Warm-up wall time minus steady wall time: what compiling (and first touches) cost end to end. The
        weights' decode layout and the KV cache are built before it, while loading (`GenerationEngine.prepare`)."""
        return self.warmup.wall_seconds - self.steady.wall_seconds

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("outputs")
        data.update(tokens_per_second=self.tokens_per_second, prefill_tokens_per_second=self.prefill_tokens_per_second,
                    compile_wall_seconds=self.compile_wall_seconds)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineRow":
        data = dict(data)
        data["warmup"], data["steady"] = PassFigures(**data["warmup"]), PassFigures(**data["steady"])
        return cls(**data)


@dataclasses.dataclass
class PeerRun:
    """One peer system at one batch size on one workload (after its warm-up)."""

    batch: int
    wall_seconds: float
    first_result_seconds: float
    prompt_tokens: int
    completion_tokens: int
    outputs: dict[str, list[int]] = dataclasses.field(default_factory=dict, repr=False)
    workload: str = "main"
    identical_share: float | None = None  # against our float32 outputs on the same workload: the same work was done
    mean_prefix_tokens: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.wall_seconds

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("outputs")
        data["tokens_per_second"] = self.tokens_per_second
        return data


@dataclasses.dataclass
class PeerResult:
    """A peer system that ran (`runs` per batch size) or was skipped / failed (`status` and `reason`)."""

    system: str
    status: str  # "ran" | "skipped" | "failed"
    reason: str = ""
    version: str = ""
    notes: str = ""
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0  # the first (untimed) pass: compile for keras-hub, allocator warm-up for torch
    peak_rss_bytes: int = 0
    runs: list[PeerRun] = dataclasses.field(default_factory=list)
    load_average: str = ""  # when the peer started

    @property
    def best(self) -> PeerRun | None:
        """The fastest run on the main workload."""
        return self.best_on("main")

    def best_on(self, workload: str) -> PeerRun | None:
        """The fastest run on `workload` (None when the peer did not run it)."""
        runs = [r for r in self.runs if r.workload == workload]
        return max(runs, key=lambda r: r.tokens_per_second, default=None)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["runs"] = [run.to_dict() for run in self.runs]
        return data


@dataclasses.dataclass
class FloorFigures:
    """FLOPs per generated token on the main workload and the measured float32 matmul rate."""

    flops_per_token: float
    weight_flops: int
    attention_flops: float
    mean_context: float
    formula: str
    rows: int
    matmul_flops_per_second: float  # mean of the measurements before and after the rows
    measurements: list[dict[str, Any]]  # each MatmulRate.to_dict()
    prompt_flops_per_token: float = 0.0  # the main workload's prompt FLOPs over its generated tokens

    @property
    def floor_tokens_per_second(self) -> float:
        """Generated tokens/s at the matmul rate if the prompts cost nothing: the decode-only ceiling."""
        return self.matmul_flops_per_second / self.flops_per_token

    @property
    def workload_floor_tokens_per_second(self) -> float:
        """Generated tokens/s at the matmul rate with the prompts' prefill paid for: what "% of floor" uses."""
        return self.matmul_flops_per_second / (self.flops_per_token + self.prompt_flops_per_token)


@dataclasses.dataclass
class BenchReport:
    """Everything one `run_benchmark` call measured."""

    preset: str
    machine: dict[str, Any]  # cpu, cores, memory, load averages before / after, library versions
    options: dict[str, Any]
    workloads: dict[str, str]  # name -> one-line description
    engine_rows: list[EngineRow]
    floor: FloorFigures | None
    peers: list[PeerResult]
    wall_seconds: float = 0.0

    def row(self, name: str) -> EngineRow | None:
        return next((r for r in self.engine_rows if r.name == name), None)

    def ratios(self, workload: str = "main") -> dict[str, float]:
        """Our float32 tokens/s on `workload` over each peer's best batch there."""
        ours = self.row(f"{workload} float32")
        if ours is None:
            return {}
        best = {p.system: p.best_on(workload) for p in self.peers}
        return {system: ours.tokens_per_second / run.tokens_per_second for system, run in best.items() if run}

    def continuous_speedup(self) -> float | None:
        """Continuous over static batching on the variable workload, in generated tokens/s."""
        cont, static = self.row("variable continuous"), self.row("variable static")
        if cont is None or static is None:
            return None
        return cont.tokens_per_second / static.tokens_per_second

    def to_dict(self) -> dict[str, Any]:
        floor = None
        if self.floor is not None:
            floor = dataclasses.asdict(self.floor)
            floor["floor_tokens_per_second"] = self.floor.floor_tokens_per_second
            floor["workload_floor_tokens_per_second"] = self.floor.workload_floor_tokens_per_second
        return {
            "preset": self.preset,
            "machine": self.machine,
            "options": self.options,
            "workloads": self.workloads,
            "engine_rows": [r.to_dict() for r in self.engine_rows],
            "floor": floor,
            "peers": [p.to_dict() for p in self.peers],
            "ratios": self.ratios(),
            "ratios_by_workload": {name: self.ratios(name) for name in self.workloads},
            "continuous_speedup": self.continuous_speedup(),
            "wall_seconds": self.wall_seconds,
        }

    def render(self) -> Group:
        """The tables `batchgen bench` prints."""
        return Group(*_render(self))

    def render_text(self, width: int = 160) -> str:
        """The tables as plain text (for READMEs and reports)."""
        console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
        console.print(self.render())
        return console.export_text()


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _load(load_average: str) -> str:
    """The 1-minute load average of "1.93 2.10 2.31"."""
    return load_average.split()[0] if load_average else "-"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _render(report: BenchReport) -> list[Any]:
    out: list[Any] = []
    m = report.machine
    out.append(Text(
        f"batchgen bench — {report.preset} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), "
        f"load average {m.get('load_before', '?')} before, {m.get('load_after', '?')} after; "
        f"jax {m.get('jax', '?')}, keras {m.get('keras', '?')}"
    ))
    for description in report.workloads.values():
        out.append(Text("  " + description, style="dim"))

    table = Table(title="our engine (steady state, after a warm-up pass; each row in its own process)")
    for column, justify in (
        ("configuration", "left"), ("slots", "right"), ("gen tok/s", "right"), ("prefill tok/s", "right"),
        ("1st result s", "right"), ("compile s wall / XLA", "right"), ("programs warm-up / steady", "right"),
        ("peak RSS MB", "right"), ("% of floor", "right"), ("= f32", "right"), ("f32 prefix", "right"),
        ("load", "right"),
    ):
        table.add_column(column, justify=justify)
    for r in report.engine_rows:
        table.add_row(
            r.name, str(r.slots), f"{r.tokens_per_second:.1f}", f"{r.prefill_tokens_per_second:.0f}",
            f"{r.steady.first_result_seconds:.2f}",
            f"{r.compile_wall_seconds:.1f} / {r.warmup.compile_seconds:.1f}",
            f"{r.warmup.programs_compiled} / {r.steady.programs_compiled}", _mb(r.peak_rss_bytes),
            _share(r.floor_share), _share(r.identical_share),
            "-" if r.mean_prefix_tokens is None else f"{r.mean_prefix_tokens:.1f}", _load(r.load_average),
        )
    out.append(table)
    speedup = report.continuous_speedup()
    if speedup is not None:
        out.append(Text(f"continuous batching on the variable workload: {speedup:.2f}x the static batches"))

    if report.floor is not None:
        f = report.floor
        rates = ", ".join(f"{meas['flops_per_second'] / 1e9:.1f}" for meas in f.measurements)
        shapes = "; ".join(
            f"{shape} {rate / 1e9:.1f}" for shape, rate in f.measurements[0]["shapes"].items()
        ) if f.measurements else ""
        out.append(Text(
            f"FLOPs per generated token: {f.formula} = {f.flops_per_token / 1e9:.3f} GFLOP at mean context "
            f"{f.mean_context:.0f} ({f.weight_flops / 1e9:.3f} weights + {f.attention_flops / 1e9:.3f} attention)"
        ))
        out.append(Text(
            f"float32 matmul rate, the model's products at {f.rows} rows: "
            f"{f.matmul_flops_per_second / 1e9:.1f} GFLOP/s "
            f"(measured {rates} after the first row / at the end; single products {shapes}) "
            f"-> floor {f.floor_tokens_per_second:.0f} tok/s generating alone"
        ))
        out.append(Text(
            f"with the prompts' prefill ({f.prompt_flops_per_token / 1e9:.3f} GFLOP more per generated token on the "
            f"main workload): floor {f.workload_floor_tokens_per_second:.0f} tok/s; "
            "% of floor = (prompt + generated FLOPs) / wall time / matmul rate"
        ))

    if report.peers:
        peers = Table(title="peers (same weights, same prompt ids, greedy; same run)")
        for column, justify in (
            ("system", "left"), ("workload", "left"), ("batch", "right"), ("gen tok/s", "right"),
            ("1st result s", "right"),
            ("warm-up s", "right"), ("peak RSS MB", "right"), ("= ours f32", "right"), ("ours f32 / peer", "right"),
            ("load", "right"),
        ):
            peers.add_column(column, justify=justify)
        for p in report.peers:
            if p.status != "ran":
                peers.add_row(p.system, "-", "-", p.status, "", "", "", "", "", "", style="dim")
                continue
            for run in p.runs:
                ours = report.row(f"{run.workload} float32")
                ratio = "" if ours is None else f"{ours.tokens_per_second / run.tokens_per_second:.2f}x"
                several = sum(r.workload == run.workload for r in p.runs) > 1
                peers.add_row(
                    p.system + (" (best)" if several and run is p.best_on(run.workload) else ""), run.workload,
                    str(run.batch), f"{run.tokens_per_second:.1f}", f"{run.first_result_seconds:.2f}",
                    f"{p.warmup_seconds:.1f}", _mb(p.peak_rss_bytes), _share(run.identical_share), ratio,
                    _load(p.load_average),
                )
        out.append(peers)
        for p in report.peers:
            if p.status != "ran":
                out.append(Text(f"{p.system}: {p.status}: {p.reason}", style="yellow"))
            else:
                out.append(Text(f"{p.system} {p.version}: {p.notes}".rstrip(": "), style="dim"))
    return out
