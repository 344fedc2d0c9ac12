"""The continuous-batching engine on a tiny random model."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from model.generation import compile_counter
from model.generation.engine import GenerationEngine
from model.generation.requests import Request, SamplingParams


def reference_greedy(backbone, prompt: list[int], new_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step: slow, simple, independent of the cache."""
    ids = list(prompt)
    out: list[int] = []
    width = 128  # one padded shape for every step, so the reference compiles once
    for _ in range(new_tokens):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        hidden = backbone({"token_ids": padded, "padding_mask": np.arange(width)[None] < len(ids)})
        token = int(np.argmax(transformer.logits(backbone.params(), hidden[:, len(ids) - 1])[0]))
        if token in stop:
            break
        out.append(token)
        ids.append(token)
    return out


def prompts(n: int, seed: int = 0, low: int = 1, high: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, 90, rng.integers(low, high))) for _ in range(n)]


def test_greedy_matches_full_recompute(tiny_backbone):
    engine = GenerationEngine(tiny_backbone, max_slots=4, max_length=64, steps_per_call=3)
    batch = prompts(6)  # more prompts than slots: slots are refilled
    requests = [Request(i, p, max_new_tokens=7) for i, p in enumerate(batch)]
    for request, completion in zip(requests, engine.generate(requests)):
        assert completion.finish_reason == "length"
        assert completion.completion_tokens == 7
        assert completion.prompt_tokens == len(request.prompt_ids)
        assert list(completion.token_ids) == reference_greedy(tiny_backbone, request.prompt_ids, 7)


def test_every_prompt_gets_the_same_tokens_alone_and_in_a_mixed_batch(tiny_backbone):
    batch = prompts(32, seed=3, high=60)
    requests = [Request(i, p, max_new_tokens=5 + i % 4) for i, p in enumerate(batch)]
    engine = GenerationEngine(tiny_backbone, max_slots=32, max_length=128)
    together = engine.generate(requests)
    # A full packed row (512 tokens of prompts under 64) ran banded attention; a prompt alone runs the plain one.
    assert 64 in {shape[4] for shape in engine.stats.shapes if shape[0] == "prefill"}
    alone_engine = GenerationEngine(tiny_backbone, max_slots=1, max_length=128)
    for request, completion in zip(requests, together):
        assert alone_engine.generate([request])[0].token_ids == completion.token_ids
    assert {shape[4] for shape in alone_engine.stats.shapes if shape[0] == "prefill"} == {None}


def test_stop_token_ends_a_sequence_and_is_not_returned(tiny_backbone):
    prompt = prompts(1, seed=5)[0]
    free_run = reference_greedy(tiny_backbone, prompt, 12)
    stop = free_run[4]
    first = free_run.index(stop)
    engine = GenerationEngine(tiny_backbone, max_slots=2, max_length=64)
    completion = engine.generate([Request("x", prompt, 12, stop_token_ids=(stop,))])[0]
    assert completion.finish_reason == "stop"
    assert list(completion.token_ids) == free_run[:first]
    assert completion.completion_tokens == first + 1  # the stop token was generated, so it is counted
    assert completion.stop_token_id == stop


def test_bad_requests_are_rejected_one_by_one_and_the_rest_go_on(tiny_backbone):
    engine = GenerationEngine(tiny_backbone, max_slots=2, max_length=32)
    requests = [
        Request("ok", [1, 2, 3], 4),
        Request("too-long", list(range(1, 33)), 4),
        Request("empty", [], 4),
        Request("bad-id", [1, 500], 4),
        Request("ok2", [4, 5], 4),
    ]
    by_id = {c.request_id: c for c in engine.generate_stream(requests)}
    assert set(by_id) == {r.request_id for r in requests}
    assert by_id["too-long"].finish_reason == "error" and "32 tokens" in by_id["too-long"].error
    assert "no tokens" in by_id["empty"].error
    assert "500" in by_id["bad-id"].error
    assert by_id["ok"].finish_reason == by_id["ok2"].finish_reason == "length"


def test_generation_stops_at_the_end_of_the_cache(tiny_backbone):
    engine = GenerationEngine(tiny_backbone, max_slots=1, max_length=32)
    completion = engine.generate([Request("x", list(range(1, 29)), 100)])[0]
    assert completion.finish_reason == "length"
    assert completion.prompt_tokens + completion.completion_tokens == 32


