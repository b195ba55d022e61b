"""The batched engine on CPU: outputs equal the single-sequence reference under chunked prefill,
small pages and preemption; n > 1 groups share the prompt; RL controls (abort, pause modes, memory
release), async batching, streaming, routed experts, weight versions, seeds, and bad requests."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from mxroll import Engine
from mxroll.rollout.engine import EngineShutdownError

GREEDY = {"temperature": 0, "ignore_eos": True}


def reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and logprobs through the single-sequence torch reference."""
    cache = model.new_cache(len(prompt) + n)
    seq, lps = list(prompt), []
    logits = model.sequence_logits(torch.tensor(prompt), torch.arange(len(prompt)), cache)[-1]
    for _ in range(n):
        tok = int(logits.argmax())
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        seq.append(tok)
        logits = model.sequence_logits(torch.tensor([tok]), torch.tensor([len(seq) - 1]), cache)[-1]
    return seq[len(prompt):], lps


PROMPTS = [[0] + list(range(5, 5 + n)) for n in (1, 3, 7, 16, 30, 45)]


@pytest.mark.parametrize("opts", [dict(page_size=16), dict(page_size=1, chunked_prefill_size=7),
                                  dict(page_size=4, max_total_tokens=96, chunked_prefill_size=20)],
                         ids=["pages16", "pages1-chunked", "pages4-preempting"])
def test_batched_greedy_equals_single_sequence_reference(tiny_checkpoint, opts):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, **opts)
    out = e.generate(input_ids=PROMPTS, sampling_params=dict(GREEDY, max_new_tokens=12), return_logprob=True)
    for prompt, o in zip(PROMPTS, out):
        ids, lps = reference(e.model, prompt, 12)
        assert o["output_ids"] == ids
        got = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got, lps)) < 1e-4
    if "max_total_tokens" in opts:
        assert e.scheduler.num_preemptions > 0, "the small cache should force preemptions"
    e.shutdown()


def test_group_samples_share_the_prompt_and_differ(engine):
    out = engine.generate(input_ids=PROMPTS[4], sampling_params={"n": 6, "max_new_tokens": 10, "seed": 3,
                                                                 "ignore_eos": True}, return_logprob=True)
    assert len(out) == 6 and len({tuple(o["output_ids"]) for o in out}) > 1
    again = engine.generate(input_ids=PROMPTS[4], sampling_params={"n": 6, "max_new_tokens": 10, "seed": 3,
                                                                   "ignore_eos": True})
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in again]
    # the prompt was prefilled once: the samples' first logprobs come from one logits row
    first = {o["output_ids"][0]: o["meta_info"]["output_token_logprobs"][0][0] for o in out}
    ref = torch.log_softmax(engine.model.sequence_logits(torch.tensor(PROMPTS[4]), torch.arange(len(PROMPTS[4])),
                                                         engine.model.new_cache(64))[-1], -1)
    assert all(abs(lp - float(ref[t])) < 1e-4 for t, lp in first.items())


def test_seeded_streams_never_overlap_between_requests(engine):
    p = {"n": 4, "max_new_tokens": 8, "ignore_eos": True}
    a = engine.generate(input_ids=PROMPTS[2], sampling_params=dict(p, seed=0))
    b = engine.generate(input_ids=PROMPTS[2], sampling_params=dict(p, seed=1))
    assert not {tuple(x["output_ids"]) for x in a} & {tuple(x["output_ids"]) for x in b}
    batch = engine.generate(input_ids=[PROMPTS[2], PROMPTS[2]], sampling_params=dict(p, seed=0))
    assert [x["output_ids"] for x in batch[:4]] == [x["output_ids"] for x in a]  # prompt 0 keeps its streams
    assert not {tuple(x["output_ids"]) for x in batch[:4]} & {tuple(x["output_ids"]) for x in batch[4:]}


