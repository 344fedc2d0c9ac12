"""Prompt sharing: a prompt already in the KV cache is copied, not prefilled again, and every output is the one
that prefilling it would give (the same tokens, the same seeded samples)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from model.generation.engine import GenerationEngine
from model.generation.paged_cache import PageTable
from model.generation.prefix_cache import MIN_SHARED_TOKENS, PrefixCache, page_keys, page_tokens
from model.generation.requests import Request, SamplingParams
from model.generation.scheduler import MIN_CONTEXT_PAGES


def samples(prompts: list[list[int]], n: int, sampling: SamplingParams, max_new_tokens: int = 12) -> list[Request]:
    """n samples of every prompt, as a synthesis job asks for them: one request each, its own seed."""
    return [
        Request(f"{p}-{s}", prompt, max_new_tokens, sampling, seed=1000 * p + s)
        for p, prompt in enumerate(prompts) for s in range(n)
    ]


def run(backbone, requests, **engine_args):
    engine = GenerationEngine(backbone, max_slots=engine_args.pop("max_slots", 8), max_length=96, **engine_args)
    completions = engine.generate(requests)
    return [c.token_ids for c in completions], engine.stats


def test_a_pages_key_stands_for_every_token_up_to_its_end():
    keys = page_keys([1, 2, 3, 4, 5], page_size=2)
    assert len(keys) == 3 and keys == page_keys(np.array([1, 2, 3, 4, 5], np.int32), page_size=2)
    assert page_keys([1, 2, 3, 4, 6], 2)[:2] == keys[:2] and page_keys([1, 2, 3, 4, 6], 2)[2] != keys[2]
    assert page_keys([9, 2, 3, 4], 2)[1] != keys[1]  # the same tokens after a different first page
    assert page_keys([1, 2, 3], 2)[1] != keys[1]  # a partly filled page is not the full one


@pytest.mark.parametrize("sampling", [SamplingParams("greedy"), SamplingParams("top_k", temperature=1.0, top_k=20)])
def test_samples_of_one_prompt_prefill_it_once_and_equal_the_unshared_run(tiny_backbone, sampling):
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(1, 90, n)) for n in (5, 33, 64, 20)]  # page size 32: partial, full + 1, exact
    requests = samples(prompts, n=5, sampling=sampling)
    shared, with_sharing = run(tiny_backbone, requests)
    alone, without = run(tiny_backbone, requests, prefix_caching=False)
    assert shared == alone
    received = sum(len(r.prompt_ids) for r in requests)
    assert without.prompt_tokens == without.prompt_tokens_received == received and without.prompt_tokens_shared == 0
    # Each distinct prompt prefilled once; the other samples copy it and recompute only its last token.
    assert with_sharing.prompt_tokens == sum(len(p) for p in prompts)
    assert with_sharing.prompt_tokens_shared == sum(4 * (len(p) - 1) for p in prompts)
    assert with_sharing.prompt_tokens_received == received


def test_a_prompt_is_shared_after_the_sequence_that_prefilled_it_finished(tiny_backbone):
    # 2 slots, 6 samples of one prompt with short budgets: later samples find the prompt in pages the cache
    # kept after its first owner finished, while other prompts come and go.
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(1, 90, n)) for n in (40, 7)]
    requests = samples(prompts, n=6, sampling=SamplingParams("random", temperature=0.8), max_new_tokens=5)
    shared, stats = run(tiny_backbone, requests, max_slots=2)
    alone, _ = run(tiny_backbone, requests, max_slots=2, prefix_caching=False)
    assert shared == alone
    assert stats.prompt_tokens == 47


def test_cached_prompts_give_their_pages_back_when_the_pool_runs_short(tiny_backbone):
    # A cache of 6 pages, prompts of 2 pages each: a finished prompt's pages are cached until a new prompt
    # needs them. Every request still completes, and equals the unshared run.
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(1, 90, 50)) for _ in range(5)]
    requests = [r for prompt in prompts for r in samples([prompt], n=2, sampling=SamplingParams("greedy"), max_new_tokens=8)]
    shared, _ = run(tiny_backbone, requests, max_slots=2, cache_tokens=6 * 32)
    alone, _ = run(tiny_backbone, requests, max_slots=2, cache_tokens=6 * 32, prefix_caching=False)
    assert shared == alone and all(len(t) == 8 for t in shared)


def test_the_page_table_keeps_a_finished_prompts_pages_cached_and_evicts_the_least_recently_used():
    prefix = PrefixCache()
    table = PageTable(pages=4, page_size=4, slots=2, max_length=16, prefix=prefix)
    table.admit(0, prompt_tokens=6, max_tokens=8)  # pages 0, 1
    prefix.remember([b"a1", b"a2"], table.table[0, :2], slot=0)
    table.admit(1, prompt_tokens=3, max_tokens=4)  # page 2
    prefix.remember([b"b1"], table.table[1, :1], slot=1)
    table.release(0)
    assert list(table.owner) == [2, 2, 1, 2] and prefix.cached_pages() == 2  # owned by no slot, not free
    table.release(1)
    assert prefix.lookup([b"a1", b"a2"]) == [0, 1]  # "a" is now more recent than "b"
    table.admit(0, prompt_tokens=12, max_tokens=12)  # 3 pages: page 3 free, then "b1", then "a2" evicted
    assert sorted(table.table[0, :3]) == [1, 2, 3] and prefix.lookup([b"a1", b"a2"]) == [0]


def test_eviction_spares_the_pages_about_to_be_copied():
    prefix = PrefixCache()
    table = PageTable(pages=3, page_size=4, slots=2, max_length=12, prefix=prefix)
    table.admit(0, prompt_tokens=4, max_tokens=4)
    prefix.remember([b"a"], table.table[0, :1], slot=0)
    table.release(0)
    table.admit(1, prompt_tokens=8, max_tokens=8)  # pages 1, 2: no eviction needed
    assert prefix.lookup([b"a"]) == [0]
    table.release(1)
    # The pinned page counts as taken: a request it would not leave room for waits.
    assert table.can_admit(12) and not table.can_admit(12, keep={b"a"}) and table.can_admit(8, keep={b"a"})
    with pytest.raises(ValueError, match="no room"):
        table.admit(0, prompt_tokens=12, max_tokens=12, keep={b"a"})
    table.admit(0, prompt_tokens=8, max_tokens=8, keep={b"a"})
    assert prefix.lookup([b"a"]) == [0]


def test_a_cache_too_small_to_keep_a_prompt_beside_its_copy_prefills_it_again(tiny_backbone):
    # One sequence of 3 pages fits the pool, no more: the cached prompt (2 pages) must give way to its repeat.
    prompt = list(np.random.default_rng(9).integers(1, 90, 60))
    requests = samples([prompt], n=3, sampling=SamplingParams("greedy"), max_new_tokens=30)
    shared, stats = run(tiny_backbone, requests, max_slots=2, cache_tokens=3 * 32)
    alone, _ = run(tiny_backbone, requests, max_slots=2, cache_tokens=3 * 32, prefix_caching=False)
    assert shared == alone and stats.prompt_tokens == 3 * 60


@pytest.mark.parametrize("sampling", [SamplingParams("greedy"), SamplingParams("top_p", temperature=0.9, top_p=0.95)])
def test_prompts_that_start_alike_prefill_only_what_follows_their_cached_pages(tiny_backbone, sampling):
    # One 70-token "system prompt" (two full pages and a bit) before different questions, 2 samples each, 4 slots
    # so that later prompts arrive after the first ones' pages are cached.
    rng = np.random.default_rng(11)
    system = list(rng.integers(1, 90, 70))
    questions = [list(rng.integers(1, 90, n)) for n in (3, 9, 14, 19, 5, 17)]  # prompts of 73-89 tokens
    prompts = [system + q for q in questions]
    requests = samples(prompts, n=2, sampling=sampling, max_new_tokens=6)
    shared, stats = run(tiny_backbone, requests, max_slots=4)
    alone, _ = run(tiny_backbone, requests, max_slots=4, prefix_caching=False)
    assert shared == alone and all(len(tokens) == 6 for tokens in shared)
    assert stats.prompt_tokens_received == sum(2 * len(p) for p in prompts)
    # The first round prefills whole; later prompts copy the system prompt's two full pages (64 tokens).
    assert stats.prompt_tokens < sum(len(p) for p in prompts) - 64 * 2
    assert any(with_context(shape) for shape in shapes(tiny_backbone, requests))


def with_context(shape) -> bool:
    """Whether an engine call's shape is a prefill whose prompts continue cached pages."""
    return shape[0] == "prefill" and shape[-1] > 0


