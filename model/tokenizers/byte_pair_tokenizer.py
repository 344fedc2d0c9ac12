"""`BytePairTokenizer`: byte-level BPE (Llama 3, SmolLM) on the Hugging Face `tokenizers` library.

Three ways in, one tokenizer: a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`), keras-hub's
`vocabulary.json` + `merges.txt`, or GGUF metadata (`tokenizer.ggml.*`). All build the same `tokenizers`
pipeline: the pre-tokenizer split, the merges, the byte-level decoder, and the special tokens added whole, so
`<|im_start|>` or `<|eot_id|>` written in a text is one id and never split into pieces. The start token is added
by `Tokenizer.tokenize` (not by the `tokenizers` post-processor), so it follows `add_start_token` alone.

The ids are transformers' (the same `tokenizers` pipeline). keras-hub's own `Llama3Tokenizer` splits text with
TensorFlow regexes that approximate Llama 3's and differs from transformers on runs of whitespace and long
numbers (4 of the 30 test texts on tests/fixtures/tokenizers/tiny_llama3); batchgen follows transformers, so
a keras-hub preset read here tokenizes as the Hugging Face checkpoint it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, processors

from model.tokenizers import byte_pair_files, storage
from model.tokenizers.base import Tokenizer
from model.tokenizers.chat_template import ChatTemplate
from model.tokenizers.huggingface_files import config_chat_template, read_tokenizer_config, token_content
from model.tokenizers.pre_tokenizers import pre_tokenization

# llama.cpp's token types (`tokenizer.ggml.token_type`), the same numbers as SentencePiece's piece types.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class BytePairTokenizer(Tokenizer):
    """Byte-level BPE tokenizer with whole special tokens and an optional chat template.

    Build it with `from_tokenizer_json`, `from_huggingface`, `from_vocabulary_and_merges` or
    `from_gguf_metadata`; the constructor takes a ready `tokenizers.Tokenizer`.

    Example:
        >>> tokenizer = BytePairTokenizer.from_huggingface("path/to/checkpoint")  # doctest: +SKIP
        >>> tokenizer.tokenize("<|im_start|>user")  # doctest: +SKIP
        [1, 4093]
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        start_token_id: int | None,
        end_token_id: int | None,
        pad_token_id: int | None = None,
        add_start_token: bool = False,
        chat_template: ChatTemplate | str | None = None,
        stop_token_ids: Sequence[int] | None = None,
        pre_tokenizer_name: str | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        # llama.cpp's name of the split (see pre_tokenizers.py), for formats that store a name, not the split.
        self.pre_tokenizer_name = pre_tokenizer_name or _name_pre_tokenizer(tokenizer)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, id in (("start", start_token_id), ("end", end_token_id), ("pad", pad_token_id)):
            if id is not None and not 0 <= id < size:
                raise ValueError(f"{name} token id {id} is outside the vocabulary of {size} ids")
        special_tokens = {
            added.content: id for id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        }
        super().__init__(
            start_token_id=start_token_id,
            end_token_id=end_token_id,
            pad_token_id=pad_token_id,
            add_start_token=add_start_token,
            special_tokens=special_tokens,
            chat_template=chat_template,
            stop_token_ids=stop_token_ids,
        )

    # ---- constructors ---------------------------------------------------------------------------------

    @classmethod
    def from_tokenizer_json(
        cls,
        tokenizer_json: str | os.PathLike[str] | Mapping[str, Any],
        tokenizer_config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        chat_template: ChatTemplate | str | None = None,
    ) -> BytePairTokenizer:
        """From a Hugging Face `tokenizer.json` (a path/URL, its JSON text, or the parsed dict).

        `tokenizer_config` (`tokenizer_config.json`: path/URL or dict) gives `bos_token`, `eos_token`,
        `pad_token`, `add_bos_token` and `chat_template`. Without it, or where it is silent, the start token and
        whether to add it are read from the `tokenizer.json` post-processor (Llama 3's adds
        `<|begin_of_text|>`). `chat_template` overrides the config's.
        """
        text, where = byte_pair_files.json_text(tokenizer_json, "tokenizer.json")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception subclasses for malformed files
            raise ValueError(f"{where} is not a valid tokenizer.json: {e}") from e
        if tokenizer.model.__class__.__name__ != "BPE":
            raise ValueError(f"{where} holds a {tokenizer.model.__class__.__name__} model, not BPE")

        config: Mapping[str, Any] = {}
        if tokenizer_config is not None:
            config_text, config_where = byte_pair_files.json_text(tokenizer_config, "tokenizer_config.json")
            config = json.loads(config_text)
            if not isinstance(config, Mapping):
                raise ValueError(f"{config_where} must hold a JSON object, got {type(config).__name__}")

        template_start = byte_pair_files.post_processor_start_token(json.loads(text).get("post_processor"))
        start_token = token_content(config.get("bos_token")) or template_start
        add_start_token = config.get("add_bos_token")
        if add_start_token is None:
            add_start_token = template_start is not None
        if chat_template is None:
            chat_template = config_chat_template(config)

        def id_of(token: str | None, key: str) -> int | None:
            if token is None:
                return None
            id = tokenizer.token_to_id(token)
            if id is None:
                raise ValueError(f"{key} {token!r} of {where} is not in its vocabulary")
            return id

        # The post-processor would add the start token a second time on top of Tokenizer.tokenize; ids are
        # always encoded without it, and `add_start_token` decides.
        return cls(
            tokenizer,
            start_token_id=id_of(start_token, "bos_token"),
            end_token_id=id_of(token_content(config.get("eos_token")), "eos_token"),
            pad_token_id=id_of(token_content(config.get("pad_token")), "pad_token"),
            add_start_token=bool(add_start_token),
            chat_template=chat_template,
        )

    @classmethod
    def from_huggingface(cls, directory: str | os.PathLike[str]) -> BytePairTokenizer:
        """From a Hugging Face checkpoint directory (path or URL): tokenizer.json, tokenizer_config.json and the
        chat template (chat_template.jinja, where transformers 5 writes it, or the config's)."""
        return cls.from_tokenizer_json(storage.join(directory, "tokenizer.json"), read_tokenizer_config(directory))

    @classmethod
    def from_vocabulary_and_merges(
        cls,
        vocabulary: str | os.PathLike[str] | Mapping[str, int],
        merges: str | os.PathLike[str] | Iterable[str | Sequence[str]],
        *,
        pre_tokenizer: str = "llama-bpe",
        special_tokens: Iterable[str] | None = None,
        start_token: str | None = None,
        end_token: str | None = None,
        pad_token: str | None = None,
        add_start_token: bool = False,
        chat_template: ChatTemplate | str | None = None,
    ) -> BytePairTokenizer:
        """From keras-hub's assets: `vocabulary.json` (token -> id) and `merges.txt` (one "a b" pair a line).

        Both may be given as files (path or URL) or as data. `pre_tokenizer` is llama.cpp's name of the split
        the merges were learned with (these files do not record it): "llama-bpe" for Llama 3, "smollm" for
        SmolLM. `special_tokens` defaults to every vocabulary entry that no merge produces and that is not a
        single byte symbol: in a BPE vocabulary only added tokens are like that.
        """
        vocab = byte_pair_files.load_vocabulary(vocabulary)
        pairs = byte_pair_files.load_merges(merges)
        if special_tokens is None:
            special_tokens = byte_pair_files.unmerged_tokens(vocab, pairs)
        special = list(special_tokens)
        for token in (start_token, end_token, pad_token):
            if token is not None and token not in special:
                special.append(token)
        return cls._build(
            vocab,
            pairs,
            pre_tokenizer=pre_tokenizer,
            special_tokens=special,
            user_defined_tokens=(),
            start_token=start_token,
            end_token=end_token,
            pad_token=pad_token,
            add_start_token=add_start_token,
            chat_template=chat_template,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> BytePairTokenizer:
        """From a GGUF file's `tokenizer.*` metadata (plain Python values, as `read_gguf_metadata` returns).

        Follows llama.cpp and transformers' GGUF converter: control tokens (type 3) are special, user-defined
        tokens (type 4) are matched whole too; tokens not spelled in the byte alphabet are respelled from their
        UTF-8 bytes; `tokenizer.ggml.add_bos_token` decides the start token, defaulting as llama.cpp does.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; BytePairTokenizer reads only 'gpt2' (BPE)")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in metadata:
                raise ValueError(f"GGUF metadata has no {key}, which a byte-level BPE tokenizer needs")
        alphabet = set(byte_pair_files.byte_to_symbol().values())
        symbols = byte_pair_files.byte_to_symbol()
        tokens = [
            token if set(token) <= alphabet else "".join(symbols[b] for b in token.encode("utf-8"))
            for token in metadata["tokenizer.ggml.tokens"]
        ]
        token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(token_types) != len(tokens):
            raise ValueError(f"GGUF has {len(token_types)} token types for {len(tokens)} tokens")
        # A control token written outside the byte alphabet is a llama.cpp mislabel; transformers skips it too.
        originals = metadata["tokenizer.ggml.tokens"]
        special = [
            tokens[i]
            for i, kind in enumerate(token_types)
            if kind == TOKEN_TYPE_CONTROL and set(originals[i]) <= alphabet
        ]
        user_defined = [tokens[i] for i, kind in enumerate(token_types) if kind == TOKEN_TYPE_USER_DEFINED]
        pre_tokenizer = str(metadata.get("tokenizer.ggml.pre", "default"))
        add_start_token = metadata.get("tokenizer.ggml.add_bos_token")
        if add_start_token is None:
            add_start_token = pre_tokenization(pre_tokenizer).adds_start_token

        def token_at(key: str) -> str | None:
            id = metadata.get(key)
            if id is None:
                return None
            if not 0 <= int(id) < len(tokens):
                raise ValueError(f"GGUF {key} = {id} is outside the vocabulary of {len(tokens)} tokens")
            return tokens[int(id)]

        return cls._build(
            {token: id for id, token in enumerate(tokens)},
            byte_pair_files.load_merges(metadata["tokenizer.ggml.merges"]),
            pre_tokenizer=pre_tokenizer,
            special_tokens=special,
            user_defined_tokens=user_defined,
            start_token=token_at("tokenizer.ggml.bos_token_id"),
            end_token=token_at("tokenizer.ggml.eos_token_id"),
            pad_token=token_at("tokenizer.ggml.padding_token_id"),
            add_start_token=bool(add_start_token),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def _build(
        cls,
        vocabulary: Mapping[str, int],
        merges: list[tuple[str, str]],
        *,
        pre_tokenizer: str,
        special_tokens: Sequence[str],
        user_defined_tokens: Sequence[str],
        start_token: str | None,
        end_token: str | None,
        pad_token: str | None,
        add_start_token: bool,
        chat_template: ChatTemplate | str | None,
    ) -> BytePairTokenizer:
        for token in (*special_tokens, *user_defined_tokens):
            if token not in vocabulary:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
        for index, (left, right) in enumerate(merges):
            if left not in vocabulary or right not in vocabulary or left + right not in vocabulary:
                raise ValueError(f"merge {index} ({left!r} {right!r}) uses or makes a token not in the vocabulary")
        split = pre_tokenization(pre_tokenizer)
        tokenizer = tokenizers.Tokenizer(
            models.BPE(vocab=dict(vocabulary), merges=merges, ignore_merges=split.ignore_merges)
        )
        tokenizer.pre_tokenizer = split.pre_tokenizer
        tokenizer.decoder = decoders.ByteLevel()
        # Already-present vocabulary entries keep their ids when added; normalized=False matches them verbatim.
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined_tokens])
        # Only for transformers reading a saved tokenizer.json: it adds the start token through the
        # post-processor, as Llama 3's file does. batchgen itself never applies it (see from_tokenizer_json).
        if add_start_token and start_token is not None:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{start_token} $A",
                pair=f"{start_token} $A {start_token} $B",
                special_tokens=[(start_token, vocabulary[start_token])],
            )
        else:
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

        def id_of(token: str | None) -> int | None:
            return None if token is None else vocabulary[token]

        return cls(
            tokenizer,
            start_token_id=id_of(start_token),
            end_token_id=id_of(end_token),
            pad_token_id=id_of(pad_token),
            add_start_token=add_start_token,
            chat_template=chat_template,
            pre_tokenizer_name=pre_tokenizer,
        )

    # ---- the Tokenizer interface ------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; bytes of a character split across ids come out whole once all are present."""
        ids = [int(id) for id in ids]
        size = self.vocabulary_size()
        for id in ids:
            if not 0 <= id < size:
                raise ValueError(f"token id {id} is outside the vocabulary of {size} ids")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def vocabulary_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        id = self._tokenizer.token_to_id(token)
        if id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return id

    def id_to_token(self, id: int) -> str:
        token = self._tokenizer.id_to_token(id)
        if token is None:
            raise IndexError(f"token id {id} is outside the vocabulary of {self.vocabulary_size()} ids")
        return token

    # ---- saving -----------------------------------------------------------------------------------------

    def to_tokenizer_json(self) -> str:
        """The Hugging Face `tokenizer.json` text of this tokenizer (vocabulary, merges, split, special tokens)."""
        return self._tokenizer.to_str()

    def tokenizer_config(self) -> dict[str, Any]:
        """The `tokenizer_config.json` content that, with `to_tokenizer_json`, rebuilds this tokenizer."""

        def text(id: int | None) -> str | None:
            return None if id is None else self.id_to_token(id)

        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": text(self.start_token_id),
            "eos_token": text(self.end_token_id),
            "pad_token": text(self.pad_token_id),
            "add_bos_token": self.add_start_token,
            "add_eos_token": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template.source
        return config

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json to `directory` (path or URL), as Hugging Face does."""
        storage.write_bytes(storage.join(directory, "tokenizer.json"), self.to_tokenizer_json().encode("utf-8"))
        config = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False)
        storage.write_bytes(storage.join(directory, "tokenizer_config.json"), config.encode("utf-8"))


def _name_pre_tokenizer(tokenizer: tokenizers.Tokenizer) -> str | None:
    """The llama.cpp name whose split equals `tokenizer`'s pre-tokenizer, or None when none does."""
    if tokenizer.pre_tokenizer is None:
        return None
    wanted = json.loads(tokenizer.pre_tokenizer.__getstate__())
    for name in ("llama-bpe", "smollm", "gpt2"):
        if json.loads(pre_tokenization(name).pre_tokenizer.__getstate__()) == wanted:
            return name
    return None
