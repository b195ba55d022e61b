"""The HTTP server over real HTTP on localhost (uvicorn on a thread, the tiny model on CPU): /generate
and /v1/completions equal the engine's own outputs, streams are cumulative and end with [DONE],
concurrent requests all succeed, tokens are enforced, bad requests are 400s that name the field and
leave the server serving, controls work, weight updates driven over HTTP + gloo change the outputs,
and the stdlib client mirrors the Engine API."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mxroll import Engine
from mxroll.model import ModelConfig
from mxroll.model.loader import iter_checkpoint
from mxroll.rollout import cli
from mxroll.rollout.server import BackgroundServer, check_exposure, create_app
from mxroll.sync.group import UpdateGroup
from mxroll.sync.http_client import EngineClient, EngineHTTPError
from mxroll.sync.receiver import WeightUpdateError
from mxroll.sync.sender import WeightSender

GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 6}
ADMIN, KEY = "admin-secret", "user-key"


@pytest.fixture(scope="module")
def secured_url(engine):
    with BackgroundServer(create_app(engine, admin_token=ADMIN, api_key=KEY)) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(url):
    return EngineClient(url)


def http(url: str, path: str, body=None, token: str | None = None, method: str | None = None):
    """(status, parsed JSON or text) of one request; body bytes go as they are, anything else as JSON."""
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def sse(url: str, path: str, body: dict) -> list:
    """The `data:` payloads of a server-sent event stream, parsed ("[DONE]" kept as a string)."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [block[len("data: "):] for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in text.split("\n\n") if block)
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def strip_timing(out):
    if isinstance(out, list):
        return [strip_timing(o) for o in out]
    return {**out, "meta_info": {k: v for k, v in out["meta_info"].items() if k not in ("e2e_latency", "id")}}


# ---- generation ----------------------------------------------------------------------------------
def test_generate_single_and_batch_equal_the_engine(engine, url):
    status, out = http(url, "/generate", {"input_ids": [0, 5, 6, 7], "sampling_params": GREEDY})
    assert status == 200
    ref = engine.generate(input_ids=[0, 5, 6, 7], sampling_params=GREEDY)
    assert strip_timing(out) == strip_timing(ref)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}

    status, batch = http(url, "/generate", {"text": ["hello", "a longer prompt"], "sampling_params": GREEDY})
    assert status == 200 and len(batch) == 2
    ref = engine.generate(prompt=["hello", "a longer prompt"], sampling_params=GREEDY)
    assert [o["output_ids"] for o in batch] == [o["output_ids"] for o in ref]
    assert [o["text"] for o in batch] == [o["text"] for o in ref]


def test_generate_returns_logprobs_and_routes(engine, client):
    out = client.generate(input_ids=[0, 9, 8], sampling_params=GREEDY, return_logprob=True, top_logprobs_num=3,
                          return_routed_experts=True)
    ref = engine.generate(input_ids=[0, 9, 8], sampling_params=GREEDY, return_logprob=True, top_logprobs_num=3)
    lps, ref_lps = out["meta_info"]["output_token_logprobs"], ref["meta_info"]["output_token_logprobs"]
    assert len(lps) == 6 and all(isinstance(x, tuple) for x in lps)
    assert [t for _, t, _ in lps] == out["output_ids"] == ref["output_ids"]
    assert client.generate(None, GREEDY, [0, 9, 8])["output_ids"] == ref["output_ids"]  # sglang's positional order
    assert max(abs(a[0] - b[0]) for a, b in zip(lps, ref_lps)) < 1e-6
    tops = out["meta_info"]["output_top_logprobs"]
    assert len(tops) == 6 and all(len(t) == 3 for t in tops)
    assert tops[0][0][1] == out["output_ids"][0]  # greedy: the top token is the sampled one
    cfg = engine.model_config
    routes = out["meta_info"]["routed_experts"]  # nested lists over HTTP: [tokens][moe layers][top-k]
    assert len(routes) == 3 + 6 - 1 and len(routes[0]) == cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert len(routes[0][0]) == cfg.num_experts_per_tok