def test_seeded_tokens_do_not_depend_on_the_batch(engine):
    """The stream is (seed, prompt index in its call, sample index): other requests stepping in the same
    engine batch, with or without seeds, change nothing."""
    p = {"max_new_tokens": 10, "seed": 42, "ignore_eos": True}
    alone = engine.generate(input_ids=PROMPTS[3], sampling_params=p)["output_ids"]
    listed = engine.generate(input_ids=[PROMPTS[3]] + PROMPTS[:3],
                             sampling_params=[p] + [{"max_new_tokens": 10, "ignore_eos": True, "seed": 7}] * 3)
    assert listed[0]["output_ids"] == alone

    async def crowd():
        others = [engine.async_generate(input_ids=q, sampling_params={"max_new_tokens": 12, "ignore_eos": True})
                  for q in PROMPTS]
        return (await asyncio.gather(engine.async_generate(input_ids=PROMPTS[3], sampling_params=p), *others))[0]
    assert crowd_out_ids(asyncio.run(crowd())) == alone


def crowd_out_ids(out):
    return out["output_ids"]


def test_async_calls_are_batched_together(engine):
    async def many():
        return await asyncio.gather(*[engine.async_generate(input_ids=p, sampling_params=dict(GREEDY, max_new_tokens=6))
                                      for p in PROMPTS])
    engine.steps.clear()
    outs = asyncio.run(many())
    sequential = [engine.generate(input_ids=p, sampling_params=dict(GREEDY, max_new_tokens=6)) for p in PROMPTS]
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in sequential]
    assert max(s.rows for s in list(engine.steps)[:20]) > 1, "concurrent calls should share steps"


def test_positional_arguments_in_either_order(engine):
    """generate(prompt, input_ids, sampling_params) as DESIGN.md lists them, and sglang's Engine order
    generate(prompt, sampling_params, input_ids): the same request; a prompt with only sampling params after it."""
    params = dict(GREEDY, max_new_tokens=4)
    by_name = engine.generate(input_ids=PROMPTS[2], sampling_params=params)["output_ids"]
    assert engine.generate(None, PROMPTS[2], params)["output_ids"] == by_name
    assert engine.generate(None, params, PROMPTS[2])["output_ids"] == by_name
    assert [o["output_ids"] for o in engine.generate(None, [params, params], PROMPTS[1:3])][1] == by_name
    assert asyncio.run(engine.async_generate(None, params, PROMPTS[2]))["output_ids"] == by_name
    with pytest.raises(ValueError, match="exactly one of prompt= or input_ids="):
        engine.generate(None, params)  # sampling params and no prompt at all


def test_streaming_yields_partials_then_final(engine):
    chunks = list(engine.generate(input_ids=PROMPTS[1], sampling_params=dict(GREEDY, max_new_tokens=5), stream=True))
    assert len(chunks) >= 5 and chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-2]["output_ids"] == chunks[-1]["output_ids"][:len(chunks[-2]["output_ids"])]

    async def collect():
        it = await engine.async_generate(input_ids=PROMPTS[1], sampling_params=dict(GREEDY, max_new_tokens=5),
                                         stream=True)
        return [c async for c in it]
    assert asyncio.run(collect())[-1]["output_ids"] == chunks[-1]["output_ids"]


def test_stream_interval_thins_partial_outputs(tiny_checkpoint, engine):
    """stream_interval=3 (sglang's): a partial output every third token of a sample, the final one always; the
    tokens are the engine's as with every token streamed."""
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, stream_interval=3)
    try:
        params = dict(GREEDY, max_new_tokens=8, n=2)
        chunks = list(e.generate(input_ids=PROMPTS[1], sampling_params=params, stream=True))
    finally:
        e.shutdown()
    partial = [c for c in chunks if c["meta_info"]["finish_reason"] is None]
    assert sorted(len(c["output_ids"]) for c in partial) == [3, 3, 6, 6]  # two samples: 3 and 6 tokens each
    ref = engine.generate(input_ids=PROMPTS[1], sampling_params=params)
    finals = sorted((c for c in chunks if c["meta_info"]["finish_reason"] is not None), key=lambda c: c["index"])
    assert [c["output_ids"] for c in finals] == [o["output_ids"] for o in ref]
    with pytest.raises(ValueError, match="stream_interval"):
        Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, stream_interval=0)


