"""`LlamaTokenizer`: the SentencePiece tokenizer of Llama 2 checkpoints (`tokenizer.model`, or GGUF metadata).

Which reference it follows, measured on tests/fixtures/tokenizers/tiny_llama2/:
- Ordinary text gives exactly the ids of `sentencepiece` itself (`SentencePieceProcessor.encode`), which is also
  what keras-hub's `LlamaTokenizer` gives (it wraps the same library) and what Meta's Llama 2 code uses.
  transformers 5 converts the model to a `tokenizers` Metaspace pipeline that differs from SentencePiece on
  text starting with spaces (" " gives "▁" there, "▁▁" in SentencePiece).
- Unlike keras-hub and plain SentencePiece (which spell "</s>" in a text as the characters "<", "/", "s", ">"),
  the special tokens <s>, </s> and <unk> written in a text become their ids, as in transformers, because chat
  templates such as Llama 2's write "<s>[INST] ..." as text. The text between special tokens is encoded by
  SentencePiece piece by piece, so each piece gets SentencePiece's dummy prefix: transformers' `legacy=True`
  behaviour, which is how Meta's reference code encoded each turn.
- The start token <s> is added in front by default and no end token is added (Llama 2, transformers'
  `add_bos_token=True`); keras-hub leaves both to its preprocessor.
- `detokenize` decodes each run of ordinary ids with SentencePiece (dropping the dummy prefix space) and writes
  special tokens as their text, so `detokenize(tokenize(text))` is `text` again, with no space inserted after
  "<s>" as transformers' decoder does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import sentencepiece

from model.tokenizers import storage
from model.tokenizers.base import Tokenizer
from model.tokenizers.chat_template import ChatTemplate
from model.tokenizers.huggingface_files import config_chat_template, read_tokenizer_config


class LlamaTokenizer(Tokenizer):
    """Llama 2 tokenizer on a SentencePiece model.

    `proto` is the serialized model (bytes) or where to read it: a local path or an fsspec URL.

    Example:
        >>> tokenizer = LlamaTokenizer("tokenizer.model")  # doctest: +SKIP
        >>> tokenizer.detokenize(tokenizer.tokenize("Hello world"))  # doctest: +SKIP
        'Hello world'
    """

    def __init__(
        self,
        proto: bytes | str | os.PathLike[str],
        *,
        add_start_token: bool = True,
        chat_template: ChatTemplate | str | None = None,
    ) -> None:
        if isinstance(proto, (bytes, bytearray)):
            self.proto = bytes(proto)
            where = "the given bytes"
        else:
            self.proto = storage.read_bytes(proto)
            where = os.fspath(proto)
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(self.proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{where} is not a SentencePiece model: {e}") from e
        processor = self._processor

        special_tokens = {
            processor.id_to_piece(id): id
            for id in range(processor.get_piece_size())
            if processor.is_control(id) or processor.is_unknown(id)
        }
        self._special_ids = frozenset(special_tokens.values())
        # Longest first, so that a special token containing another one is matched whole.
        alternatives = sorted(special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

        def optional(id: int) -> int | None:
            return id if id >= 0 else None

        super().__init__(
            start_token_id=optional(processor.bos_id()),
            end_token_id=optional(processor.eos_id()),
            # keras-hub's LlamaTokenizer pads with 0 (<unk> in Llama 2) when the model defines no pad piece;
            # padding is masked, so keeping its choice only keeps presets interchangeable.
            pad_token_id=processor.pad_id() if processor.pad_id() >= 0 else 0,
            add_start_token=add_start_token,
            special_tokens=special_tokens,
            chat_template=chat_template,
        )

    @classmethod
    def from_huggingface(cls, directory: str | os.PathLike[str]) -> LlamaTokenizer:
        """From a Hugging Face checkpoint directory (path or URL): tokenizer.model, and from tokenizer_config.json
        `add_bos_token` (default True) and the chat template."""
        config = read_tokenizer_config(directory)
        return cls(
            storage.join(directory, "tokenizer.model"),
            add_start_token=bool(config.get("add_bos_token", True)),
            chat_template=config_chat_template(config),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> LlamaTokenizer:
        """From a GGUF file's `tokenizer.*` metadata with `tokenizer.ggml.model = "llama"` (Llama 2 GGUFs).

        GGUF keeps SentencePiece's pieces, scores and piece types (the same numbers) but not the model file, so
        the model is rebuilt: a BPE model with Llama's normalizer (identity, whitespace kept), byte fallback
        when there are byte pieces, and `tokenizer.ggml.add_space_prefix` as the dummy prefix.
        """
        from sentencepiece import sentencepiece_model_pb2

        model = metadata.get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; LlamaTokenizer reads only 'llama'")
        tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        scores = list(metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if not len(scores) == len(types) == len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokens, {len(scores)} scores and {len(types)} token types")

        proto = sentencepiece_model_pb2.ModelProto()
        for token, score, kind in zip(tokens, scores, types):
            proto.pieces.add(piece=token, score=float(score), type=int(kind))
        trainer = proto.trainer_spec
        trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
        trainer.vocab_size = len(tokens)
        trainer.byte_fallback = 6 in types  # 6: BYTE pieces <0x00>..<0xFF>
        # Encoding keeps runs of spaces as one piece only with this flag; the file does not record it, but
        # whitespace-only pieces exist only in models trained with it (Llama 2's has "▁▁" ... and the flag).
        trainer.allow_whitespace_only_pieces = any(len(t) > 1 and set(t) == {"\u2581"} for t in tokens)

        def token_id(key: str, default: int) -> int:
            id = metadata.get(key)
            return default if id is None else int(id)

        trainer.unk_id = token_id("tokenizer.ggml.unknown_token_id", types.index(2) if 2 in types else 0)
        trainer.bos_id = token_id("tokenizer.ggml.bos_token_id", -1)
        trainer.eos_id = token_id("tokenizer.ggml.eos_token_id", -1)
        trainer.pad_id = token_id("tokenizer.ggml.padding_token_id", -1)
        normalizer = proto.normalizer_spec
        normalizer.name = "identity"
        normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        normalizer.remove_extra_whitespaces = False
        normalizer.escape_whitespaces = True
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_start_token = metadata.get("tokenizer.ggml.add_bos_token", True)
        return cls(
            proto.SerializeToString(),
            add_start_token=bool(add_start_token) and trainer.bos_id >= 0,
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    def _encode(self, text: str) -> list[int]:
        if self._special_pattern is None:
            return self._processor.encode(text)
        ids: list[int] = []
        # re.split with a group keeps the matched special tokens at the odd positions.
        for index, chunk in enumerate(self._special_pattern.split(text)):
            if index % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self._processor.encode(chunk))
        return ids

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._special_pattern is None or not any(self._special_pattern.search(text) for text in texts):
            return self._processor.encode(list(texts))
        return [self._encode(text) for text in texts]

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`: SentencePiece decoding of each run of ordinary ids, special tokens as their text."""
        ids = [int(id) for id in ids]
        size = self._processor.get_piece_size()
        for id in ids:
            if not 0 <= id < size:
                raise ValueError(f"token id {id} is outside the vocabulary of {size} ids")
        parts: list[str] = []
        run: list[int] = []
        for id in ids:
            if id in self._special_ids:
                if run:
                    parts.append(self._processor.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._processor.id_to_piece(id))
            else:
                run.append(id)
        if run:
            parts.append(self._processor.decode(run))
        return "".join(parts)

    def vocabulary_size(self) -> int:
        return self._processor.get_piece_size()

    def token_to_id(self, token: str) -> int:
        id = self._processor.piece_to_id(token)
        # SentencePiece answers the <unk> id for any unknown piece; only <unk> itself may map there.
        if id == self._processor.unk_id() and token != self._processor.id_to_piece(id):
            raise KeyError(f"token {token!r} is not in the SentencePiece vocabulary")
        return id

    def id_to_token(self, id: int) -> str:
        if not 0 <= id < self._processor.get_piece_size():
            raise IndexError(f"token id {id} is outside the vocabulary of {self._processor.get_piece_size()} ids")
        return self._processor.id_to_piece(id)

    def save(self, location: str | os.PathLike[str]) -> None:
        """Write the SentencePiece model to `location` (a path or fsspec URL), e.g. `.../tokenizer.model`."""
        storage.write_bytes(location, self.proto)
