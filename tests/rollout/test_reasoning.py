"""Reasoning apart from content in chat replies (`--reasoning-parser`): the think tags as special tokens and as
plain text, prompts that open the reasoning (deepseek-r1, deepseek-v3 with `thinking`) or replies that do, whole and
streamed (the deltas add up to the whole reply's fields, no tag text leaks), with tool calls after the reasoning,
and the request / server / CLI switches."""
from __future__ import annotations

import pytest

from mxroll.rollout import cli
from mxroll.rollout.reasoning import FORMATS, reasoning_format, split_reasoning
from mxroll.rollout.server_chat import ChatCompletionRequest, ChatFormatter
from mxroll.rollout.tool_calls import FORMATS as TOOLS

from .test_tool_calls import SPECIALS, Tok, output, written

tokenizers = pytest.importorskip("tokenizers")

R1, V3, KIMI = FORMATS["deepseek-r1"], FORMATS["deepseek-v3"], FORMATS["kimi_k2"]
REPLY = "Two and two.\nSo 4. \n</think>\n\nThe answer is 4."


@pytest.fixture(scope="module", params=["tags special", "tags as text"])
def tok(request):
    return Tok(tuple(SPECIALS) + (("<think>", "</think>") if request.param == "tags special" else ()))


def split(fmt, forced, tok, reply: str, final: bool = True):
    ids = tok.encode(reply)
    return split_reasoning(fmt, forced, tok, ids, tok.decode(ids), final)


def test_prompt_opened_reasoning_ends_at_the_end_tag(tok):
    s = split(R1, True, tok, REPLY)
    assert (s.reasoning, s.content, s.ended) == ("Two and two.\nSo 4.", "The answer is 4.", True)
    assert split(R1, True, tok, "<think>\n" + REPLY).reasoning == "Two and two.\nSo 4."  # a reply repeating the tag
    s = split(R1, True, tok, "Still thinking", final=True)  # finished (max_tokens) inside the reasoning
    assert (s.reasoning, s.content) == ("Still thinking", "")
    assert tok.decode(tok.encode(REPLY)).count("think") == (0 if tok.token_id("</think>") is not None else 1)


def test_replies_that_open_reasoning_themselves(tok):
    for fmt in (KIMI, V3):
        assert split(fmt, False, tok, "<think>hm</think> ok").reasoning == "hm"
        s = split(fmt, False, tok, "plain answer")
        assert (s.reasoning, s.content) == (None, "plain answer")
    assert V3.opens({"thinking": True}) and not V3.opens({}) and not V3.opens(None) and R1.opens(None)
    assert not KIMI.opens({"thinking": True})


def chunks(fmtr, tok, reply: str) -> list[dict]:
    ids = tok.encode(reply)
    return [fmtr.chunk(output(tok, ids[:k], k == len(ids)))["choices"][0] for k in range(1, len(ids) + 1)]


@pytest.mark.parametrize("opened", [True, False])
def test_whole_and_streamed_replies_agree(tok, opened):
    reply = REPLY if opened else "<think>" + REPLY
    fmt = (R1, True) if opened else (KIMI, False)
    whole = ChatFormatter("m", tok, False, None, False, reasoning=fmt).response(
        [output(tok, tok.encode(reply), True)])["choices"][0]["message"]
    assert whole == {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Two and two.\nSo 4."}
    streamed = chunks(ChatFormatter("m", tok, False, None, True, reasoning=fmt), tok, reply)
    assert "".join(c["delta"].get("reasoning_content", "") for c in streamed) == whole["reasoning_content"]
    assert "".join(c["delta"]["content"] for c in streamed) == whole["content"]
    assert not any("think" in c["delta"].get("reasoning_content", "") + c["delta"]["content"] for c in streamed)
    first_content = next(i for i, c in enumerate(streamed) if c["delta"]["content"])
    assert all("reasoning_content" not in c["delta"] for c in streamed[first_content:])  # reasoning comes first


def test_reasoning_then_tool_calls(tok):
    reply = "I should add.</think>\n" + written("deepseekv3", "Adding. ")
    fmtr = ChatFormatter("m", tok, False, None, False, tools=TOOLS["deepseekv3"], reasoning=(R1, True))
    (choice,) = fmtr.response([output(tok, tok.encode(reply), True)])["choices"]
    assert choice["message"]["reasoning_content"] == "I should add." and choice["message"]["content"] == "Adding. "
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather", "add"]
    assert choice["finish_reason"] == "tool_calls"
    streamed = chunks(ChatFormatter("m", tok, False, None, True, TOOLS["deepseekv3"], (R1, True)), tok, reply)
    assert "".join(c["delta"]["content"] for c in streamed) == "Adding. "
    assert "".join(c["delta"].get("reasoning_content", "") for c in streamed) == "I should add."
    assert len(streamed[-1]["delta"]["tool_calls"]) == 2


def test_switches():
    msgs = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(messages=msgs).reasoning_format(R1) == (R1, True)
    assert ChatCompletionRequest(messages=msgs, separate_reasoning=False).reasoning_format(R1) is None
    assert ChatCompletionRequest(messages=msgs, chat_template_kwargs={"thinking": True}).reasoning_format(V3) == (
        V3, True)
    assert ChatCompletionRequest(messages=msgs).reasoning_format(None) is None
    with pytest.raises(ValueError, match=r"reasoning_parser='qwen3'.*deepseek-r1"):
        reasoning_format("qwen3")


def test_serve_cli_passes_the_reasoning_parser(monkeypatch):
    calls = []
    monkeypatch.setattr("mxroll.rollout.server.run_server", lambda cfg, **kw: calls.append(kw))
    monkeypatch.delenv("MXROLL_ADMIN_TOKEN", raising=False)
    assert cli.main(["serve", "--reasoning-parser", "deepseek-r1", "engine.device=cpu"]) == 0
    assert calls[-1]["reasoning_parser"] == "deepseek-r1" and calls[-1]["tool_call_parser"] is None
    with pytest.raises(SystemExit):
        cli.main(["serve", "--reasoning-parser", "qwen3"])
