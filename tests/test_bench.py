"""The benchmark's parts: workloads, the FLOP count, agreement, the report and peer availability."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import stat
import sys

import pytest

from batchgen.bench import peers
from batchgen.bench.floor import (
    FORMULA, flops_per_token, mean_context, measure_matmul_rate, prompt_flops, weights_per_token,
)
from batchgen.bench.options import BenchOptions
from batchgen.bench.ours import EngineRun
from batchgen.bench.quality import agreement, matching_prefix
from batchgen.bench.report import BenchReport, EngineRow, FloorFigures, PassFigures, PeerResult, PeerRun
from batchgen.bench.runner import generated_counts
from batchgen.bench.workloads import (
    SHORT_PROMPT_TOKENS, Workload, chat_prompts, main_workload, short_chat_prompts, short_workload, variable_budgets,
    variable_workload,
)
from model.config import LlamaConfig


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    return tiny_lm.preprocessor.tokenizer


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    """The demo model's tokenizer and chat template, from the files transformers wrote (no GGUF file needed)."""
    import gzip
    import shutil

    from model.tokenizers import BytePairTokenizer

    source = pathlib.Path(__file__).parent / "fixtures" / "tokenizers" / "smollm2"
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / "tokenizer.json").write_bytes(gzip.decompress((source / "tokenizer.json.gz").read_bytes()))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    return BytePairTokenizer.from_huggingface(folder)


# ---- workloads ---------------------------------------------------------------------------------------------


def test_main_workload_is_the_same_every_time_and_changes_with_the_seed(tokenizer):
    first = main_workload(tokenizer, prompts=16, max_new_tokens=8, stop_token_ids=(5,))
    again = main_workload(tokenizer, prompts=16, max_new_tokens=8, stop_token_ids=(5,))
    other = main_workload(tokenizer, prompts=16, max_new_tokens=8, stop_token_ids=(5,), seed=1)
    assert first == again
    assert [r.prompt_ids for r in first.requests] != [r.prompt_ids for r in other.requests]
    assert len({r.request_id for r in first.requests}) == 16
    assert all(r.max_new_tokens == 8 for r in first.requests)
    assert first.stop_token_ids == (5,)


def test_main_prompts_go_through_the_chat_template_and_have_mixed_lengths(tokenizer):
    workload = main_workload(tokenizer, prompts=32, max_new_tokens=8, stop_token_ids=(5,))
    request = workload.requests[0]
    assert list(request.prompt_ids) == tokenizer.tokenize_chat(list(request.messages))
    assert tokenizer.detokenize(list(request.prompt_ids)).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    lengths = workload.prompt_lengths()
    assert max(lengths) > 4 * min(lengths)  # one-liners and pages of notes
    assert any(m["role"] == "system" for r in workload.requests for m in r.messages)


def test_variable_budgets_span_one_to_max_and_are_seeded():
    budgets = variable_budgets(128, 256, seed=0)
    assert budgets == variable_budgets(128, 256, seed=0)
    assert min(budgets) == 1 and max(budgets) == 256
    assert sorted(budgets)[64] < 64  # log-uniform: most outputs short, a few long
    assert variable_budgets(1, 256, seed=0) == [1]


def test_variable_workload_has_no_stop_ids_and_its_own_prompts(tokenizer):
    variable = variable_workload(tokenizer, prompts=8, max_new_tokens=16)
    main = main_workload(tokenizer, prompts=8, max_new_tokens=16, stop_token_ids=(5,))
    assert variable.stop_token_ids == ()
    assert [r.max_new_tokens for r in variable.requests] == variable_budgets(8, 16, 0)
    assert [r.prompt_ids for r in variable.requests] != [r.prompt_ids for r in main.requests]


def test_short_workload_is_deterministic_under_64_tokens_and_apart_from_main(demo_tokenizer):
    tokenizer = demo_tokenizer
    short = short_workload(tokenizer, prompts=64, max_new_tokens=64, stop_token_ids=(2,))
    assert short == short_workload(tokenizer, prompts=64, max_new_tokens=64, stop_token_ids=(2,))
    assert short.name == "short" and short.stop_token_ids == (2,)
    lengths = short.prompt_lengths()
    assert max(lengths) < SHORT_PROMPT_TOKENS and 30 < sum(lengths) / len(lengths) < 50  # ~39 tokens each
    assert all(r.max_new_tokens == 64 for r in short.requests)
    assert len({r.request_id for r in short.requests}) == 64 and short.requests[0].request_id == "short-0000"
    # A system line and a one-sentence question, through the chat template.
    assert all([m["role"] for m in r.messages] == ["system", "user"] for r in short.requests)
    assert list(short.requests[0].prompt_ids) == tokenizer.tokenize_chat(list(short.requests[0].messages))
    assert tokenizer.detokenize(list(short.requests[0].prompt_ids)).endswith("<|im_start|>assistant\n")
    main = main_workload(tokenizer, prompts=64, max_new_tokens=64, stop_token_ids=(2,))
    assert [r.prompt_ids for r in short.requests] != [r.prompt_ids for r in main.requests][:64]
    assert short_chat_prompts(8, seed=1) != short_chat_prompts(8, seed=2)