def shapes(backbone, requests, max_slots=4):
    engine = GenerationEngine(backbone, max_slots=max_slots, max_length=96)
    engine.generate(requests)
    return engine.stats.shapes


@pytest.mark.parametrize("sampling", [SamplingParams("greedy"), SamplingParams("top_k", temperature=1.0, top_k=10)])
def test_a_prefill_call_mixing_cached_contexts_equals_the_unshared_run(tiny_backbone, sampling):
    # Round one (8 slots) prefills system prompts A (one full page) and B (two) and six other prompts, all done at
    # their first token; round two packs prompts behind A, behind B and behind nothing into one call, whose
    # context is A's page and B's two, each once, every prompt attending to its own only.
    rng = np.random.default_rng(17)
    a, b = list(rng.integers(1, 90, 35)), list(rng.integers(1, 90, 70))
    first = [a + [1], b + [2]] + [list(rng.integers(1, 90, 9)) for _ in range(6)]
    second = [a + [7, 8, 9], b + [4], list(rng.integers(1, 90, 12)), a + list(rng.integers(1, 90, 20)), b + [6, 6]]
    requests = [Request(f"first{i}", p, 1, sampling, seed=i) for i, p in enumerate(first)]
    requests += [Request(f"second{i}", p, 6, sampling, seed=50 + i) for i, p in enumerate(second)]
    results = {}
    for on in (True, False):
        engine = GenerationEngine(tiny_backbone, max_slots=8, max_length=96, prefix_caching=on)
        engine.stats.calls = []
        results[on] = [c.token_ids for c in engine.generate(requests)]
        prefills = [c for c in engine.stats.calls if c.kind == "prefill"]
        assert len(prefills) == 2  # one call per round
        if on:
            # A's page and B's two: one context of three pages, read as the smallest width.
            assert [shape[-1] for shape in engine.stats.shapes if shape[0] == "prefill"].count(MIN_CONTEXT_PAGES) == 1
            assert engine.stats.prompt_tokens_shared == 2 * 32 + 2 * 64
    assert results[True] == results[False]


