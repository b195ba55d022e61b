"""CUDA graphs for decode steps: one graph per padded batch size, all captured at engine start-up (largest first)
or each on first use (`cuda_graph_lazy_capture`).

Inputs (token ids, positions, cache slots) live in the step builder's fixed device buffer: a step
padded to size n finds them at the same addresses every time (`StepBuilder.token_views(n)`). The
graph runs the model and the lm_head into a fixed fp32 logits buffer. Before a replay the attention
backend re-plans into its per-size index buffers (on the host; padding rows point at the cache's
scratch page). Weights, cache and buffers keep their addresses for the engine's lifetime (weight
updates copy in place), so graphs stay valid across updates; releasing memory drops them (they are
captured again when the memory comes back).
Legend: B rows, V vocab, D hidden.
"""
from __future__ import annotations

import bisect
import logging

import torch

from ..model import DeepseekV3
from ..model.moe import RouteRecorder
from .step_builder import StepBuilder
from .step_inputs import StepInputs

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


class DecodeGraphs:
    def __init__(self, model: DeepseekV3, attn, sizes: tuple[int, ...], device: torch.device,
                 record_routes: bool, builder: StepBuilder):
        self.model, self.attn, self.device, self.builder = model, attn, device, builder
        self.sizes = sorted(set(sizes))
        B, cfg = self.sizes[-1], model.cfg
        if B > builder.max_tokens:
            raise ValueError(f"DecodeGraphs: batch size {B} exceeds the step buffers ({builder.max_tokens} tokens)")
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=device)
        self.routes = (RouteRecorder(len(model.moe_layers), B, cfg.num_experts_per_tok, device)
                       if record_routes and model.moe_layers else None)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, rows) -> int | None:
        """The captured size a batch of `rows` pads to, or None when it does not run as a graph."""
        if len(rows) > self.max_size or not all(r.length == 1 for r in rows):
            return None
        return self.sizes[bisect.bisect_left(self.sizes, len(rows))]

    def ensure(self, size: int) -> None:
        """Capture the graph of `size` (before a step of that size is built: capture writes the same buffers)."""
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)

    def capture_all(self, progress: bool = False) -> None:
        """Capture every size not captured yet, largest first: the pool's blocks, sized by the largest batch, serve
        the smaller ones, and a batch that does not fit in memory fails here rather than in a rollout."""
        from tqdm import tqdm
        todo = [s for s in reversed(self.sizes) if s not in self.graphs]
        with torch.inference_mode():
            for size in tqdm(todo, desc="capturing decode CUDA graphs", unit="graph", disable=not progress):
                self.graphs[size] = self._capture(size, quiet=True)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [B, V] (fp32) of the step's rows; a view into the graph's buffer until the next replay."""
        size = step.num_rows + step.pad_rows
        if not step.graph or size not in self.graphs or step.ids_T.data_ptr() != self.builder.token_views(size)[0].data_ptr():
            raise ValueError(f"DecodeGraphs.run: the step ({step.num_rows} rows + {step.pad_rows} padding) was not "
                             "built by the runner's StepBuilder for a captured size (ModelRunner.prepare)")
        graph, wrapper = self.graphs[size]
        self.attn.begin(step, wrapper)
        self.builder.release()  # the step's host buffers (and the plan's) are copied before the replay's kernels
        graph.replay()
        return self.logits[:step.num_rows]

    def _capture(self, size: int, quiet: bool = False):
        wrapper = self.attn.graph_wrapper(size)
        step = self.builder.build([], pad_to=size)  # every row a padding row
        self.attn.begin(step, wrapper)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: Triton autotune/compile, lazy buffers, FlashInfer JIT
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            self._forward(size)
        self.builder.release()
        log.log(logging.DEBUG if quiet else logging.INFO, "captured a CUDA graph for decode batch size %d", size)
        return graph, wrapper

    def _forward(self, size: int) -> None:
        ids, pos, _ = self.builder.token_views(size)
        h = self.model(ids, pos, self.attn, self.routes)
        self.model.logits(h, out=self.logits[:size])
