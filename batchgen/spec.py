"""The job spec: one TOML file with sections model, input, sampling, output and execution.

Everything is checked when the spec is loaded, before any input is read or any model loaded; an error names
the spec file, the key and the value received. The README's "Job spec reference" documents every key.

Example:
    >>> spec = load_spec("jobs/demo.toml", ["sampling.seed=7"])  # doctest: +SKIP
    >>> spec.sampling[0].seed  # doctest: +SKIP
    7
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchgen.errors import SpecError
from batchgen.overrides import apply_overrides
from batchgen.sampling_checks import SEARCH_SAMPLERS, canonical_response_format, check_logprobs, check_search_and_penalties
from model.generation.requests import STREAMING_SAMPLERS

# The samplers a job may name: those the streaming engine runs with per-request parameters (importing them
# loads neither Keras nor JAX), and the searches.
SAMPLERS = STREAMING_SAMPLERS + SEARCH_SAMPLERS
INPUT_FORMATS = ("parquet", "jsonl", "openai_batch")
OUTPUT_FORMATS = ("parquet", "jsonl", "openai_batch")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")
TASK_KINDS = ("generate", "score", "perplexity")
# Metric -> the task kinds it applies to (batchgen/metrics.py computes them).
METRICS = {
    "none": ("generate", "score", "perplexity"),
    "exact_match": ("generate",),
    "accuracy": ("score",),
    "mean_loglikelihood": ("score", "perplexity"),
    "perplexity": ("score", "perplexity"),
}
COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "brotli", "none")
DEFAULT_CONFIG_NAME = "default"
# Placeholders filled in input.url and output.url.
DATE_PLACEHOLDER = "{date}"
DATA_PLACEHOLDER = "{batchgen_data}"
DATA_DIR = Path(__file__).parent / "data"
_CONFIG_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
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
    # model.generation.engine.auto_slots). With cache_tokens and cache_dtype, the engine's whole sizing.
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
    "execution": frozenset(
        {"replicas", "max_attempts", "shard_timeout", "max_error_rate", "compilation_cache"}
    ),
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
    raw = _move_old_keys(raw, str(path))
    overrides = [_moved_assignment(assignment) for assignment in overrides]
    return parse_spec(apply_overrides(raw, overrides, field_type), source=str(path), today=today)


def parse_spec(raw: Mapping[str, Any], *, source: str = "<spec>", today: datetime.date | None = None) -> JobSpec:
    """Validate a spec given as nested tables (what `tomllib` returns) and build the JobSpec."""
    _check_keys(raw, _SECTIONS, "", source)
    for name in ("model", "input", "output"):
        if name not in raw:
            raise SpecError(f"{source}: the [{name}] section is required")
    raw = _move_old_keys(raw, source)
    tables = {name: _table(raw.get(name, {}), name, source) for name in _SECTIONS}
    _, models = _build_models(tables["model"], source)
    task = _build(TaskSpec, tables["task"], "task", source)
    input = _build(InputSpec, tables["input"], "input", source)
    output = _build(OutputSpec, tables["output"], "output", source)
    execution = _build(ExecutionSpec, tables["execution"], "execution", source)
    sampling = _build_sampling(tables["sampling"], source)
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
    _check_values(spec)
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
    if len(rest) != 1:
        # Deeper than a field: inside a table such as storage_options, anything goes.
        return Any if rest and typing.get_type_hints(cls).get(rest[0]) is not None else None
    hints = typing.get_type_hints(cls)
    return None if rest[0] == "name" and cls in (SamplingConfig, ModelSpec) else hints.get(rest[0])


# ---- building ---------------------------------------------------------------------------------------------


def _move_old_keys(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`raw` with every key of MOVED_KEYS in its new place; SpecError when a spec sets both places."""
    moved = dict(raw)
    for (old_section, old_key), (section, key) in MOVED_KEYS.items():
        old_table = moved.get(old_section)
        if isinstance(old_table, Mapping) and old_key in old_table:
            table = moved.get(section, {})
            if isinstance(table, Mapping) and key in table:
                raise SpecError(
                    f"{source}: {old_section}.{old_key} is the old place of {section}.{key}; set only {section}.{key}"
                )
            moved[old_section] = {k: v for k, v in old_table.items() if k != old_key}
            moved[section] = {**(table if isinstance(table, Mapping) else {}), key: old_table[old_key]}
    return moved


