"""LlamaCausalLM: the end-to-end model with the public API of `keras_hub.models.LlamaCausalLM`."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import keras
import numpy as np

from model import parallel, samplers, transformer
from model.backbone import LlamaBackbone
from model.generation import scoring, search
from model.generation.engine import GenerationEngine
from model.generation.requests import Request, resolve_stop_token_ids
from model.generation.seeds import derive_seed
from model.preprocessor import LlamaCausalLMPreprocessor

MAX_ENGINE_SLOTS = 64


@functools.partial(jax.jit, static_argnames=("config", "mode"))
def _score(params, token_ids, padding_mask, target_ids, *, config, mode):
    b, t = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    hidden, _, _ = transformer.forward(params, config, token_ids, positions, padding_mask)
    logits = transformer.logits(params, hidden)
    if mode == "logits":
        return logits
    # The same log-prob as the engine's scoring step, so `score` and `score_continuations` agree.
    return -scoring.target_logprobs(logits, target_ids)[0]


@keras.saving.register_keras_serializable(package="batchgen")
class LlamaCausalLM(keras.Model):
    """An end-to-end Llama model for causal language modelling.

    `generate()` produces text with the sampler set by `compile(sampler=...)` ("top_k" by default);
    `fit()` trains on raw strings through the preprocessor; `score()` returns logits or per-token losses.

    Example:
        >>> lm = LlamaCausalLM.from_preset("smollm2_135m_instruct")
        >>> lm.compile(sampler="greedy")
        >>> lm.generate("The capital of France is", max_length=32)
    """

    def __init__(self, backbone: LlamaBackbone, preprocessor: LlamaCausalLMPreprocessor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.stop_token_ids: tuple[int, ...] = tuple(preprocessor.tokenizer.stop_token_ids) if preprocessor else ()
        self.sampler = samplers.get("top_k")
        self._engines: dict[tuple[int, int], GenerationEngine] = {}
        self.built = True  # the backbone's weights exist already; nothing is built lazily

    # ---- presets ----------------------------------------------------------------------------------------

    @classmethod
    def from_preset(
        cls, preset: str, load_weights: bool = True, dtype: Any = None, sequence_length: int | None = None,
        devices: Sequence[jax.Device] | None = None,
    ) -> "LlamaCausalLM":
        """Loads a built-in preset, a kaggle:// or hf:// handle, or a directory / GGUF file at any fsspec URL.

        `devices`: split the model across these devices (tensor parallel, see `model.parallel`); each shard is
        sent straight to its device while loading. None keeps the whole model on the default device.
        """
        from model.checkpoints.loader import load_preset

        with parallel.TensorParallel(devices).scope() if devices is not None else contextlib.nullcontext():
            loaded = load_preset(preset, load_weights=load_weights, dtype=dtype)
        preprocessor = None
        if loaded.tokenizer is not None:
            preprocessor = LlamaCausalLMPreprocessor(
                loaded.tokenizer, sequence_length=sequence_length or loaded.sequence_length or 1024
            )
        lm = cls(loaded.backbone, preprocessor)
        if loaded.stop_token_ids:
            lm.stop_token_ids = tuple(dict.fromkeys(loaded.stop_token_ids))
        return lm

    def save_to_preset(self, preset_dir: str) -> None:
        """Writes a keras-hub preset directory (config.json, model.weights.h5, tokenizer assets)."""
        from model.checkpoints.keras_hub import save_keras_hub_preset

        tokenizer = self.preprocessor.tokenizer if self.preprocessor else None
        sequence_length = self.preprocessor.sequence_length if self.preprocessor else None
        save_keras_hub_preset(self.backbone, tokenizer, preset_dir, sequence_length=sequence_length)

    @classmethod
    def _presets(cls) -> dict[str, Any]:
        from model.checkpoints.presets import BUILTIN_PRESETS

        return dict(BUILTIN_PRESETS)

    # ---- training and scoring ----------------------------------------------------------------------------

    def call(self, inputs: dict[str, Any]) -> Any:
        hidden = self.backbone(inputs)
        return transformer.logits(self.backbone.params(), hidden)

    def compile(self, optimizer: Any = "auto", loss: Any = "auto", *, weighted_metrics: Any = "auto",
                sampler: Any = "top_k", **kwargs: Any) -> None:
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)
        self.sampler = samplers.get(sampler)

    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, sample_weight: Any = None, **kwargs):
        """Trains on raw strings (through the preprocessor) or on preprocessed (x, y, sample_weight)."""
        if self.preprocessor is not None and _is_text(x):
            x, y, sample_weight = self.preprocessor(list(x) if not isinstance(x, str) else [x])
        return super().fit(x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def score(
        self,
        token_ids: Any,
        padding_mask: Any = None,
        scoring_mode: str = "logits",
        target_ids: Any = None,
    ) -> np.ndarray:
        """Logits [B, T, V] of every position, or per-token losses [B, T] against `target_ids`."""
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(f"scoring_mode must be 'logits' or 'loss', got {scoring_mode!r}")
        token_ids = jnp.asarray(token_ids, jnp.int32)
        padding_mask = jnp.ones(token_ids.shape, bool) if padding_mask is None else jnp.asarray(padding_mask, bool)
        if scoring_mode == "loss":
            if target_ids is None:
                raise ValueError("scoring_mode='loss' needs target_ids")
            target_ids = jnp.asarray(target_ids, jnp.int32)
        else:
            target_ids = jnp.zeros_like(token_ids)
        out = _score(self.backbone.params(), token_ids, padding_mask, target_ids,
                     config=self.backbone.config, mode=scoring_mode)
        return np.asarray(out)

    def score_continuations(
        self,
        contexts: Sequence[str | Sequence[int]],
        continuations: Sequence[str | Sequence[int]],
        *,
        per_token: bool = False,
        max_length: int | None = None,
    ) -> list[scoring.ScoreResult]:
        """log p(continuation | context) for each pair, packed like prefill (see `model.generation.scoring`).

        Strings go through the tokenizer (the context as `generate` takes a prompt, the continuation without
        start / end tokens); lists are token ids. An empty context scores the continuation as a document (its
        first token unscored); pairs longer than `max_length` (default: the preprocessor's sequence_length) roll.

        Example:
            >>> lm.score_continuations(["The capital of France is"], [" Paris"])[0].logprob
        """
        if len(contexts) != len(continuations):
            raise ValueError(f"got {len(contexts)} contexts and {len(continuations)} continuations")
        length = max_length or (self.preprocessor.sequence_length if self.preprocessor else 1024)
        length = min(length, self.backbone.config.max_sequence_length)
        requests = [
            scoring.ScoreRequest(i, *self._pair_ids(context, continuation), per_token)
            for i, (context, continuation) in enumerate(zip(contexts, continuations))
        ]
        return list(self.engine(1, length).score_stream(requests))

    def _pair_ids(self, context: str | Sequence[int], continuation: str | Sequence[int]) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation); text is tokenized as one string and split where the context's
        own tokens end (as lm-evaluation-harness does), so a word is not cut differently at the boundary."""
        if not isinstance(context, str) and not isinstance(continuation, str):
            return [int(t) for t in context], [int(t) for t in continuation]
        if self.preprocessor is None or not (isinstance(context, str) and isinstance(continuation, str)):
            raise ValueError("text needs a preprocessor, and a pair must be two strings or two lists of ids")
        preprocessor = self.preprocessor
        return scoring.split_pair(
            lambda text: preprocessor._ids(text, add_end=False), preprocessor.tokenizer._encode, context, continuation
        )

    def quantize(self, mode: str | None = None, **kwargs: Any) -> None:
        self.backbone.quantize(mode, **kwargs)
        self._engines.clear()

    # ---- generation -------------------------------------------------------------------------------------

    def engine(self, max_slots: int, max_length: int) -> GenerationEngine:
        """The (cached) continuous-batching engine for this many slots and this cache length."""
        key = (max_slots, max_length)
        if key not in self._engines:
            tokenizer = self.preprocessor.tokenizer if self.preprocessor else None
            self._engines[key] = GenerationEngine(self.backbone, tokenizer, max_slots=max_slots, max_length=max_length)
        return self._engines[key]

    def generate(
        self,
        inputs: Any,
        max_length: int | None = None,
        stop_token_ids: Any = "auto",
        *,
        max_new_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        strip_prompt: bool = False,
        seed: int | None = None,
        skip_special_tokens: bool = True,
    ) -> Any:
        """Generates text (or token ids, without a preprocessor) from prompts.

        Args:
            inputs: a string, a list of strings, an iterable of such batches; or, without a preprocessor, a dict
                of `token_ids` / `padding_mask` [B, T] whose padded positions are filled in.
            max_length: prompt + generated tokens, at most; defaults to the preprocessor's sequence_length.
            stop_token_ids: "auto" (the checkpoint's end tokens), None (run to the limit) or a tuple of ids.
            max_new_tokens: cap on generated tokens per prompt, on top of max_length.
            stop: stop strings; generation ends when one appears, and it is cut from the returned text.
            strip_prompt: return only the completion, not the prompt followed by it.
            seed: makes sampling reproducible; each row's randomness depends on (seed, row index) alone.
            skip_special_tokens: leave special tokens (chat markers, end tokens) out of the generated text; stop
                strings are matched against the text as returned. The prompt's text is returned as given.

        Stop strings work with every sampler but beam search, which raises ValueError when given any.
        """
        stop_ids = resolve_stop_token_ids(stop_token_ids, None if self.preprocessor is None else self.stop_token_ids)
        stop_strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if self.preprocessor is None:
            if not isinstance(inputs, dict):
                raise ValueError("without a preprocessor, generate() takes {'token_ids', 'padding_mask'} arrays")
            return self._generate_packed(inputs, stop_ids, seed)
        options = dict(max_length=max_length, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                       stop_strings=stop_strings, strip_prompt=strip_prompt, seed=seed,
                       skip_special_tokens=skip_special_tokens)
        if isinstance(inputs, str):
            return self._generate_texts([inputs], **options)[0]
        if isinstance(inputs, (list, tuple)) and all(isinstance(x, str) for x in inputs):
            return self._generate_texts(list(inputs), **options)
        if isinstance(inputs, Iterable):
            outputs: list[str] = []
            for batch in inputs:
                batch = [batch] if isinstance(batch, str) else list(batch)
                outputs.extend(self._generate_texts(batch, **options))
            return outputs
        raise ValueError(f"generate() takes a string, a list of strings or an iterable of batches, got {type(inputs)}")

    def _base_seed(self, seed: int | None) -> int:
        seed = seed if seed is not None else getattr(self.sampler, "seed", None)
        return int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)

    def _run_requests(
        self, prompts: list[list[int]], budgets: list[int], stop_ids, stop_strings, seed, length,
        skip_special_tokens: bool = True,
    ):
        """Runs prompts through the engine (or beam / contrastive search); returns their Completions."""
        base_seed = self._base_seed(seed)
        if not self.sampler.streaming:
            tokenizer = self.preprocessor.tokenizer if self.preprocessor is not None else None
            return self.sampler.search(search.bind_backbone(self.backbone), prompts, budgets, stop_ids, length,
                                       stop_strings, skip_special_tokens, tokenizer)
        params = self.sampler.to_sampling_params()
        requests = [
            Request(i, ids, max(budget, 1), params, stop_ids, stop_strings, derive_seed(base_seed, i, 0),
                    skip_special_tokens)
            for i, (ids, budget) in enumerate(zip(prompts, budgets))
        ]
        slots = 1
        while slots < min(len(requests), MAX_ENGINE_SLOTS):
            slots *= 2
        # Cache lengths in steps of 128 so that nearby max_lengths share compiled programs.
        cache_length = min(-(-length // 128) * 128, self.backbone.config.max_sequence_length)
        return self.engine(slots, cache_length).generate(requests)

    def _generate_texts(
        self, texts, *, max_length, stop_ids, max_new_tokens, stop_strings, strip_prompt, seed, skip_special_tokens
    ):
        length = max_length or self.preprocessor.sequence_length
        prompts = [self.preprocessor._ids(text, add_end=False) for text in texts]
        budgets = [length - len(ids) for ids in prompts]
        if max_new_tokens is not None:
            budgets = [min(b, max_new_tokens) for b in budgets]
        completions = self._run_requests(prompts, budgets, stop_ids, stop_strings, seed, length, skip_special_tokens)
        outputs = []
        for text, budget, completion in zip(texts, budgets, completions):
            if completion.finish_reason == "error" or budget < 1:
                reason = completion.error or f"the prompt fills max_length={length}"
                warnings.warn(f"nothing generated for prompt {text[:40]!r}: {reason}", stacklevel=3)
            outputs.append(completion.text if strip_prompt else text + (completion.text or ""))
        return outputs

    def _generate_packed(self, inputs: dict[str, Any], stop_ids: tuple[int, ...], seed: int | None) -> dict[str, np.ndarray]:
        token_ids = np.asarray(inputs["token_ids"], np.int32)
        padding_mask = np.asarray(inputs.get("padding_mask", np.ones_like(token_ids, bool)), bool)
        b, t = token_ids.shape
        prompts = [list(row[mask]) for row, mask in zip(token_ids, padding_mask)]
        budgets = [t - len(ids) for ids in prompts]
        completions = self._run_requests(prompts, budgets, stop_ids, (), seed, t)
        out_ids = token_ids.copy()
        out_mask = padding_mask.copy()
        for i, (ids, completion) in enumerate(zip(prompts, completions)):
            generated = list(completion.token_ids)
            if completion.stop_token_id is not None:  # keras-hub keeps the end token in the ids
                generated.append(completion.stop_token_id)
            n = len(ids)
            generated = generated[: t - n]
            out_ids[i, n : n + len(generated)] = generated
            out_mask[i, n : n + len(generated)] = True
        return {"token_ids": out_ids, "padding_mask": out_mask}

    def get_config(self) -> dict[str, Any]:
        return {"backbone": keras.saving.serialize_keras_object(self.backbone), "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LlamaCausalLM":
        backbone = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(backbone, name=config.get("name"))


class _PresetsDescriptor:
    def __get__(self, obj: Any, owner: type) -> dict[str, Any]:
        return owner._presets()


LlamaCausalLM.presets = _PresetsDescriptor()  # a class attribute computed on access, as keras-hub's is


def _is_text(x: Any) -> bool:
    if isinstance(x, str):
        return True
    if isinstance(x, (list, tuple)) and x and all(isinstance(item, str) for item in x):
        return True
    return isinstance(x, np.ndarray) and x.dtype.kind in "UO"


class CausalLM:
    """keras-hub's base-class entry point: `CausalLM.from_preset(...)` infers the model class from the preset."""

    @staticmethod
    def from_preset(preset: str, load_weights: bool = True, **kwargs: Any) -> LlamaCausalLM:
        # Every checkpoint batchgen reads is a Llama; the readers refuse other architectures by name.
        return LlamaCausalLM.from_preset(preset, load_weights=load_weights, **kwargs)