def test_second_call_of_the_same_shapes_does_not_recompile(tiny_backbone):
    engine = GenerationEngine(tiny_backbone, max_slots=4, max_length=64)
    requests = [Request(i, p, 6) for i, p in enumerate(prompts(4, seed=7, high=20))]
    engine.generate(requests)
    before, _ = compile_counter.snapshot()
    engine.generate([Request(i, p, 6) for i, p in enumerate(prompts(4, seed=8, high=20))])
    after, _ = compile_counter.snapshot()
    assert after == before


def test_prepare_builds_the_weights_and_the_cache_that_generation_then_uses(tiny_backbone):
    engine = GenerationEngine(tiny_backbone, max_slots=4, max_length=64)
    engine.prepare()
    weights, cache = engine._weights_cache, engine._cache
    assert weights is not None and cache is not None
    engine.prepare()  # a second call builds nothing
    assert engine._weights_cache is weights and engine._cache is cache
    requests = [Request(i, p, 5) for i, p in enumerate(prompts(3, seed=11, high=20))]
    for request, completion in zip(requests, engine.generate(requests)):
        assert list(completion.token_ids) == reference_greedy(tiny_backbone, request.prompt_ids, 5)
    assert engine._weights_cache is weights  # generation took the prepared weights, not a rebuilt copy


def test_a_long_run_of_random_lengths_compiles_a_handful_of_programs(tiny_backbone):
    import jax

    jax.clear_caches()  # what earlier tests compiled must not count as free here
    engine = GenerationEngine(tiny_backbone, max_slots=16, max_length=256, steps_per_call=8)
    engine.prepare()  # the weights' and the cache's layouts: compiled once per engine, not per shape
    rng = np.random.default_rng(11)
    requests = [
        Request(i, list(rng.integers(1, 90, rng.integers(1, 200))), int(rng.integers(1, 40)))
        for i in range(500)
    ]
    completions = list(engine.generate_stream(requests))
    assert sorted(c.request_id for c in completions) == list(range(500))
    assert all(c.finish_reason == "length" for c in completions)
    # Prefill: one program per row length bucket (32..512: prompts of up to 200 tokens packed into rows of up to
    # 512) and its pool write; decode: one per rows bucket and page-table window.
    prefills = {shape for shape in engine.stats.shapes if shape[0] == "prefill"}
    decodes = engine.stats.shapes - prefills
    assert len(prefills) <= 5 and len(decodes) <= 4, engine.stats.shapes
    assert engine.stats.programs_compiled <= 2 * len(prefills) + len(decodes), engine.stats.shapes


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny_backbone):
    sampling = SamplingParams("random", temperature=1.5)
    target = Request("target", [3, 4, 5], 10, sampling, seed=1234)
    others = [Request(i, p, 10, sampling, seed=i) for i, p in enumerate(prompts(5, seed=9))]
    alone = GenerationEngine(tiny_backbone, max_slots=1, max_length=64).generate([target])[0]
    crowded = GenerationEngine(tiny_backbone, max_slots=8, max_length=64).generate([*others, target])[-1]
    assert alone.token_ids == crowded.token_ids
    other_seed = GenerationEngine(tiny_backbone, max_slots=1, max_length=64).generate(
        [Request("target", [3, 4, 5], 10, sampling, seed=99)]
    )[0]
    assert other_seed.token_ids != alone.token_ids


def test_packs_hold_every_prompt_once_within_their_rows():
    from model.generation.scheduler import PACK_TOKENS, bucket, plan_packs, segments_for

    rng = np.random.default_rng(4)
    for _ in range(200):
        lengths = list(rng.integers(1, rng.choice([40, 300, 1500]), rng.integers(1, 70)))
        max_slots = int(rng.choice([1, 8, 64]))
        packs = plan_packs(lengths, max_slots)
        assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
        for pack in packs:
            total = sum(lengths[i] for i in pack)
            row = bucket(total, 32)
            assert total <= max(PACK_TOKENS, row) and len(pack) <= segments_for(row, max_slots)
            assert len(pack) == 1 or total <= PACK_TOKENS or max(lengths[i] for i in pack) > PACK_TOKENS


