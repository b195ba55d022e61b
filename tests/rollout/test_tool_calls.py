"""Tool calls parsed out of chat replies (`--tool-call-parser`): each format as its checkpoints' chat templates write
an assistant's calls, the markers as special tokens of a real (byte-level HF) tokenizer, whole and streamed replies,
cut-off sections left as text, and the server / CLI wiring."""
from __future__ import annotations

import json

import pytest

from mxroll.model.tokenizer import HFTokenizer, byte_level_bpe
from mxroll.rollout.server_chat import ChatCompletionRequest, ChatFormatter
from mxroll.rollout.tool_calls import FORMATS, split_reply, tool_call_format

tokenizers = pytest.importorskip("tokenizers")

DS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"]
KIMI = ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
SPECIALS = ["<s>", "</s>"] + DS + KIMI
CALLS = [("get_weather", {"city": "Zürich", "unit": "c"}), ("add", {"a": 1, "b": [2, 3]})]


def written(fmt: str, content: str, calls=CALLS, close: bool = True) -> str:
    """A reply as the model family's chat template writes an assistant message with tool calls."""
    if fmt == "deepseekv3":
        body = "\n".join(f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{json.dumps(a)}\n```<｜tool▁call▁end｜>"
                         for n, a in calls)
        return content + "<｜tool▁calls▁begin｜>" + body + ("<｜tool▁calls▁end｜>" if close else "")
    if fmt == "deepseekv31":
        body = "".join(f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{json.dumps(a)}<｜tool▁call▁end｜>" for n, a in calls)
        return content + "<｜tool▁calls▁begin｜>" + body + ("<｜tool▁calls▁end｜>" if close else "")
    body = "".join(f"<|tool_call_begin|>functions.{n}:{i}<|tool_call_argument_begin|>{json.dumps(a)}<|tool_call_end|>"
                   for i, (n, a) in enumerate(calls))
    return content + "<|tool_calls_section_begin|>" + body + ("<|tool_calls_section_end|>" if close else "")


def Tok(specials=tuple(SPECIALS)) -> HFTokenizer:
    """The engine's tokenizer interface over a byte-level HF tokenizer whose markers are special tokens."""
    return HFTokenizer.of(byte_level_bpe(specials))


@pytest.fixture(scope="module")
def tok():
    return Tok()


def output(tok: Tok, ids: list[int], final: bool, reason: str = "stop") -> dict:
    return {"text": tok.decode(ids), "output_ids": ids, "index": 0,
            "meta_info": {"id": "r", "prompt_tokens": 3, "completion_tokens": len(ids),
                          "finish_reason": {"type": reason} if final else None}}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_parses_the_calls_its_template_writes(fmt, tok):
    ids = tok.encode(written(fmt, "Checking both. ") + "</s>")
    assert {tok.token_id(m) for m in DS + KIMI} <= set(range(len(SPECIALS)))  # the markers are single tokens
    text = tok.decode(ids)
    assert "tool" not in text  # special tokens skipped: the plain text is no help to find the calls
    reply = split_reply(FORMATS[fmt], tok, ids, text, final=True)
    assert reply.content == "Checking both. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.calls] == CALLS
    assert all(c["type"] == "function" and c["id"] for c in reply.calls)
    assert reply.calls[0]["function"]["arguments"] == '{"city": "Zürich", "unit": "c"}'  # JSON, not \u-escaped
    if fmt == "kimi_k2":  # the model numbers its calls: those are the ids
        assert [c["id"] for c in reply.calls] == ["functions.get_weather:0", "functions.add:1"]
    else:
        assert len({c["id"] for c in reply.calls}) == 2 and reply.calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_cut_off_or_absent_section_is_text(fmt, tok):
    cut = tok.encode(written(fmt, "Hm ", calls=CALLS[:1], close=False))
    cut = cut[:len(cut) - 6]  # max_tokens ended it inside the first call
    reply = split_reply(FORMATS[fmt], tok, cut, tok.decode(cut), final=True)
    assert reply.calls is None and reply.content == tok.decode(cut)
    second = tok.encode(written(fmt, "Hm ", close=False))
    second = second[:len(second) - 6]  # ... or inside the second: the first is a call
    reply = split_reply(FORMATS[fmt], tok, second, tok.decode(second), final=True)
    assert reply.content == "Hm " and [c["function"]["name"] for c in reply.calls] == ["get_weather"]
    plain = tok.encode("no tools needed")
    assert split_reply(FORMATS[fmt], tok, plain, "no tools needed", final=True).content == "no tools needed"
    other = "deepseekv31" if fmt == "kimi_k2" else "kimi_k2"  # another family's markup is not a call
    ids = tok.encode(written(other, "x"))
    assert split_reply(FORMATS[fmt], tok, ids, tok.decode(ids), final=True).calls is None


def test_markers_spelled_by_ordinary_tokens_and_partial_markers(tok):
    fmt = FORMATS["kimi_k2"]

    class Plain:  # a tokenizer without the markers as tokens: they are plain text
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

        def token_id(self, text):
            return None

    s = written("kimi_k2", "ok ")
    ids = [ord(c) for c in s]
    reply = split_reply(fmt, Plain(), ids, s, final=True)
    assert reply.content == "ok " and [c["function"]["name"] for c in reply.calls] == ["get_weather", "add"]
    partial = "ok <|tool_calls_sec"  # streaming: an end that may begin the marker is held back
    assert split_reply(fmt, Plain(), [ord(c) for c in partial], partial, final=False).content == "ok "
    assert split_reply(fmt, Plain(), [ord(c) for c in partial], partial, final=True).content == partial


@pytest.mark.parametrize("fmt", ["deepseekv3", "kimi_k2"])
def test_whole_and_streamed_chat_replies(fmt, tok):
    ids = tok.encode(written(fmt, "Let me look. ") + "</s>")
    whole = ChatFormatter("m", tok, False, None, stream=False, tools=FORMATS[fmt]).response([output(tok, ids, True)])
    (choice,) = whole["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look. "
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather", "add"]
    only = tok.encode(written(fmt, ""))
    msg = ChatFormatter("m", tok, False, None, False, FORMATS[fmt]).response([output(tok, only, True)])["choices"][0]
    assert msg["message"]["content"] is None and len(msg["message"]["tool_calls"]) == 2  # calls only: content null
    cut = ChatFormatter("m", tok, False, None, False, FORMATS[fmt]).response([output(tok, ids[:-9], True, "length")])
    assert cut["choices"][0]["finish_reason"] == "length"  # cut in its second call: the first is kept
    assert [c["function"]["name"] for c in cut["choices"][0]["message"]["tool_calls"]] == ["get_weather"]

    fmtr = ChatFormatter("m", tok, False, None, stream=True, tools=FORMATS[fmt])
    chunks = [fmtr.chunk(output(tok, ids[:k], k == len(ids)))["choices"][0] for k in range(1, len(ids) + 1)]
    assert "".join(c["delta"]["content"] for c in chunks) == "Let me look. "  # no call text leaks into content
    assert all("tool_calls" not in c["delta"] and c["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["finish_reason"] == "tool_calls"
    assert [(t["index"], t["function"]["name"]) for t in last["delta"]["tool_calls"]] == [(0, "get_weather"), (1, "add")]
    assert [json.loads(t["function"]["arguments"]) for t in last["delta"]["tool_calls"]] == [a for _, a in CALLS]


def test_which_requests_are_parsed():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    fmt = FORMATS["deepseekv3"]
    msgs = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(messages=msgs, tools=tools).tool_format(fmt) is fmt
    assert ChatCompletionRequest(messages=msgs, tools=tools, tool_choice="none").tool_format(fmt) is None
    assert ChatCompletionRequest(messages=msgs).tool_format(fmt) is None  # no tools: nothing to call
    assert ChatCompletionRequest(messages=msgs, tools=tools).tool_format(None) is None  # no parser configured
    with pytest.raises(ValueError, match=r"tool_call_parser='hermes'.*deepseekv3"):
        tool_call_format("hermes")
    assert tool_call_format(None) is None


def test_server_parses_replies_with_its_parser(tiny_checkpoint, tok, monkeypatch):
    """Over HTTP: `create_app(tool_call_parser=..., reasoning_parser=...)` parses a reply holding reasoning and calls
    (the engine's generate stands in with that reply: a random tiny model writes neither), whole and streamed; an
    unknown parser is an error naming the known ones."""
    from mxroll import Engine
    from mxroll.rollout.server import BackgroundServer, create_app

    from .test_server import http, sse

    engine = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    try:
        with pytest.raises(ValueError, match="tool_call_parser"):
            create_app(engine, tool_call_parser="nope")
        with pytest.raises(ValueError, match="reasoning_parser"):
            create_app(engine, reasoning_parser="nope")
        ids = tok.encode("Hmm.</think>" + written("deepseekv31", "Sure. ") + "</s>")

        async def fake_generate(stream=False, **kw):
            if not stream:
                return output(tok, ids, True)

            async def events():
                for k in range(1, len(ids) + 1):
                    yield output(tok, ids[:k], k == len(ids))
            return events()

        monkeypatch.setattr(engine, "async_generate", fake_generate)
        monkeypatch.setattr(engine, "tokenizer", tok)
        app = create_app(engine, tool_call_parser="deepseekv31", reasoning_parser="deepseek-r1")
        monkeypatch.setattr("mxroll.rollout.server_chat.ChatCompletionRequest.engine_args",
                            lambda self, *a: {"input_ids": [5, 6, 7], "sampling_params": {}})
        body = {"messages": [{"role": "user", "content": "add"}], "tools": [{"type": "function",
                                                                             "function": {"name": "add"}}]}
        with BackgroundServer(app) as server:
            status, out = http(server.url, "/v1/chat/completions", body)
            assert status == 200, out
            msg = out["choices"][0]
            assert msg["finish_reason"] == "tool_calls" and msg["message"]["content"] == "Sure. "
            assert msg["message"]["reasoning_content"] == "Hmm."
            assert [c["function"]["name"] for c in msg["message"]["tool_calls"]] == ["get_weather", "add"]
            events = sse(server.url, "/v1/chat/completions", {**body, "stream": True})
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "tool_calls"
            assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-1]) == "Sure. "
            assert "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in events[:-1]) == "Hmm."
            status, out = http(server.url, "/v1/chat/completions", {**body, "tool_choice": "none"})
            assert "tool_calls" not in out["choices"][0]["message"] and out["choices"][0]["finish_reason"] == "stop"
    finally:
        engine.shutdown()
