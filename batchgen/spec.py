"""The job spec: one TOML file with sections model, input, sampling, output and execution.

Everything is checked when the spec is loaded, before any input is read or any model loaded; an error names
the spec file, the key and the value received. The README's "Job spec reference" documents every key. This
module is what a spec is (its sections, defaults, identity) and how it is read; the generic TOML-table reading
is batchgen/spec_tables.py, the value checks batchgen/spec_checks.py.

Example:
    >>> spec = load_spec("jobs/demo.toml", ["sampling.seed=7"])  # doctest: +SKIP
    >>> spec.sampling[0].seed  # doctest: +SKIP
    7
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchgen.errors import SpecError
from batchgen.overrides import apply_overrides
from batchgen.spec_checks import check_values
from batchgen.spec_tables import (
    DEFAULT_CONFIG_NAME, as_table, build, build_configs, check_keys, field_type_of, move_keys, moved_assignment,
)

# Placeholders filled in input.url and output.url.
DATE_PLACEHOLDER = "{date}"
DATA_PLACEHOLDER = "{batchgen_data}"
DATA_DIR = Path(__file__).parent / "data"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """[model]: which checkpoint each worker loads, and how; `name` is its [model.configs.NAME] in a sweep."""

    preset: str
    dtype: str = "float32"
    quantization: str = "none"
    max_length: int = 1024
    # Positions the KV cache holds over all slots; 0: room for every slot at max_length. Less saves memory, and
    # a row then waits for room when its prompt plus max_new_tokens does not fit beside the rows in flight.
    cache_tokens: int = 0
    # Sequences the engine runs at once per worker (its slots), or "auto": from cache_tokens (see
    # model.generation.scheduler.auto_slots). With cache_tokens and cache_dtype, the engine's whole sizing.
    max_slots: int | str = 32
    # dtype of the KV cache: "auto" is the compute dtype; "bfloat16" halves a float32 model's cache (more rows in
    # the same memory) at a small cost in accuracy.
    cache_dtype: str = "auto"
    # Prompt tokens already in the KV cache within a shard (n samples, a shared system prompt) are copied, not
    # prefilled again (model.generation.prefix_cache); false prefills every prompt whole (to measure the gain).
    prefix_caching: bool = True
    devices_per_replica: int = 1
    # The Ray resource that counts a worker's devices: "" picks GPU where the cluster has GPUs, else CPU; any
    # other name (a custom resource such as "TPU") is requested as it is, devices_per_replica units per worker.
    device_resource: str = ""
    name: str = DEFAULT_CONFIG_NAME


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """[task]: what each row asks for: generated text, or the log-likelihood of given continuations.

    `generate`: completions (the default). `score`: each row's prompt is a context and `continuations_column`
    holds one continuation (a string) or several (a list of strings); one output row per input row and model,
    with list columns aligned to the continuations. `perplexity`: the prompt column holds whole documents,
    scored alone (rolling windows past the context length).
    """

    kind: str = "generate"
    continuations_column: str | None = None
    reference_column: str | None = None
    metric: str = "none"
    per_token_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """[input]: the prompt table; exactly one of `prompt_column` and `messages_column` is set."""

    url: str
    prompt_column: str | None = None
    messages_column: str | None = None
    apply_chat_template: bool = False
    id_column: str | None = None
    date: str = "today"
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # parquet | jsonl (one JSON object per line; .gz files too) | openai_batch (an OpenAI Batch request file).
    format: str = "parquet"
    # A system message put first in every conversation that has none (chat input only). One prompt prefix
    # shared by all rows, which the engine's prefix sharing computes once.
    system_prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """One named sampling configuration: [sampling], or [sampling] merged with one [sampling.configs.NAME]."""

    name: str = DEFAULT_CONFIG_NAME
    sampler: str = "greedy"
    temperature: float = 1.0
    top_k: int = 5
    top_p: float = 0.9
    min_p: float = 0.05
    max_new_tokens: int = 128
    stop_token_ids: str | tuple[int, ...] = "auto"
    stop_strings: tuple[str, ...] = ()
    # Special tokens (chat markers such as <|im_start|>, end tokens) are left out of completions unless false.
    skip_special_tokens: bool = True
    n: int = 1
    seed: int = 0
    # Applied to the logits before temperature (model.generation.requests.SamplingParams has the semantics).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Token id (a TOML key is a string: "128009" = -100) -> bias added to that token's logit.
    logit_bias: dict[str, float] = dataclasses.field(default_factory=dict)
    # Structured output: a table (or its JSON text) as OpenAI's response_format, or regex / grammar
    # (README, "Structured output"); a row's response_format column overrides it.
    response_format: str | dict[str, Any] | None = None
    num_beams: int = 4  # for sampler "beam"
    alpha: float = 0.6  # for sampler "contrastive" (which takes its candidates from top_k)
    # k >= 1: each generated token's log-prob and its k most likely alternatives as output columns; 0: none.
    logprobs: int = 0


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """[output]: where the part files go and which input columns ride along."""

    url: str
    carry_columns: tuple[str, ...] = ()
    compression: str = "zstd"
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # parquet | jsonl (one JSON object per output row) | openai_batch (one OpenAI Batch output line per request).
    format: str = "parquet"


@dataclasses.dataclass(frozen=True)
class ExecutionSpec:
    """[execution]: workers, shard size and fault handling; none of it changes the output."""

    replicas: int = 1
    rows_per_shard: int = 256
    max_attempts: int = 3
    shard_timeout: float = 3600.0
    max_error_rate: float = 0.0
    compilation_cache: str = "~/.cache/batchgen/xla"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A whole, validated job. `sampling` holds one entry per named configuration, in spec order; `models` one
    per model configuration ([model.configs.NAME], or `model` alone), and `model` is the first of them."""

    model: ModelSpec
    input: InputSpec
    sampling: tuple[SamplingConfig, ...]
    output: OutputSpec
    execution: ExecutionSpec
    source: str = "<spec>"
    task: TaskSpec = TaskSpec()
    models: tuple[ModelSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.models:
            object.__setattr__(self, "models", (self.model,))

    @property
    def model_sweep(self) -> bool:
        """True when the spec names model configurations: output rows then carry a `model` column."""
        return len(self.models) > 1 or self.models[0].name != DEFAULT_CONFIG_NAME

    @property
    def outputs_per_model(self) -> int:
        """Output rows per input row and model: the samples of every configuration (scoring: one)."""
        return 1 if self.task.kind != "generate" else sum(config.n for config in self.sampling)

    @property
    def outputs_per_row(self) -> int:
        """Output rows per input row: the samples of every configuration, for every model."""
        return self.outputs_per_model * len(self.models)

    def model_named(self, name: str) -> ModelSpec:
        return next(model for model in self.models if model.name == name)

    def fingerprint(self) -> str:
        """A hash of everything that decides the output rows, so a rerun knows it is the same job.

        Every key counts except those of `RUN_ONLY_KEYS`, which change how the job runs, not what it writes.
        """

        def kept(section: str, table: Any) -> dict[str, Any]:
            return {k: v for k, v in dataclasses.asdict(table).items() if k not in RUN_ONLY_KEYS[section]}

        def model(spec: ModelSpec) -> dict[str, Any]:
            return {k: v for k, v in kept("model", spec).items() if k != "name"}  # in a sweep, the key of `models`

        # This layout (sampling as a list, [execution]'s keys at the top, keys added later left out at their
        # defaults, [task] and the sweep's models only where set) is what earlier versions hashed: kept, so that
        # their outputs still resume and their shard ids (which hash it) do not move.
        affecting = {
            "model": model(self.model),
            "input": _without_later_defaults(kept("input", self.input)),
            "sampling": [_without_later_defaults(kept("sampling", config)) for config in self.sampling],
            "output": _without_later_defaults(kept("output", self.output)),
            **kept("execution", self.execution),
        }
        if self.task != TaskSpec():
            affecting["task"] = kept("task", self.task)
        if self.model_sweep:
            affecting["models"] = {m.name: model(m) for m in self.models}
        encoded = json.dumps(affecting, sort_keys=True, default=list).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, without storage options (they may hold credentials)."""
        data = {
            "model": dataclasses.asdict(self.model),
            "input": dataclasses.asdict(self.input),
            "sampling": [dataclasses.asdict(config) for config in self.sampling],
            "output": dataclasses.asdict(self.output),
            "execution": dataclasses.asdict(self.execution),
            "task": dataclasses.asdict(self.task),
            "models": [dataclasses.asdict(model) for model in self.models],
        }
        del data["input"]["storage_options"], data["output"]["storage_options"]
        return json.loads(json.dumps(data, default=list))


# The keys that do not change the output rows, per section: they may differ between a run and its resumption,
# and `JobSpec.fingerprint()` leaves them out. Every other key is part of the job's identity, a new one too
# unless it is listed here. rows_per_shard is in: it decides the shards. The input's date is out: where it
# matters, it is part of the URL already.
RUN_ONLY_KEYS: dict[str, frozenset[str]] = {
    "model": frozenset({"cache_tokens", "max_slots", "prefix_caching", "devices_per_replica", "device_resource"}),
    "input": frozenset({"storage_options", "date"}),
    "sampling": frozenset(),
    "output": frozenset({"url", "compression", "storage_options"}),
    "execution": frozenset({"replicas", "max_attempts", "shard_timeout", "max_error_rate", "compilation_cache"}),
    "task": frozenset(),
}

# Keys that moved, old (section, key) -> new: a spec may still use the old place (the value moves); setting both
# is an error. execution.max_slots joined model.cache_tokens, so that the engine's sizing is one section.
MOVED_KEYS: dict[tuple[str, str], tuple[str, str]] = {("execution", "max_slots"): ("model", "max_slots")}

# Keys added after jobs were already running, at their defaults: left out of the fingerprint, so that an
# output written before they existed still resumes (a non-default value does change the fingerprint).
_LATER_DEFAULTS: dict[str, Any] = {
    "format": "parquet",
    "system_prompt": None,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "response_format": None,
    "num_beams": 4,
    "alpha": 0.6,
    "logprobs": 0,
}


def _without_later_defaults(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "input": InputSpec,
    "sampling": SamplingConfig,
    "output": OutputSpec,
    "execution": ExecutionSpec,
    "task": TaskSpec,
}


def load_spec(path: str | Path, overrides: Sequence[str] = (), *, today: datetime.date | None = None) -> JobSpec:
    """Read the TOML job spec at `path`, apply `section.key=value` overrides and validate it all."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise SpecError(f"job spec {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from error
    # A key in its old place moves before the overrides apply, so `--set` of either place wins over the file.
    raw = move_keys(raw, MOVED_KEYS, str(path))
    overrides = [moved_assignment(assignment, MOVED_KEYS) for assignment in overrides]
    return parse_spec(apply_overrides(raw, overrides, field_type), source=str(path), today=today)


def parse_spec(raw: Mapping[str, Any], *, source: str = "<spec>", today: datetime.date | None = None) -> JobSpec:
    """Validate a spec given as nested tables (what `tomllib` returns) and build the JobSpec."""
    check_keys(raw, _SECTIONS, "", source)
    for name in ("model", "input", "output"):
        if name not in raw:
            raise SpecError(f"{source}: the [{name}] section is required")
    raw = move_keys(raw, MOVED_KEYS, source)
    tables = {name: as_table(raw.get(name, {}), name, source) for name in _SECTIONS}
    # A sweep over checkpoints may leave the preset to each [model.configs.NAME]; [sampling] alone must be valid.
    models = build_configs(ModelSpec, tables["model"], "model", source, check_shared=False)
    sampling = build_configs(SamplingConfig, tables["sampling"], "sampling", source, check_shared=True)
    task = build(TaskSpec, tables["task"], "task", source)
    input = build(InputSpec, tables["input"], "input", source)
    output = build(OutputSpec, tables["output"], "output", source)
    execution = build(ExecutionSpec, tables["execution"], "execution", source)
    if input.format == "openai_batch":
        input = _openai_batch_input(input, source)
    if output.format == "jsonl" and "compression" not in tables["output"]:
        output = dataclasses.replace(output, compression="none")  # zstd, the Parquet default, is no JSONL codec
    if output.format == "openai_batch" and "compression" not in tables["output"]:
        output = dataclasses.replace(output, compression="none")
    if not input.prompt_column and not input.messages_column:
        input = dataclasses.replace(input, prompt_column="prompt")
    input, output = _fill_placeholders(input, output, source, today)
    # Workers do not share the driver's working directory (on a cluster, not even its machine).
    input = dataclasses.replace(input, url=_absolute(input.url))
    output = dataclasses.replace(output, url=_absolute(output.url))
    models = tuple(
        dataclasses.replace(m, preset=_absolute(m.preset)) if "/" in m.preset or os.path.exists(m.preset) else m
        for m in models
    )
    model = models[0]
    spec = JobSpec(model, input, sampling, output, execution, source, task, models)
    check_values(spec)
    return spec


def _openai_batch_input(input: InputSpec, source: str) -> InputSpec:
    """An OpenAI Batch file has fixed columns: its rows are chat `messages` with ids in `custom_id`."""
    for key in ("prompt_column", "messages_column", "id_column"):
        if getattr(input, key):
            raise SpecError(
                f"{source}: input.{key} must be unset with input.format = \"openai_batch\" (requests carry "
                f"custom_id and body.messages), got {getattr(input, key)!r}"
            )
    if input.apply_chat_template:
        raise SpecError(f"{source}: input.apply_chat_template does not apply to openai_batch input (messages always use it)")
    return dataclasses.replace(input, messages_column="messages", id_column="custom_id")


def field_type(path: Sequence[str]) -> Any:
    """The type the spec expects at a key path like ("sampling", "seed"), or None when it is no known key."""
    if not path or path[0] not in _SECTIONS:
        return None
    path = MOVED_KEYS.get(tuple(path), tuple(path))
    cls = _SECTIONS[path[0]]
    rest = list(path[1:])
    if path[0] in ("sampling", "model") and rest[:1] == ["configs"]:
        if len(rest) < 3:
            return None
        rest = rest[2:]
    return field_type_of(cls, rest, hidden=("name",) if cls in (SamplingConfig, ModelSpec) else ())


# ---- building ---------------------------------------------------------------------------------------------


# ---- placeholders -------------------------------------------------------------------------


def _fill_placeholders(
    input: InputSpec, output: OutputSpec, source: str, today: datetime.date | None
) -> tuple[InputSpec, OutputSpec]:
    date = input.date
    if date == "today":
        date = (today or datetime.date.today()).isoformat()
    elif not _DATE.match(date):
        raise SpecError(f"{source}: input.date must be 'today' or YYYY-MM-DD, got {input.date!r}")
    else:
        try:
            datetime.date.fromisoformat(date)
        except ValueError as error:
            raise SpecError(f"{source}: input.date {date!r} is not a real date: {error}") from error

    def fill(url: str) -> str:
        # Plain replace, not str.format: globs may hold braces of their own.
        return url.replace(DATE_PLACEHOLDER, date).replace(DATA_PLACEHOLDER, str(DATA_DIR))

    return (
        dataclasses.replace(input, url=fill(input.url), date=date),
        dataclasses.replace(output, url=fill(output.url)),
    )


def _absolute(url: str) -> str:
    """A relative local path made absolute (against the current directory); URLs and absolute paths as given."""
    if not url or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))
