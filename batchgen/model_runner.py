"""The model side of a worker: one loaded model and its engine; prompt rows in, output records out.

This is the only part of batchgen that touches the model: it loads the checkpoint once, turns a shard's prompt
rows into engine Requests (one per row, configuration and sample), and turns the engine's Completions into
output records. Everything else (reading, the row contract, writing, retries) works without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jinja2

from batchgen.prompts import PromptRow
from batchgen.row_sampling import RowSampling, resolve
from batchgen.rows import OutputRecord, error_record
from batchgen.sampling_checks import SEARCH_SAMPLERS
from batchgen.score_rows import ScoreRecord
from batchgen.search_runner import SearchRun, run_searches
from batchgen.spec import ModelSpec, SamplingConfig
from model.generation.seeds import derive_seed


class ModelRunner:
    """Generates the output records of prompt rows with one loaded model.

    Example:
        >>> runner = ModelRunner.load(ModelSpec(preset="smollm2_135m_instruct"), max_slots=32)  # doctest: +SKIP
        >>> records = list(runner.run(rows, spec.sampling))  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, engine: Any, stop_token_ids: tuple[int, ...], lm: Any = None) -> None:
        self.tokenizer = tokenizer
        self.engine = engine
        self.stop_token_ids = stop_token_ids
        self.lm = lm  # the LlamaCausalLM, for beam and contrastive search (outside the streaming engine)
        # Prompt tokens run through the model so far; fewer than received when the engine found prompt tokens in
        # its cache (n samples of a prompt, a shared system prompt) and copied them instead.
        self.prompt_tokens_computed = 0
        self._token_texts: dict[int, str] = {}

    @classmethod
    def load(cls, model: ModelSpec, max_slots: int | str, compilation_cache: str = "") -> ModelRunner:
        """Load the checkpoint `model.preset` and build the streaming engine over it.

        `compilation_cache`, a directory, keeps compiled XLA programs on disk, so that a replacement worker
        or a rerun does not compile them again ("" turns it off).
        """
        if compilation_cache:
            enable_compilation_cache(compilation_cache)
        # Imported here: the driver, `validate` and `status` never need Keras or JAX.
        from model import LlamaCausalLM
        from model.generation.engine import GenerationEngine

        from model import parallel

        # More than one device: the model is split across this worker's devices (tensor parallel).
        devices = parallel.replica_devices(model.devices_per_replica) if model.devices_per_replica > 1 else None
        lm = LlamaCausalLM.from_preset(model.preset, dtype=model.dtype, devices=devices)
        if model.quantization != "none":
            lm.quantize(model.quantization)
        tokenizer = lm.preprocessor.tokenizer
        # The spec's max_length is an upper bound: a model with a shorter context uses all of its own.
        max_length = min(model.max_length, lm.backbone.config.max_sequence_length)
        # The spec checked cache_tokens >= its max_length; 0 is the engine's default (every slot at full length).
        engine = GenerationEngine(
            lm.backbone, tokenizer, max_slots=max_slots, max_length=max_length, cache_tokens=model.cache_tokens or None,
            cache_dtype=None if model.cache_dtype == "auto" else model.cache_dtype, prefix_caching=model.prefix_caching,
        )
        # The model's own list: the tokenizer's end-of-turn tokens plus the checkpoint's generation config.
        return cls(tokenizer, engine, tuple(lm.stop_token_ids or tokenizer.stop_token_ids), lm)

    def prompt_ids(self, row: PromptRow) -> list[int]:
        """The token ids of a row's prompt; chat messages go through the model's chat template first.

        Raises ValueError (or a Jinja error) when the messages do not fit the template.
        """
        if row.messages is None:
            assert row.text is not None  # prompt_rows sets one of text, messages or error
            return self.tokenizer.tokenize(row.text)
        # The template decides where the start token goes, as transformers' apply_chat_template(tokenize=True).
        return self.tokenizer.tokenize_chat(row.messages, add_generation_prompt=True)

    def requests(
        self, rows: Sequence[PromptRow], configs: Sequence[SamplingConfig], errors: list[OutputRecord]
    ) -> Iterator[Any]:
        """Engine requests for `rows` under `configs`; rows that cannot be generated go to `errors` instead.

        A request's id is its output record's key (row index, configuration name, sample index).
        """
        from model.generation.requests import Request, SamplingParams, resolve_stop_token_ids

        for row in rows:
            error, ids = row.error, None
            if error is None:
                try:
                    ids = self.prompt_ids(row)
                except (ValueError, TypeError, jinja2.TemplateError) as template_error:
                    error = f"chat template failed: {template_error}"
            for config in configs:
                settings = resolve(config, row.overrides) if error is None else None
                problem = error or (self._problem(settings, row) if settings else None)
                for sample in range(row.samples(config.n)):
                    if problem is not None or ids is None or settings is None:
                        errors.append(error_record(row.index, config.name, sample, problem or "no prompt"))
                        continue
                    assert row.row_id is not None  # a null id makes an error row
                    yield Request(
                        request_id=(row.index, config.name, sample),
                        prompt_ids=ids,
                        max_new_tokens=settings.max_new_tokens,
                        # Search samplers never reach the engine; their requests only carry their settings.
                        sampling=SamplingParams() if settings.is_search else SamplingParams(
                            sampler=settings.sampler,
                            temperature=settings.temperature,
                            top_k=settings.top_k,
                            top_p=settings.top_p,
                            min_p=settings.min_p,
                            repetition_penalty=settings.repetition_penalty,
                            presence_penalty=settings.presence_penalty,
                            frequency_penalty=settings.frequency_penalty,
                            logit_bias=settings.logit_bias,
                        ),
                        stop_token_ids=resolve_stop_token_ids(config.stop_token_ids, self.stop_token_ids),
                        stop_strings=settings.stop_strings,
                        seed=derive_seed(settings.seed, row.row_id, sample),
                        skip_special_tokens=config.skip_special_tokens,
                        response_format=settings.response_format,
                        logprobs=settings.logprobs,
                    ), settings

    def _problem(self, settings: RowSampling, row: PromptRow) -> str | None:
        """Why the row cannot run with these settings here; said in its error rows, never silently ignored."""
        where = f"row {row.row_id!r}"
        problem = settings.problem()
        if problem:
            return f"{where}: {problem}"
        vocabulary = self.tokenizer.vocabulary_size()
        beyond = [token for token, _ in settings.logit_bias if token >= vocabulary]
        if beyond:
            return f"{where}: logit_bias names token ids {beyond[:5]} beyond the vocabulary of {vocabulary}"
        if settings.response_format is not None:
            if not getattr(self.engine, "supports_response_format", False):
                return (
                    f"{where}: response_format {settings.response_format} needs structured-output decoding, which "
                    "this engine does not support"
                )
            grammars = getattr(self.engine, "grammars", None)
            problem = grammars.problem(settings.response_format) if grammars is not None else None
            if problem:  # compiled once per distinct format, so every row of a job's format asks at no cost
                return f"{where}: response_format {settings.response_format:.200} {problem}"
        if settings.has_penalties and not getattr(self.engine, "supports_penalties", False):
            return f"{where}: penalties / logit_bias need an engine that applies them, which this one does not yet"
        if settings.is_search and self.lm is None:
            return f"{where}: the {settings.sampler} sampler needs the loaded model, which this runner lacks"
        return None

    def run(self, rows: Sequence[PromptRow], configs: Sequence[SamplingConfig]) -> Iterator[OutputRecord]:
        """Output records of every (row, configuration, sample), in the order they finish."""
        errors: list[OutputRecord] = []
        # Built up front so that the error records of bad rows are known before generation starts.
        pairs = list(self.requests(rows, configs, errors))
        yield from errors
        streaming = [request for request, settings in pairs if not settings.is_search]
        searches = [SearchRun(request, settings) for request, settings in pairs if settings.is_search]
        if searches:
            self.prompt_tokens_computed += sum(len(run.request.prompt_ids) for run in searches)
            for completion in run_searches(self.lm, searches, self.engine.max_length, self.engine.max_slots):
                yield self.record(completion)
        stats = self.engine.stats
        before = stats.prompt_tokens_received - stats.prompt_tokens_shared
        try:
            for completion in self.engine.generate_stream(streaming):
                yield self.record(completion)
        finally:
            self.prompt_tokens_computed += stats.prompt_tokens_received - stats.prompt_tokens_shared - before

    def score(
        self, rows: Sequence[PromptRow], continuations: Sequence[list[str] | None], errors: Sequence[str | None],
        config: str, per_token: bool,
    ) -> Iterator[ScoreRecord]:
        """Scored records of `rows` (one per row, in row order): each row's prompt is the context of its
        `continuations`; a row with continuations None is a document (perplexity), its prompt scored alone.

        `errors[i]` (a bad continuations cell) makes row i an error row, as does a bad prompt.
        """
        from model.generation.scoring import ScoreRequest, split_pair

        requests, failed = [], {}
        for row, conts, error in zip(rows, continuations, errors):
            error = row.error or error
            try:
                if error is None and conts is None:
                    requests.append(ScoreRequest((row.index, 0), [], self.prompt_ids(row), per_token))
                elif error is None and row.messages is not None:  # a chat context: the template ends it
                    context = self.prompt_ids(row)
                    requests += [ScoreRequest((row.index, j), context, self.tokenizer._encode(c), per_token)
                                 for j, c in enumerate(conts)]  # fmt: skip
                elif error is None:
                    requests += [ScoreRequest((row.index, j), *split_pair(self.tokenizer.tokenize,
                                 self.tokenizer._encode, row.text, c), per_token) for j, c in enumerate(conts)]  # fmt: skip
            except (ValueError, TypeError, jinja2.TemplateError) as template_error:
                error = f"chat template failed: {template_error}"
            if error is not None:
                failed[row.index] = error
        by_row: dict[int, list[Any]] = {}
        for result in self.engine.score_stream(requests):
            by_row.setdefault(result.request_id[0], []).append(result)
        for row in rows:
            results = by_row.get(row.index, [])
            error = failed.get(row.index) or next((r.error for r in results if r.error), None)
            if error is not None:
                yield ScoreRecord(row.index, config, None, None, None, 0, error)
                continue
            yield ScoreRecord(
                row.index, config, tuple(r.logprob for r in results), tuple(r.tokens for r in results),
                tuple(r.is_greedy for r in results), results[0].context_tokens,
                token_logprobs=tuple(r.token_logprobs for r in results) if per_token else None,
            )

    def warm_up(self, configs: Sequence[SamplingConfig]) -> None:
        """Generate a few tokens of a short prompt under each configuration, so that the common programs are
        compiled before the first shard (whose time `execution.shard_timeout` then measures fairly).

        One more prompt than there are slots: a full prefill, decode, then a refill of one slot. The prompts
        differ (the engine prefills a repeated prompt once and copies it), and the first has two samples, which
        compiles the page copy of a shared prompt too.
        """
        slots = self.engine.max_slots
        rows = [PromptRow(index=i, row_id=f"warm-up-{i}", text=f"Hello {i}", n=2 if i == 0 else 1) for i in range(slots + 1)]
        # A search sampler is deterministic and runs outside the engine: one sample compiles its program.
        short = [dataclasses.replace(c, max_new_tokens=min(c.max_new_tokens, 4)) for c in configs]
        streaming = [c for c in short if c.sampler not in SEARCH_SAMPLERS]
        if streaming:
            for _ in self.run(rows, streaming):
                pass
        searching = [c for c in short if c.sampler in SEARCH_SAMPLERS]
        if searching:
            for _ in self.run([dataclasses.replace(rows[1], index=0)], searching):
                pass

    def record(self, completion: Any) -> OutputRecord:
        """The output record of one engine Completion (with its tokens' log-probabilities where it has them)."""
        row_index, config, sample = completion.request_id
        failed = completion.finish_reason == "error"
        record = OutputRecord(
            row_index=row_index,
            config=config,
            sample_index=sample,
            completion=None if failed else (completion.text or ""),
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            error=completion.error if failed else None,
        )
        if failed or getattr(completion, "token_logprobs", None) is None:
            return record
        return dataclasses.replace(
            record,
            token_logprobs=tuple(completion.token_logprobs),
            tokens=tuple(self.token_text(i) for i in completion.token_ids),
            top_logprobs=tuple(
                tuple((self.token_text(i), i, lp) for i, lp in top) for top in completion.top_logprobs
            ),
        )

    def token_text(self, token_id: int) -> str:
        """One token's text as it reads alone (special tokens spelled out), remembered: the same few ids recur."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.detokenize([token_id])
        return text


def enable_compilation_cache(directory: str) -> None:
    """Make JAX keep compiled programs in `directory` (~ expanded), every program however quick to compile.

    Must run before this process compiles anything; JAX reads the setting once. Several workers may share
    the directory: entries are written atomically.
    """
    import os

    import jax

    path = os.path.expanduser(directory)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
