"""ModelRunner: one forward of the model over a scheduled batch.

Copy-on-write page copies first, then the flat forward (CUDA-graph replay for decode batches that
fit a captured size, eager otherwise), then fp32 logits of the rows that sample (a group leader
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
from .step_inputs import StepInputs

log = logging.getLogger(__name__)


@dataclass
class ForwardOutput:
    logits_SV: torch.Tensor  # fp32
    routes: RouteRecorder | None  # ids/weights [moe_layers, >= T, K] of this step's tokens, when recorded


class ModelRunner:
    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, attn, max_batch_tokens: int,
                 graphs: DecodeGraphs | None):
        self.model, self.cache, self.attn, self.graphs = model, cache, attn, graphs
        cfg = model.cfg
        self.routes = (RouteRecorder(len(model.moe_layers), max_batch_tokens, cfg.num_experts_per_tok,
                                     cache.device) if model.moe_layers else None)

    @torch.inference_mode()
    def forward(self, step: StepInputs, copies: list[tuple[int, int]], record_routes: bool) -> ForwardOutput:
        if copies:
            self.cache.copy_pages([s for s, _ in copies], [d for _, d in copies])
        if self.graphs is not None and self.graphs.fits(step) and (not record_routes or self.graphs.routes):
            logits = self.graphs.run(step)
            return ForwardOutput(logits.index_select(0, step.sample_T), self.graphs.routes)
        routes = self.routes if record_routes else None
        self.attn.begin(step)
        h_TD = self.model(step.ids_T, step.pos_T, self.attn, routes)
        return ForwardOutput(self.model.logits(h_TD.index_select(0, step.sample_T)), routes)