def test_per_request_stream_interval(engine):
    """sglang's per-request sampling_params.stream_interval overrides the engine's (1 here) for that request."""
    params = dict(GREEDY, max_new_tokens=8, stream_interval=4)
    chunks = list(engine.generate(input_ids=PROMPTS[1], sampling_params=params, stream=True))
    assert [len(c["output_ids"]) for c in chunks] == [4, 8]  # a partial at 4; the final (8: also a multiple)
    every = list(engine.generate(input_ids=PROMPTS[1], sampling_params=dict(GREEDY, max_new_tokens=8), stream=True))
    assert len(every) == 8 and every[-1]["output_ids"] == chunks[-1]["output_ids"]


def test_routed_experts_per_input_token(engine):
    cfg = engine.model_config
    out = engine.generate(input_ids=PROMPTS[3], sampling_params=dict(GREEDY, max_new_tokens=7),
                          return_routed_experts=True)
    ids, w = out["meta_info"]["routed_experts"], out["meta_info"]["routed_expert_weights"]
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert ids.shape == (len(PROMPTS[3]) + 7 - 1, moe_layers, cfg.num_experts_per_tok) == w.shape
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    # the router's own choices for the same tokens (single-sequence reference forward)
    from mxroll.model.moe import RouteRecorder
    seq = PROMPTS[3] + out["output_ids"][:-1]
    rec = RouteRecorder(moe_layers, len(seq), cfg.num_experts_per_tok, "cpu")
    cache = engine.model.new_cache(len(seq))
    cache.begin(torch.arange(len(seq)))
    with torch.inference_mode():
        engine.model(torch.tensor(seq), torch.arange(len(seq)), cache, rec)
    assert torch.equal(ids, rec.ids.permute(1, 0, 2))
    assert torch.allclose(w, rec.weights.permute(1, 0, 2), atol=1e-5)
    # n > 1: every sample carries the shared prompt's routes
    group = engine.generate(input_ids=PROMPTS[2], sampling_params={"n": 3, "max_new_tokens": 4, "seed": 1,
                                                                   "ignore_eos": True}, return_routed_experts=True)
    for o in group:
        r = o["meta_info"]["routed_experts"]
        assert r.shape[0] == len(PROMPTS[2]) + 3
        assert torch.equal(r[:len(PROMPTS[2])], group[0]["meta_info"]["routed_experts"][:len(PROMPTS[2])])


def test_top_logprobs(engine):
    out = engine.generate(input_ids=PROMPTS[1], sampling_params=dict(GREEDY, max_new_tokens=3), return_logprob=True,
                          top_logprobs_num=4)
    tops = out["meta_info"]["output_top_logprobs"]
    assert len(tops) == 3 and all(len(t) == 4 for t in tops)
    for (lp, tok, _), top in zip(out["meta_info"]["output_token_logprobs"], tops):
        assert top[0][1] == tok and top[0][0] == lp  # greedy: the chosen token is the top one, the same value
        assert [x[0] for x in top] == sorted([x[0] for x in top], reverse=True)


