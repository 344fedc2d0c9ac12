"""Chat templates: the Jinja program a checkpoint ships to turn a conversation into one prompt string.

Rendered the way transformers renders them (`utils/chat_template_utils.py`), so a prompt built here is the
prompt the checkpoint's authors tested: a sandboxed environment (templates come from downloaded checkpoints and
are untrusted code), `trim_blocks` and `lstrip_blocks`, loop controls, a `tojson` filter that keeps non-ASCII
text, and the globals `raise_exception` and `strftime_now`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplate:
    """One compiled chat template.

    Example:
        >>> template = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}")
        >>> template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
        'user: Hi\\n'
    """

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"a chat template must be a non-empty Jinja string, got {source!r:.80}")
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        **extra: Any,
    ) -> str:
        """The prompt text of `messages` (a list of {"role": str, "content": str, ...} dicts).

        `add_generation_prompt` appends the opening of an assistant turn, so the model answers next. `extra`
        reaches the template as further variables (for instance `tools`).
        """
        validate_messages(messages)
        variables: dict[str, Any] = {"tools": None, "documents": None, **extra}
        try:
            return self._template.render(
                messages=[dict(message) for message in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                **variables,
            )
        except jinja2.TemplateError as e:
            # raise_exception() in a template (e.g. "roles must alternate") lands here; it is bad input.
            raise ValueError(f"chat template rejected the conversation: {e}") from e

    def __reduce__(self) -> tuple[type[ChatTemplate], tuple[str]]:
        # A compiled Jinja template does not pickle; the source does, and Ray ships tokenizers to workers.
        return (ChatTemplate, (self.source,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatTemplate) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.source[:60]!r}{'...' if len(self.source) > 60 else ''})"


def validate_messages(messages: Any) -> None:
    """Raise ValueError naming the first malformed message: not a dict, or role / content missing or not str."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}: {messages!r:.80}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}: {message!r:.80}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{index}] has no {key!r} key: {message!r:.80}")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"messages[{index}][{key!r}] must be a str, got {type(message[key]).__name__}: "
                    f"{message[key]!r:.80}"
                )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which changes the prompt; templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment
