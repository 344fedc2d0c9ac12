"""Fixtures and helpers of the batch job tests (tests/test_batch_*.py, test_job_*.py, test_cli*.py).

Import the fixtures a module uses from here (`from tests.batch_fixtures import ray_local`): pytest finds a
fixture imported into a test module as if it were defined there.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.spec import JobSpec, parse_spec


# Compiled programs of the tiny test model, shared by the test runs' workers (as a real cluster's are).
TEST_XLA_CACHE = str(Path(tempfile.gettempdir()) / "batchgen-test-xla-cache")


def write_prompts(
    path: str | Path,
    prompts: Sequence[Any],
    *,
    ids: Sequence[Any] | None = None,
    row_group_size: int = 4,
    extra: dict[str, pa.Array | list[Any]] | None = None,
    filesystem: Any = None,
) -> str:
    """Write a prompt Parquet file (columns id?, prompt, extra...) with small row groups; returns the path."""
    columns: dict[str, Any] = {}
    if ids is not None:
        columns["id"] = list(ids)
    columns["prompt"] = pa.array(list(prompts), pa.string()) if all(
        p is None or isinstance(p, str) for p in prompts
    ) else list(prompts)
    columns.update(extra or {})
    table = pa.table(columns)
    pq.write_table(table, str(path), row_group_size=row_group_size, filesystem=filesystem)
    return str(path)


def make_spec(input_url: str, output_url: str, preset: str = "unused", **sections: dict[str, Any]) -> JobSpec:
    """A JobSpec over a prompt column `prompt` and an id column `id`, with `sections` merged in."""
    raw: dict[str, Any] = {
        "model": {"preset": preset, "max_length": 64, "max_slots": 8},
        "input": {"url": input_url, "prompt_column": "prompt", "id_column": "id"},
        "sampling": {"max_new_tokens": 4},
        "output": {"url": output_url},
        "execution": {"rows_per_shard": 4, "shard_timeout": 120.0, "compilation_cache": TEST_XLA_CACHE},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_spec(raw, source="test-spec")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[str]:
    """One small embedded Ray for the whole test module; yields its GCS address (for subprocess drivers)."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, Any]]:
    """moto's S3 server on 127.0.0.1 and a free port; yields the fsspec storage options that reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    try:
        yield options
    finally:
        server.stop()


# A tiny random Llama 3.1-style checkpoint (byte-level BPE tokenizer with a chat template), committed by the
# model tests; the batch tests only need some real model that loads fast.
TINY_PRESET = str(Path(__file__).parent / "fixtures" / "hf_llama31_tiny")


@pytest.fixture(scope="session")
def tiny_preset() -> str:
    """The path of a tiny model preset for batch tests."""
    return TINY_PRESET