def test_abort_request_returns_partial_output(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    result = {}
    t = threading.Thread(target=lambda: result.update(out=e.generate(
        input_ids=PROMPTS[1], sampling_params=dict(GREEDY, max_new_tokens=1500), rid="long")))
    t.start()
    while not e.scheduler.running:
        time.sleep(0.01)
    time.sleep(0.1)
    e.abort_request("long")
    t.join(30)
    out = result["out"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and 0 < len(out["output_ids"]) < 1500
    assert e.generate(input_ids=[0, 5], sampling_params=dict(GREEDY, max_new_tokens=2))["meta_info"][
        "completion_tokens"] == 2
    e.shutdown()


@pytest.mark.parametrize("mode", ["abort", "retract", "in_place"])
def test_pause_modes(tiny_checkpoint, mode):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    expected = e.generate(input_ids=PROMPTS[2], sampling_params=dict(GREEDY, max_new_tokens=40))["output_ids"]
    result = {}
    t = threading.Thread(target=lambda: result.update(out=e.generate(
        input_ids=PROMPTS[2], sampling_params=dict(GREEDY, max_new_tokens=40))))
    t.start()
    while not e.scheduler.running:
        time.sleep(0.005)
    e.pause_generation(mode=mode)
    frozen = [len(s.tokens) for s in e.scheduler.running]
    time.sleep(0.2)
    assert [len(s.tokens) for s in e.scheduler.running] == frozen  # no steps while paused
    if mode == "retract":
        assert not e.scheduler.running and e.scheduler.waiting and e.scheduler.pool.num_free == \
            e.scheduler.pool.num_pages
    e.continue_generation()
    t.join(30)
    out = result["out"]
    if mode == "abort":
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
    else:  # resumed in place or by recompute: the same greedy continuation
        assert out["output_ids"] == expected
    with pytest.raises(ValueError, match="mode"):
        e.pause_generation(mode="bogus")
    e.shutdown()


def test_release_and_resume_memory(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    before = e.generate(input_ids=PROMPTS[3], sampling_params=dict(GREEDY, max_new_tokens=8))["output_ids"]
    e.release_memory_occupation()
    assert not e.cache.allocated and e.get_server_info()["memory_released"]
    e.resume_memory_occupation()
    assert e.generate(input_ids=PROMPTS[3], sampling_params=dict(GREEDY, max_new_tokens=8))["output_ids"] == before
    with pytest.raises(ValueError, match="memory tags"):
        e.release_memory_occupation(tags=["bogus"])
    # slime's order: graphs, then weights and cache; weights back first, then cache and graphs
    e.release_memory_occupation(tags=["cuda_graph"])
    assert e.get_server_info()["memory_released"] and e.cache.allocated
    e.release_memory_occupation(tags=["weights", "kv_cache"])
    e.resume_memory_occupation(tags=["weights"])
    assert e.get_server_info()["memory_released"]
    e.resume_memory_occupation(tags=["kv_cache", "cuda_graph"])
    assert not e.get_server_info()["memory_released"]
    assert e.generate(input_ids=PROMPTS[3], sampling_params=dict(GREEDY, max_new_tokens=8))["output_ids"] == before
    e.release_memory_occupation(tags=["cuda_graph"])
    e.resume_memory_occupation(tags=["cuda_graph"])
    assert e.generate(input_ids=PROMPTS[3], sampling_params=dict(GREEDY, max_new_tokens=8))["output_ids"] == before
    assert e.flush_cache() is True
    e.shutdown()


def test_dense_bf16_copy_needs_the_triton_backend(tiny_checkpoint):
    with pytest.raises(ValueError, match="mxfp8_dense_bf16_copy"):
        Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, mxfp8_dense_bf16_copy=True)
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, quantization="mxfp8")
    assert e.get_model_info()["mxfp8_dense_bf16_copies"] == 0  # the torch reference reads the stored bytes
    assert e.get_model_info()["moe_dequant_workspace_bytes"] == 0  # no fused MoE on CPU
    e.shutdown()


def test_steps_record_where_the_loop_time_goes(engine):
    """Each step records the host's launch time inside its wall time (its own launch, or with overlap the next
    step's) and how long the loop then blocked on the device; on CPU the forward runs inside the launch, so the loop
    is nearly all launch and never waits on a device."""
    engine.generate(input_ids=PROMPTS, sampling_params=dict(GREEDY, max_new_tokens=8))
    steps = list(engine.steps)[-8:]
    assert all(0 <= s.launch_s <= s.seconds + 1e-9 and s.wait_s >= 0 for s in steps)
    assert sum(s.launch_s for s in steps) > 0.5 * sum(s.seconds for s in steps)
    info = engine.get_server_info()
    assert 0.5 < info["recent_launch_share"] <= 1.0 and info["recent_device_wait_share"] < 0.1


def test_generate_takes_sglang_fields_at_their_defaults(engine):
    """What sglang clients pass at its defaults is accepted (verl's image_data=None, bench_serving's
    logprob_start_len=-1); return_text_in_logprobs fills the logprob tuples' text, streamed too; other values, and
    unknown arguments, are errors naming them."""
    kw = dict(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=3), return_logprob=True)
    ref = engine.generate(**kw)
    out = engine.generate(**kw, image_data=None, lora_path=None, logprob_start_len=-1, custom_logit_processor=None,
                          token_ids_logprob=None, return_hidden_states=False, return_text_in_logprobs=False,
                          data_parallel_rank=0, bootstrap_host=None, bootstrap_port=None, bootstrap_room=None,
                          priority=None, routed_dp_rank=None, session_params=None)
    assert out["output_ids"] == ref["output_ids"]
    assert all(text is None for *_, text in out["meta_info"]["output_token_logprobs"])
    out = engine.generate(**kw, top_logprobs_num=2, return_text_in_logprobs=True)
    decode = engine.tokenizer.decode
    assert [text for *_, text in out["meta_info"]["output_token_logprobs"]] == [decode([t]) for t in out["output_ids"]]
    assert all(text == decode([t]) for row in out["meta_info"]["output_top_logprobs"] for _, t, text in row)
    *_, final = engine.generate(**kw, return_text_in_logprobs=True, stream=True)
    assert [text for *_, text in final["meta_info"]["output_token_logprobs"]] == [decode([t]) for t in ref["output_ids"]]
    for name, value in (("logprob_start_len", -2), ("logprob_start_len", 99), ("lora_path", "adapter"),
                        ("image_data", ["img.png"]), ("custom_logit_processor", "fn"), ("token_ids_logprob", [3]),
                        ("return_hidden_states", True), ("return_text_in_logprobs", "yes"),
                        ("data_parallel_rank", 1), ("bootstrap_host", "10.0.0.1"), ("priority", 5),
                        ("routed_dp_rank", 2), ("session_params", {"id": "x"})):
        with pytest.raises(ValueError, match=name):
            engine.generate(**kw, **{name: value})
    with pytest.raises(TypeError, match="sesion_params"):
        engine.generate(**kw, sesion_params={"id": "x"})
    assert engine.generate(**kw)["output_ids"] == ref["output_ids"]  # still serving