def test_generate_takes_the_fields_sglang_clients_send(engine, url):
    """The body sglang's bench_serving and RL clients send (logprob_start_len -1, return_text_in_logprobs, lora_path
    / image_data null, top_logprobs_num 0) is served; return_text_in_logprobs fills the logprob tuples' text; values
    this engine does not do are 400s naming the field."""
    body = {"input_ids": [0, 9, 8], "sampling_params": GREEDY, "return_logprob": True, "logprob_start_len": -1,
            "top_logprobs_num": 0, "return_text_in_logprobs": False, "lora_path": None, "image_data": None,
            "stream": False, "rid": "sglang-shaped"}
    status, out = http(url, "/generate", body)
    ref = engine.generate(input_ids=[0, 9, 8], sampling_params=GREEDY, return_logprob=True)
    assert status == 200 and out["output_ids"] == ref["output_ids"]
    assert all(text is None for _, _, text in out["meta_info"]["output_token_logprobs"])
    status, out = http(url, "/generate", {**body, "return_text_in_logprobs": True, "top_logprobs_num": 2})
    assert status == 200
    assert [text for _, _, text in out["meta_info"]["output_token_logprobs"]] == [
        engine.tokenizer.decode([t]) for t in out["output_ids"]]
    assert all(text == engine.tokenizer.decode([t]) for row in out["meta_info"]["output_top_logprobs"]
               for _, t, text in row)
    for field, value in (("logprob_start_len", 7), ("lora_path", "adapter"), ("image_data", "img.png"),
                         ("token_ids_logprob", [5]), ("return_hidden_states", True), ("custom_logit_processor", "x")):
        status, out = http(url, "/generate", {**body, field: value})
        assert status == 400 and field in out["error"]["message"], (field, out)
    assert http(url, "/generate", body)[0] == 200  # still serving
    out = EngineClient(url).generate(input_ids=[0, 9, 8], sampling_params=GREEDY, return_logprob=True,
                                     return_text_in_logprobs=True, image_data=None)
    assert [text for _, _, text in out["meta_info"]["output_token_logprobs"]] == [
        engine.tokenizer.decode([t]) for t in out["output_ids"]]


def test_generate_routes_in_sglang_base64(engine):
    """--routed-experts-format base64: meta_info["routed_experts"] is sglang's encoding (little-endian int32 [prompt +
    completion - 1, num_hidden_layers, top_k], dense layers 0) of the Engine API's array, streamed too; the weights
    the same layout in float32; a request without return_routed_experts gets neither; an unknown format is refused."""
    import base64

    import numpy as np
    cfg = engine.model_config
    L, K = cfg.num_hidden_layers, cfg.num_experts_per_tok
    moe = [i for i in range(L) if cfg.is_moe_layer(i)]
    dense = [i for i in range(L) if i not in moe]
    ref = engine.generate(input_ids=[0, 9, 8], sampling_params=GREEDY, return_routed_experts=True)["meta_info"]

    def decode(meta, key, dtype):
        a = np.frombuffer(base64.b64decode(meta[key]), dtype=dtype).reshape(3 + 6 - 1, L, K)
        assert not a[:, dense].any()
        return torch.from_numpy(a[:, moe].copy())

    body = {"input_ids": [0, 9, 8], "sampling_params": GREEDY, "return_routed_experts": True}
    with BackgroundServer(create_app(engine, routed_experts_format="base64")) as server:
        status, out = http(server.url, "/generate", body)
        assert status == 200 and isinstance(out["meta_info"]["routed_experts"], str)
        assert torch.equal(decode(out["meta_info"], "routed_experts", "<i4"), ref["routed_experts"].to(torch.int32))
        assert torch.equal(decode(out["meta_info"], "routed_expert_weights", "<f4"), ref["routed_expert_weights"])
        final = sse(server.url, "/generate", {**body, "stream": True})[-2]
        assert torch.equal(decode(final["meta_info"], "routed_experts", "<i4"), ref["routed_experts"].to(torch.int32))
        status, plain = http(server.url, "/generate", {"input_ids": [0, 9, 8], "sampling_params": GREEDY})
        assert status == 200 and "routed_experts" not in plain["meta_info"]
    assert dense and moe  # the tiny model has both kinds, so the layout above is exercised
    with pytest.raises(ValueError, match="routed_experts_format='csv'"):
        create_app(engine, routed_experts_format="csv")


