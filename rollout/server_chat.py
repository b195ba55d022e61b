"""OpenAI /v1/chat/completions: the request body, and the chat shapes of the completion formatter.

Messages are rendered by the checkpoint's own chat template (rollout/chat.py) and tokenized as they are (the
template spells its special tokens); the assistant's reply is the sampled text. Tools are handed to the template;
with a tool-call parser (`mxroll serve --tool-call-parser`, rollout/tool_calls.py) the calls in a reply come back
as `tool_calls` (finish_reason "tool_calls"), the text before them as `content`; without one, or with
`tool_choice: "none"`, the reply is text. Streamed, content deltas stop where a calls section begins and the calls
come in the last delta. With a reasoning parser (`--reasoning-parser`, rollout/reasoning.py) a thinking model's
reasoning comes back as `reasoning_content` (streamed as its own deltas), apart from `content`.
"""
from __future__ import annotations

from typing import Any

from .server_api import CompletionFormatter, Json, StreamOptions, _Body, finish_reason, openai_sampling
from .reasoning import ReasoningFormat, split_reasoning
from .tool_calls import ToolCallFormat, split_reply


class ChatCompletionRequest(_Body):
    model: str | None = None
    messages: list[Json]
    max_tokens: int | None = None  # None (and no max_completion_tokens): up to the context length
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    tools: list[Json] | None = None
    tool_choice: str | Json | None = None
    chat_template_kwargs: Json | None = None  # more template variables (e.g. enable_thinking)
    separate_reasoning: bool = True  # sglang's: with a reasoning parser, reasoning_content apart from content
    # extensions (sglang/vLLM names)
    top_k: int = -1
    min_p: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    rid: str | None = None

    def engine_args(self, template, tokenizer, context_length: int) -> Json:
        """Keyword arguments of `Engine.async_generate` (ValueError names what cannot be served)."""
        if template is None or tokenizer is None:
            raise ValueError("messages: this model has no chat template (tokenizer_config.json chat_template or "
                             "chat_template.jinja, with a tokenizer.json); use /v1/completions or /generate")
        if self.tool_choice not in (None, "auto", "none"):
            raise ValueError(f"tool_choice={self.tool_choice!r}: forcing a tool call is not supported (tools go to "
                             "the chat template; the model decides, as with \"auto\")")
        if self.top_logprobs is not None and (self.top_logprobs < 0 or not self.logprobs):
            raise ValueError(f"top_logprobs={self.top_logprobs}: needs logprobs true and a value >= 0")
        text = template.render(self.messages, tools=self.tools, add_generation_prompt=True, extra=self.chat_template_kwargs)
        ids = tokenizer.encode(text, add_bos=False)
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is None:
            limit = max(context_length - len(ids), 0)
        if limit < 0:
            raise ValueError(f"max_completion_tokens={limit}: must be an integer >= 0")
        args: Json = {"input_ids": ids, "sampling_params": openai_sampling(self, limit),
                      "return_logprob": self.logprobs,
                      "top_logprobs_num": self.top_logprobs or 0}
        if self.rid is not None:
            args["rid"] = self.rid
        return args

    def tool_format(self, parser: ToolCallFormat | None) -> ToolCallFormat | None:
        """The server's tool-call format when this request's replies are parsed for calls (tools given, not
        tool_choice "none")."""
        return parser if self.tools and self.tool_choice != "none" else None

    def reasoning_format(self, parser: ReasoningFormat | None) -> tuple[ReasoningFormat, bool] | None:
        """(the server's reasoning format, whether this request's prompt opens the reasoning) when its replies are
        split (separate_reasoning)."""
        if parser is None or not self.separate_reasoning:
            return None
        return parser, parser.opens(self.chat_template_kwargs)


class ChatFormatter(CompletionFormatter):
    """Engine outputs -> `chat.completion` objects (or `chat.completion.chunk` deltas when streaming: each
    choice's first carries the assistant role). tools: the format replies are parsed with for tool calls."""

    def __init__(self, model: str, tokenizer, logprobs: bool, top_logprobs: int | None, stream: bool,
                 tools: ToolCallFormat | None = None, reasoning: tuple[ReasoningFormat, bool] | None = None):
        """reasoning: (format, whether the prompt opened the reasoning), from `reasoning_format`."""
        super().__init__(model, tokenizer, (top_logprobs or 0) if logprobs else None)
        self.id = "chatcmpl-" + self.id.removeprefix("cmpl-")
        self.stream, self._roled = stream, set()
        self.tools = tools if tokenizer is not None else None
        self.reasoning = reasoning if tokenizer is not None else None
        self._calls: dict[int, list[dict]] = {}  # parsed calls of each choice (its reply finished)
        self._thoughts: dict[int, str | None] = {}  # each choice's reasoning so far (None: it does not reason)
        self._sent_thoughts: dict[int, str] = {}

    def _text(self, out: Json, index: int) -> str:
        """The reply's content (so far); its reasoning and tool calls are kept for `_choice`."""
        text, ids = out.get("text", ""), out["output_ids"]
        if self.tools is None and self.reasoning is None:
            return text
        final = out["meta_info"]["finish_reason"] is not None
        if self.tools is not None:  # the calls follow any reasoning: what comes before them is split next
            reply = split_reply(self.tools, self.tokenizer, ids, text, final)
            if reply.calls:
                self._calls[index] = reply.calls
            text, ids = reply.content, reply.content_ids
        if self.reasoning is not None:
            fmt, forced = self.reasoning
            split = split_reasoning(fmt, forced, self.tokenizer, ids, text, final)
            self._thoughts[index] = split.reasoning
            text = split.content
        return text

    def _envelope(self, choices: list[Json]) -> Json:
        return {"id": self.id, "object": "chat.completion.chunk" if self.stream else "chat.completion",
                "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, index: int, out: Json, text: str, start: int, text_offset: int, echo: bool = False) -> Json:
        choice: dict[str, Any] = {"index": index}
        calls, thought = self._calls.get(index), self._thoughts.get(index)
        if self.stream:
            choice["delta"] = {"content": text} if index in self._roled else {"role": "assistant", "content": text}
            self._roled.add(index)
            if thought is not None:  # the reasoning's delta (it only grows; a character still incomplete waits)
                stable = thought if out["meta_info"]["finish_reason"] is not None else thought.rstrip("\ufffd")
                sent = self._sent_thoughts.get(index, "")
                if len(stable) > len(sent):
                    choice["delta"]["reasoning_content"] = stable[len(sent):]
                    self._sent_thoughts[index] = stable
            if calls:
                choice["delta"]["tool_calls"] = [{"index": j, **c} for j, c in enumerate(calls)]
        else:
            choice["message"] = {"role": "assistant", "content": text}
            if self.reasoning is not None:
                choice["message"]["reasoning_content"] = thought
            if calls:
                choice["message"].update(content=text if text.strip() else None, tool_calls=calls)
        choice["logprobs"] = self._chat_logprobs(out, start)
        choice["finish_reason"] = finish_reason(out["meta_info"]["finish_reason"])
        if calls and choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
        return choice

    def _chat_logprobs(self, out: Json, start: int) -> Json | None:
        if self.logprobs is None:
            return None
        meta = out["meta_info"]
        sampled = meta.get("output_token_logprobs", [])[start:]
        tops = meta.get("output_top_logprobs", [])[start:] or [[] for _ in sampled]

        def entry(lp, t):
            s = self._token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(lp, t), "top_logprobs": [entry(x, u) for x, u, _ in top]}
                            for (lp, t, _), top in zip(sampled, tops)]}