def test_on_the_demo_model_a_shared_system_prompt_changes_no_greedy_token_and_log_probs_by_under_1e_4(demo_lm):
    from batchgen.bench.synthesis import synthesis_prompts

    tokenizer = demo_lm.preprocessor.tokenizer
    prompts = synthesis_prompts(tokenizer, 4, seed=0)  # one 215-token system prompt, four questions
    requests = [Request(i, p, 12, SamplingParams("greedy"), logprobs=1) for i, p in enumerate(prompts)]
    results = {}
    for on in (True, False):
        # Two slots: the last two prompts arrive when the first two's pages are cached.
        engine = GenerationEngine(
            demo_lm.backbone, tokenizer, max_slots=2, max_length=300, cache_tokens=1200, prefix_caching=on
        )
        results[on] = engine.generate(requests)
        if on:
            assert engine.stats.prompt_tokens_shared >= 2 * 192  # six full pages of the system prompt, twice
    for shared, alone in zip(results[True], results[False]):
        assert shared.token_ids == alone.token_ids
        np.testing.assert_allclose(shared.token_logprobs, alone.token_logprobs, atol=1e-4)


def test_a_prompt_shares_the_first_tokens_of_a_cached_page_it_parts_from_midway():
    prefix = PrefixCache()
    system = list(range(1, 21))  # 20 tokens: shorter than a page (4 here: pages of 32 would do the same)
    cached = system + [50, 51, 52, 53, 54]
    keys = page_keys(cached, page_size=32)
    prefix.remember(keys, [7], slot=0, tokens=page_tokens(cached, 32))
    found = prefix.match(system + [60, 61], page_size=32)
    assert (found.pages, found.keys, found.tokens) == ((7,), (keys[0],), 20)
    # Fewer than MIN_SHARED_TOKENS in common: not worth a context.
    assert prefix.match(system[:MIN_SHARED_TOKENS - 1] + [99] * 10, 32).pages == ()
    # A prompt that is a prefix of the cached one keeps its last token to prefill.
    assert prefix.match(system[:12], 32).tokens == 11
    # The whole prompt found by key is shared whole.
    assert prefix.match(cached, 32).tokens == len(cached)
    # Of many cached pages that start alike, the one with the most first tokens in common.
    for slot, common in enumerate([9, 23, 14, 8], start=1):
        other = system[:common] + [80 + slot] * (30 - common) if common < 20 else system + [60, 61, 62, 70 + slot]
        prefix.remember(page_keys(other, 32), [10 + slot], slot, page_tokens(other, 32))
    found = prefix.match(system + [60, 61, 62, 99, 98], page_size=32)
    assert (found.pages, found.tokens) == ((12,), 23)


