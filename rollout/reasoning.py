"""Reasoning in chat replies: the text a thinking model writes between its think tags comes back as
`reasoning_content`, the rest as `content` (the parser names of sglang's `--reasoning-parser`).

  deepseek-r1  the generation prompt opens `<think>`: the reply starts inside the reasoning, which ends at `</think>`
  deepseek-v3  DeepSeek-V3.1: as deepseek-r1 when the request's chat_template_kwargs set `thinking`, else a reply
               reasons only if it opens with `<think>`
  kimi_k2      a reply reasons when it opens with `<think>` (Kimi-K2-Thinking)
A reply with no end tag when it finishes is all reasoning (content empty). Reasoning is shown stripped of the tags
and of surrounding whitespace, content without its leading whitespace; while streaming, whitespace that may end the
reasoning and an end that may begin a tag are held back, so the streamed deltas add up to the whole reply's fields.
The end tag is found among the token ids when it is one token (special or not), else in the text.
"""
from __future__ import annotations

from dataclasses import dataclass

from .output import partial_tag
from .tool_calls import parser_format


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str
    forced: bool  # the generation prompt opened the reasoning
    thinking_key: str | None = None  # chat_template_kwargs key that makes it forced

    def opens(self, template_kwargs: dict | None) -> bool:
        return self.forced or bool(self.thinking_key and (template_kwargs or {}).get(self.thinking_key))


FORMATS = {
    "deepseek-r1": ReasoningFormat("<think>", "</think>", forced=True),
    "deepseek-v3": ReasoningFormat("<think>", "</think>", forced=False, thinking_key="thinking"),
    "kimi_k2": ReasoningFormat("<think>", "</think>", forced=False),
}


def reasoning_format(name: str | None) -> ReasoningFormat | None:
    return parser_format("reasoning_parser", FORMATS, name)


@dataclass
class Split:
    reasoning: str | None  # None: the reply does not reason
    content: str
    ended: bool  # the reasoning is over (the end tag, or the finished reply)


def split_reasoning(fmt: ReasoningFormat, forced: bool, tokenizer, ids: list[int] | None, text: str,
                    final: bool) -> Split:
    """A reply's (visible) reasoning and content. forced: the prompt opened the reasoning (`ReasoningFormat.opens`).
    ids: the text's token ids (None: unknown, the tags are looked for in the text only)."""
    lead = text.lstrip()
    ids = ids if ids is not None else []
    start_id = tokenizer.token_id(fmt.start) if tokenizer is not None else None
    opened = lead.startswith(fmt.start) or (start_id is not None and ids[:1] == [start_id])
    if not forced and not opened:
        if not final and lead and fmt.start.startswith(lead):
            return Split(None, "", False)  # may be opening the reasoning: held back
        return Split(None, text, True)
    end_id = tokenizer.token_id(fmt.end) if tokenizer is not None else None
    if end_id is not None and fmt.end not in text and end_id in ids:  # one token the text skips (special)
        k = ids.index(end_id)
        thought = tokenizer.decode(ids[:k])
        return Split(_thought(thought, fmt), text[len(thought):].lstrip() if text.startswith(thought)
                     else tokenizer.decode(ids[k + 1:]).lstrip(), True)
    at = text.find(fmt.end)
    if at >= 0:
        return Split(_thought(text[:at], fmt), text[at + len(fmt.end):].lstrip(), True)
    if final:
        return Split(_thought(text, fmt), "", True)
    held = partial_tag(text, (fmt.end,))
    return Split(_thought(text[:len(text) - held], fmt), "", False)


def _thought(text: str, fmt: ReasoningFormat) -> str:
    text = text.lstrip()
    return (text[len(fmt.start):] if text.startswith(fmt.start) else text).strip()