def _moved_assignment(assignment: str) -> str:
    """A `--set` assignment with an old key path (MOVED_KEYS) rewritten to the new one."""
    for (old_section, old_key), (section, key) in MOVED_KEYS.items():
        if assignment.replace(" ", "").startswith(f"{old_section}.{old_key}="):
            return f"{section}.{key}=" + assignment.split("=", 1)[1]
    return assignment


def _table(value: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{source}: {where} must be a table ([{where}]), got {value!r}")
    return value


def _check_keys(table: Mapping[str, Any], known: Mapping[str, Any] | Sequence[str], prefix: str, source: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {', '.join(known)}"
            raise SpecError(f"{source}: unknown key {prefix}{key}{hint}")


def _build(cls: type, table: Mapping[str, Any], section: str, source: str, extra: Sequence[str] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not (cls in (SamplingConfig, ModelSpec) and f.name == "name")]
    _check_keys({k: v for k, v in table.items() if k not in extra}, [f.name for f in fields], f"{section}.", source)
    values: dict[str, Any] = {}
    for field in fields:
        key = f"{section}.{field.name}"
        if field.name not in table:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SpecError(f"{source}: {key} is required")
            continue
        values[field.name] = _convert(table[field.name], hints[field.name], key, source)
    return cls(**values)


def _build_sampling(table: dict[str, Any], source: str) -> tuple[SamplingConfig, ...]:
    base = {k: v for k, v in table.items() if k != "configs"}
    _build(SamplingConfig, base, "sampling", source)  # the shared keys alone must be valid too
    configs = _table(table.get("configs", {}), "sampling.configs", source)
    if not configs:
        return (_build(SamplingConfig, base, "sampling", source),)
    result = []
    for name, overrides in configs.items():
        where = f"sampling.configs.{name}"
        if not _CONFIG_NAME.match(name):
            raise SpecError(f"{source}: configuration name {name!r} ({where}) may use only letters, digits, _ . -")
        merged = {**base, **_table(overrides, where, source)}
        config = _build(SamplingConfig, merged, where, source)
        result.append(dataclasses.replace(config, name=name))
    return tuple(result)


def _build_models(table: dict[str, Any], source: str) -> tuple[ModelSpec, tuple[ModelSpec, ...]]:
    """[model] alone, or [model] merged with each [model.configs.NAME] (a sweep over checkpoints)."""
    base = {k: v for k, v in table.items() if k != "configs"}
    configs = _table(table.get("configs", {}), "model.configs", source)
    if not configs:
        model = _build(ModelSpec, base, "model", source)
        return model, (model,)
    result = []
    for name, overrides in configs.items():
        where = f"model.configs.{name}"
        if not _CONFIG_NAME.match(name):
            raise SpecError(f"{source}: configuration name {name!r} ({where}) may use only letters, digits, _ . -")
        config = _build(ModelSpec, {**base, **_table(overrides, where, source)}, where, source)
        result.append(dataclasses.replace(config, name=name))
    return result[0], tuple(result)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    converted = _try_convert(value, tp)
    if converted is _INVALID:
        raise SpecError(f"{source}: {key} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
    return converted


_INVALID = object()


def _try_convert(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # TOML has no null, so an empty string stands for "unset" in optional keys.
        if type(None) in typing.get_args(tp) and value in (None, ""):
            return None
        for option in typing.get_args(tp):
            converted = _try_convert(value, option)
            if converted is not _INVALID:
                return converted
        return _INVALID
    if tp is Any:
        return value
    if tp is type(None):
        return None if value is None else _INVALID
    if tp is bool:
        return value if isinstance(value, bool) else _INVALID
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID
    if tp is str:
        return value if isinstance(value, str) else _INVALID
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _INVALID
        items = [_try_convert(item, typing.get_args(tp)[0]) for item in value]
        return _INVALID if any(item is _INVALID for item in items) else tuple(items)
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _INVALID
    raise TypeError(f"no conversion for spec type {tp!r}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "empty"}
    if tp in names:
        return names[tp]
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "a table"
    return repr(tp)


# ---- placeholders and value checks -------------------------------------------------------------------------


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


def _check_values(spec: JobSpec) -> None:
    source = spec.source

    def fail(key: str, value: Any, why: str) -> typing.NoReturn:
        raise SpecError(f"{source}: {key} {why}, got {value!r}")

    input, output, execution = spec.input, spec.output, spec.execution
    for model in spec.models:
        _check_model(model, fail)
    _check_task(spec, fail)

    if not input.url:
        fail("input.url", input.url, "must not be empty")
    if input.prompt_column and input.messages_column:
        raise SpecError(
            f"{source}: set one of input.prompt_column and input.messages_column, not both "
            f"(got {input.prompt_column!r} and {input.messages_column!r})"
        )
    if input.messages_column and input.apply_chat_template:
        fail("input.apply_chat_template", True, "applies to input.prompt_column only (messages always use it)")
    if input.system_prompt is not None and not (input.messages_column or input.apply_chat_template):
        fail("input.system_prompt", input.system_prompt, "needs chat input (input.messages_column or "
             "input.apply_chat_template = true): a plain prompt has no place for a system message")
    if input.format not in INPUT_FORMATS:
        fail("input.format", input.format, f"must be one of {INPUT_FORMATS}")

    for config in spec.sampling:
        where = "sampling" if config.name == DEFAULT_CONFIG_NAME else f"sampling.configs.{config.name}"
        if config.sampler not in SAMPLERS:
            fail(f"{where}.sampler", config.sampler, f"must be one of {SAMPLERS}")
        if config.temperature < 0:
            fail(f"{where}.temperature", config.temperature, "must be >= 0")
        if config.top_k < 1:
            fail(f"{where}.top_k", config.top_k, "must be >= 1")
        if not 0 < config.top_p <= 1:
            fail(f"{where}.top_p", config.top_p, "must be in (0, 1]")
        if not 0 <= config.min_p < 1:
            fail(f"{where}.min_p", config.min_p, "must be in [0, 1)")
        if config.max_new_tokens < 1:
            fail(f"{where}.max_new_tokens", config.max_new_tokens, "must be >= 1")
        if isinstance(config.stop_token_ids, str) and config.stop_token_ids != "auto":
            fail(f"{where}.stop_token_ids", config.stop_token_ids, "must be 'auto' or a list of token ids")
        if not isinstance(config.stop_token_ids, str) and any(i < 0 for i in config.stop_token_ids):
            fail(f"{where}.stop_token_ids", config.stop_token_ids, "must hold non-negative ids")
        if any(not s for s in config.stop_strings):
            fail(f"{where}.stop_strings", config.stop_strings, "must not hold an empty string")
        if config.n < 1:
            fail(f"{where}.n", config.n, "must be >= 1")
        if config.seed < 0:
            fail(f"{where}.seed", config.seed, "must be >= 0")
        check_search_and_penalties(config, where, fail)
        if config.response_format is not None:
            try:
                canonical_response_format(config.response_format)
            except ValueError as error:
                fail(f"{where}.response_format", config.response_format, str(error))
        check_logprobs(config, where, spec, fail)

    if not output.url:
        fail("output.url", output.url, "must not be empty")
    from batchgen.rows import CONTRACT_COLUMNS  # here, not at the top: rows imports pyarrow

    for column in output.carry_columns:
        if column in CONTRACT_COLUMNS:
            fail("output.carry_columns", list(output.carry_columns), f"must not repeat the output column {column!r}")
    if len(set(output.carry_columns)) != len(output.carry_columns):
        fail("output.carry_columns", list(output.carry_columns), "must not name a column twice")
    if output.compression not in COMPRESSIONS:
        fail("output.compression", output.compression, f"must be one of {COMPRESSIONS}")
    if output.format not in OUTPUT_FORMATS:
        fail("output.format", output.format, f"must be one of {OUTPUT_FORMATS}")
    if output.format != "parquet" and output.compression not in ("none", "gzip"):
        fail("output.compression", output.compression, f"must be 'none' or 'gzip' for {output.format} output")
    if output.format == "openai_batch" and len(spec.sampling) > 1:
        fail("output.format", output.format, "holds one response per request: it takes one sampling configuration, "
             f"not {len(spec.sampling)}")

    if execution.replicas < 1:
        fail("execution.replicas", execution.replicas, "must be >= 1")
    if execution.rows_per_shard < 1:
        fail("execution.rows_per_shard", execution.rows_per_shard, "must be >= 1")
    if execution.max_attempts < 1:
        fail("execution.max_attempts", execution.max_attempts, "must be >= 1")
    if execution.shard_timeout < 0:
        fail("execution.shard_timeout", execution.shard_timeout, "must be >= 0 seconds (0: no timeout)")
    if not 0 <= execution.max_error_rate <= 1:
        fail("execution.max_error_rate", execution.max_error_rate, "must be in [0, 1]")


def _check_model(model: ModelSpec, fail: Any) -> None:
    where = "model" if model.name == DEFAULT_CONFIG_NAME else f"model.configs.{model.name}"
    if not model.preset:
        fail(f"{where}.preset", model.preset, "must name a preset, a directory or a file")
    if model.dtype not in DTYPES:
        fail(f"{where}.dtype", model.dtype, f"must be one of {DTYPES}")
    if model.quantization not in QUANTIZATIONS:
        fail(f"{where}.quantization", model.quantization, f"must be one of {QUANTIZATIONS}")
    if model.max_length < 2:
        fail(f"{where}.max_length", model.max_length, "must be >= 2 (a prompt token and a new one)")
    if model.cache_tokens and model.cache_tokens < model.max_length:
        fail(f"{where}.cache_tokens", model.cache_tokens, f"must be 0 (room for every slot) or >= {where}.max_length "
             f"({model.max_length}), so that one sequence fits")
    if isinstance(model.max_slots, str):
        if model.max_slots != "auto":
            fail(f"{where}.max_slots", model.max_slots, "must be an integer >= 1 or \"auto\"")
        if not model.cache_tokens:
            fail(f"{where}.max_slots", model.max_slots,
                 f"\"auto\" picks the slots from the cache's size: set {where}.cache_tokens too")
    elif model.max_slots < 1:
        fail(f"{where}.max_slots", model.max_slots, "must be >= 1")
    if model.cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
        fail(f"{where}.cache_dtype", model.cache_dtype, "must be auto, float32, bfloat16 or float16")
    if model.devices_per_replica < 1:
        fail(f"{where}.devices_per_replica", model.devices_per_replica, "must be >= 1")
    if model.device_resource != model.device_resource.strip():
        fail(f"{where}.device_resource", model.device_resource, "must be a Ray resource name without spaces around it")


def _check_task(spec: JobSpec, fail: Any) -> None:
    task = spec.task
    if task.kind not in TASK_KINDS:
        fail("task.kind", task.kind, f"must be one of {TASK_KINDS}")
    if task.metric not in METRICS:
        fail("task.metric", task.metric, f"must be one of {tuple(METRICS)}")
    if task.kind not in METRICS[task.metric]:
        fail("task.metric", task.metric, f"does not apply to task.kind {task.kind!r} (it needs {METRICS[task.metric]})")
    if task.kind == "score" and not task.continuations_column:
        fail("task.continuations_column", task.continuations_column, "must name a column for task.kind 'score'")
    if task.kind != "score" and task.continuations_column:
        fail("task.continuations_column", task.continuations_column, "applies to task.kind 'score' only")
    if task.metric in ("exact_match", "accuracy") and not task.reference_column:
        fail("task.reference_column", task.reference_column, f"must name a column for metric {task.metric!r}")
    if task.kind != "generate" and len(spec.sampling) > 1:
        fail("sampling.configs", [c.name for c in spec.sampling], f"do not apply to task.kind {task.kind!r} "
             "(scoring samples nothing)")
    if task.kind != "generate" and (spec.input.format != "parquet" or spec.output.format != "parquet"):
        fail("task.kind", task.kind, "reads and writes Parquet only (input.format and output.format \"parquet\")")
    if task.kind == "perplexity" and spec.input.messages_column:
        fail("input.messages_column", spec.input.messages_column, "does not apply to task.kind 'perplexity' "
             "(documents are plain text in input.prompt_column)")
