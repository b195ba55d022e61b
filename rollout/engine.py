"""`Engine`: the Python API an RL loop calls (sglang-compatible names).

One thread, the engine loop, owns the model, the paged KV cache and the scheduler, and runs
`step()` while there is work. Public methods are thread-safe: they hand the loop new requests, or
a command that runs between two steps (weight updates, pause, abort, memory release), and wait.
Many `generate` / `async_generate` calls in flight are batched together by the scheduler.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import queue
import random
import threading
import time
import uuid
import weakref
from concurrent.futures import Future
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..model import ModelConfig, load_model
from ..model.kernels import select_model_kernels
from ..model.moe import attach_bf16_copies, attach_dequant_workspace
from ..model.tokenizer import load_tokenizer
from ..precision import GemmConfig, Recipe, select_backend
from ..precision.layout import LayoutCache
from .attention import TorchPagedAttention, select_attention, select_decode_attention
from .config import EngineConfig, check_engine_config, engine_config, from_sglang_args, resolve_context_length
from .controls import ControlsAPI
from .cuda_graph import DEFAULT_SIZES, DecodeGraphs
from .inflight import HostCopy, InFlight, PhaseClock, StepStat
from .intake import SGLANG_FIELDS, PromptRequest, build_requests, check_sglang_fields, prompt_ids
from .kv_cache import PagedLatentCache, plan_capacity, plan_chunk
from .gc_watch import GcWatch
from .output import Record, format_output
from .pages import PagePool
from .presets import resolve_model_path
from .metrics import Totals
from .profile import StepProfiler
from .request import ENDED, Group, SeqStatus
from .runner import ModelRunner
from .sampler import Sampler, SamplingRows, host_to_device, sample_seed
from .sampling_params import positional_order
from .scheduler import Scheduler
from .scoring import score_plan, score_rows
from .step_builder import StepBuilder
from .step_inputs import StepInputs
from .weight_api import WeightUpdateAPI

log = logging.getLogger(__name__)

# float64 is a CPU reference dtype (numerical checks); serving uses bfloat16 or float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


STEP_LOG = 100_000


class EngineShutdownError(RuntimeError):
    """The engine was shut down (or its loop stopped); it serves nothing more."""


class _Call:
    """One generate() call: its groups (one per prompt) with their output records, and how its caller
    hears back (a future, or `notify` for streams)."""

    def __init__(self, groups: list[Group], records: list[Record], single: bool, notify=None):
        self.groups, self.records, self.single, self.notify = groups, records, single, notify
        self.future: Future = Future()
        self.done_groups: set[int] = set()

    def fail(self, error: BaseException) -> None:
        if self.notify is not None:
            self.notify(("error", error))
        elif not self.future.done():
            self.future.set_exception(error)


class Engine(WeightUpdateAPI, ControlsAPI):
    def __init__(self, config: EngineConfig | dict | None = None, *, model_path: str | None = None,
                 device: str | None = None, dtype: str | None = None, quantization: str | None = None,
                 **overrides: Any):
        explicit = {k: v for k, v in dict(model_path=model_path, device=device, dtype=dtype,
                                            quantization=quantization).items() if v is not None}
        base = asdict(config) if is_dataclass(config) else config
        self.config = cfg = engine_config(base, from_sglang_args({**overrides, **explicit}))
        check_engine_config(cfg)
        self._build(cfg)
        self.weight_version = "default"
        self._init_weight_updates()
        self._seeds = random.Random(cfg.seed)  # streams of unseeded requests, in arrival order
        self._arrivals = itertools.count()
        self._records: dict[int, Record] = {}
        self.steps: collections.deque[StepStat] = collections.deque(maxlen=STEP_LOG)  # recent steps, for figures
        self._calls: dict[str, _Call] = {}
        self._cv = threading.Condition()
        self._commands: list[tuple[Any, Future]] = []
        self._paused = self._released = self._closed = False
        self._ahead: InFlight | None = None  # a step launched before the previous one was finished (overlap)
        self._last_finish = 0.0
        self._launches: list[tuple[float, float]] = []  # (start, end) of the launches since the last finished step
        self._gc_watch = GcWatch(cfg.gc_warning_threshold_secs) if cfg.gc_warning_threshold_secs > 0 else None
        self._profiler: StepProfiler | None = None  # start_profile / stop_profile (loop thread)
        self.totals = Totals()  # requests and tokens returned since start-up (get_server_info, /metrics)
        self._thread = threading.Thread(target=self._loop, name="mxroll-engine", daemon=True)
        self._thread.start()
        # a script that never calls shutdown(): stop the loop before the interpreter tears torch down under it
        # (a daemon thread still inside torch at exit can abort the process: "terminate called ...")
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    def _build(self, cfg: EngineConfig) -> None:
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:  # the loop thread binds this exact device
            self.device = torch.device("cuda", torch.cuda.current_device())
        dtype_name = cfg.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = DTYPES[dtype_name]
        self.recipe = Recipe(cfg.act_mode, cfg.scale_mode, tuple(cfg.high_precision))
        backend, gemm_why = select_backend(self.device, cfg.gemm_backend)
        if backend == "triton" and self.dtype == torch.float32:
            if cfg.gemm_backend == "triton":
                raise ValueError("gemm_backend='triton' takes bf16 activations; use dtype='bfloat16'")
            backend, gemm_why = "torch", "torch reference (float32 engine; the Triton kernel takes bf16)"
        for name in ("mxfp8_dense_bf16_copy", "mxfp8_moe_bf16_copy"):
            if getattr(cfg, name) and backend != "triton":
                raise ValueError(f"{name}=True serves the Triton GEMM backend; this engine runs {backend}")
        self.gemm = GemmConfig(cfg.act_mode, cfg.scale_mode, backend, bf16_copy=cfg.mxfp8_dense_bf16_copy is not False)
        self.model_path = resolve_model_path(cfg.model_path, cfg.seed, cfg.cache_dir, cfg.progress,
                                             config_only=cfg.load_format == "dummy")
        shape = ModelConfig.from_file(self.model_path)
        self.context_length = resolve_context_length(cfg.context_length, shape.max_position_embeddings)
        if cfg.chunked_prefill_size is None:  # resolved once, before the MoE workspace and step buffers are sized
            cfg.chunked_prefill_size, chunk_why = plan_chunk(shape, self.dtype, self.device, cfg.mem_fraction_static)
        elif cfg.chunked_prefill_size == -1:
            cfg.chunked_prefill_size = self.context_length
            chunk_why = "chunked_prefill_size=-1: no chunking, the context length"
        else:
            chunk_why = "chunked_prefill_size"
        kernels, kernels_why = select_model_kernels(self.device, self.dtype, cfg.norm_backend, cfg.router_backend,
                                                    cfg.rope_backend, shape.n_routed_experts or 0, shape.n_group or 1,
                                                    cfg.latent_backend, cfg.act_backend)
        kernels = replace(kernels, shared_experts_fusion=not cfg.disable_shared_experts_fusion)
        self.model = load_model(self.model_path, self.device, self.dtype, progress=cfg.progress,
                                quantization=cfg.quantization, recipe=self.recipe, gemm=self.gemm,
                                load_format=cfg.load_format, seed=cfg.seed, kernels=kernels)
        self.layouts = LayoutCache()
        self._postprocess_weights()
        moe_workspace = self._attach_moe_workspace()
        self.model_config = mcfg = self.model.cfg
        self.tokenizer_path = self.model_path if cfg.tokenizer_path is None else _tokenizer_dir(cfg.tokenizer_path)
        self.tokenizer = None if cfg.skip_tokenizer_init else load_tokenizer(self.tokenizer_path, mcfg.bos_token_id)
        if self.tokenizer is None and cfg.tokenizer_path is not None and not cfg.skip_tokenizer_init:
            raise ValueError(f"tokenizer_path={cfg.tokenizer_path!r}: no tokenizer.json there")

        attn_name, attn_why = select_attention(cfg.attention_backend, self.device, mcfg)
        self.triton_decode_rows, decode_why = select_decode_attention(cfg.decode_attention_backend, attn_name)
        attn_why += f" ({decode_why})" if decode_why else ""
        self.page_size = cfg.page_size
        pages = plan_capacity(mcfg, self.dtype, self.device, cfg.page_size, cfg.mem_fraction_static,
                              cfg.max_total_tokens)
        self.cache = PagedLatentCache(mcfg, pages, cfg.page_size, self.dtype, self.device)
        if attn_name == "flashinfer":
            from .attention.flashinfer_mla import FlashInferAttention
            self.attn = FlashInferAttention(self.cache, mcfg.num_attention_heads, mcfg.softmax_scale,
                                            -(-self.context_length // cfg.page_size) + 1, cfg.attention_fast_plan,
                                            self.triton_decode_rows)
        else:
            self.attn = TorchPagedAttention(self.cache)
        graphs_why = self._graphs_decision(cfg)
        self.step_builder = StepBuilder(cfg.page_size, max((cfg.chunked_prefill_size, *self._graph_sizes)),
                                        cfg.max_running_requests, self.device, self.cache.scratch_page)
        self.runner = ModelRunner(self.model, self.cache, self.attn, self.step_builder, self._new_graphs())
        graphs_why += self._capture_graphs()
        self.sampler = Sampler(self.device, cfg.sampling_backend)
        self.scheduler = Scheduler(PagePool(self.cache.usable_pages), page_size=cfg.page_size,
                                   max_running=cfg.max_running_requests, max_batch_tokens=cfg.chunked_prefill_size,
                                   eos_ids=mcfg.eos_token_ids, max_context=self.context_length,
                                   decode=self.tokenizer.decode if self.tokenizer is not None else None,
                                   prefix_cache=cfg.enable_prefix_caching)
        mx = "MXFP8 GEMMs: " + gemm_why if self.model.plan.mxfp8_modules else "no MXFP8 weights"
        copies = self.model.bf16_copies()
        if copies:
            mx += (f" (+ exact bf16 copies of {len(copies)} dense weights for GEMMs above 16 tokens, "
                   f"{sum(c.nbytes for c in copies) / 2**30:.2f} GiB: mxfp8_dense_bf16_copy)")
        moe = "Triton fused MoE" if backend == "triton" else "torch reference MoE"
        moe += f" ({moe_workspace})" if moe_workspace else ""
        hosting = [m for m in self.model.modules() if getattr(m, "hosted", None) is not None]
        if hosting:
            moe += (f" (+ the shared experts of {len(hosting)} layers as {hosting[0].S} extra experts each, "
                    f"{sum(m.shared_nbytes for m in hosting) / 2**30:.2f} GiB of copies: "
                    "disable_shared_experts_fusion)")
        fused = sum(1 for m in self.model.modules() if getattr(m, "qdq_mode", None))
        kernels_why += (f", {fused} norms quantize their output for their MXFP8 GEMMs (fused RMSNorm + MXFP8)" if fused
                        else ", MXFP8 GEMMs quantize their own activations")
        overlap = ("serial decode loop (disable_overlap_schedule)" if cfg.disable_overlap_schedule
                   else "overlap schedule (decode step N+1 launched before step N is read back)")
        log.info("engine ready: %s on %s (%s); %s; %s; %s; %s; %s; %s", self.model_path, self.device, dtype_name, mx,
                 moe, kernels_why, attn_why, graphs_why, overlap)
        log.info("KV cache: %d tokens (%d pages of %d, %.2f GiB), context length %d; prefill chunks of up to %d tokens "
                 "(%s)", self.cache.capacity_tokens, self.cache.usable_pages, cfg.page_size, self.cache.nbytes / 2**30,
                 self.context_length, cfg.chunked_prefill_size, chunk_why)

    def _graphs_decision(self, cfg: EngineConfig) -> str:
        self._graph_sizes: tuple[int, ...] = ()
        if self.device.type != "cuda":
            return "eager decode (no CUDA device)"
        if cfg.disable_cuda_graph:
            return "eager decode (disable_cuda_graph)"
        if not self.attn.supports_cuda_graphs or self.gemm.backend == "torch":
            return "eager decode (CUDA graphs need the FlashInfer attention and a Triton/FlashInfer GEMM backend)"
        top = min(cfg.cuda_graph_max_bs, cfg.max_running_requests)  # no decode batch is larger than the latter
        self._graph_sizes = tuple(s for s in DEFAULT_SIZES if s < top) + (top,)
        return f"CUDA graphs for decode batches up to {top}"

    def _capture_graphs(self) -> str:
        """Capture every decode graph now (unless cuda_graph_lazy_capture); what was done, for the start-up log."""
        graphs = self.runner.graphs
        if graphs is None:
            return ""
        if self.config.cuda_graph_lazy_capture:
            return ", each captured on first use (cuda_graph_lazy_capture)"
        t0 = time.perf_counter()
        try:
            with torch.cuda.device(self.device):
                graphs.capture_all(self.config.progress)
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError(f"capturing the decode CUDA graphs (batches up to {graphs.max_size} rows) ran out of "
                               "device memory: lower cuda_graph_max_bs or mem_fraction_static, or set "
                               f"cuda_graph_lazy_capture or disable_cuda_graph ({str(e).splitlines()[0]})") from None
        return f", {len(graphs.graphs)} captured at start-up in {time.perf_counter() - t0:.1f} s"

    def _new_graphs(self) -> DecodeGraphs | None:
        if not self._graph_sizes:
            return None
        return DecodeGraphs(self.model, self.attn, self._graph_sizes, self.device, record_routes=True,
                            builder=self.step_builder)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, input_ids=None, sampling_params: dict | list | None = None,
                 return_logprob: bool | list = False, top_logprobs_num: int | list | None = None,
                 return_routed_experts: bool | list = False, rid: str | list | None = None, stream: bool = False,
                 **sglang_fields):
        """One prompt -> a dict (a list of n dicts when n > 1); a batch -> a list (prompt-major, n each).
        Positionally also in sglang's order, generate(prompt, sampling_params, input_ids) (`positional_order`).
        stream=True returns an iterator of partial outputs (cumulative), the last one final.
        sglang_fields: `return_text_in_logprobs` (token texts in the logprob tuples), and what sglang clients pass at
        its defaults (`logprob_start_len=-1`, `lora_path` / `image_data` / `custom_logit_processor` /
        `token_ids_logprob` None, `return_hidden_states=False`; other values are errors: `check_sglang_fields`)."""
        if stream:
            events: queue.Queue = queue.Queue()
            call = self._submit(prompt, input_ids, sampling_params, return_logprob, top_logprobs_num,
                                return_routed_experts, rid, notify=events.put, **sglang_fields)
            return self._stream(call, events)
        call = self._submit(prompt, input_ids, sampling_params, return_logprob, top_logprobs_num,
                            return_routed_experts, rid, **sglang_fields)
        return call.future.result()

    async def async_generate(self, prompt=None, input_ids=None, sampling_params=None, return_logprob=False,
                             top_logprobs_num=None, return_routed_experts=False, rid=None, stream: bool = False,
                             **sglang_fields):
        """Awaitable generate; concurrent calls are batched together. stream=True -> an async iterator."""
        if stream:
            aloop, events = asyncio.get_running_loop(), asyncio.Queue()
            call = self._submit(prompt, input_ids, sampling_params, return_logprob, top_logprobs_num,
                                return_routed_experts, rid,
                                notify=lambda e: aloop.call_soon_threadsafe(events.put_nowait, e), **sglang_fields)
            return self._astream(call, events)
        call = self._submit(prompt, input_ids, sampling_params, return_logprob, top_logprobs_num,
                            return_routed_experts, rid, **sglang_fields)
        return await asyncio.wrap_future(call.future)

    def _no_tokenizer(self) -> str:
        return ("the engine was started with skip_tokenizer_init=True" if self.config.skip_tokenizer_init
                else f"{self.tokenizer_path} has no tokenizer (tokenizer.json; or give tokenizer_path)")

    def _submit(self, prompt, input_ids, sampling_params, return_logprob, top_logprobs_num,
                return_routed_experts, rid, notify=None, **sglang_fields) -> _Call:
        self._check_open()
        input_ids, sampling_params = positional_order(input_ids, sampling_params)
        unknown = sorted(set(sglang_fields) - SGLANG_FIELDS)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
        check_sglang_fields(self.tokenizer, **sglang_fields)
        texts = sglang_fields.get("return_text_in_logprobs", False)
        prompts, batched = prompt_ids(prompt, input_ids, self.tokenizer, self._no_tokenizer())
        requests = build_requests(prompts, sampling_params, return_logprob, top_logprobs_num,
                                  return_routed_experts, rid, self.model_config.vocab_size, self.context_length,
                                  sglang_fields.get("logprob_start_len"))
        if self.tokenizer is None and any(r.params.stop for r in requests):
            raise ValueError(f"sampling_params.stop: stop strings need a tokenizer and {self._no_tokenizer()}; "
                             "use stop_token_ids")
        call = _Call([self._group(i, r) for i, r in enumerate(requests)],
                     [Record(r.return_logprob, r.top_logprobs_num, r.return_routed_experts, texts,
                             input_start=r.input_start) for r in requests],
                     single=not batched and requests[0].params.n == 1, notify=notify)
        self._command(lambda: self._admit(call), wait=False)
        return call

    def _group(self, index: int, req: PromptRequest) -> Group:
        """A request's group; sample j of prompt `index` draws from its own seeded stream."""
        p = req.params
        with self._cv:  # unseeded streams are drawn in arrival order from the engine's seed
            seeds = ([sample_seed(p.seed, index, j) for j in range(p.n)] if p.seed is not None
                     else [self._seeds.getrandbits(64) for _ in range(p.n)])
            arrival = next(self._arrivals)
        # positions whose outputs are asked (prompt logprobs, every position's routes) are computed, never cached
        compute_from = 0 if req.return_routed_experts else req.input_start if req.return_logprob else None
        return Group(rid=req.rid or uuid.uuid4().hex, prompt=req.input_ids, params=p, seeds=seeds,
                     arrival=arrival, seqs=[], compute_from=compute_from)

    def _stream(self, call: _Call, events: queue.Queue):
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            yield payload
            if kind == "final":
                return

    async def _astream(self, call: _Call, events: asyncio.Queue):
        while True:
            kind, payload = await events.get()
            if kind == "error":
                raise payload
            yield payload
            if kind == "final":
                return

    # ---- the engine loop -------------------------------------------------------------------
    def step(self) -> None:
        """One scheduler step: schedule -> forward -> sample -> update -> outputs. With overlap on, the next
        decode step is launched before this step's tokens are read back (`_launch_next`), so the host's
        scheduling and output work runs while the device computes; `step()` then finishes that one next."""
        cur, self._ahead = self._ahead, None
        if cur is None:
            clock = PhaseClock(self.device, self.config.step_timing)
            batch = self.scheduler.schedule()
            if batch is None:
                return
            clock.mark("schedule")
            cur = self._launch(batch, clock)
        self._launch_next(cur)
        self._finish(cur)

    def _launch(self, batch, clock: PhaseClock, prev: InFlight | None = None) -> InFlight:
        """Enqueue a step's forward and sampling and the copies of its results to the host; no sync.
        prev: the step whose sampled tokens are this decode step's inputs (still on the device)."""
        t0 = time.perf_counter()
        next_ids = None
        if prev is not None:
            next_ids = prev.tokens if len(batch.rows) == len(prev.batch.rows) else prev.tokens.index_select(
                0, host_to_device(torch.tensor(batch.ahead_of, dtype=torch.int64), self.device))
        plan = score_plan(batch, self._records)
        step = self.runner.prepare(batch.rows, next_ids, eager=bool(plan), ahead_of=batch.ahead_of)
        rows = self._sampling_rows(batch, prev)  # host work and non_blocking copies, before the forward is queued
        scores = score_rows(plan, batch, step, self._records, self.device)
        clock.mark("inputs")
        wants_routes = self._wants_routes(batch)
        out = self.runner.forward(step, batch.copies, wants_routes, scores)
        clock.mark("forward")
        sampled = self.sampler(out.logits_SV, rows)
        routes = None
        if out.routes is not None and wants_routes:  # the recorder is overwritten by the next step
            T = step.num_tokens
            routes = (out.routes.ids[:, :T].permute(1, 0, 2), out.routes.weights[:, :T].permute(1, 0, 2))
        self._launches.append((t0, time.perf_counter()))
        return InFlight(batch, step, sampled.tokens, HostCopy(sampled, routes, self.device, out.scored), clock,
                        rows, scores.owners if scores is not None else None)

    def _launch_next(self, cur: InFlight) -> None:
        """With overlap on, launch the decode step after `cur` now (its tokens come from `cur` on the device)."""
        if (self.config.disable_overlap_schedule or self.config.step_timing or self._commands
                or self._paused or self._released):
            return
        # ready_for: a graph to capture first is not captured while a step is in flight
        batch = self.scheduler.schedule_next_decode(cur.batch, ready=self.runner.ready_for)
        if batch is None:
            return
        self._ahead = self._launch(batch, PhaseClock(self.device, False), prev=cur)

    def _finish(self, cur: InFlight) -> None:
        """Wait for a launched step's results; update the scheduler, the outputs and the callers."""
        host = cur.host.wait()
        tokens = host["tokens"]
        cur.clock.mark("sample")
        batch = cur.batch
        live = [r.seq.status not in ENDED for r in batch.rows]  # a launched-ahead row may have ended since
        finished = self.scheduler.update(batch, self._per_row(batch, tokens))
        self._record(batch, cur.step, host, live, cur.scored)
        self._complete(finished)
        cur.clock.mark("outputs")
        now = time.perf_counter()
        start = max(cur.clock.start, self._last_finish)
        # the host's launch time inside this step's wall time (a launch of a failed step before it is left out)
        launch_s = sum(max(0.0, end - max(begin, start)) for begin, end in self._launches)
        self._launches.clear()
        self._last_finish = now
        self.totals.steps += 1
        self.steps.append(StepStat(cur.step.num_rows, cur.step.num_tokens, len(tokens), cur.step.is_decode,
                                   now - start, cur.clock.phases, cur.batch.ahead_of is not None, launch_s,
                                   cur.host.waited_s))

    def _drain(self) -> None:
        """Finish a step launched ahead (before commands that change state between steps)."""
        if self._ahead is not None:
            cur, self._ahead = self._ahead, None
            self._finish(cur)

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on device 0; kernels launch on the current one
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - a broken loop must not leave callers waiting forever
            log.exception("engine loop stopped")
            with self._cv:
                self._closed = True
            self._fail_all(EngineShutdownError(f"the engine loop stopped: {e!r}"))

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._commands and self._ahead is None and (
                        self._paused or self._released or not self.scheduler.has_work()):
                    self._cv.wait()
                commands, self._commands = self._commands, []
                closed = self._closed
            if commands or closed:
                self._drain()  # commands see the state after every launched step
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller gets its own error
                    fut.set_exception(e)
            if closed:
                if self._profiler is not None:  # a profile still running at shutdown is written
                    self._end_profile()
                return
            if self._ahead is not None or (not (self._paused or self._released) and self.scheduler.has_work()):
                prof = self._profiler
                try:
                    with prof.step_scope() if prof is not None else contextlib.nullcontext():
                        self.step()
                except Exception as e:  # noqa: BLE001 - fail the requests of this step, keep serving
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_running(e)
                if prof is not None and prof.stepped():
                    self._end_profile()

    def _end_profile(self) -> None:
        """Write the running profile after its num_steps (or at shutdown); a failed write is logged, never fatal to
        the loop."""
        prof, self._profiler = self._profiler, None
        try:
            prof.stop()
        except Exception:  # noqa: BLE001 - profiling must not stop serving
            log.exception("writing the profile to %s failed", prof.path)

    def _command(self, fn, wait: bool = True):
        """Run `fn()` on the engine loop between two steps; return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()
        self._check_open()
        fut: Future = Future()
        with self._cv:
            self._commands.append((fn, fut))
            self._cv.notify()
        return fut.result() if wait else fut

    def _check_open(self) -> None:
        if self._closed:
            raise EngineShutdownError("the engine is shut down; create a new Engine")

    # ---- per-step bookkeeping (loop thread) ------------------------------------------------
    def _admit(self, call: _Call) -> None:
        added = []
        try:
            for group, record in zip(call.groups, call.records):
                if group.rid in self._calls:
                    raise ValueError(f"rid {group.rid!r} is already in flight")
                finished = self.scheduler.add(group)
                added.append(group)
                self._calls[group.rid] = call
                for seq in group.seqs:
                    self._records[seq.seq_id] = record
                self._complete(finished)
        except Exception as e:  # e.g. a request that can never fit the cache: this call's error only
            for group in added:
                self.scheduler.abort(group.rid)
                self._forget(group)
            call.fail(e)

    def _wants_routes(self, batch) -> bool:
        return any(self._records[r.seq.seq_id].return_routed_experts for r in batch.rows)

    def _sampling_rows(self, batch, prev: InFlight | None = None) -> SamplingRows:
        """prev: the step `batch` was scheduled after (overlap); its rows' arrays are reused (`ahead_of` is set
        only on a decode step after one whose rows sample once each: schedule_next_decode's rule)."""
        if prev is not None and batch.ahead_of is not None and prev.rows.host is not None:
            return prev.rows.advance(batch.ahead_of, [r.start + 1 for r in batch.rows], self.device)
        params, seeds, positions, tops = [], [], [], []
        for row in batch.rows:
            group, k = row.seq.group, row.num_samples
            for j in range(k):
                params.append(group.params)
                seeds.append(group.seeds[j if k > 1 else row.seq.index])
                positions.append(row.start + row.length)
                tops.append(self._records[row.seq.seq_id].top_logprobs_num)
        return SamplingRows.build(params, seeds, positions, self.device, tops)

    @staticmethod
    def _per_row(batch, tokens: list[int]) -> list[list[int]]:
        if batch.ahead_of is not None:  # a steady decode step: one sample a row
            return [[t] for t in tokens]
        out, i = [], 0
        for row in batch.rows:
            out.append(tokens[i:i + row.num_samples])
            i += row.num_samples
        return out

    def _record(self, batch, step: StepInputs, host: dict, live: list[bool],
                scored: list[tuple[int, int]] | None) -> None:
        """Append the step's tokens, logprobs and routes to the records of its live rows (a row launched
        ahead whose sequence ended since is skipped: its token is dropped), and the prompt-token logprobs of
        `scored` ((seq_id, position) each) to theirs."""
        for i, (seq_id, position) in enumerate(scored or ()):
            rec = self._records.get(seq_id)
            if rec is not None:
                top = rec.top_of(host.get("input_top_logprobs"), host.get("input_top_ids"), i)
                rec.add_input(position, host["input_logprobs"][i], top)
        ids, weights = host["route_ids"], host["route_weights"]
        if ids is not None:
            ids, weights = ids.numpy(), weights.numpy()  # numpy row views: a tenth of a tensor slice's host cost
            for r, row in enumerate(batch.rows):
                rec = self._records[row.seq.seq_id] if live[r] else None
                if rec is not None and rec.return_routed_experts:
                    a, b = step.qo_indptr[r], step.qo_indptr[r + 1]
                    rec.add_routes(row.start, ids[a:b], weights[a:b])
        logprobs, top_ids, top_lps = host["logprobs"], host["top_ids"], host["top_logprobs"]
        records, version = self._records, self.weight_version
        s = 0
        for r, row in enumerate(batch.rows):
            k = row.num_samples
            if k == 1 and live[r]:  # the common row (the loop of a step at 1024 rows: kept lean)
                seq = row.seq
                rec = records[seq.seq_id]
                rec.add_token(logprobs[s], rec.top_of(top_lps, top_ids, s), version,
                              len(seq.tokens) - seq.num_prompt - 1)
            elif k > 1 and live[r]:
                leader = records[row.seq.seq_id]
                for j, seq in enumerate(row.seq.group.seqs[:k]):
                    rec = records.get(seq.seq_id)
                    if rec is None:  # a sibling forked in this step's update
                        rec = records[seq.seq_id] = leader.fork()
                    rec.add_token(logprobs[s + j], rec.top_of(top_lps, top_ids, s + j), version, seq.num_outputs - 1)
            s += k
        self._stream_updates([row for row, ok in zip(batch.rows, live) if ok])

    def _stream_updates(self, rows) -> None:
        every = self.config.stream_interval
        for row in rows:
            call = self._calls.get(row.seq.group.rid)
            if call is None or call.notify is None or row.num_samples == 0:
                continue
            seqs = [row.seq] if row.num_samples <= 1 else row.seq.group.seqs
            interval = row.seq.group.params.stream_interval or every
            for seq in seqs:
                if seq.status == SeqStatus.RUNNING and seq.num_outputs % interval == 0:
                    out = format_output(seq, self._records[seq.seq_id], self.tokenizer, self.weight_version,
                                        partial=True)
                    out["index"] = self._output_index(call, seq)
                    call.notify(("partial", out))

    @staticmethod
    def _output_index(call: _Call, seq) -> int:
        return sum(g.params.n for g in call.groups[:call.groups.index(seq.group)]) + seq.index

    def _complete(self, finished) -> None:
        for seq in finished:
            group = seq.group
            call = self._calls.get(group.rid)
            if call is None or id(group) in call.done_groups or not _group_done(group):
                continue
            call.done_groups.add(id(group))
            if len(call.done_groups) == len(call.groups):
                self._resolve(call)

    def _resolve(self, call: _Call) -> None:
        outputs = []
        for group in call.groups:
            seqs = sorted(group.seqs, key=lambda s: s.index)
            for j in range(group.params.n):  # siblings never forked (aborted early) repeat the leader
                seq = seqs[j] if j < len(seqs) else seqs[0]
                out = format_output(seq, self._records[seq.seq_id], self.tokenizer, self.weight_version)
                if call.notify is not None:
                    out["index"] = len(outputs)
                outputs.append(out)
            self._forget(group)
        self.totals.add(outputs)
        if call.notify is not None:
            for out in outputs[:-1]:
                call.notify(("partial", out))
            call.notify(("final", outputs[-1]))
        else:
            call.future.set_result(outputs[0] if call.single else outputs)

    def _forget(self, group: Group) -> None:
        self._calls.pop(group.rid, None)
        for seq in group.seqs:
            self._records.pop(seq.seq_id, None)

    def _fail_running(self, error: Exception) -> None:
        """A failed step fails the calls that had sequences in it; queued requests keep their turn."""
        self._ahead = None
        for seq in list(self.scheduler.running):
            call = self._calls.get(seq.group.rid)
            if call is not None:
                self._drop(call, error)

    def _fail_all(self, error: BaseException) -> None:
        for call in {id(c): c for c in self._calls.values()}.values():
            self._drop(call, error)

    def _drop(self, call: _Call, error: BaseException) -> None:
        for group in call.groups:
            self.scheduler.abort(group.rid)
            self._forget(group)
        call.fail(error)

    def _postprocess_weights(self) -> None:
        """The weights' kernel-side layouts, after loading and after the weights come back to the device. It stacks
        storage (fused projections, hosted shared experts); the per-Parameter storage it replaced goes back to the
        device, so that the free memory the KV cache is sized from counts it."""
        self.model.postprocess(self.layouts)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _attach_moe_workspace(self) -> str:
        """The MXFP8 experts' bf16 copies (`attach_bf16_copies`, mxfp8_moe_bf16_copy), or else their dequantize-once
        workspace for prefill chunks (`attach_dequant_workspace`)."""
        copies = attach_bf16_copies(self.model, self.config.mxfp8_moe_bf16_copy)
        if copies:
            return copies
        return attach_dequant_workspace(self.model, self.config.chunked_prefill_size, self.model.cfg.num_experts_per_tok
                                        or 1, not self.config.disable_moe_prefill_dequant)

    def _moe_workspace_bytes(self) -> int:
        spaces = {id(m.workspace): m.workspace for m in self.model.modules()
                  if getattr(m, "workspace", None) is not None}
        return sum(w.nbytes for w in spaces.values())

    # ---- info / lifecycle -------------------------------------------------------------------
    def get_model_info(self) -> dict:
        return {"model_path": str(self.model_path), "is_generation": True, "weight_version": self.weight_version,
                "tokenizer_path": str(self.tokenizer_path) if self.tokenizer is not None else None,
                "preferred_sampling_params": None,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "quantization": "mxfp8" if self.model.plan.mxfp8_modules else None,
                "mxfp8_modules": len(self.model.plan.mxfp8_modules), "act_mode": self.recipe.act_mode,
                "gemm_backend": self.gemm.backend, "mxfp8_dense_bf16_copies": len(self.model.bf16_copies()),
                "moe_dequant_workspace_bytes": self._moe_workspace_bytes(),
                "moe_bf16_copy_bytes": sum(c.nbytes for m in self.model.modules()
                                           for c in (getattr(m, "bf16_copy", None) or ())),
                "attention_backend": self.attn.name, "triton_decode_max_rows": self.triton_decode_rows,
                "context_length": self.context_length, "max_total_tokens": self.cache.capacity_tokens,
                "page_size": self.page_size}

    def get_load(self) -> dict:
        """sglang's load report (`GET /get_load`): `load` (tokens held by running requests plus the prompts waiting),
        `num_reqs` running, `num_waiting_reqs`, `num_tokens` (= load), `dp_rank` 0."""
        return {**self.scheduler.load(), "dp_rank": 0}

    def get_server_info(self) -> dict:
        """Engine state and recent figures (the last steps' throughput)."""
        recent = list(self.steps)[-1000:]
        secs = sum(s.seconds for s in recent)

        def per_s(total: float) -> float:  # a sum over the recent steps, per second of their wall time
            return total / secs if secs else 0.0
        prefix = self.scheduler.prefix
        gen_throughput = per_s(sum(s.sampled for s in recent))
        return {**self.get_model_info(), "paused": self._paused, "memory_released": self._released,
                "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "token_usage": 1.0 - self.scheduler.pool.num_free / max(1, self.scheduler.pool.num_pages),
                **self.totals.as_info(),
                "steps": len(self.steps), "overlap_schedule": not self.config.disable_overlap_schedule,
                "recent_steps_launched_ahead": sum(s.ahead for s in recent) / len(recent) if recent else 0.0,
                "recent_tokens_per_s": gen_throughput,
                "recent_computed_tokens_per_s": per_s(sum(s.tokens for s in recent)),
                "prefix_cache_pages": len(prefix) if prefix is not None else 0,
                "prefix_cache_hit_rate": prefix.hit_tokens / prefix.query_tokens if prefix and prefix.query_tokens
                else 0.0,
                # where the loop's time went: blocked on the device (near 1: the device is the bound) and host
                # time enqueueing steps, both as shares of the steps' wall time
                "recent_device_wait_share": per_s(sum(s.wait_s for s in recent)),
                "recent_launch_share": per_s(sum(s.launch_s for s in recent)),
                **self._sglang_server_info(gen_throughput)}

    def _sglang_server_info(self, gen_throughput: float) -> dict:
        """The keys of sglang's get_server_info that RL frameworks read (its server args and scheduler info)."""
        cfg, capacity = self.config, self.cache.capacity_tokens
        return {"max_total_num_tokens": capacity, "max_req_input_len": min(self.context_length, capacity) - 1,
                "max_running_requests": cfg.max_running_requests, "chunked_prefill_size": cfg.chunked_prefill_size,
                "mem_fraction_static": cfg.mem_fraction_static, "tp_size": 1, "dp_size": 1, "version": _version(),
                "internal_states": [{"last_gen_throughput": gen_throughput, "load": self.scheduler.load()["load"]}]}

    def is_alive(self) -> bool:
        """The engine loop runs and accepts requests (False after shutdown or a crashed loop)."""
        return not self._closed and self._thread.is_alive()

    def shutdown(self) -> None:
        if self._closed:
            return
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        if self._gc_watch is not None:
            self._gc_watch.close()
        self._fail_all(EngineShutdownError("the engine was shut down before this request finished"))
        self.receiver.close()
        # everything that holds device memory (weights, KV cache, graphs, workspaces, layouts), so that a new
        # Engine in this process gets it back without waiting for the garbage collector
        self.model = self.cache = self.runner = self.attn = self.step_builder = self.layouts = self._ahead = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mxroll")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _tokenizer_dir(path: str) -> Path:
    """tokenizer_path: a directory (or its tokenizer.json file); a missing one is an error naming it."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == "tokenizer.json":
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"tokenizer_path={path!r}: not a directory (a local folder holding tokenizer.json)")
    return p


def _shutdown_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


def _group_done(group: Group) -> bool:
    """Every sample ended; a leader that ended before forking ends its group (no siblings will come)."""
    ended = (SeqStatus.FINISHED, SeqStatus.ABORTED)
    return bool(group.seqs) and all(s.status in ended for s in group.seqs)