def test_packs_take_at_most_their_share_of_distinct_cached_pages():
    from model.generation.scheduler import CONTEXT_PAGES, plan_packs

    rng = np.random.default_rng(6)
    for _ in range(200):
        lengths = list(rng.integers(1, 200, rng.integers(1, 60)))
        # Prompts behind one of a few system prompts (shared pages), behind pages of their own, or none.
        systems = [tuple(range(100 * s, 100 * s + int(rng.integers(1, 12)))) for s in range(4)]
        contexts = [
            systems[int(rng.integers(4))] if r < 0.5 else tuple(range(1000 + 50 * i, 1000 + 50 * i + int(rng.integers(1, 40))))
            if r < 0.7 else ()
            for i, r in enumerate(rng.random(len(lengths)))
        ]
        packs = plan_packs(lengths, 64, contexts)
        assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
        for pack in packs:
            distinct = {page for i in pack for page in contexts[i]}
            assert len(distinct) <= CONTEXT_PAGES or len(pack) == 1
    # Prompts behind one system prompt share its pages: they fill rows as prompts without context do.
    assert len(plan_packs([40] * 12, 64, [(1, 2)] * 12)) == 1


def test_only_full_rows_of_short_prompts_attend_in_bands():
    from model.generation.scheduler import PACK_TOKENS, BAND_TOKENS, segment_bound

    assert segment_bound([40, 33, BAND_TOKENS], PACK_TOKENS) == BAND_TOKENS
    assert segment_bound([40, 33, BAND_TOKENS + 1], PACK_TOKENS) is None  # a longer prompt would lose keys
    assert segment_bound([40, 33], PACK_TOKENS // 2) is None  # one banded program per job, not one per row length


def test_packing_pads_little_on_a_mixed_workload():
    from model.generation.scheduler import bucket, plan_packs

    rng = np.random.default_rng(5)
    lengths = list(rng.integers(30, 400, 64))
    padded = sum(bucket(sum(lengths[i] for i in pack), 32) for pack in plan_packs(lengths, 64))
    assert padded < 1.15 * sum(lengths)  # a power-of-two bucket per prompt pads ~40% here


def test_a_decode_call_reads_the_cache_chunks_below_the_highest_page_in_use():
    from model.generation.paged_cache import CHUNK_PAGES, MAX_CHUNKS, chunk_sizes, chunks_to_read

    assert chunk_sizes(150) == [CHUNK_PAGES, CHUNK_PAGES, 150 - 2 * CHUNK_PAGES] and chunk_sizes(10) == [10]
    assert [chunks_to_read(n, 150) for n in (0, 1, CHUNK_PAGES, CHUNK_PAGES + 1, 150)] == [1, 1, 1, 2, 3]
    # A large pool gets larger chunks, never more than MAX_CHUNKS: the programs stay few and their compiles short.
    big = CHUNK_PAGES * MAX_CHUNKS * 3 + 5
    assert len(chunk_sizes(big)) == MAX_CHUNKS and sum(chunk_sizes(big)) == big
    assert [chunks_to_read(n, big) for n in (1, chunk_sizes(big)[0], chunk_sizes(big)[0] + 1, big)] == [1, 1, 2, MAX_CHUNKS]


def test_a_decode_call_reads_whole_page_table_rows_when_rows_are_short():
    from model.generation.paged_cache import WHOLE_ROW_PAGES, PageTable

    short = PageTable(64, 32, 4, 32 * 6)  # rows of 6 pages: one width whatever the slots hold
    short.admit(0, 10, 100)
    assert short.width(4) == 6
    long = PageTable(4 * 200, 32, 4, 32 * 200)
    long.admit(0, 32 * 40, 32 * 40)
    assert long.width(1) == 2 * WHOLE_ROW_PAGES and long.width(4) == 2 * WHOLE_ROW_PAGES
    long.admit(1, 10, 10)
    assert long.width(4) == 2 * WHOLE_ROW_PAGES
    long.release(0)
    assert long.width(4) == WHOLE_ROW_PAGES


def _token_texts(tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    """The text each generated token adds after the prompt (decoded in context)."""
    base = len(tokenizer.detokenize(prompt))
    texts = [tokenizer.detokenize([*prompt, *generated[: k + 1]])[base:] for k in range(len(generated))]
    return [after[len(before) :] for before, after in zip(["", *texts], texts)]


def test_a_stop_string_followed_by_a_stop_token_in_the_same_decode_call_ends_the_text_at_the_string(tiny_lm):
    # The leak: a decode call returned the stop string's token and, later in the same call, a stop token; the
    # engine finished on the token and never looked for the string, so the text ran on past it.
    tokenizer = tiny_lm.preprocessor.tokenizer
    engine = GenerationEngine(tiny_lm.backbone, tokenizer, max_slots=2, max_length=64, steps_per_call=8)
    for prompt_text in ["The ocean is", "Once upon a time", "1 2 3", "Hello there, friend"]:
        prompt = tokenizer.tokenize(prompt_text)
        free = engine.generate([Request(0, prompt, 12)])[0]
        generated, texts = list(free.token_ids), _token_texts(tokenizer, prompt, list(free.token_ids))
        # Token k (1..5: the first decode call returns tokens 1..8) adds text that appears nowhere before it;
        # token k + 2, new so far, is made a stop token.
        for k in range(1, 6):
            stop, before = texts[k].strip(), "".join(texts[:k])
            if not stop or "\ufffd" in stop or stop in before + texts[k][: texts[k].find(stop)] or generated[k + 2] in generated[: k + 2]:
                continue
            completion = engine.generate([Request(1, prompt, 12, stop_token_ids=(generated[k + 2],), stop_strings=(stop,))])[0]
            expected = free.text[: free.text.find(stop)]
            assert completion.text == expected and stop not in completion.text
            assert completion.finish_reason == "stop" and completion.stop_token_id is None
            assert completion.completion_tokens == k + 1 and list(completion.token_ids) == generated[:k]
            return
    pytest.fail("no generated text of the tiny model gave a stop string to test")


def test_special_tokens_stay_out_of_the_text_unless_the_request_keeps_them(tiny_lm):
    tokenizer = tiny_lm.preprocessor.tokenizer
    special = set(tokenizer.special_tokens.values())
    engine = GenerationEngine(tiny_lm.backbone, tokenizer, max_slots=16, max_length=64)
    hot = SamplingParams("random", temperature=5.0)  # near uniform: the 11 special ids of 711 come out too
    keep = [Request(i, tokenizer.tokenize("Hi"), 24, hot, seed=i, skip_special_tokens=False) for i in range(16)]
    kept = engine.generate(keep)
    skipped = engine.generate([dataclasses.replace(r, skip_special_tokens=True) for r in keep])
    with_special = [i for i, c in enumerate(kept) if special & set(c.token_ids)]
    assert with_special, "no special token sampled; raise the token count"
    for i in with_special:
        assert kept[i].token_ids == skipped[i].token_ids
        names = [tokenizer.id_to_token(t) for t in kept[i].token_ids if t in special]
        assert all(name in kept[i].text for name in names)
        assert not any(name in skipped[i].text for name in tokenizer.special_tokens)
        assert skipped[i].text == tokenizer.detokenize(
            [*keep[i].prompt_ids, *kept[i].token_ids], skip_special_tokens=True
        )[len(tokenizer.detokenize(keep[i].prompt_ids, skip_special_tokens=True)) :]


def test_compaction_packs_occupied_slots_low_and_decode_computes_only_their_rows(tiny_backbone):
    from model.generation.paged_cache import PageTable
    from model.generation.scheduler import SlotTable, rows_bucket

    table = SlotTable.empty(32, PageTable(64, 8, 32, 32))
    for slot in (3, 17, 30):
        table.reserve(slot, Request(slot, [1, 2, 3], 4), 32)
        table.occupy(slot, first_token=slot, seed=slot)
    table.compact()
    assert [e.request.request_id if e else None for e in table.entries[:4]] == [30, 17, 3, None]
    assert list(table.tokens[:3]) == [30, 17, 3] and table.active[:3].all() and not table.active[3:].any()
    assert rows_bucket(table.occupied(), 32) == 8 and rows_bucket(0, 32) == 8
    assert [rows_bucket(n, 256) for n in (9, 17, 25, 33, 49, 65, 97, 129, 193)] == [16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert rows_bucket(20, 20) == 20 and rows_bucket(40, 32) == 32  # never past max_slots

    # Sequences of very different lengths: the engine runs its calls at 32 rows down to 8 as slots free up,
    # and every request's tokens equal those it gets alone.
    rng = np.random.default_rng(3)
    requests = [Request(i, list(rng.integers(1, 90, 5)), int(n)) for i, n in enumerate(rng.integers(1, 40, 30))]
    engine = GenerationEngine(tiny_backbone, max_slots=32, max_length=64, steps_per_call=4)
    together = engine.generate(requests)
    assert {shape[1] for shape in engine.stats.shapes if shape[0] == "decode"} >= {8, 32}
    alone = GenerationEngine(tiny_backbone, max_slots=32, max_length=64, steps_per_call=4)
    for request, completion in zip(requests[::7], together[::7]):
        assert alone.generate([request])[0].token_ids == completion.token_ids


def test_logprobs_are_the_models_log_softmax_at_each_generated_token(tiny_backbone):
    rng = np.random.default_rng(11)
    prompts = [list(rng.integers(1, 90, n)) for n in (5, 17, 9)]
    engine = GenerationEngine(tiny_backbone, max_slots=4, max_length=64, steps_per_call=4)
    requests = [Request(0, prompts[0], 10, logprobs=3), Request(1, prompts[1], 7, logprobs=0), Request(2, prompts[2], 6)]
    completions = engine.generate(requests)
    assert completions[2].token_logprobs is None and completions[2].top_logprobs is None
    params = tiny_backbone.params()
    for request, completion in zip(requests[:2], completions[:2]):
        ids = [*request.prompt_ids, *completion.token_ids]
        hidden, _, _ = transformer.forward(params, tiny_backbone.config, jnp.asarray([ids]), jnp.arange(len(ids))[None])
        log_probs = np.asarray(jax.nn.log_softmax(transformer.logits(params, hidden[0]), axis=-1))
        n = len(request.prompt_ids)
        assert len(completion.token_logprobs) == len(completion.token_ids) == request.max_new_tokens
        for t, token in enumerate(completion.token_ids):
            expected = log_probs[n - 1 + t]
            assert completion.token_logprobs[t] == pytest.approx(expected[token], abs=1e-4)
            top = completion.top_logprobs[t]
            assert len(top) == request.logprobs
            assert [i for i, _ in top] == list(np.argsort(-expected, kind="stable")[: request.logprobs])
            assert [lp for _, lp in top] == pytest.approx(list(np.sort(expected)[::-1][: request.logprobs]), abs=1e-4)


def test_the_engine_can_list_every_device_call_and_their_seconds_add_up_to_its_counters(tiny_backbone):
    from batchgen.bench.timeline import summary
    from model.generation.engine import EngineStats

    engine = GenerationEngine(tiny_backbone, max_slots=4, max_length=64, steps_per_call=4)
    requests = [Request(i, p, max_new_tokens=6) for i, p in enumerate(prompts(6, seed=5))]
    engine.generate(requests)  # compiles
    engine.stats = EngineStats(calls=[])
    start = time.perf_counter()
    engine.generate(requests)
    wall = time.perf_counter() - start
    calls = engine.stats.calls
    assert {call.kind for call in calls} == {"prefill", "decode"}
    assert sum(call.rows for call in calls if call.kind == "prefill") == 6  # every prompt prefilled once
    assert sum(1 for call in calls if call.kind == "decode") == engine.stats.decode_calls
    assert sum(c.seconds for c in calls) == pytest.approx(engine.stats.prefill_seconds + engine.stats.decode_seconds)
    assert all(a.start + a.seconds <= b.start for a, b in zip(calls, calls[1:]))  # one after another
    table = summary(calls, wall)
    assert table[-1][0] == "host, between calls" and table[-1][2] >= 0
    assert sum(row[2] for row in table) == pytest.approx(wall)
    assert GenerationEngine(tiny_backbone, max_slots=4, max_length=64).stats.calls is None  # off unless asked
