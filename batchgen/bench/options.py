"""What `batchgen bench` runs: the model, the workloads' sizes, the configurations and the peers."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from batchgen.bench.peers import peer_names

# "int8" is float32 activations with int8 weights (`quantize("int8")`); "bf16-cache" is the float32 model with a
# bfloat16 KV cache (`cache_dtype = "bfloat16"`); the others are Keras dtype policies.
DTYPES = ("float32", "bfloat16", "int8", "bf16-cache")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """Options of one benchmark run; `BenchOptions.quick()` is a run small enough for tests.

    Example:
        >>> report = run_benchmark(BenchOptions(peers=True, peer_python="/opt/goldenv/bin/python"))  # doctest: +SKIP
    """

    preset: str = "smollm2_135m_instruct"
    prompts: int = 64  # main workload
    max_new_tokens: int = 64
    variable_prompts: int = 128  # variable workload; 0 leaves it out
    variable_max_new_tokens: int = 256
    short_prompts: int = 64  # short workload (prompts under 64 tokens: decode dominates); 0 leaves it out
    short_max_new_tokens: int = 64
    slots: int = 64  # engine slots (B) for every row
    cache_tokens: int = 0  # positions of the engine's KV cache; 0: room for every slot at the workload's longest
    steps_per_call: int = 8
    # Adds the row "short float32 response_format": the short workload with every request constrained by this
    # response format (canonical JSON text, e.g. a JSON schema), to measure what structured output costs.
    response_format: str | None = None
    dtypes: tuple[str, ...] = DTYPES  # rows on the main and short workloads; float32 is required (the reference)
    peers: bool = False
    peer_python: str = sys.executable
    vllm_python: str | None = None  # vLLM's CPU build pins its own torch, so it gets its own venv; None: peer_python
    skip_peers: tuple[str, ...] = ()  # peer systems to leave out ("keras-hub", "ctranslate2", "ctranslate2 int8", ...)
    peer_cache_dir: str | None = None  # converted peer models (transformers export, CTranslate2); None: ~/.cache
    transformers_batches: tuple[int, ...] = (16, 64, 128)
    keras_hub_batches: tuple[int, ...] = (64,)
    seed: int = 0
    floor_seconds: float = 2.0  # time spent on each matmul-rate measurement
    workdir: str | None = None  # keep workloads, logs and results here (default: a temporary folder, removed)
    timeout_seconds: float = 3600.0  # per child process

    def __post_init__(self) -> None:
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"dtypes must be among {DTYPES}, got {unknown}")
        if "float32" not in self.dtypes:
            raise ValueError(f"dtypes must include float32 (the reference for quality and ratios), got {self.dtypes}")
        for name in ("prompts", "max_new_tokens", "short_max_new_tokens", "slots", "steps_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cache_tokens < 0:
            raise ValueError(f"cache_tokens must be >= 0, got {self.cache_tokens}")
        if self.variable_prompts < 0 or self.variable_max_new_tokens < 1:
            raise ValueError(
                f"variable_prompts must be >= 0 and variable_max_new_tokens >= 1, got {self.variable_prompts}, "
                f"{self.variable_max_new_tokens}"
            )
        if self.short_prompts < 0:
            raise ValueError(f"short_prompts must be >= 0, got {self.short_prompts}")
        if self.response_format is not None and not self.short_prompts:
            raise ValueError("response_format adds a row on the short workload: short_prompts must be >= 1")
        unknown = [p for p in self.skip_peers if p not in peer_names()]
        if unknown:
            raise ValueError(f"skip_peers: unknown peers {unknown}; known: {sorted(peer_names())}")
        batches = self.transformers_batches + self.keras_hub_batches
        if any(b < 1 for b in batches):
            raise ValueError(f"peer batch sizes must be >= 1, got {batches}")

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchOptions":
        """A few prompts and tokens: checks that everything runs, measures little."""
        small = dict(
            prompts=8, max_new_tokens=8, variable_prompts=12, variable_max_new_tokens=16, short_prompts=8,
            short_max_new_tokens=8, slots=4,
            transformers_batches=(4, 8), keras_hub_batches=(8,), floor_seconds=0.2,
        )
        return cls(**{**small, **overrides})

    @property
    def interpreter(self) -> dict[str, str]:
        """The interpreter for each kind of peer interpreter ("peer", "vllm")."""
        return {"peer": self.peer_python, "vllm": self.vllm_python or self.peer_python}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
