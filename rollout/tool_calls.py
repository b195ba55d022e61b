"""Tool calls in chat replies: the model's own tool-call markup parsed into OpenAI `tool_calls` (the parser names of
sglang's `--tool-call-parser`).

The formats, as the checkpoints' chat templates write an assistant's calls (and so as the models emit them):
  deepseekv3   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
               (more calls separated by a newline) <｜tool▁calls▁end｜>
  deepseekv31  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
  kimi_k2      <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:I<|tool_call_argument_begin|>ARGS
               <|tool_call_end|>...<|tool_calls_section_end|>
The markers are special tokens of those tokenizers (skipped in the reply's text), so the calls section is read from
the token ids after the marker, decoded with special tokens kept; the content is the reply's text before it. Only complete calls count: a reply cut off by
max_tokens keeps the calls it completed (its finish_reason stays "length"), and a section with none (cut off in its
first call, or malformed) is no call: the reply then comes back whole as text, as without a parser. Arguments
that are JSON are re-serialized compactly; others are passed on as written (OpenAI's `arguments` is a string the
client parses).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .output import partial_tag


@dataclass(frozen=True)
class ToolCallFormat:
    begin: str  # opens the calls section
    call: re.Pattern  # one call: groups "name" and "args", and "id" where the format numbers its calls

    def parse(self, section: str) -> list[dict]:
        """OpenAI tool calls of a calls section (text from `begin` on)."""
        calls = []
        for m in self.call.finditer(section):
            name = m.group("name").strip()
            if not name:
                continue
            given = m.groupdict().get("id")
            calls.append({"id": given.strip() if given else "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": name, "arguments": _arguments(m.group("args"))}})
        return calls


FORMATS = {
    "deepseekv3": ToolCallFormat(
        "<｜tool▁calls▁begin｜>",
        re.compile(r"<｜tool▁call▁begin｜>\s*\w*\s*<｜tool▁sep｜>(?P<name>[^\n<]*)\n```(?:json)?\s*\n(?P<args>.*?)\n?```"
                   r"\s*<｜tool▁call▁end｜>", re.S)),
    "deepseekv31": ToolCallFormat(
        "<｜tool▁calls▁begin｜>",
        re.compile(r"<｜tool▁call▁begin｜>(?P<name>[^<]*?)<｜tool▁sep｜>(?P<args>.*?)<｜tool▁call▁end｜>", re.S)),
    "kimi_k2": ToolCallFormat(
        "<|tool_calls_section_begin|>",
        re.compile(r"<\|tool_call_begin\|>\s*(?P<id>(?:functions\.)?(?P<name>[^<:\s]+?)(?::\d+)?)\s*"
                   r"<\|tool_call_argument_begin\|>(?P<args>.*?)<\|tool_call_end\|>", re.S)),
}


def tool_call_format(name: str | None) -> ToolCallFormat | None:
    return parser_format("tool_call_parser", FORMATS, name)


def parser_format(option: str, formats: dict, name: str | None):
    """The format of a parser name (None: no parsing); an unknown name is a ValueError naming the option and listing
    the known ones."""
    if name is None:
        return None
    if name not in formats:
        raise ValueError(f"{option}={name!r}; supported: {sorted(formats)}")
    return formats[name]


@dataclass
class Reply:
    content: str  # the text to show as content (so far, when streaming)
    calls: list[dict] | None  # parsed tool calls (a finished reply whose calls section parsed), else None
    content_ids: list[int] | None = None  # the content's token ids where known (the reply's up to the marker)


def split_reply(fmt: ToolCallFormat, tokenizer, ids: list[int] | None, text: str, final: bool) -> Reply:
    """A chat reply's content and tool calls. ids / text: its output token ids (None: unknown, the text is read)
    and their decoded text (special tokens skipped). While not final, content stops where a calls section begins (or may be beginning) and no calls
    are given: they come with the finished reply. Streamed, this runs at every chunk: a marker that is one token is
    looked for among the ids, and only the finished reply is decoded with special tokens."""
    marker = tokenizer.token_id(fmt.begin) if ids is not None else None
    content_ids = None
    if marker is None or fmt.begin in text:  # the marker is spelled by ordinary tokens: all of it is in the text
        at = text.find(fmt.begin)
        if at < 0:
            return Reply(text if final else text[:len(text) - partial_tag(text, (fmt.begin,))], None, ids)
        content, section = text[:at], text[at:]
    else:
        if marker not in ids:
            return Reply(text, None, ids)
        k = ids.index(marker)
        content, content_ids = tokenizer.decode(ids[:k]), ids[:k]
        if not final:
            return Reply(content, None, content_ids)
        section = tokenizer.decode(ids[k:], skip_special_tokens=False)
    if not final:
        return Reply(content, None, content_ids)
    calls = fmt.parse(section)
    return Reply(content, calls, content_ids) if calls else Reply(text, None, ids)


def _arguments(raw: str) -> str:
    raw = raw.strip()
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except ValueError:
        return raw