def test_generate_stream_is_cumulative_and_ends_with_done(engine, url, client):
    events = sse(url, "/generate", {"input_ids": [0, 5, 6], "sampling_params": GREEDY, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 6
    for a, b in zip(chunks, chunks[1:]):
        assert b["output_ids"][:len(a["output_ids"])] == a["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    final = chunks[-1]
    assert final["output_ids"] == engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)["output_ids"]
    assert final["meta_info"]["finish_reason"]["type"] == "length"
    streamed = list(client.generate(input_ids=[0, 5, 6], sampling_params=GREEDY, stream=True))
    assert streamed[-1]["output_ids"] == final["output_ids"]


def test_completions(engine, url):
    body = {"model": "tiny", "prompt": "hi there", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    status, out = http(url, "/v1/completions", body)
    assert status == 200 and out["object"] == "text_completion" and out["model"] == "tiny"
    ref = engine.generate(prompt="hi there", sampling_params={"max_new_tokens": 5, "temperature": 0},
                          return_logprob=True)
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["text"] == ref["text"] and choice["finish_reason"] in ("length", "stop")
    n_out = ref["meta_info"]["completion_tokens"]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp for lp, _, _ in
                                                                  ref["meta_info"]["output_token_logprobs"]])
    assert len(choice["logprobs"]["top_logprobs"]) == n_out and len(choice["logprobs"]["tokens"]) == n_out
    assert out["usage"] == {"prompt_tokens": ref["meta_info"]["prompt_tokens"], "completion_tokens": n_out,
                            "total_tokens": ref["meta_info"]["prompt_tokens"] + n_out}

    status, out = http(url, "/v1/completions", {"prompt": [[0, 5, 6], [0, 7]], "max_tokens": 3, "n": 2, "seed": 1})
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] == 12 and out["usage"]["prompt_tokens"] == 5


