"""ChatTemplate: Jinja rendering as transformers does it, the sandbox, and messages checked before rendering."""

from __future__ import annotations

import datetime

import pytest

from model.tokenizers import ChatTemplate

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_renders_messages_and_generation_prompt() -> None:
    template = ChatTemplate(CHATML)
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert template.render(CONVERSATION, add_generation_prompt=False) == expected
    assert template.render(CONVERSATION) == expected + "<|im_start|>assistant\n"


def test_trim_blocks_and_lstrip_blocks_as_transformers() -> None:
    # Written over several lines, as checkpoint authors do: the newline after a block tag and the indentation
    # before it vanish, so only the {{ }} output and the literal "\n" in it remain.
    template = ChatTemplate(
        "{% for message in messages %}\n"
        "    {% if message.role == 'user' %}\n"
        "U: {{ message.content }}\n"
        "    {% else %}\n"
        "A: {{ message.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    assert template.render(CONVERSATION, add_generation_prompt=False) == "U: Hi\nA: Hello!\n"


def test_special_tokens_and_extra_variables_reach_the_template() -> None:
    template = ChatTemplate("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}{{ tools is none }}{{ name }}")
    assert template.render(CONVERSATION[:1], bos_token="<s>", eos_token="</s>", name="!") == "<s>Hi</s>True!"


def test_globals_and_filters() -> None:
    template = ChatTemplate(
        "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% generation %}{{ messages[-1].content }}{% endgeneration %}"
    )
    year = str(datetime.date.today().year)
    rendered = template.render([{"role": "user", "content": "日本 <b>"}, *CONVERSATION])
    # tojson keeps non-ASCII and HTML characters as they are (Jinja's own filter would escape them).
    assert rendered == year + '|{"role": "user", "content": "日本 <b>"}|user|Hello!'


def test_raise_exception_and_sandbox_escapes_become_value_errors() -> None:
    with pytest.raises(ValueError, match="only user turns"):
        ChatTemplate("{{ raise_exception('only user turns') }}").render(CONVERSATION)
    # Templates ship inside downloaded checkpoints: reaching Python internals must fail, not run.
    with pytest.raises(ValueError, match="unsafe|not safely|access"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render(CONVERSATION)
    with pytest.raises(ValueError):
        ChatTemplate("{% set x = messages.append({'role': 'x', 'content': 'y'}) %}").render(CONVERSATION)


def test_syntax_errors_are_reported_at_load() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for message in messages %}")
    with pytest.raises(ValueError, match="non-empty"):
        ChatTemplate("   ")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("Hi", "list of dicts"),
        ([["user", "Hi"]], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\] must be a str"),
    ],
)
def test_malformed_messages_are_named(messages: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ChatTemplate(CHATML).render(messages)  # type: ignore[arg-type]


def test_tokenizer_without_template_says_so() -> None:
    import pathlib

    from model.tokenizers import LlamaTokenizer

    model = pathlib.Path(__file__).parent / "fixtures" / "tokenizers" / "tiny_llama2" / "tokenizer.model"
    with pytest.raises(ValueError, match="no chat template"):
        LlamaTokenizer(model).apply_chat_template(CONVERSATION)
