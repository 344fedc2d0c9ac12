"""Value checks of a built job spec: ranges, allowed names and keys that exclude each other, each error naming the
spec file, the key and the value (`check_values`). The allowed values of the spec's keys are listed here.

Type and key checks happen earlier, while the TOML tables are read (batchgen/spec_tables.py).
"""

from __future__ import annotations

import typing
from typing import Any

from batchgen.errors import SpecError
from batchgen.sampling_checks import SAMPLERS, canonical_response_format, check_logprobs, check_search_and_penalties
from batchgen.spec_tables import config_key

INPUT_FORMATS = ("parquet", "jsonl", "openai_batch")
OUTPUT_FORMATS = ("parquet", "jsonl", "openai_batch")
DTYPES = ("float32", "bfloat16", "float16")
CACHE_DTYPES = ("auto", *DTYPES)
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


def check_values(spec: Any) -> None:
    """Raise SpecError on the first value of the JobSpec `spec` out of its range or in conflict with another."""
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
        where = config_key("sampling", config.name)
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


def _check_model(model: Any, fail: Any) -> None:
    where = config_key("model", model.name)
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
    if model.cache_dtype not in CACHE_DTYPES:
        fail(f"{where}.cache_dtype", model.cache_dtype, "must be auto, float32, bfloat16 or float16")
    if model.devices_per_replica < 1:
        fail(f"{where}.devices_per_replica", model.devices_per_replica, "must be >= 1")
    if model.device_resource != model.device_resource.strip():
        fail(f"{where}.device_resource", model.device_resource, "must be a Ray resource name without spaces around it")


def _check_task(spec: Any, fail: Any) -> None:
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
