"""Per-slot incremental detokenization: a completion's text grows token by token, stop strings are looked for
in the new text only, and special tokens stay out of it unless asked for.

Detokenizing the whole completion on every token would cost O(n^2) in its length; this follows vLLM's
`detokenize_incrementally` instead. Each token's new text is the decode of a short window of ids (from
`prefix_offset`: the few tokens before the ones not yet read) minus the decode of the window without the new
tokens. The look-back matters: SentencePiece drops the leading space of a sequence, so a token decoded alone
can read differently than after its neighbours, while a window whose first token is decoded both times
cancels that out. Text that ends in U+FFFD is held back (not emitted, the window not advanced): it is a
character whose UTF-8 bytes are split across tokens and not all here yet.

A stop string is searched for in the new text plus the last `longest stop - 1` characters before it, so each
token costs the same whatever the completion's length, and the text is cut where the first stop string begins,
even when it ends in the middle of a token.

Example:
    >>> d = IncrementalDetokenizer(tokenizer, prompt_ids, stop_strings=(".",))  # doctest: +SKIP
    >>> d.add([id_of_paris, id_of_dot])  # True: "." ended the text  # doctest: +SKIP
    >>> d.text, d.kept_tokens, d.consumed_tokens  # doctest: +SKIP
    (' Paris', 1, 2)
"""

from __future__ import annotations

from typing import Any, Sequence

# Prompt tokens decoded in front of the first generated ones, as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:
# enough for a SentencePiece leading space or a character split across tokens to read as it does in context.
PROMPT_LOOK_BACK = 5
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


class IncrementalDetokenizer:
    """The text of one sequence's generated tokens, built as they arrive, and where a stop string ended it.

    Args:
        tokenizer: has `detokenize(ids, skip_special_tokens=...)`.
        prompt_ids: the prompt; only its last PROMPT_LOOK_BACK ids are kept, as context for the first tokens.
        stop_strings: the text ends where the first of them begins; without any, tokens are only collected and
            decoded once, when `text` is read.
        skip_special_tokens: leave special tokens (chat markers, start / end tokens) out of the text.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stop_strings: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop_strings):
            raise ValueError(f"stop strings must not be empty, got {list(stop_strings)!r}")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stops = tuple(stop_strings)
        self._overlap = max((len(s) for s in self._stops), default=1) - 1
        # The window: ids from prefix_offset on; `_read` of them had been read when `_prefix_text` was decoded.
        self._window = [int(i) for i in prompt_ids[-PROMPT_LOOK_BACK:]]
        self._prefix_text = self._decode(self._window)
        if self._prefix_text.endswith(REPLACEMENT):
            # The prompt ends inside a character (only ids that did not come from text can): its bytes would
            # merge with the completion's, so the completion is decoded on its own instead.
            self._window, self._prefix_text = [], ""
        self._read = len(self._window)
        self._held = 0  # characters of the window's new text already emitted (all but a trailing U+FFFD run)
        self._chunks: list[str] = []
        self._length = 0  # characters emitted
        self._tail = ""  # the last `_overlap` characters emitted, where a stop string may have begun
        self._ends: list[int] = []  # characters emitted after each generated token (with stop strings only)
        self.consumed_tokens = 0  # generated tokens added, up to the one that completed a stop string
        self.stopped = False
        self._cut: int | None = None

    # ---- feeding ------------------------------------------------------------------------------------------

    def add(self, tokens: Sequence[int]) -> bool:
        """Adds generated tokens in order; True when a stop string has ended the text (later tokens are ignored)."""
        for token in tokens:
            if self.stopped:
                break
            self._window.append(int(token))
            self.consumed_tokens += 1
            if self._stops:
                self._ends.append(self._read_new())
        return self.stopped

    def _read_new(self) -> int:
        """Emits the text the window gained since `_read` and checks it for stop strings; returns where the
        text ends after this token, counting a held-back partial character (whose bytes this token holds)."""
        new = self._decode(self._window)[len(self._prefix_text) :]
        stable = new.rstrip(REPLACEMENT)
        if len(stable) > self._held:
            self._emit(stable[self._held :])
            self._held = len(stable)
        end = self._length + len(new) - len(stable)
        if new and stable == new:  # whole characters only: the window moves on to the tokens just read
            self._window = self._window[self._read :]
            self._prefix_text = self._decode(self._window)
            self._read = len(self._window)
            self._held = 0
        return end

    def _emit(self, delta: str) -> None:
        start = self._length - len(self._tail)  # where `_tail` begins in the whole text
        region = self._tail + delta
        self._chunks.append(delta)
        self._length += len(delta)
        self._tail = region[-self._overlap :] if self._overlap else ""
        found = [i for i in (region.find(s) for s in self._stops) if i >= 0]
        if found and not self.stopped:
            self.stopped = True
            self._cut = start + min(found)

    # ---- results ------------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The completion's text: cut where the stop string begins, or all of it (a held-back partial character
        included, as a whole decode would write it)."""
        emitted = "".join(self._chunks)
        if self._cut is not None:
            return emitted[: self._cut]
        if self._read == len(self._window):
            return emitted
        # Without stop strings nothing was read yet: this is the one decode of the whole completion.
        return emitted + self._decode(self._window)[len(self._prefix_text) + self._held :]

    @property
    def kept_tokens(self) -> int:
        """Generated tokens whose text lies wholly before the cut (all consumed tokens when none stopped it)."""
        if self._cut is None:
            return self.consumed_tokens
        # The first token whose text reaches past the cut, as a whole decode after every token would find it (a
        # held-back partial character counts: when it resolves it may shrink, so the ends are not sorted).
        return next((k for k, end in enumerate(self._ends) if end > self._cut), len(self._ends))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.detokenize(ids, skip_special_tokens=self._skip) if ids else ""
