"""/v1/chat/completions over real HTTP: the checkpoint's chat template renders the messages (checked against the
template rendered by hand), the reply is the engine's own greedy output for those tokens, whole and streamed;
logprobs in OpenAI's chat shape; bad messages, templates and requests are clear errors."""
from __future__ import annotations

import json
import shutil

import pytest

from mxroll import Engine
from mxroll.model.tokenizer import byte_level_bpe
from mxroll.rollout.chat import ChatTemplate
from mxroll.rollout.server import BackgroundServer, create_app

from .test_server import http, sse

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_checkpoint, path)
    byte_level_bpe(SPECIALS).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    return path


@pytest.fixture(scope="module")
def engine(chat_checkpoint):
    e = Engine(model_path=str(chat_checkpoint), device="cpu", progress=False)
    yield e
    e.shutdown()


MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]


def test_template_renders_messages_as_written(chat_checkpoint):
    t = ChatTemplate.load(chat_checkpoint)
    text = t.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}])
    assert text == "<s><|system|>be brief</s><|user|>hi there</s><|assistant|>"
    assert t.render([{"role": "user", "content": "é"}], tools=[{"name": "f"}], add_generation_prompt=False) == \
        '<s><|user|>é</s>[{"name": "f"}]'
    assert ChatTemplate("{% if enable_thinking %}<think>{% endif %}{{ messages | length }}").render(
        [{"role": "user", "content": "x"}], extra={"enable_thinking": True}) == "<think>1"


def test_chat_completion_is_the_engine_output_for_the_rendered_prompt(engine, url):
    ids = engine.tokenizer.encode("<s><|system|>be brief</s><|user|>hi there</s><|assistant|>", add_bos=False)
    assert ids[:2] == [0, 2] and ids[-1] == 4  # the template's specials are single tokens
    assert ids.count(0) == 1 and ids.count(1) == 2  # one bos (the template's), no bos added on top
    ref = engine.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=6), return_logprob=True,
                          top_logprobs_num=2)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    status, out = http(url, "/v1/chat/completions", body)
    assert status == 200 and out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref["text"]} and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    want = [lp for lp, _, _ in ref["meta_info"]["output_token_logprobs"]]
    assert [c["logprob"] for c in content] == pytest.approx(want)
    assert [c["token"] for c in content] == [engine.tokenizer.decode([t]) for t in ref["output_ids"]]
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    events = sse(url, "/v1/chat/completions", {**body, "stream": True, "logprobs": False, "top_logprobs": None})
    chunks = events[:-1]
    assert events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == ref["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_n_samples_and_default_length(engine, url):
    status, out = http(url, "/v1/chat/completions", {"messages": MESSAGES, "n": 2, "seed": 1, "max_tokens": 4})
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1]
    status, out = http(url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 0})
    assert status == 200 and out["choices"][0]["message"]["content"] == ""


@pytest.mark.parametrize("body, field", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages[0].content[0]"),
    ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": MESSAGES, "bogus": 1}, "bogus"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
def test_bad_chat_requests_are_400s_naming_the_field(url, body, field):
    status, out = http(url, "/v1/chat/completions", body)
    assert status == 400 and field in out["error"]["message"], out
    assert http(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[0] == 200


def test_a_model_without_a_template_says_so(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    try:
        with BackgroundServer(create_app(e)) as server:
            status, out = http(server.url, "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 400 and "no chat template" in out["error"]["message"]
    finally:
        e.shutdown()


@pytest.mark.parametrize("config, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"chat_template": "{% for %}"}), "does not compile"),
    (json.dumps({"chat_template": 3}), "must be a string"),
])
def test_damaged_template_files_name_the_file(tmp_path, config, message):
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ValueError, match=message) as e:
        ChatTemplate.load(tmp_path)
    assert "tokenizer_config.json" in str(e.value)


def test_template_errors_are_value_errors(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"}))
    with pytest.raises(ValueError, match="user first"):
        ChatTemplate.load(tmp_path).render([{"role": "assistant", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] + 1 }}"}))
    with pytest.raises(ValueError, match="could not render"):  # a template meeting data it cannot handle
        ChatTemplate.load(tmp_path).render([{"role": "user", "content": "x"}])
    assert ChatTemplate.load(tmp_path / "nothing") is None


def test_tokenizer_path_gives_the_tokenizer_and_template(tiny_checkpoint, chat_checkpoint, tmp_path):
    """sglang's tokenizer_path: the tokenizer (and the chat template the server renders) from another folder."""
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, tokenizer_path=str(chat_checkpoint))
    try:
        assert e.get_model_info()["tokenizer_path"] == str(chat_checkpoint)
        assert e.tokenizer.encode("<|user|>", add_bos=False) == [3]  # the chat tokenizer's special, one token
        out = e.generate(prompt="hi", sampling_params=GREEDY | {"max_new_tokens": 2})
        assert out["meta_info"]["prompt_tokens"] == 3  # bos + 2 byte-level tokens
        with BackgroundServer(create_app(e)) as server:
            status, body = http(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                      "max_tokens": 2, "temperature": 0})
            assert status == 200 and body["usage"]["prompt_tokens"] == len(e.tokenizer.encode(
                "<s><|user|>hi</s><|assistant|>", add_bos=False))
    finally:
        e.shutdown()
    with pytest.raises(ValueError, match="tokenizer_path='/no/such/dir': not a directory"):
        Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, tokenizer_path="/no/such/dir")
    with pytest.raises(ValueError, match="no tokenizer.json there"):
        Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, tokenizer_path=str(tmp_path))