def test_short_workload_names_a_prompt_over_its_token_limit(tokenizer):
    with pytest.raises(ValueError, match="short workload: short-0000 has .* prompt tokens, not under 5"):
        short_workload(tokenizer, prompts=2, stop_token_ids=(5,), max_prompt_tokens=5)


def test_workload_round_trips_through_json(tokenizer, tmp_path):
    workload = variable_workload(tokenizer, prompts=5, max_new_tokens=16)
    workload.write(tmp_path / "w.json")
    assert Workload.read(tmp_path / "w.json") == workload


def test_chat_prompts_do_not_depend_on_the_tokenizer():
    assert chat_prompts(6, seed=3) == chat_prompts(6, seed=3)
    assert chat_prompts(6, seed=3) != chat_prompts(6, seed=4)


# ---- the floor ---------------------------------------------------------------------------------------------

TINY = LlamaConfig(vocabulary_size=96, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                   intermediate_dim=32)


def test_flops_per_token_matches_a_hand_count():
    # Per layer: query 16*16 + key, value 2*16*8 + output 16*16 + gate, up, down 3*16*32 = 2304; two layers 4608;
    # LM head 16*96 = 1536; 6144 weights, 2 FLOPs each. Attention at context 10: 4 * 2 layers * 4 heads * 4 * 10.
    flops = flops_per_token(TINY, context=10)
    assert flops.weights_per_token == 6144
    assert flops.weight_flops == 12288
    assert flops.attention_flops == 1280
    assert flops.total == 13568
    assert flops.formula == FORMULA