def test_completions_stream(engine, url):
    body = {"prompt": "hi there", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse(url, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    ref = engine.generate(prompt="hi there", sampling_params=dict(GREEDY, max_new_tokens=8))
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref["text"]


def test_completions_echo_scores_the_prompt(engine, url):
    """OpenAI's echo: the prompt leads the text and, with logprobs, the token list (its first token without a
    logprob); max_tokens 0 scores a text (the engine's prompt-token logprobs); streamed, the first chunk leads."""
    prompt = "hi there, general"
    ref = engine.generate(prompt=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    ids = [t for _, t, _ in ref["meta_info"]["input_token_logprobs"]]
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    status, out = http(url, "/v1/completions", body)
    (choice,) = out["choices"]
    assert status == 200 and choice["text"] == engine.tokenizer.decode(ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [engine.tokenizer.decode([t]) for t in ids] and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([x for x, _, _ in ref["meta_info"]["input_token_logprobs"][1:]])
    assert lp["top_logprobs"][0] is None and all(len(t) >= 1 for t in lp["top_logprobs"][1:])
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "echo": True}
    status, out = http(url, "/v1/completions", body)
    gen = engine.generate(prompt=prompt, sampling_params=dict(GREEDY, max_new_tokens=4))
    assert status == 200 and out["choices"][0]["text"] == engine.tokenizer.decode(ids) + gen["text"]
    assert out["choices"][0]["logprobs"] is None
    chunks = sse(url, "/v1/completions", {**body, "stream": True})[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]


def test_tokenize_and_detokenize(engine, url):
    """sglang / vLLM's /tokenize and /detokenize: the ids the engine generates from a text (its BOS unless
    add_special_tokens is false) and back; bad ids are 400s."""
    status, out = http(url, "/tokenize", {"prompt": "hi there"})
    assert status == 200 and out["tokens"] == engine.tokenizer.encode("hi there") and out["count"] == 9
    assert out["max_model_len"] == engine.context_length
    status, out = http(url, "/tokenize", {"prompt": ["a", "bc"], "add_special_tokens": False})
    assert status == 200 and out["tokens"] == [engine.tokenizer.encode(t, add_bos=False) for t in ("a", "bc")]
    status, out = http(url, "/detokenize", {"tokens": engine.tokenizer.encode("hi there")})
    assert status == 200 and out == {"text": "hi there"}
    status, out = http(url, "/detokenize", {"tokens": [1, 10**6]})
    assert status == 400 and "tokens" in out["message"]


def test_stop_strings_over_http(engine, url):
    """/v1/completions' stop and /generate's sampling_params.stop: the text ends before the stop string, whole or
    streamed (streamed texts only grow; the deltas add up to the whole text)."""
    free = engine.generate(prompt="hi there", sampling_params=dict(GREEDY, max_new_tokens=24, ignore_eos=True))["text"]
    i = next(i for i in range(2, len(free) - 1) if free[i:i + 2].isprintable() and "\ufffd" not in free[i:i + 2])
    stop = free[i:i + 2]
    ref = engine.generate(prompt="hi there", sampling_params=dict(GREEDY, max_new_tokens=24, ignore_eos=True,
                                                                  stop=stop))
    assert ref["text"] == free[:free.find(stop)] and ref["meta_info"]["finish_reason"]["matched"] == stop
    body = {"prompt": "hi there", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    status, out = http(url, "/v1/completions", body)
    assert status == 200 and out["choices"][0]["text"] == ref["text"] and out["choices"][0]["finish_reason"] == "stop"
    chunks = sse(url, "/v1/completions", {**body, "stream": True})[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref["text"]
    events = sse(url, "/generate", {"text": "hi there", "stream": True, "sampling_params": dict(
        GREEDY, max_new_tokens=24, ignore_eos=True, stop=stop)})[:-1]
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == ref["text"]


def test_concurrent_requests_all_succeed(engine, client):
    prompts = [[0] + list(range(5, 5 + k)) for k in range(1, 9)]
    params = dict(GREEDY, max_new_tokens=12)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: client.generate(input_ids=p, sampling_params=params), prompts))
    refs = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in refs]


# ---- auth ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "wrong", KEY], ids=["none", "wrong", "api-key"])
def test_admin_endpoints_need_the_admin_token(secured_url, token):
    status, out = http(secured_url, "/pause_generation", {"mode": "abort"}, token=token)
    assert status == 401 and out["success"] is False and "admin token" in out["message"]
    body = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2}
    assert http(secured_url, "/init_weights_update_group", body, token=token)[0] == 401
    assert http(secured_url, "/flush_cache", token=token)[0] == 401
    assert http(secured_url, "/update_weight_version", {"new_version": "x"}, token=token)[0] == 401
    assert http(secured_url, "/get_weights_by_name?name=lm_head.weight", token=token, method="GET")[0] == 401


def test_generation_needs_the_api_key(secured_url):
    body = {"input_ids": [0, 5], "sampling_params": {"max_new_tokens": 2}}
    for token in (None, "wrong"):
        status, out = http(secured_url, "/generate", body, token=token)
        assert status == 401 and "API key" in out["error"]["message"]
        assert http(secured_url, "/v1/completions", {"prompt": "x"}, token=token)[0] == 401
    assert http(secured_url, "/generate", body, token=KEY)[0] == 200
    assert http(secured_url, "/generate", body, token=ADMIN)[0] == 200  # the admin token works everywhere
    assert http(secured_url, "/health")[0] == 200  # probes carry no token
    with pytest.raises(EngineHTTPError) as err:
        EngineClient(secured_url, api_key="wrong").generate(input_ids=[0, 5], sampling_params={"max_new_tokens": 1})
    assert err.value.status == 401
    admin = EngineClient(secured_url, admin_token=ADMIN, api_key=KEY)
    admin.pause_generation("in_place")
    admin.continue_generation()
    assert admin.flush_cache() is True


def test_non_loopback_hosts_need_an_admin_token():
    with pytest.raises(ValueError, match="not a loopback address and no admin token"):
        check_exposure("0.0.0.0", None, None)
    check_exposure("0.0.0.0", ADMIN, KEY)
    check_exposure("127.0.0.1", None, None)
    check_exposure("::1", None, None)


# ---- bad requests --------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, field", [
    ("/generate", {"input_ids": [0, 5], "sampling_params": {"bogus": 1}}, "bogus"),
    ("/generate", {"input_ids": [0, 5], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ("/generate", b"{not json", "not valid JSON"),
    ("/generate", {"input_ids": ["a"]}, "input_ids"),
    ("/generate", {"input_ids": [0, 5], "return_logprob": "yes"}, "return_logprob"),
    ("/generate", {"input_ids": [0, 5], "unknown_field": 1}, "unknown_field"),
    ("/generate", {"sampling_params": {}}, "text or input_ids"),
    ("/generate", {"input_ids": [0, 10**6]}, "outside the vocabulary"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -2}, "max_tokens"),
], ids=["unknown-param", "negative-max-new", "non-json", "ids-type", "bool-type", "unknown-field", "no-prompt",
        "vocab", "completions-no-prompt", "completions-stop", "completions-negative"])
def test_bad_generation_requests_are_400s_naming_the_field(engine, url, path, body, field):
    status, out = http(url, path, body)
    assert status == 400 and field in out["error"]["message"]
    status, out = http(url, "/generate", {"input_ids": [0, 5], "sampling_params": GREEDY})
    assert status == 200 and len(out["output_ids"]) == 6


@pytest.mark.parametrize("path, body, field", [
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "rank_offset": 1, "world_size": 2},
     "master_port"),
    ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": "4"}, "shapes"),
    ("/pause_generation", {"mode": "sideways"}, "mode"),
    ("/release_memory_occupation", {"tags": ["gpu"]}, "tags"),
    ("/abort_request", {}, "rid"),
])
def test_bad_control_requests_are_400s(url, path, body, field):
    status, out = http(url, path, body)
    assert status == 400 and out["success"] is False and field in out["message"]