def test_weight_version_in_every_output(engine):
    out = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=2))
    assert out["meta_info"]["weight_version"] == engine.weight_version


def test_update_weight_version_relabels_between_steps(engine):
    """sglang's update_weight_version: later outputs carry the new label; with abort_all_requests=False a request
    in flight (held by an in-place pause) finishes and lists the switch; by default it is aborted; bad values are
    errors naming the argument."""
    old = engine.weight_version
    try:
        assert engine.update_weight_version("policy-7") == (True, "weight_version updated to policy-7")
        out = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=2))
        assert out["meta_info"]["weight_version"] == "policy-7"
        stream = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=60), stream=True)
        first = next(stream)
        engine.pause_generation(mode="in_place")
        engine.update_weight_version("policy-8", abort_all_requests=False)
        engine.continue_generation()
        *_, final = stream
        assert final["meta_info"]["finish_reason"]["type"] == "length" and len(final["output_ids"]) == 60
        switches = final["meta_info"]["weight_version_switches"]
        assert [w["weight_version"] for w in switches] == ["policy-7", "policy-8"]
        assert len(first["output_ids"]) <= switches[1]["output_index"] < 60
        stream = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=60), stream=True)
        next(stream)
        engine.pause_generation(mode="in_place")
        engine.update_weight_version("policy-9")  # aborts what is in flight
        engine.continue_generation()
        *_, final = stream
        assert final["meta_info"]["finish_reason"]["type"] == "abort" and len(final["output_ids"]) < 60
        for bad in ("", None, True, 1.5):
            with pytest.raises(ValueError, match="new_version"):
                engine.update_weight_version(bad)
        with pytest.raises(ValueError, match="abort_all_requests"):
            engine.update_weight_version("x", abort_all_requests="no")
        assert engine.weight_version == "policy-9"
    finally:
        engine.update_weight_version(old)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=[1, 2], sampling_params={"bogus": 1}), "bogus"),
    (dict(input_ids=[1, 2], sampling_params={"temperature": float("inf")}), "temperature"),
    (dict(input_ids=[1, 10**6]), "outside the vocabulary"),
    (dict(input_ids=[]), "at least one token"),
    (dict(input_ids="12"), "input_ids"),
    (dict(input_ids=[1.5, 2]), "integers"),
    (dict(input_ids=[1], sampling_params={"max_new_tokens": 10**6}), "context length"),
    (dict(input_ids=[1], sampling_params=[1, 2]), "sampling_params"),
    (dict(input_ids=[1], top_logprobs_num=-1), "top_logprobs_num"),
    (dict(input_ids=[1], return_logprob="yes"), "return_logprob"),
])
def test_bad_requests_then_the_next_one_is_served(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)
    assert engine.generate(input_ids=[0, 5], sampling_params=dict(GREEDY, max_new_tokens=2))["meta_info"][
        "completion_tokens"] == 2


