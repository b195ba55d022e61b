"""FlashInfer's MLA paged attention (`flashinfer.mla.BatchMLAPagedAttentionWrapper`, FA3 on sm90)
over the absorbed formulation: q is folded into latent space (W_UK), the kernel attends over the
cached latents and rope keys, W_UV maps the result back per head. One plan per step serves all
layers. Decode batches captured in CUDA graphs use a wrapper per batch size over fixed index
buffers (`graph_wrapper`); re-planning before a replay updates those buffers in place.
Checked against the torch reference on the device (tests/rollout/test_attention_gpu.py).
Legend: T tokens, H heads, C kv_lora_rank, R qk_rope_head_dim.
"""
from __future__ import annotations

import warnings

import torch

from ..kv_cache import PagedLatentCache
from ..step_inputs import StepInputs

WORKSPACE_BYTES = 256 << 20


class FlashInferAttention:
    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, cache: PagedLatentCache, num_heads: int, sm_scale: float, max_pages_per_seq: int):
        import flashinfer

        self.flashinfer = flashinfer
        self.cache, self.num_heads, self.sm_scale = cache, num_heads, sm_scale
        self.max_pages_per_seq = max_pages_per_seq
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=cache.device)
        self.eager = flashinfer.mla.BatchMLAPagedAttentionWrapper(self.workspace)
        self.wrapper = self.eager
        self.step: StepInputs | None = None

    def graph_wrapper(self, batch_size: int):
        """A wrapper whose metadata lives in fixed buffers sized for `batch_size` rows (CUDA graphs)."""
        dev, i32 = self.cache.device, torch.int32
        return self.flashinfer.mla.BatchMLAPagedAttentionWrapper(
            self.workspace, use_cuda_graph=True,
            qo_indptr=torch.empty(batch_size + 1, dtype=i32, device=dev),
            kv_indptr=torch.empty(batch_size + 1, dtype=i32, device=dev),
            # rows of a group share prompt pages, so the index list can exceed the physical pages
            kv_indices=torch.empty(batch_size * self.max_pages_per_seq, dtype=i32, device=dev),
            kv_len_arr=torch.empty(batch_size, dtype=i32, device=dev))

    def begin(self, step: StepInputs, wrapper=None) -> None:
        self.step = step
        self.wrapper = wrapper or self.eager
        indptr, indices = step.kv_indices()
        i32 = torch.int32
        # Host tensors: FA3 schedules the work on the host, so device metadata would cost a sync per step.
        with warnings.catch_warnings():  # the flat CSR plan form is the one verified on sm90 (deprecated upstream)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.wrapper.plan(torch.tensor(step.qo_indptr, dtype=i32), torch.tensor(indptr, dtype=i32),
                              torch.tensor(indices, dtype=i32), torch.tensor(step.kv_lens, dtype=i32),
                              self.num_heads, self.cache.cfg.kv_lora_rank, self.cache.cfg.qk_rope_head_dim,
                              self.cache.page_size, True, self.sm_scale, self.cache.dtype, self.cache.dtype)

    def forward(self, mla, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR) -> torch.Tensor:
        self.cache.write(mla.layer, self.step.slots_T, kv_TC, k_pe_TR)
        dtype = self.cache.dtype
        q_lat_THC = mla.absorb(q_nope_THP.to(dtype)).contiguous()
        ckv, kpe = self.cache.layer(mla.layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            o_lat_THC = self.wrapper.run(q_lat_THC, q_pe_THR.to(dtype).contiguous(), ckv, kpe)
        return mla.unabsorb(o_lat_THC)
