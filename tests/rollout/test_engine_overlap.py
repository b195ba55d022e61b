"""The overlap schedule (decode step N + 1 launched before step N's tokens are read back) changes no output:
the same tokens, logprobs, top logprobs, routes and finish reasons as the serial loop, with stop tokens that end
sequences while their next step is already launched (those rows are computed and dropped), n > 1 groups, length
limits, a small cache that forces preemption, and seeded sampling."""
from __future__ import annotations

import pytest
import torch

from mxroll import Engine

PROMPTS = [[0] + list(range(5, 5 + n)) for n in (2, 9, 17, 31)]


def run(tiny_checkpoint, overlap: bool, device: str = "cpu", **opts):
    e = Engine(model_path=str(tiny_checkpoint), device=device, progress=False, disable_overlap_schedule=not overlap,
               **opts)
    params = [{"n": 3, "temperature": 1.0, "seed": 11, "max_new_tokens": 24, "stop_token_ids": list(range(2, 512, 9))},
              {"temperature": 0, "max_new_tokens": 17, "ignore_eos": True},
              {"n": 2, "temperature": 0.8, "top_p": 0.9, "seed": 5, "max_new_tokens": 30,
               "stop_token_ids": list(range(3, 512, 13))},
              {"temperature": 1.0, "top_k": 20, "seed": 2, "max_new_tokens": 9, "ignore_eos": True}]
    out = e.generate(input_ids=PROMPTS, sampling_params=params, return_logprob=True, top_logprobs_num=2,
                     return_routed_experts=True)
    steps = list(e.steps)
    e.shutdown()
    return out, steps


def split(o: dict) -> tuple[dict, list[float]]:
    """(what must be equal: tokens, routes, finish reason, top-logprob ids; the logprobs). The logprobs are
    compared within 1e-4: a step launched ahead still computes the rows that ended meanwhile, so its batch (and
    the CPU GEMM shapes) can differ from the serial loop's by those rows."""
    m = o["meta_info"]
    routes = m["routed_experts"]
    exact = {"ids": o["output_ids"], "finish": m["finish_reason"], "version": m["weight_version"],
             "lp_ids": [t for _, t, _ in m["output_token_logprobs"]],
             "top_ids": [[t for _, t, _ in row] for row in m["output_top_logprobs"]],
             "routes": routes.tolist() if torch.is_tensor(routes) else routes}
    lps = [lp for lp, _, _ in m["output_token_logprobs"]] + [lp for row in m["output_top_logprobs"] for lp, _, _ in row]
    return exact, lps


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device,opts,tol", [
    ("cpu", dict(), 1e-4), ("cpu", dict(page_size=4, max_total_tokens=160, chunked_prefill_size=24), 1e-4),
    pytest.param("cuda", dict(max_total_tokens=4096), 2e-2, marks=CUDA)], ids=["roomy", "small-cache", "cuda-graphs"])
def test_overlap_schedule_changes_no_output(tiny_checkpoint, device, opts, tol):
    """On the GPU the bf16 engine replays CUDA graphs; the serial and overlapped loops may pad a step to different
    graph sizes (rows that ended are still in a launched-ahead step), hence the bf16-level logprob tolerance."""
    serial, serial_steps = run(tiny_checkpoint, False, device, **opts)
    overlap, overlap_steps = run(tiny_checkpoint, True, device, **opts)
    for a, b in zip(overlap, serial, strict=True):
        (exact_a, lps_a), (exact_b, lps_b) = split(a), split(b)
        assert exact_a == exact_b
        assert max(abs(x - y) for x, y in zip(lps_a, lps_b, strict=True)) < tol
    assert not any(s.ahead for s in serial_steps)
    assert sum(s.ahead for s in overlap_steps) > 5, "decode steps should have been launched ahead"
    # stop tokens end sequences whose next step was already launched: those rows were computed, then dropped
    assert sum(s.tokens for s in overlap_steps) > sum(s.tokens for s in serial_steps)
    assert {o["meta_info"]["finish_reason"]["type"] for o in serial} == {"stop", "length"}


def test_server_info_reports_the_overlap_schedule(tiny_checkpoint):
    for overlap in (True, False):
        e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, disable_overlap_schedule=not overlap)
        e.generate(input_ids=PROMPTS[:2], sampling_params={"max_new_tokens": 8, "ignore_eos": True})
        info = e.get_server_info()
        e.shutdown()
        assert info["overlap_schedule"] is overlap
        assert (info["recent_steps_launched_ahead"] > 0) is overlap


def test_shutdown_lets_go_of_the_weights_and_the_cache(tiny_checkpoint):
    """An RL process may shut an engine down and build another: the old one's weights and KV cache must be freed
    at once (not when the garbage collector finds the engine's reference cycles)."""
    import weakref

    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    e.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 3})
    model, cache = weakref.ref(e.model), weakref.ref(e.cache)
    e.shutdown()
    assert model() is None and cache() is None