def test_input_ids_accept_integer_sequences_of_any_kind(engine):
    np = pytest.importorskip("numpy")
    ref = engine.generate(input_ids=[0, 5, 6], sampling_params=dict(GREEDY, max_new_tokens=3))["output_ids"]
    for ids in ((0, 5, 6), np.array([0, 5, 6]), torch.tensor([0, 5, 6]), [np.int64(0), np.int32(5), 6]):
        assert engine.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=3))["output_ids"] == ref
    batch = engine.generate(input_ids=np.array([[0, 5, 6], [0, 5, 6]]), sampling_params=dict(GREEDY, max_new_tokens=3))
    assert [b["output_ids"] for b in batch] == [ref, ref]


def test_a_request_that_can_never_fit_the_cache(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, max_total_tokens=64, page_size=4)
    with pytest.raises(ValueError, match="never fit the KV cache"):
        e.generate(input_ids=[0] * 40, sampling_params={"max_new_tokens": 100})
    assert e.generate(input_ids=[0, 5], sampling_params=dict(GREEDY, max_new_tokens=2))["meta_info"][
        "completion_tokens"] == 2
    e.shutdown()


def test_generate_after_shutdown(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    e.shutdown()
    e.shutdown()  # idempotent
    with pytest.raises(EngineShutdownError, match="shut down"):
        e.generate(input_ids=[0, 5])


def test_a_script_that_never_shuts_down_stops_the_loop_at_exit(tmp_path):
    """An engine left running at interpreter exit is shut down by its atexit hook, before torch is torn down under
    its loop thread (without it such scripts could abort with "terminate called without an active exception")."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent(f"""
        import atexit
        from mxroll import Engine
        held = []
        atexit.register(lambda: print("loop alive at exit:", held[0].is_alive()))  # runs after the engine's hook
        held.append(Engine(model_path="preset:tiny", device="cpu", cache_dir={str(tmp_path)!r}, progress=False))
        print(held[0].generate(input_ids=[0, 5, 6], sampling_params={{"max_new_tokens": 2}})["output_ids"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "loop alive at exit: False", proc.stdout


def test_engine_takes_sglang_constructor_arguments(tiny_checkpoint):
    """An sglang Engine(...) call of an RL framework: random_seed is the engine's seed, the single-GPU layout is
    accepted, skip_tokenizer_init loads no tokenizer (input_ids in, no text out; a text prompt is an error naming
    it)."""
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, random_seed=7, tp_size=1, dp_size=1,
               trust_remote_code=True, enable_memory_saver=True, skip_tokenizer_init=True)
    try:
        assert e.config.seed == 7 and e.tokenizer is None
        out = e.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=4))
        assert "text" not in out and len(out["output_ids"]) == 4
        with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
            e.generate(prompt="hello", sampling_params=GREEDY)
        with pytest.raises(ValueError, match="sampling_params.stop: stop strings need a tokenizer"):
            e.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, stop="x"))
        again = e.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=4))
        assert again["output_ids"] == out["output_ids"]  # the engine serves on after the refused prompt
    finally:
        e.shutdown()
    with pytest.raises(ValueError, match="tp_size=2"):
        Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, tp_size=2)


def stopped_at(tokenizer, ids: list[int], stop: list[str]) -> tuple[int | None, str | None]:
    """Reference: the shortest prefix of `ids` whose decoded text holds a stop string, and that string."""
    for j in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:j])
        hit = next((s for s in stop if s in text), None)
        if hit is not None:
            return j, hit
    return None, None


