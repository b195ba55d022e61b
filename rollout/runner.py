"""ModelRunner: one forward of the model over a scheduled batch.

`prepare` turns the scheduler's rows into StepInputs in reused buffers (padded to a captured size
when the batch will replay a CUDA graph); `forward` does the copy-on-write page copies, then the
flat forward (graph replay, or eager), then fp32 logits of the rows that sample (a group leader
finishing its prompt appears once per sample). Router choices are recorded when asked.
Legend: T tokens, S sampled rows, V vocab.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..model import DeepseekV3
from ..model.moe import RouteRecorder
from .cuda_graph import DecodeGraphs
from .kv_cache import PagedLatentCache
from .scoring import ScoreRows, score
from .step_builder import StepBuilder
from .step_inputs import StepInputs

log = logging.getLogger(__name__)


@dataclass
class ForwardOutput:
    logits_SV: torch.Tensor  # fp32
    routes: RouteRecorder | None  # ids/weights [moe_layers, >= T, K] of this step's tokens, when recorded
    scored: dict[str, torch.Tensor] | None = None  # prompt-token logprobs (scoring.score), when asked


class ModelRunner:
    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, attn, builder: StepBuilder,
                 graphs: DecodeGraphs | None):
        self.model, self.cache, self.attn, self.builder, self.graphs = model, cache, attn, builder, graphs
        cfg = model.cfg
        self.routes = (RouteRecorder(len(model.moe_layers), builder.max_tokens, cfg.num_experts_per_tok,
                                     cache.device) if model.moe_layers else None)

    def prepare(self, rows, next_ids: torch.Tensor | None = None, eager: bool = False,
                ahead_of: list[int] | None = None) -> StepInputs:
        """The step's inputs; a decode batch that fits a captured size is padded to it (captured first) unless
        eager (a step that scores prompt tokens needs its hidden states).
        next_ids: the decode rows' token ids on the device (a step built before its tokens reached the host);
        ahead_of: then each row's index in the step built last (its arrays are reused)."""
        size = self.graphs.size_for(rows) if self.graphs is not None and not eager else None
        if size is not None:
            with torch.inference_mode():
                self.graphs.ensure(size)
        return self.builder.build(rows, pad_to=size, next_ids=next_ids, ahead_of=ahead_of)

    def ready_for(self, rows) -> bool:
        """A step of `rows` runs without capturing a graph first (captures are not overlapped with a step)."""
        size = self.graphs.size_for(rows) if self.graphs is not None else None
        return size is None or size in self.graphs.graphs

    @torch.inference_mode()
    def forward(self, step: StepInputs, copies: list[tuple[int, int]], record_routes: bool,
                scores: ScoreRows | None = None) -> ForwardOutput:
        """scores: prompt positions whose next-token logprobs are asked (an eager step's)."""
        try:
            return self._forward(step, copies, record_routes, scores)
        finally:
            self.builder.release()

    def _forward(self, step: StepInputs, copies, record_routes: bool, scores: ScoreRows | None) -> ForwardOutput:
        if copies:
            self.cache.copy_pages([s for s, _ in copies], [d for _, d in copies])
        if step.graph:
            assert scores is None, "a step that scores prompt tokens runs eagerly"
            logits = self.graphs.run(step)  # routes are always recorded in the graph (when the model has MoE)
            return ForwardOutput(logits if step.sample_rows_in_order else logits.index_select(0, step.sample_T),
                                 self.graphs.routes)
        routes = self.routes if record_routes else None
        self.attn.begin(step)
        self.builder.release()
        h_TD = self.model(step.ids_T, step.pos_T, self.attn, routes)
        h_SD = h_TD if step.sample_rows_in_order else h_TD.index_select(0, step.sample_T)
        return ForwardOutput(self.model.logits(h_SD), routes, score(self.model, h_TD, scores) if scores else None)
