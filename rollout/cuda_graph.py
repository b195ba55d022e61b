"""CUDA graphs for decode steps: one graph per padded batch size, captured on first use.

Inputs (token ids, positions, cache slots) live in fixed buffers; the graph runs the model and the
lm_head into a fixed fp32 logits buffer. Before a replay the attention backend re-plans into its
per-size index buffers and the padded rows point at the cache's scratch page. Weights, cache and
buffers keep their addresses for the engine's lifetime (weight updates copy in place), so graphs
stay valid across updates; releasing memory drops them (they are captured again on demand).
Legend: B rows, V vocab, D hidden.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import replace

import torch

from ..model import DeepseekV3
from ..model.moe import RouteRecorder
from .step_inputs import StepInputs

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: DeepseekV3, attn, sizes: tuple[int, ...], device: torch.device,
                 record_routes: bool):
        self.model, self.attn, self.device = model, attn, device
        self.sizes = sorted(set(sizes))
        B, cfg = self.sizes[-1], model.cfg
        self.ids = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, dtype=torch.long, device=device)
        self.slots = torch.zeros(B, dtype=torch.long, device=device)
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=device)
        self.routes = (RouteRecorder(len(model.moe_layers), B, cfg.num_experts_per_tok, device)
                       if record_routes and model.moe_layers else None)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def fits(self, step: StepInputs) -> bool:
        return step.is_decode and step.num_rows <= self.max_size

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [B, V] (fp32) of the step's rows; a view into the graph's buffer until the next replay."""
        B = step.num_rows
        size = self.sizes[bisect.bisect_left(self.sizes, B)]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, wrapper = self.graphs[size]
        padded = self._pad(step, size)
        self.attn.begin(padded, wrapper)
        graph.replay()
        return self.logits[:B]

    def _pad(self, step: StepInputs, size: int) -> StepInputs:
        """Copy the step into the fixed buffers; rows past B attend one scratch position and write there."""
        B, extra = step.num_rows, size - step.num_rows
        scratch = self.attn.cache.scratch_page
        self.ids[:B].copy_(step.ids_T)
        self.pos[:B].copy_(step.pos_T)
        self.slots[:B].copy_(step.slots_T)
        if extra:
            self.pos[B:size].zero_()
            self.slots[B:size].fill_(scratch * step.page_size)
        return replace(step, ids_T=self.ids[:size], pos_T=self.pos[:size], slots_T=self.slots[:size],
                       qo_indptr=list(range(size + 1)), kv_lens=step.kv_lens + [1] * extra,
                       pages=step.pages + [[scratch]] * extra)

    def _capture(self, size: int):
        wrapper = self.attn.graph_wrapper(size)
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        self.ids[:size].zero_()
        self.attn.begin(self._pad(StepInputs(empty, empty, empty, [0], [], [], empty, self.attn.cache.page_size, True),
                                  size), wrapper)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: Triton autotune/compile, lazy buffers, FlashInfer JIT
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            self._forward(size)
        log.info("captured a CUDA graph for decode batch size %d", size)
        return graph, wrapper

    def _forward(self, size: int) -> None:
        h = self.model(self.ids[:size], self.pos[:size], self.attn, self.routes)
        self.logits[:size].copy_(self.model.logits(h))
