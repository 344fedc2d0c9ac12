"""OpenAI Batch files: chat-completion requests in, one output line per `custom_id` out.

Input (https://platform.openai.com/docs/guides/batch): one request per line,
    {"custom_id": "r-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0.7, "n": 2, ...}}
`request_columns` turns a shard's requests into the job's columns: `custom_id` (the row id), `messages`, and
the per-row override columns (batchgen.row_sampling) named by batchgen: max_tokens / max_completion_tokens
-> max_new_tokens, stop -> stop_strings, and temperature, top_p, seed, presence_penalty, frequency_penalty,
logit_bias, response_format, n under their own names. `top_p` picks the top_p sampler for its row; `logprobs: true`
(with `top_logprobs: k`, 0 to 20) asks for each token's log-probability and its k most likely alternatives, filled
into each choice's `logprobs` as OpenAI does. The body's `model` is not used (the job's model answers). A key
batchgen cannot honour (tools, ...) makes the request an error line naming it: it is never silently dropped.

Output (`output_lines`): the Batch API's output shape, one line per custom_id with all its `n` choices:
    {"id": "batch_req_...", "custom_id": "r-1",
     "response": {"status_code": 200, "request_id": "...", "body": {chat.completion object}}, "error": null}
and for a request that failed, "response": null and "error": {"code": ..., "message": ...}.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from batchgen.rows import OutputRecord

CHAT_URL = "/v1/chat/completions"
# Body key -> the per-row override column it fills.
BODY_COLUMNS = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop_strings",
    "n": "n",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    "response_format": "response_format",
}
# Body keys that do not change what is generated here: the job decides the model; the rest is bookkeeping.
IGNORED_BODY_KEYS = ("model", "user", "metadata", "store", "stream")
# Body keys read into the per-row `logprobs` column (batchgen.row_sampling): true, or top_logprobs' k.
LOGPROB_KEYS = ("logprobs", "top_logprobs")
COLUMNS = ("custom_id", "messages", "sampler", *dict.fromkeys(BODY_COLUMNS.values()), "logprobs")


def request_columns(rows: Sequence[dict[str, Any] | str]) -> tuple[dict[str, list[Any]], list[str | None]]:
    """The job's columns of a shard's request lines (`rows`: parsed objects, or why a line is not one), and
    each row's error (None for a usable request)."""
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    errors: list[str | None] = []
    for row in rows:
        values, error = _request(row)
        for name in COLUMNS:
            columns[name].append(values.get(name))
        errors.append(error)
    return columns, errors


def _request(row: dict[str, Any] | str) -> tuple[dict[str, Any], str | None]:
    if isinstance(row, str):
        return {}, row
    custom_id = row.get("custom_id")
    values: dict[str, Any] = {"custom_id": custom_id}
    if not isinstance(custom_id, str) or not custom_id:
        return values, f"request has no custom_id string (got {custom_id!r:.80})"
    where = f"custom_id {custom_id!r}"
    if row.get("url", CHAT_URL) != CHAT_URL:
        return values, f"{where}: url {row.get('url')!r} is not supported (only {CHAT_URL})"
    if row.get("method", "POST") != "POST":
        return values, f"{where}: method {row.get('method')!r} is not supported (only POST)"
    body = row.get("body")
    if not isinstance(body, dict):
        return values, f"{where}: body must be an object, got {body!r:.80}"
    unknown = sorted(set(body) - set(BODY_COLUMNS) - set(IGNORED_BODY_KEYS) - set(LOGPROB_KEYS) - {"messages"})
    if unknown:
        return values, f"{where}: body keys {unknown} are not supported by batchgen"
    if body.get("stream"):
        return values, f"{where}: stream = true makes no sense in a batch"
    values["messages"] = body.get("messages")
    for key, column in BODY_COLUMNS.items():
        if body.get(key) is not None:
            values[column] = body[key]
    if body.get("top_p") is not None:
        values["sampler"] = "top_p"
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        return values, f"{where}: logprobs must be true or false, got {wanted!r:.80}"
    if top is not None and not wanted:
        return values, f"{where}: top_logprobs ({top!r:.20}) needs logprobs: true"
    if wanted:
        values["logprobs"] = top or True  # k alternatives; true alone: the tokens' own log-probs only
    return values, None


def output_lines(
    records: Sequence[OutputRecord],
    custom_ids: Sequence[Any],
    model: str,
    fingerprint: str,
    created: int,
) -> list[str]:
    """One output line per request (input row) of the shard, in input order, each with its samples as choices.

    `custom_ids` holds each input row's id; ids in the lines are derived from (fingerprint, custom_id), so a
    rerun writes the same ones. A request any of whose samples failed is an error line (the first reason).
    """
    by_row: dict[int, list[OutputRecord]] = collections.defaultdict(list)
    for record in records:
        by_row[record.row_index].append(record)
    lines = []
    for row_index, custom_id in enumerate(custom_ids):
        samples = sorted(by_row[row_index], key=lambda r: r.sample_index)
        digest = hashlib.sha256(f"{fingerprint}\0{custom_id}".encode()).hexdigest()
        line: dict[str, Any] = {"id": f"batch_req_{digest[:24]}", "custom_id": custom_id, "response": None, "error": None}
        failed = [r for r in samples if r.finish_reason == "error"]
        if failed:
            line["error"] = {"code": "batchgen_error", "message": failed[0].error or "generation failed"}
        else:
            prompt_tokens = samples[0].prompt_tokens if samples else 0
            completion_tokens = sum(r.completion_tokens for r in samples)
            line["response"] = {
                "status_code": 200,
                "request_id": digest[24:48],
                "body": {
                    "id": f"chatcmpl-{digest[:29]}",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": r.sample_index,
                            "message": {"role": "assistant", "content": r.completion},
                            "logprobs": _choice_logprobs(r),
                            "finish_reason": r.finish_reason,
                        }
                        for r in samples
                    ],
                    # The prompt is processed once per request, as OpenAI counts it with n > 1.
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
            }
        lines.append(json.dumps(line, ensure_ascii=False))
    return lines


def _choice_logprobs(record: OutputRecord) -> dict[str, Any] | None:
    """A choice's `logprobs` in OpenAI's shape, {"content": [{token, logprob, bytes, top_logprobs}]}, or None
    where the request did not ask for them. `bytes` are the UTF-8 bytes of the token's text as it reads alone."""
    if record.token_logprobs is None or record.tokens is None or record.top_logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [
        {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, _, lp in top]}
        for token, logprob, top in zip(record.tokens, record.token_logprobs, record.top_logprobs)
    ]}  # fmt: skip
