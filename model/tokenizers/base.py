"""The interface every batchgen tokenizer implements, and the behaviour they share.

A subclass supplies the text <-> id mapping (`_encode`, `detokenize`, the vocabulary look-ups) and fills the
attributes through `Tokenizer.__init__`; adding the start token, batching in `__call__` and chat templates are
the same for every kind, so they live here.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import overload

from model.tokenizers.chat_template import ChatTemplate

# Tokens that end an assistant turn in the chat formats batchgen meets; generation stops on them as well as on
# the end token (Llama 3 instruct ends turns with <|eot_id|> while its end token is <|end_of_text|>).
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


class Tokenizer(abc.ABC):
    """Text to token ids and back, with the special tokens and chat template of one checkpoint.

    Attributes:
        start_token_id: the beginning-of-sequence id, or None when the vocabulary has none.
        end_token_id: the end-of-sequence id, or None when the vocabulary has none.
        pad_token_id: the id used to pad batches (the checkpoint's pad token, else its end token, else 0).
        add_start_token: whether `tokenize` puts `start_token_id` in front of every text.
        stop_token_ids: ids that end generation: the end token plus end-of-turn tokens in the vocabulary.
        special_tokens: text of each special (never split) token -> its id.
        chat_template: the checkpoint's chat template, or None when it ships none.
    """

    start_token_id: int | None
    end_token_id: int | None
    pad_token_id: int
    add_start_token: bool
    stop_token_ids: tuple[int, ...]
    special_tokens: dict[str, int]
    chat_template: ChatTemplate | None

    def __init__(
        self,
        *,
        start_token_id: int | None,
        end_token_id: int | None,
        pad_token_id: int | None,
        add_start_token: bool,
        special_tokens: Mapping[str, int],
        chat_template: ChatTemplate | str | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        if add_start_token and start_token_id is None:
            raise ValueError("add_start_token=True needs a start token, but start_token_id is None")
        self.start_token_id = start_token_id
        self.end_token_id = end_token_id
        # Padding is masked out everywhere it is used, so any valid id serves; the end token is the usual choice.
        if pad_token_id is None:
            pad_token_id = end_token_id if end_token_id is not None else 0
        self.pad_token_id = pad_token_id
        self.add_start_token = add_start_token
        self.special_tokens = dict(special_tokens)
        if isinstance(chat_template, str):
            chat_template = ChatTemplate(chat_template)
        self.chat_template = chat_template
        if stop_token_ids is None:
            stop_token_ids = default_stop_token_ids(end_token_id, self.special_tokens)
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids)

    # ---- what each kind of tokenizer supplies -------------------------------------------------------------

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of `text` alone, without the start token; special tokens written in the text stay whole."""

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of several texts; kinds with a faster batch path override this."""
        return [self._encode(text) for text in texts]

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; with `skip_special_tokens`, special tokens (start, end, chat markers) are left out."""

    @abc.abstractmethod
    def vocabulary_size(self) -> int:
        """Number of ids, special tokens included."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry given as its stored text; KeyError naming the token when absent."""

    @abc.abstractmethod
    def id_to_token(self, id: int) -> str:
        """Stored text of the vocabulary entry `id`; IndexError naming the id when out of range."""

    # ---- shared behaviour ------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text`, with the start token in front when `add_start_token` is True.

        Example:
            >>> tokenizer.tokenize("Hello")  # doctest: +SKIP
            [1, 15043]
        """
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}: {text!r:.80}")
        return self._with_start(self._encode(text))

    @overload
    def __call__(self, inputs: str) -> list[int]: ...

    @overload
    def __call__(self, inputs: Sequence[str]) -> list[list[int]]: ...

    def __call__(self, inputs: str | Sequence[str]) -> list[int] | list[list[int]]:
        """Tokenize one string (ids) or a list of strings (a list of ids each), as keras-hub tokenizers do."""
        if isinstance(inputs, str):
            return self.tokenize(inputs)
        texts = list(inputs)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"inputs[{index}] must be a str, got {type(text).__name__}: {text!r:.80}")
        return [self._with_start(ids) for ids in self._encode_batch(texts)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation (a list of {"role": str, "content": str} dicts) with the chat template.

        The text already holds the start token where the template writes one (Llama 2 and 3 templates write
        `bos_token`); `tokenize_chat` turns it into ids without adding a second one.
        """
        if self.chat_template is None:
            raise ValueError(f"{type(self).__name__} has no chat template; the checkpoint shipped none")
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.start_token_id),
            eos_token=self._token_text(self.end_token_id),
        )

    def tokenize_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation, as transformers' `apply_chat_template(tokenize=True)` gives them.

        The start token is not added on top of the text: the template decides where it goes.
        """
        return self._encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def _with_start(self, ids: list[int]) -> list[int]:
        if self.add_start_token:
            assert self.start_token_id is not None  # checked in __init__
            return [self.start_token_id, *ids]
        return ids

    def _token_text(self, id: int | None) -> str:
        return "" if id is None else self.id_to_token(id)


def default_stop_token_ids(end_token_id: int | None, special_tokens: Mapping[str, int]) -> tuple[int, ...]:
    """The end token followed by every end-of-turn token present among `special_tokens`, without repeats."""
    ids: list[int] = [] if end_token_id is None else [end_token_id]
    for token in END_OF_TURN_TOKENS:
        id = special_tokens.get(token)
        if id is not None and id not in ids:
            ids.append(id)
    return tuple(ids)
