"""The torch reference attention over the paged latent cache: gathers each row's pages and runs
`MLA.attend_naive` (multi-token chunks) or `MLA.attend_absorbed` (single tokens) in fp32.
Slow (a Python loop over rows) and exact: the oracle for the FlashInfer backend, and the CPU path.
Legend: T tokens, H heads, V v_head_dim.
"""
from __future__ import annotations

import torch

from ..kv_cache import PagedLatentCache
from ..step_inputs import StepInputs


class TorchPagedAttention:
    name = "torch"
    supports_cuda_graphs = False

    def __init__(self, cache: PagedLatentCache, mode: str = "auto"):
        if mode not in ("auto", "naive", "absorbed"):
            raise ValueError(f"attention mode {mode!r}; use auto, naive or absorbed")
        self.cache, self.mode = cache, mode
        self.step: StepInputs | None = None

    def begin(self, step: StepInputs) -> None:
        self.step = step

    def forward(self, mla, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR) -> torch.Tensor:
        step, device = self.step, q_nope_THP.device
        self.cache.write(mla, step.slots_T, kv_TC, k_pe_TR)
        T = q_nope_THP.shape[0]
        out_THV = torch.empty(T, mla.n_heads, mla.v_dim, dtype=torch.float32, device=device)
        for r in range(step.num_rows):
            a, b, kv_len = step.qo_indptr[r], step.qo_indptr[r + 1], step.kv_lens[r]
            kv_SC, pe_SR = self.cache.gather(mla.layer, step.pages[r], kv_len)
            q_pos = torch.arange(kv_len - (b - a), kv_len, device=device)
            mask_TS = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
            absorbed = self.mode == "absorbed" or (self.mode == "auto" and b - a == 1)
            attend = mla.attend_absorbed if absorbed else mla.attend_naive
            out_THV[a:b] = attend(q_nope_THP[a:b], q_pe_THR[a:b], kv_SC, pe_SR, mask_TS)
        return out_THV
