"""`run_benchmark` end to end on a tiny model (its own process per row, as for the demo model)."""

from __future__ import annotations

import dataclasses
import json
import stat
import sys

from click.testing import CliRunner

from batchgen.bench import BenchOptions, run_benchmark
from batchgen.bench.runner import generated_counts
from batchgen.bench.workloads import Workload
from model.backbone import LlamaBackbone
from model.causal_lm import LlamaCausalLM


def test_quick_run_on_a_tiny_model_measures_our_engine_and_skips_missing_peers(tiny_lm, tmp_path):
    # The tiny tokenizer spends many tokens on the workload's longer prompts: give the model room for them.
    config = dataclasses.replace(tiny_lm.backbone.config, max_sequence_length=1024)
    preset = tmp_path / "tiny_preset"
    LlamaCausalLM(LlamaBackbone(config), tiny_lm.preprocessor).save_to_preset(str(preset))
    bare = tmp_path / "bare-python"  # standard library only: it has neither torch nor keras-hub
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    bare.chmod(bare.stat().st_mode | stat.S_IEXEC)
    options = BenchOptions.quick(
        preset=str(preset), prompts=6, max_new_tokens=5, variable_prompts=0, short_prompts=0,
        dtypes=("float32", "bf16-cache"),
        slots=4, peers=True, peer_python=str(bare), floor_seconds=0.05, workdir=str(tmp_path / "work"),
    )
    report = run_benchmark(options)

    # The tiny tokenizer spends more than 64 tokens on a short prompt: the short workload is left out here.
    row, bf16_cache = report.engine_rows
    assert row.name == "main float32" and row.slots == 4 and row.cache_dtype == "float32"
    # The float32 model over a bfloat16 KV cache, its greedy text compared with float32's.
    assert (bf16_cache.name, bf16_cache.dtype, bf16_cache.cache_dtype) == ("main bf16-cache", "float32", "bfloat16")
    assert bf16_cache.identical_share is not None and set(bf16_cache.outputs) == set(row.outputs)
    workload = Workload.read(tmp_path / "work" / "workload_main.json")
    assert len(workload.requests) == 6 and set(row.outputs) == {r.request_id for r in workload.requests}
    # The engine's token counter agrees with the outputs it returned (stop tokens included).
    assert row.steady.completion_tokens == sum(generated_counts(workload, row.outputs))
    # Every prompt token is computed or copied from a prompt that starts alike (prompt sharing), never both.
    assert row.steady.prompt_tokens + row.steady.prompt_tokens_shared == sum(workload.prompt_lengths())
    assert row.steady.prompt_tokens_shared > 0  # the workload's chat prompts share their system lines
    assert row.warmup.programs_compiled > 0 and row.warmup.compile_seconds > 0
    assert row.peak_rss_bytes > 50 * 2**20  # the child's own peak (JAX alone takes more), not zero or the parent's
    assert row.identical_share == 1.0  # float32 against itself
    assert row.floor_share is not None and row.floor_share > 0
    assert report.floor is not None and len(report.floor.measurements) == 2
    assert [(p.system, p.status) for p in report.peers] == [
        ("transformers", "skipped"), ("ctranslate2 float32", "skipped"), ("ctranslate2 int8", "skipped"),
        ("vllm", "skipped"), ("keras-hub", "skipped")]
    assert all("lacks" in p.reason for p in report.peers)
    assert report.ratios() == {}  # nothing to compare with: no figure is made up
    text = report.render_text()
    assert "main float32" in text and "transformers: skipped" in text
    json.dumps(report.to_dict())


def test_bench_command_rejects_a_bad_dtype_before_running_anything():
    from batchgen.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--quick", "--dtypes", "float32,float16"])
    assert result.exit_code == 2
    assert "float16" in result.output


def test_bench_command_names_an_unknown_peer_before_running_anything():
    from batchgen.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--quick", "--skip-peers", "keras-hub,llama.cpp"])
    assert result.exit_code == 2
    assert "llama.cpp" in result.output and "keras-hub" not in result.output.split("unknown peers")[1].split("known")[0]