def test_client_raises_value_error_for_a_bad_request(client):
    with pytest.raises(ValueError, match="temperature"):
        client.generate(input_ids=[0, 5], sampling_params={"temperature": -1})
    assert client.health()


# ---- controls and info ---------------------------------------------------------------------------
def test_pause_and_continue(engine, client):
    client.pause_generation(mode="in_place")
    try:
        assert client.get_server_info()["paused"] is True
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            out=client.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "a paused engine must not finish requests"
    finally:
        client.continue_generation()
    worker.join(30)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "length"
    assert client.get_server_info()["paused"] is False


def test_abort_request_by_rid_and_on_disconnect(engine, url, client):
    long = {"max_new_tokens": 1500, "ignore_eos": True}
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        out=client.generate(input_ids=[0, 5], sampling_params=long, rid="long-one")))
    worker.start()
    deadline = time.monotonic() + 10
    while client.get_server_info()["num_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    client.abort_request(rid="long-one")
    worker.join(30)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"

    # clients that go away, streaming or not: their requests are aborted, not decoded to the end
    def request(stream: bool):
        return urllib.request.Request(url + "/generate", headers={"Content-Type": "application/json"}, data=json.dumps(
            {"input_ids": [0, 5], "sampling_params": long, "stream": stream}).encode())

    def settles() -> bool:
        deadline = time.monotonic() + 10
        while client.get_server_info()["num_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return client.get_server_info()["num_running"] == 0

    resp = urllib.request.urlopen(request(stream=True), timeout=30)
    resp.readline()
    resp.close()
    assert settles()
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(request(stream=False), timeout=0.3)
    assert settles()
    steps = len(engine.steps)
    time.sleep(0.3)
    assert len(engine.steps) == steps, "nothing should still be decoding"


def test_memory_release_and_resume(client):
    client.pause_generation(mode="abort")
    client.release_memory_occupation(["kv_cache"])
    assert client.get_server_info()["memory_released"] is True
    client.resume_memory_occupation(["kv_cache"])
    client.continue_generation()
    assert len(client.generate(input_ids=[0, 5], sampling_params=GREEDY)["output_ids"]) == 6


def test_update_weight_version_over_http(engine, url, client):
    """/update_weight_version (sglang's body and answer): relabels what the engine serves; the client mirrors it;
    a missing field is a 400 naming it."""
    old = engine.weight_version
    try:
        status, out = http(url, "/update_weight_version", {"new_version": "rl-step-3", "abort_all_requests": False})
        assert status == 200 and out["success"] is True and out["new_version"] == "rl-step-3"
        assert client.get_weight_version() == "rl-step-3"
        assert client.generate(input_ids=[0, 5], sampling_params=GREEDY)["meta_info"]["weight_version"] == "rl-step-3"
        assert client.update_weight_version("rl-step-4")[0] is True and engine.weight_version == "rl-step-4"
        status, out = http(url, "/update_weight_version", {"abort_all_requests": False})
        assert status == 400 and "new_version" in out["message"]
    finally:
        engine.update_weight_version(old)


def test_sglang_get_or_post_endpoints(engine, url, client):
    """As sglang's, /get_weights_by_name and the memory endpoints answer GET too: a JSON body, or the query string;
    a bad value is a 400 naming its field."""
    name = "model.norm.weight"
    want = engine.get_weights_by_name(name, truncate_size=4)
    for method, path, body in (("GET", f"/get_weights_by_name?name={name}&truncate_size=4", None),
                               ("GET", "/get_weights_by_name", {"name": name, "truncate_size": 4}),
                               ("POST", "/get_weights_by_name", {"name": name, "truncate_size": 4})):
        status, got = http(url, path, body, method=method)
        assert status == 200 and torch.equal(torch.tensor(got), torch.as_tensor(want).float()), (method, path)
    status, out = http(url, f"/get_weights_by_name?name={name}&truncate_size=four", method="GET")
    assert status == 400 and "truncate_size" in out["message"]
    client.pause_generation(mode="abort")
    status, out = http(url, "/release_memory_occupation?tags=kv_cache", method="GET")
    assert status == 200 and out["success"] and client.get_server_info()["memory_released"] is True
    status, out = http(url, "/resume_memory_occupation?tags=kv_cache", method="GET")
    assert status == 200 and out["success"] and client.get_server_info()["memory_released"] is False
    client.continue_generation()
    assert len(client.generate(input_ids=[0, 5], sampling_params=GREEDY)["output_ids"]) == 6


def test_info_endpoints(engine, url, client):
    assert client.get_model_info() == engine.get_model_info()
    assert client.get_weight_version() == engine.weight_version
    info = client.get_server_info()
    assert info["admin_token_set"] is False and info["context_length"] == engine.context_length
    status, newer = http(url, "/server_info")  # sglang's newer name
    assert status == 200 and newer["context_length"] == engine.context_length and "num_running" in newer
    # sglang's keys that RL frameworks read (its server args and scheduler info)
    cap = engine.cache.capacity_tokens
    assert (info["max_total_num_tokens"], info["max_req_input_len"]) == (cap, min(engine.context_length, cap) - 1)
    assert info["max_running_requests"] == engine.config.max_running_requests and info["tp_size"] == 1
    assert info["chunked_prefill_size"] == engine.config.chunked_prefill_size and info["version"]
    assert info["internal_states"][0]["load"] == 0 and info["internal_states"][0]["last_gen_throughput"] >= 0
    assert http(url, "/health")[0] == 200
    assert http(url, "/health_generate")[0] == 200
    assert http(url, "/v1/models")[1]["data"][0]["id"] == str(engine.model_path)


def test_sglang_and_openai_aliases(engine, url):
    """sglang's other names: /v1/tokenize, /v1/detokenize, PUT /generate, /v1/models/{id} (404 in OpenAI's shape
    for another id), /get_load (a router's balancing figures; EngineClient.get_load)."""
    status, card = http(url, "/v1/models/" + str(engine.model_path))
    assert status == 200 and card["id"] == str(engine.model_path) and card["max_model_len"] == engine.context_length
    assert card["object"] == "model" and 0 < time.time() - card["created"] < 3600
    assert http(url, "/v1/models")[1]["data"] == [card]
    status, out = http(url, "/v1/models/other-model")
    assert status == 404 and out["error"]["code"] == "model_not_found" and "other-model" in out["error"]["message"]
    assert http(url, "/v1/tokenize", {"prompt": "hi"})[1]["tokens"] == engine.tokenizer.encode("hi")
    assert http(url, "/v1/detokenize", {"tokens": engine.tokenizer.encode("hi")})[1] == {"text": "hi"}
    status, out = http(url, "/generate", {"input_ids": [0, 5, 6], "sampling_params": GREEDY}, method="PUT")
    assert status == 200 and out["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"]
    status, load = http(url, "/get_load")
    assert status == 200 and load == {"load": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0, "dp_rank": 0}
    assert EngineClient(url).get_load() == load


def test_parse_function_call_and_separate_reasoning(url):
    """sglang's text parsing endpoints: tool calls by a --tool-call-parser format (tool_index: the tool's place in
    `tools`), reasoning by a --reasoning-parser format; an unknown parser is a 400 naming the field."""
    text = ('Let me look.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.lookup:1'
            '<|tool_call_argument_begin|>{"q": 1}<|tool_call_end|><|tool_calls_section_end|>')
    tools = [{"type": "function", "function": {"name": n}} for n in ("other", "get_weather")]
    status, out = http(url, "/parse_function_call", {"text": text, "tool_call_parser": "kimi_k2", "tools": tools})
    assert status == 200 and out == {"normal_text": "Let me look.", "calls": [
        {"tool_index": 1, "name": "get_weather", "parameters": '{"city": "Paris"}'},
        {"tool_index": -1, "name": "lookup", "parameters": '{"q": 1}'}]}
    status, out = http(url, "/parse_function_call", {"text": "no calls here", "tool_call_parser": "deepseekv3"})
    assert status == 200 and out == {"normal_text": "no calls here", "calls": []}
    status, out = http(url, "/parse_function_call", {"text": "x", "tool_call_parser": "qwen"})
    assert status == 400 and "tool_call_parser='qwen'" in out["message"]
    status, out = http(url, "/separate_reasoning", {"text": "step 1, step 2</think>\n\nThe answer is 4.",
                                                    "reasoning_parser": "deepseek-r1"})
    assert status == 200 and out == {"reasoning_text": "step 1, step 2", "text": "The answer is 4."}
    status, out = http(url, "/separate_reasoning", {"text": "Plain answer.", "reasoning_parser": "kimi_k2"})
    assert status == 200 and out == {"reasoning_text": "", "text": "Plain answer."}
    status, out = http(url, "/separate_reasoning", {"text": "x"})
    assert status == 400 and "reasoning_parser" in out["message"]


def test_health_is_503_once_the_engine_is_shut_down(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, max_total_tokens=256)
    with BackgroundServer(create_app(e)) as server:
        assert http(server.url, "/health")[0] == 200
        e.shutdown()
        assert http(server.url, "/health")[0] == 503
        status, out = http(server.url, "/generate", {"input_ids": [0, 5]})
        assert status == 503 and "shut down" in out["error"]["message"]
        assert not EngineClient(server.url).health()


# ---- weight updates over HTTP + gloo --------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Background(threading.Thread):
    """A blocking call on a thread; result() returns its value or raises its error."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs, self.out = fn, args, kwargs, None
        self.start()

    def run(self):
        try:
            self.out = (True, self.fn(*self.args, **self.kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self.out = (False, e)

    def result(self, timeout: float = 60):
        self.join(timeout)
        assert self.out is not None, "the call did not finish"
        ok, value = self.out
        if not ok:
            raise value
        return value


PROMPTS = [[0, 5, 6, 7], [0, 42, 17, 99, 3, 8]]


def greedy_ids(client: EngineClient) -> list[list[int]]:
    return [o["output_ids"] for o in client.generate(input_ids=PROMPTS, sampling_params=dict(GREEDY, max_new_tokens=8))]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """bf16, as a trainer sends high-precision tensors: an update with the same weights is then exact."""
    from mxroll import configs
    from mxroll.model.synthetic import make_checkpoint

    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    return make_checkpoint(cfg, tmp_path_factory.mktemp("tiny-bf16"), seed=0, dtype="bfloat16", progress=False)


@pytest.fixture(scope="module")
def mx_served(bf16_checkpoint):
    """An MXFP8 engine (as the trainer's weights arrive) behind an admin-token server, and its first outputs."""
    e = Engine(model_path=str(bf16_checkpoint), device="cpu", quantization="mxfp8", progress=False,
               weight_update_timeout=30)
    with BackgroundServer(create_app(e, admin_token=ADMIN)) as server:
        client = EngineClient(server.url, admin_token=ADMIN)
        yield e, client, greedy_ids(client)
    e.shutdown()


def test_weight_update_over_http_and_gloo(mx_served, bf16_checkpoint):
    """sglang's protocol: the engine joins the trainer's group (POST, blocking until the trainer is there;
    generation keeps being served meanwhile), then one broadcast per tensor while the update POST waits."""
    engine, client, _ = mx_served
    before = greedy_ids(client)
    old_version = client.get_weight_version()
    ckpt = dict(iter_checkpoint(bf16_checkpoint, progress=False))
    new = [(name, ckpt[name] * 1.5) for name in ("model.embed_tokens.weight", "lm_head.weight")]

    port = free_port()
    joining = Background(client.init_weights_update_group, "127.0.0.1", port, 1, 2, "weight_update_group", "gloo")
    assert greedy_ids(client) == before  # the server answers while the engine waits for the trainer
    trainer = UpdateGroup("weight_update_group", "gloo", "127.0.0.1", port, rank=0, world_size=2, timeout=30)
    assert joining.result()[0] is True

    updating = Background(client.update_weights_from_distributed, [n for n, _ in new],
                          [str(t.dtype).removeprefix("torch.") for _, t in new], [list(t.shape) for _, t in new],
                          weight_version="step-1")
    for _, t in new:
        trainer.broadcast(t.contiguous())
    ok, message = updating.result()
    assert ok and "step-1" in message
    assert client.get_weight_version() == engine.weight_version == "step-1" != old_version
    after = client.generate(input_ids=PROMPTS, sampling_params=dict(GREEDY, max_new_tokens=8))
    assert [o["output_ids"] for o in after] != before
    assert {o["meta_info"]["weight_version"] for o in after} == {"step-1"}
    got = torch.tensor(client.get_weights_by_name("lm_head.weight", truncate_size=3))
    assert torch.equal(got, new[1][1][:3].float())

    # a rejected update: 400 over HTTP, WeightUpdateError from the client, nothing changes
    status, out = http(client.base_url, "/update_weights_from_distributed",
                       {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "nope"},
                       token=ADMIN)
    assert status == 400 and out["success"] is False and "no update group" in out["message"]
    with pytest.raises(WeightUpdateError, match="no weight"):
        client.get_weights_by_name("model.layers.0.nope.weight")
    assert client.get_weight_version() == "step-1"

    ok, _ = client.destroy_weights_update_group()
    assert ok
    trainer.destroy()


def test_weight_sender_drives_the_server(mx_served, bf16_checkpoint):
    """mxroll's trainer side (recipe -> MXFP8 buckets, one atomic commit after the last) through
    EngineClient: pushing the original checkpoint back restores the original outputs exactly."""
    engine, client, initial = mx_served
    original = list(iter_checkpoint(bf16_checkpoint, progress=False))
    client.update_weights_from_tensor([(n, t * 2) for n, t in original if n == "lm_head.weight"],
                                      weight_version="doubled")
    changed = greedy_ids(client)
    assert changed != initial and client.get_weight_version() == "doubled"
    sender = WeightSender(client, master_port=free_port(), backend="gloo", bucket_bytes=1 << 16,
                          model_config=ModelConfig.from_file(bf16_checkpoint), timeout=30)
    sender.connect()
    stats = sender.push(original, weight_version="restored")
    sender.close()
    assert stats["buckets"] > 1
    assert client.get_weight_version() == "restored" and greedy_ids(client) == initial

    client.update_weights_from_tensor([(n, t * 2) for n, t in original if n == "lm_head.weight"])
    with pytest.raises(WeightUpdateError):
        client.update_weights_from_disk(str(bf16_checkpoint / "missing"))
    ok, _ = client.update_weights_from_disk(str(bf16_checkpoint), weight_version="disk")
    assert ok and client.get_weight_version() == "disk" and greedy_ids(client) == initial


# ---- CLI -----------------------------------------------------------------------------------------
@pytest.fixture
def captured_run(monkeypatch):
    calls = []
    monkeypatch.setattr("mxroll.rollout.server.run_server", lambda cfg, **kw: calls.append((cfg, kw)))
    monkeypatch.delenv("MXROLL_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("MXROLL_API_KEY", raising=False)
    return calls


def test_serve_cli_settings(captured_run, monkeypatch, tmp_path):
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("server:\n  port: 8001\nengine:\n  max_total_tokens: 512\n")
    monkeypatch.setenv("MXROLL_ADMIN_TOKEN", "from-env")
    assert cli.main(["serve", "--config", str(cfg_file), "--model-path", "preset:tiny", "--api-key", "k",
                     "engine.device=cpu", "server.host=::1"]) == 0
    (cfg, kw), = captured_run
    assert (cfg.device, cfg.model_path, cfg.max_total_tokens) == ("cpu", "preset:tiny", 512)
    assert kw == {"host": "::1", "port": 8001, "admin_token": "from-env", "api_key": "k", "log_level": "INFO",
                  "routed_experts_format": "list", "tool_call_parser": None, "reasoning_parser": None}
    assert cli.main(["serve", "--routed-experts-format", "base64", "engine.device=cpu"]) == 0
    assert captured_run[-1][1]["routed_experts_format"] == "base64"
    assert cli.main(["serve", "--tool-call-parser", "kimi_k2", "engine.device=cpu"]) == 0
    assert captured_run[-1][1]["tool_call_parser"] == "kimi_k2"
    assert cli.main(["serve", "engine.device=cpu", "server.tool_call_parser=deepseekv31"]) == 0
    assert captured_run[-1][1]["tool_call_parser"] == "deepseekv31"


def test_serve_cli_takes_every_engine_option_as_a_flag(captured_run, capsys):
    assert cli.main(["serve", "--device", "cpu", "--page-size", "8", "--mem-fraction-static", "0.5",
                     "--high-precision", "[kv_b_proj,shared_experts]", "--disable-cuda-graph", "true",
                     "engine.page_size=4"]) == 0
    (cfg, _), = captured_run
    assert (cfg.device, cfg.page_size, cfg.mem_fraction_static) == ("cpu", 8, 0.5)  # flags beat the dotlist
    assert cfg.high_precision == ["kv_b_proj", "shared_experts"] and cfg.disable_cuda_graph is True
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--mem-fraction-static" in text and "--weight-update-timeout" in text and "--chunked-prefill-size" in text
    assert cli.main(["serve", "--page-size", "many"]) == 2
    assert "page_size" in capsys.readouterr().err


def test_serve_cli_refuses_open_admin_on_a_public_host(capsys, monkeypatch):
    from mxroll.rollout import engine as engine_module

    monkeypatch.delenv("MXROLL_ADMIN_TOKEN", raising=False)
    monkeypatch.setattr(engine_module.Engine, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["serve", "--host", "0.0.0.0", "engine.device=cpu"]) == 2
    assert "no admin token is set" in capsys.readouterr().err
    assert cli.main(["serve", "device=cpu"]) == 2
    assert "unknown ServeConfig option 'device'; did you mean 'engine.device'?" in capsys.readouterr().err