def test_stop_strings_end_samples_where_their_text_first_holds_one(engine):
    """sglang's stop strings: a seeded sample with them is the same sample cut where its decoded output first holds
    one (every sampled token kept in output_ids, finish_reason matched = the string); the text ends before the string
    unless no_stop_trim. Samples of one request stop independently."""
    params = dict(temperature=1.0, seed=5, n=3, max_new_tokens=48)
    free = engine.generate(prompt="The quick", sampling_params=params)
    ids = free[0]["output_ids"]
    chars = [engine.tokenizer.decode([t]) for t in ids]
    # a string of two printable one-character tokens of the first sample, with tokens decoding to nothing between
    k = next(i for i in range(len(ids)) if len(chars[i]) == 1 and chars[i].isprintable())
    rest = [i for i in range(k + 1, len(ids)) if chars[i]]
    stop = [chars[k] + chars[rest[0]], "\n"]
    outs = engine.generate(prompt="The quick", sampling_params=dict(params, stop=stop))
    for f, o in zip(free, outs, strict=True):
        j, hit = stopped_at(engine.tokenizer, f["output_ids"], stop)
        if j is None:
            assert o["output_ids"] == f["output_ids"]
            assert o["meta_info"]["finish_reason"] == f["meta_info"]["finish_reason"]
        else:
            assert o["output_ids"] == f["output_ids"][:j]
            assert o["meta_info"]["finish_reason"] == {"type": "stop", "matched": hit}
            full = engine.tokenizer.decode(o["output_ids"])
            assert o["text"] == full[:full.find(hit)] and hit not in o["text"]
    assert outs[0]["meta_info"]["finish_reason"]["type"] == "stop"
    kept = engine.generate(prompt="The quick", sampling_params=dict(params, stop=stop, no_stop_trim=True))
    assert [o["output_ids"] for o in kept] == [o["output_ids"] for o in outs]
    assert [o["text"] for o in kept] == [engine.tokenizer.decode(o["output_ids"]) for o in outs]


def test_prefix_cache_serves_the_next_turn_of_a_conversation(tiny_checkpoint, engine):
    """enable_prefix_caching: a second turn resending the first (prompt + outputs) computes only after the first
    turn's full pages (meta_info cached_tokens), with the tokens of an engine without the cache and logprobs within
    float32 noise; flush_cache and every weight update drop the cache."""
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, enable_prefix_caching=True)
    try:
        turn1 = [0] + list(range(5, 44))  # 40 tokens: two full pages of 16 and a partial one
        params = dict(GREEDY, max_new_tokens=8)
        first = e.generate(input_ids=turn1, sampling_params=params)
        assert first["meta_info"]["cached_tokens"] == 0
        turn2 = turn1 + first["output_ids"] + [7, 8, 9]
        second = e.generate(input_ids=turn2, sampling_params=dict(params, n=2), return_logprob=True)
        ref = engine.generate(input_ids=turn2, sampling_params=dict(params, n=2), return_logprob=True)
        # the first turn computed 47 positions (its last token was sampled, never fed back): 2 full pages
        assert [o["meta_info"]["cached_tokens"] for o in second] == [32, 32]
        assert [o["meta_info"]["cached_tokens"] for o in ref] == [0, 0]
        for o, r in zip(second, ref, strict=True):
            assert o["output_ids"] == r["output_ids"]
            assert [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] == pytest.approx(
                [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]], abs=1e-4)
        info = e.get_server_info()
        assert info["prefix_cache_pages"] >= 3 and 0 < info["prefix_cache_hit_rate"] < 1
        assert e.flush_cache() is True and e.get_server_info()["prefix_cache_pages"] == 0
        assert e.generate(input_ids=turn2, sampling_params=params)["meta_info"]["cached_tokens"] == 0
        assert e.generate(input_ids=turn2, sampling_params=params)["meta_info"]["cached_tokens"] == 48
        # routing replay asks every position's routes: a cached prefix is computed again (routes equal a fresh run)
        routed = e.generate(input_ids=turn2, sampling_params=params, return_routed_experts=True)
        fresh = engine.generate(input_ids=turn2, sampling_params=params, return_routed_experts=True)
        assert routed["meta_info"]["cached_tokens"] == 0 and routed["output_ids"] == fresh["output_ids"]
        assert torch.equal(routed["meta_info"]["routed_experts"], fresh["meta_info"]["routed_experts"])
        assert routed["meta_info"]["routed_experts"].shape[0] == len(turn2) + 8 - 1
        ok, _ = e.update_weights_from_disk(str(tiny_checkpoint), flush_cache=False)
        assert ok and e.get_server_info()["prefix_cache_pages"] == 0  # KV of old weights never serves
        assert e.generate(input_ids=turn2, sampling_params=params)["meta_info"]["cached_tokens"] == 0
    finally:
        e.shutdown()


