"""The overlap schedule (decode step N + 1 launched before step N's tokens are read back) changes no output:
the same tokens, logprobs, top logprobs, routes and finish reasons as the serial loop, with stop tokens that end
sequences while their next step is already launched (those rows are computed and dropped), n > 1 groups, length
limits, a small cache that forces preemption, and seeded sampling."""
from __future__ import annotations

import pytest
import torch

from mxroll import Engine

PROMPTS = [[0] + list(range(5, 5 + n)) for n in (2, 9, 17, 31)]


def run(tiny_checkpoint, overlap: bool, device: str = "cpu", wide: bool = False, **opts):
    """wide: more samples a prompt (22 rows) and sparser stop tokens: steady decode steps are built from the last
    step's arrays."""
    e = Engine(model_path=str(tiny_checkpoint), device=device, progress=False, disable_overlap_schedule=not overlap,
               **opts)
    params = [{"n": 9 if wide else 3, "temperature": 1.0, "seed": 11, "max_new_tokens": 24,
               "stop_token_ids": list(range(2, 512, 61 if wide else 9))},
              {"temperature": 0, "max_new_tokens": 17, "ignore_eos": True},
              {"n": 8 if wide else 2, "temperature": 0.8, "top_p": 0.9, "seed": 5, "max_new_tokens": 30,
               "stop_token_ids": list(range(3, 512, 97 if wide else 13))},
              {"n": 4 if wide else 1, "temperature": 1.0, "top_k": 20, "seed": 2, "max_new_tokens": 9,
               "ignore_eos": True}]
    out = e.generate(input_ids=PROMPTS, sampling_params=params, return_logprob=True, top_logprobs_num=2,
                     return_routed_experts=True)
    steps = list(e.steps)
    steps_steady = e.runner.builder.steady_steps
    e.shutdown()
    return out, steps if not wide else (steps, steps_steady)


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


def test_steady_decode_steps_change_no_output(tiny_checkpoint):
    """22 rows, 4-token pages: the overlap schedule's decode steps of >= 16 rows are built from the last step's
    arrays (StepBuilder._build_next, SamplingRows.advance) and give the serial loop's outputs."""
    serial, _ = run(tiny_checkpoint, False, wide=True, page_size=4)
    overlap, (_, steady) = run(tiny_checkpoint, True, wide=True, page_size=4)
    assert steady > 5
    for a, b in zip(overlap, serial, strict=True):
        (exact_a, lps_a), (exact_b, lps_b) = split(a), split(b)
        assert exact_a == exact_b
        assert max(abs(x - y) for x, y in zip(lps_a, lps_b, strict=True)) < 1e-4


def test_stops_do_not_break_the_overlap(tiny_checkpoint):
    """Samples ending by stop tokens at scattered steps (an RL batch with EOS): a row whose sequence ended in the
    step before is left out of the next step rather than ending the overlap, so nearly every decode step is
    launched ahead (83% before this was so, on this workload)."""
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    params = {"n": 16, "temperature": 1.0, "seed": 3, "max_new_tokens": 200, "stop_token_ids": list(range(2, 512, 40))}
    out = e.generate(input_ids=[[0] + list(range(5, 20))] * 4, sampling_params=params)
    steps = [s for s in e.steps if s.decode]
    e.shutdown()
    ends = sorted(o["meta_info"]["completion_tokens"] for o in out)
    assert ends[0] < ends[len(ends) // 2] < ends[-1] < 200  # samples end by stop tokens, at many steps
    assert sum(s.ahead for s in steps) / len(steps) > 0.95