def test_a_partly_shared_page_follows_the_full_pages_it_continues_and_goes_with_its_eviction():
    prefix = PrefixCache()
    table = PageTable(pages=4, page_size=4, slots=2, max_length=16, prefix=prefix)
    first = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # pages [1-4] [5-8] [9-11]
    table.admit(0, prompt_tokens=len(first), max_tokens=len(first))
    keys = page_keys(first, 4)
    prefix.remember(keys, table.table[0, :3], slot=0, tokens=page_tokens(first, 4))
    # Pages of 4 hold fewer than MIN_SHARED_TOKENS: only full pages are shared.
    assert prefix.match([1, 2, 3, 4, 5, 6, 99, 99], 4).tokens == 4
    prefix = PrefixCache()
    long = list(range(1, 41))  # pages of 16: [1-16] [17-32] [33-40]
    keys = page_keys(long, 16)
    prefix.remember(keys, [3, 4, 5], slot=0, tokens=page_tokens(long, 16))
    other = list(range(1, 29)) + [0, 0, 0, 0, 0]  # page 0 whole, 12 tokens of page 1
    found = prefix.match(other, 16)
    assert found.pages == (3, 4) and found.tokens == 28
    assert prefix.match([0] + other[1:], 16).pages == ()  # a different first page: its continuations do not count
    prefix.pages_kept_at_release(0)
    while prefix.evict(keep={keys[0]}) is not None:  # page 1 and 2 go, page 0 stays
        pass
    assert prefix.match(other, 16).tokens == 16


def test_a_round_prefills_one_prompt_per_shared_start_first_and_the_rest_after_it(tiny_backbone):
    from model.generation import admission
    from model.generation.scheduler import SlotTable

    rng = np.random.default_rng(19)
    system = list(rng.integers(1, 90, 20))
    other = list(rng.integers(1, 90, 20))
    prompts = [system + [1, 2], system + [3], other + [4], system + [1, 2], other + [5, 6], [7] * 5]
    requests = [Request(i, p, 4, SamplingParams("greedy")) for i, p in enumerate(prompts)]
    prefix = PrefixCache()
    table = SlotTable.empty(8, PageTable(16, 32, 8, 64, prefix))
    waiting = collections.deque(requests)
    plan = admission.admit(waiting, list(range(8)), table, prefix, 32, 64, lambda r: None)
    assert [r.request_id for _, r in plan.admitted] == [0, 2, 5]  # one per start, and the unlike prompt
    assert [r.request_id for _, r, _ in plan.shared] == [3]  # the same prompt as a leader: copied after it
    assert [r.request_id for _, r in plan.after_leaders] == [1, 4]
    # Once the leaders' pages are cached, the rest continue them past their common first tokens.
    for slot, request in plan.admitted:
        prefix.remember(page_keys(request.prompt_ids, 32), table.pages.table[slot, :1], slot,
                        page_tokens(request.prompt_ids, 32))
    whole, with_context = admission.after_leaders(plan.after_leaders, prefix, 32)
    assert whole == [] and [(p.request.request_id, p.cached_tokens) for p in with_context] == [(1, 20), (4, 20)]
    # A later round's prompt of one page that shares part of it is continued, not taken for the same prompt.
    later = Request("later", system + [9, 9], 4, SamplingParams("greedy"))
    plan = admission.admit(collections.deque([later]), [7], table, prefix, 32, 64, lambda r: None)
    assert plan.shared == [] and [p.cached_tokens for p in plan.with_context] == [20]


@pytest.mark.parametrize("sampling", [SamplingParams("greedy"), SamplingParams("top_p", temperature=0.9, top_p=0.95)])
def test_one_rounds_prompts_behind_a_short_system_prompt_compute_it_once_and_equal_the_unshared_run(
    tiny_backbone, sampling
):
    # Chat prompts: two system lines shorter than a page, questions after them, all admitted in one round.
    rng = np.random.default_rng(23)
    systems = [list(rng.integers(1, 90, 18)), list(rng.integers(1, 90, 45))]
    prompts = [systems[i % 2] + list(rng.integers(1, 90, 4 + i)) for i in range(8)]
    requests = samples(prompts, n=1, sampling=sampling, max_new_tokens=6)
    shared, stats = run(tiny_backbone, requests)
    alone, without = run(tiny_backbone, requests, prefix_caching=False)
    assert shared == alone and all(len(tokens) == 6 for tokens in shared)
    # Each system prompt is computed once: by the first prompt behind it.
    assert stats.prompt_tokens == without.prompt_tokens - 3 * 18 - 3 * 45
    assert stats.prompt_tokens_shared == 3 * 18 + 3 * 45
    assert any(with_context(shape) for shape in shapes(tiny_backbone, requests))