def test_weights_per_token_counts_every_product_weight_of_the_backbone():
    from model.backbone import weight_shapes

    shapes = weight_shapes(LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": False}))
    products = ("layers/query", "layers/key", "layers/value", "layers/attention_output", "layers/gate", "layers/up",
                "layers/down", "lm_head")
    total = 0
    for name in products:
        size = 1
        for n in shapes[name]:
            size *= n
        total += size
    assert weights_per_token(TINY) == total


def test_demo_model_costs_about_0_28_gflop_per_token():
    demo = LlamaConfig(vocabulary_size=49152, num_layers=30, num_query_heads=9, num_key_value_heads=3,
                       hidden_dim=576, intermediate_dim=1536, tie_word_embeddings=True)
    assert weights_per_token(demo) == 134_479_872  # the 134.5M weights less the norms
    assert flops_per_token(demo, context=100).total == pytest.approx(0.276e9, rel=0.01)


def test_prompt_flops_count_the_body_products_and_causal_attention():
    # 6144 - 1536 (no LM head) = 4608 weights, 2 FLOPs each, per token; attention 4 * 2 * 4 * 4 = 128 FLOPs per
    # token attended: a 3-token prompt attends to 1 + 2 + 3 tokens.
    assert prompt_flops(TINY, [3]) == 3 * 2 * 4608 + 128 * 6
    assert prompt_flops(TINY, [3, 1]) == prompt_flops(TINY, [3]) + 2 * 4608 + 128
    assert prompt_flops(TINY, []) == 0


def test_mean_context_averages_what_each_generated_token_attends_to():
    # Prompt 3, two tokens: they see 3 and 4; prompt 5, one token: it sees 5.
    assert mean_context([3, 5], [2, 1]) == pytest.approx(4.0)
    assert mean_context([3], [0]) == 0.0
    with pytest.raises(ValueError, match="2 prompt lengths but 1"):
        mean_context([3, 5], [2])


def test_matmul_rate_is_measured_at_the_model_shapes():
    rate = measure_matmul_rate(TINY, rows=4, min_repeats=2, min_seconds=0.0)
    assert rate.rows == 4 and rate.repeats >= 2
    assert 0 < rate.flops_per_second <= rate.best_flops_per_second
    assert set(rate.shapes) == {"[4,16]x[16,32]", "[4,16]x[16,96]"}


# ---- agreement and counting --------------------------------------------------------------------------------


def test_agreement_counts_identical_outputs_and_matching_prefixes():
    reference = {"a": [1, 2, 3], "b": [4, 5], "c": [6]}
    outputs = {"a": [1, 2, 3], "b": [4, 9, 9]}  # c is missing: it shares nothing
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2
    share, prefix = agreement(outputs, reference)
    assert share == pytest.approx(1 / 3)
    assert prefix == pytest.approx((3 + 1 + 0) / 3)


def test_generated_counts_add_the_stop_token_only_when_a_sequence_stopped(tokenizer):
    workload = main_workload(tokenizer, prompts=3, max_new_tokens=4, stop_token_ids=(5,))
    ids = [r.request_id for r in workload.requests]
    outputs = {ids[0]: [7, 7, 7, 7], ids[1]: [7], ids[2]: []}
    assert generated_counts(workload, outputs) == [4, 2, 1]
    no_stops = variable_workload(tokenizer, prompts=2, max_new_tokens=4)
    assert generated_counts(no_stops, {r.request_id: [7] for r in no_stops.requests}) == [1, 1]


# ---- options, report, peers --------------------------------------------------------------------------------


def test_options_name_the_bad_value():
    with pytest.raises(ValueError, match="float16"):
        BenchOptions(dtypes=("float32", "float16"))
    with pytest.raises(ValueError, match="must include float32"):
        BenchOptions(dtypes=("int8",))
    assert BenchOptions.quick(prompts=3).prompts == 3


def _pass(wall: float, generated: int, compiled: int) -> PassFigures:
    return PassFigures(wall, 0.5, 100, generated, 0.25, wall - 0.25, 4, compiled, 1.5 * compiled)


def _report() -> BenchReport:
    row = EngineRow("main float32", "main", "float32", None, True, 4, 8, 128, 1.0, _pass(12.0, 200, 3),
                    _pass(2.0, 200, 0), 900 * 2**20, identical_share=1.0, mean_prefix_tokens=40.0,
                    achieved_flops_per_second=5e9, floor_share=0.5, load_average="4.10 4.28 5.14")
    int8 = EngineRow("main int8", "main", "float32", "int8", True, 4, 8, 128, 1.0, _pass(11.0, 200, 3),
                     _pass(4.0, 200, 0), 600 * 2**20, identical_share=0.25, mean_prefix_tokens=12.5)
    floor = FloorFigures(2.8e8, 269_000_000, 7e6, 90.0, FORMULA, 4, 1e10, [
        {"rows": 4, "flops_per_second": 1e10, "best_flops_per_second": 1.1e10, "repeats": 5,
         "shapes": {"[4,576]x[576,1536]": 2e10}}], prompt_flops_per_token=2.2e8)
    short = EngineRow("short float32", "short", "float32", None, True, 4, 8, 128, 1.0, _pass(5.0, 300, 3),
                      _pass(1.0, 300, 0), 800 * 2**20, identical_share=1.0, mean_prefix_tokens=30.0)
    ran = PeerResult("transformers", "ran", version="5.24", runs=[
        PeerRun(16, 4.0, 1.0, 100, 200, identical_share=1.0), PeerRun(64, 2.0, 2.0, 100, 100)])
    ct2 = PeerResult("ctranslate2 int8", "ran", version="4.8", runs=[
        PeerRun(4, 2.0, 2.0, 100, 100, workload="main"),
        PeerRun(4, 0.5, 0.5, 50, 600, workload="short", identical_share=0.75)])
    skipped = PeerResult("keras-hub", "skipped", reason="python lacks keras_hub")
    return BenchReport("tiny", {"cpu": "test cpu", "cores": 2, "load_before": "1.00 1.00 1.00"}, {},
                       {"main": "main: 8 chat prompts", "short": "short: 8 chat prompts"}, [row, int8, short], floor,
                       [ran, ct2, skipped])


def test_report_renders_rows_floor_peers_and_ratios():
    report = _report()
    text = report.render_text(width=220)
    assert "main float32" in text and "main int8" in text
    assert "100.0" in text  # 200 tokens in 2 s
    assert "3 / 0" in text  # programs compiled in warm-up / steady
    assert "4.10" in text and "4.28" not in text  # the 1-minute load average as the row started
    assert "25%" in text and "12.5" in text  # int8's agreement with float32
    assert "2*(L*(2*M*H*D" in text and "floor 36 tok/s" in text  # 1e10 FLOP/s / 2.8e8 FLOP per token
    assert "floor 20 tok/s;" in text  # with the prompts: 1e10 / (2.8e8 + 2.2e8)
    assert "keras-hub: skipped: python lacks keras_hub" in text
    assert report.ratios() == {"transformers": pytest.approx(2.0), "ctranslate2 int8": pytest.approx(2.0)}
    assert "2.00x" in text


def test_report_compares_each_peer_run_with_our_float32_on_the_same_workload():
    report = _report()
    # short: ours 300 tok/s, CTranslate2 int8 1200 tok/s; transformers did not run it.
    assert report.ratios("short") == {"ctranslate2 int8": pytest.approx(0.25)}
    text = report.render_text(width=220)
    (line,) = [x for x in text.splitlines() if "ctranslate2 int8" in x and "short" in x]
    assert "1200.0" in line and "0.25x" in line and "75%" in line
    assert "short float32" in text and "300.0" in text
    assert report.to_dict()["ratios_by_workload"]["short"] == {"ctranslate2 int8": pytest.approx(0.25)}


def test_report_json_has_the_raw_figures_and_no_outputs():
    data = json.loads(json.dumps(_report().to_dict()))
    row = data["engine_rows"][0]
    assert row["tokens_per_second"] == pytest.approx(100.0)
    assert row["compile_wall_seconds"] == pytest.approx(10.0)
    assert "outputs" not in row
    assert data["peers"][2] == {**data["peers"][2], "status": "skipped", "runs": []}
    assert data["peers"][1]["runs"][1]["workload"] == "short"
    assert data["floor"]["floor_tokens_per_second"] == pytest.approx(1e10 / 2.8e8)
    assert data["floor"]["workload_floor_tokens_per_second"] == pytest.approx(1e10 / 5e8)


def test_engine_rows_cover_each_dtype_on_main_and_short(tmp_path):
    from batchgen.bench.runner import _engine_runs

    runs = _engine_runs(BenchOptions(dtypes=("float32", "int8", "bf16-cache"), variable_prompts=0), tmp_path, None)
    assert [r.name for r in runs] == [
        "main float32", "main int8", "main bf16-cache", "short float32", "short int8", "short bf16-cache"
    ]
    assert runs[4].quantization == "int8" and runs[4].workload_path == str(tmp_path / "workload_short.json")
    # The float32 model with a bfloat16 KV cache.
    assert (runs[5].dtype, runs[5].quantization, runs[5].cache_dtype) == ("float32", None, "bfloat16")
    assert runs[3].cache_dtype is None
    assert runs[0].prepare.short_path == str(tmp_path / "workload_short.json")
    runs = _engine_runs(BenchOptions(dtypes=("float32",), short_prompts=0, variable_prompts=0), tmp_path, None)
    assert [r.name for r in runs] == ["main float32"] and runs[0].prepare.short_path is None
    runs[0] = dataclasses.replace(runs[0], cache_dtype="bfloat16")
    runs[0].write(tmp_path / "spec.json")  # a spec file carries the cache dtype to the row's process
    assert EngineRun.read(tmp_path / "spec.json").cache_dtype == "bfloat16"


def test_a_response_format_adds_a_constrained_short_row(tmp_path):
    from batchgen.bench.runner import _engine_runs

    answer = '{"json_schema":{"schema":{"type":"object"}},"type":"json_schema"}'
    runs = _engine_runs(BenchOptions(dtypes=("float32",), variable_prompts=0, response_format=answer), tmp_path, None)
    assert [r.name for r in runs] == ["main float32", "short float32", "short float32 response_format"]
    assert runs[2].response_format == answer and runs[1].response_format is None
    assert runs[2].workload_path == runs[1].workload_path
    with pytest.raises(ValueError, match="short_prompts"):
        BenchOptions(short_prompts=0, response_format=answer)


def _python_without_site_packages(tmp_path: pathlib.Path) -> str:
    """An interpreter that has the standard library only (no site-packages): it lacks every peer's packages."""
    script = tmp_path / "bare-python"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_peer_whose_interpreter_lacks_its_packages_is_unavailable(tmp_path):
    python = _python_without_site_packages(tmp_path)
    reason = peers.unavailable_reason(peers.TRANSFORMERS, python)
    assert reason is not None and "lacks torch, transformers, gguf" in reason
    assert "does not exist" in peers.unavailable_reason(peers.KERAS_HUB, str(tmp_path / "no-python"))
    # The interpreter running the tests has what the check itself needs:
    assert peers.unavailable_reason(peers.Peer("x", pathlib.Path("x"), ("json",), ""), sys.executable) is None


def test_synthesis_prompts_are_distinct_and_share_a_system_prompt_of_over_200_tokens(demo_tokenizer):
    from batchgen.bench.synthesis import SYSTEM_PROMPT, synthesis_prompts

    prompts = synthesis_prompts(demo_tokenizer, 16, seed=0)
    assert len({tuple(p) for p in prompts}) == 16 and prompts == synthesis_prompts(demo_tokenizer, 16, seed=0)
    assert len(demo_tokenizer.tokenize(SYSTEM_PROMPT)) >= 200
    shared = min(next((i for i, (a, b) in enumerate(zip(prompts[0], p)) if a != b), len(p)) for p in prompts[1:])
    assert shared >= 200  # every prompt starts with the same 200+ tokens
