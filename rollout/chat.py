"""Chat templates: a checkpoint's own (tokenizer_config.json's `chat_template`, or chat_template.jinja), rendered
in a sandboxed jinja2 environment with the variables and helpers transformers' apply_chat_template gives them
(messages, tools, add_generation_prompt, bos_token, eos_token, raise_exception, strftime_now, tojson).
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.tokenizer import read_json_object

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


def chat_messages(messages) -> list[dict]:
    """Messages as a template reads them: each with a string role, and content as text (a list of text parts is
    joined) or null; anything else is a ValueError naming the message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}].role: must be a string")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string, a list of text parts, or null")
        out.append({**m, "content": content})
    return out


def _special(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": string}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


@dataclass
class ChatTemplate:
    source: str  # the jinja2 text
    bos_token: str = ""
    eos_token: str = ""
    where: str = ""  # the file it came from, for errors
    _template: Any = field(default=None, repr=False, compare=False)  # compiled once

    @classmethod
    def load(cls, directory: str | Path) -> "ChatTemplate | None":
        """The checkpoint's chat template, or None when it has none; a damaged one is a ValueError naming its file."""
        directory = Path(directory)
        path = directory / CONFIG_FILE
        config = read_json_object(path) if path.is_file() else {}
        source, where = config.get("chat_template"), str(path)
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if (directory / TEMPLATE_FILE).is_file():
            source, where = (directory / TEMPLATE_FILE).read_text(), str(directory / TEMPLATE_FILE)
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{where}: chat_template must be a string, got {type(source).__name__}")
        template = cls(source, _special(config.get("bos_token")), _special(config.get("eos_token")), where)
        template._compiled()  # a syntax error is reported now, naming the file
        return template

    def _compiled(self):
        if self._template is not None:
            return self._template
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ImportError("chat templates need jinja2: pip install jinja2") from e

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: (
            json.dumps(x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii))
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        try:
            self._template = env.from_string(self.source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.where}: the chat template does not compile ({e})") from None
        return self._template

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None) -> str:
        """The prompt text of a conversation (`chat_messages` first; `extra`: more template variables); an error the
        template raises (or a jinja2 error) is a ValueError."""
        import jinja2

        messages = chat_messages(messages)
        kwargs = dict(extra or {})
        reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
        if reserved:
            raise ValueError(f"chat_template_kwargs: {reserved} are set by the server")
        try:
            return self._compiled().render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                           bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)
        except (jinja2.exceptions.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"messages: the chat template could not render them ({type(e).__name__}: {e})") from None
