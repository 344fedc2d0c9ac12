"""The tokenizer config of a Hugging Face checkpoint directory: tokenizer_config.json, special tokens, chat template."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from model.tokenizers import storage


def read_tokenizer_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """`tokenizer_config.json` of `directory` (path or URL), with its chat template filled in from
    chat_template.jinja where transformers 5 writes it; {} when the directory has no config."""
    config: dict[str, Any] = {}
    location = storage.join(directory, "tokenizer_config.json")
    if storage.exists(location):
        try:
            config = json.loads(storage.read_text(location))
        except json.JSONDecodeError as e:
            raise ValueError(f"{location} is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{location} must hold a JSON object, got {type(config).__name__}")
    template = storage.join(directory, "chat_template.jinja")
    if storage.exists(template):
        config["chat_template"] = storage.read_text(template)
    return config


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json special token must be a string or {{'content': ...}}, got {value!r}")


def config_chat_template(config: Mapping[str, Any]) -> str | None:
    """The default chat template of a tokenizer_config.json: a string, or a list of {name, template}."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"tokenizer_config.json has named chat templates {sorted(named)} but none is 'default'")
    raise ValueError(f"tokenizer_config.json chat_template must be a string or a list, got {type(template).__name__}")