@pytest.mark.parametrize("opts", [dict(), dict(page_size=1, chunked_prefill_size=7),
                                  dict(page_size=4, max_total_tokens=96, chunked_prefill_size=20),
                                  dict(enable_prefix_caching=True, page_size=4)],
                         ids=["one-chunk", "chunked", "preempting", "prefix-cache"])
def test_prompt_token_logprobs_equal_the_reference(tiny_checkpoint, opts):
    """sglang's logprob_start_len: meta_info input_token_logprobs holds prompt[start:] as (logprob, id, text), the
    first without a logprob (as sglang), each other the fp32 log_softmax(logits / T) of its token given the tokens
    before it (the torch reference's full-prompt logits), whatever the chunking, preemption or prefix cache; the
    default (-1) gives the last prompt token only; input_top_logprobs with top_logprobs_num."""
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, **opts)
    prompts = PROMPTS[2:]
    starts = [0, 3, 10, -1]
    params = {"temperature": 0.7, "max_new_tokens": 6, "n": 2, "seed": 3, "ignore_eos": True}
    if opts.get("enable_prefix_caching"):  # the prompts' pages cached first: scoring must compute them anyway
        e.generate(input_ids=prompts, sampling_params=dict(params, n=1))
    outs = e.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=starts,
                      top_logprobs_num=3)
    for prompt, start, pair in zip(prompts, starts, [outs[i:i + 2] for i in range(0, len(outs), 2)], strict=True):
        logits = e.model.sequence_logits(torch.tensor(prompt), torch.arange(len(prompt)), e.model.new_cache(64))
        logp = torch.log_softmax(logits / 0.7, -1)
        s = len(prompt) - 1 if start == -1 else start
        for o in pair:
            got = o["meta_info"]["input_token_logprobs"]
            assert [t for _, t, _ in got] == prompt[s:] and got[0][0] is None
            want = [float(logp[i - 1, prompt[i]]) for i in range(s + 1, len(prompt))]
            assert [lp for lp, _, _ in got[1:]] == pytest.approx(want, abs=1e-4)
            tops = o["meta_info"]["input_top_logprobs"]
            assert len(tops) == len(got) and tops[0] is None
            for i, row in zip(range(s + 1, len(prompt)), tops[1:]):
                vals, ids = logp[i - 1].topk(3)
                assert [t for _, t, _ in row] == ids.tolist()
                assert [lp for lp, _, _ in row] == pytest.approx(vals.tolist(), abs=1e-4)
    if "max_total_tokens" in opts:
        assert e.scheduler.num_preemptions > 0
    out = e.generate(input_ids=prompts[0], sampling_params=dict(GREEDY, max_new_tokens=2), return_logprob=True)
    assert out["meta_info"]["input_token_logprobs"] == [(None, prompts[0][-1], None)]
    e.shutdown()


def test_scoring_a_given_text_with_max_new_tokens_zero(engine):
    """max_new_tokens=0 with logprob_start_len 0: the prompt is prefilled and scored, nothing is sampled (a trainer's
    sequence scored by the engine); without prompt logprobs nothing runs at all."""
    prompt = PROMPTS[4]
    out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    logits = engine.model.sequence_logits(torch.tensor(prompt), torch.arange(len(prompt)), engine.model.new_cache(64))
    want = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()
    got = out["meta_info"]["input_token_logprobs"]
    assert got[0] == (None, prompt[0], None) and [lp for lp, _, _ in got[1:]] == pytest.approx(want, abs=1e-4)
    steps = len(engine.steps)
    out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True)
    assert out["meta_info"]["input_token_logprobs"] == [(None, prompt[-1], None)] and len(engine.steps) == steps
