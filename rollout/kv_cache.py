"""The paged MLA latent cache: per layer and token, the normalized latent (kv_lora_rank) and the
rotated rope key (qk_rope_head_dim), in pages of `page_size` tokens.

One tensor per kind for all layers ([L, pages, page_size, C] and [L, pages, page_size, R]) so that
the per-layer views are contiguous (what FlashInfer's MLA kernels take), the memory is released and
taken again in one piece, and addresses stay fixed for captured CUDA graphs. The last page is a
scratch page that no sequence owns: padded rows of a captured decode batch write there.
Legend: L layers, P pages, G page size, C kv_lora_rank, R qk_rope_head_dim, T tokens.
"""
from __future__ import annotations

import logging

import torch

from ..model import ModelConfig

log = logging.getLogger(__name__)


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


def plan_capacity(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, page_size: int,
                  mem_fraction: float, max_total_tokens: int | None) -> int:
    """Pages the cache can hold: on a GPU, what is left of `mem_fraction` of the device's memory once the
    weights are loaded (sglang's mem_fraction_static); `max_total_tokens` caps it (and sizes it on CPU)."""
    per_page = bytes_per_token(cfg, dtype) * page_size
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * mem_fraction) - (total - free)
        if budget < per_page * 2:
            raise ValueError(f"mem_fraction_static={mem_fraction} leaves no room for the KV cache: "
                             f"{(total - free) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB are in use after loading "
                             "the weights (raise mem_fraction_static or free GPU memory)")
        pages = budget // per_page
        if max_total_tokens is not None:
            pages = min(pages, -(-max_total_tokens // page_size) + 1)
    else:
        pages = -(-(max_total_tokens or 65536) // page_size) + 1
    return int(pages)


CHUNK_CHOICES = (32768, 16384, 8192, 4096, 2048)  # chunked_prefill_size when unset on a GPU: the largest that fits
CPU_CHUNK = 8192


def prefill_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """An upper estimate of the activation bytes one prefill token holds at a layer's peak: the residual stream and
    norm outputs, the attention's q, expanded k / v and output, and the fused MoE's gate_up, activation (bf16 + MXFP8)
    and fp32 combine rows for its routed and shared experts (or the dense MLP's). Measured on moonlight-16b-a3b (H200):
    a 32768-token chunk peaks ~2.3 GiB above an 8192-token one, about half this estimate."""
    b, D, H = dtype.itemsize, cfg.hidden_size, cfg.num_attention_heads
    attn = H * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim) * b + D * b
    k = (cfg.num_experts_per_tok or 0) + cfg.n_shared_experts
    moe = k * (2 * cfg.moe_intermediate_size * b + cfg.moe_intermediate_size * (b + 1) + D * 4) if k else 0
    dense = 3 * cfg.intermediate_size * b
    return 4 * D * b + attn + max(moe, dense)


def plan_chunk(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, mem_fraction: float) -> tuple[int, str]:
    """chunked_prefill_size when unset: on a GPU the largest of CHUNK_CHOICES whose prefill activations
    (`prefill_bytes_per_token`) take at most half the memory mem_fraction_static leaves outside weights + KV cache
    (larger chunks: fewer steps, and MXFP8 experts dequantized once per chunk serve more tokens); CPU_CHUNK on CPU.
    Returns (tokens, why) for the start-up log."""
    if device.type != "cuda":
        return CPU_CHUNK, "default on CPU"
    total = torch.cuda.get_device_properties(device).total_memory
    room = (1 - mem_fraction) * total / 2
    per = prefill_bytes_per_token(cfg, dtype)
    tokens = next((c for c in CHUNK_CHOICES if c * per <= room), CHUNK_CHOICES[-1])
    return tokens, (f"auto: ~{per / 1024:.0f} KiB of activations a token, {tokens * per / 2**30:.1f} GiB of the "
                    f"{room * 2 / 2**30:.1f} GiB left by mem_fraction_static={mem_fraction}")


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.cfg, self.page_size, self.dtype, self.device = cfg, page_size, dtype, device
        self.num_pages = num_pages
        self.scratch_page = num_pages - 1  # never handed out (the page pool has num_pages - 1 pages)
        self.ckv_LPGC: torch.Tensor | None = None
        self.kpe_LPGR: torch.Tensor | None = None
        self.allocate()

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def capacity_tokens(self) -> int:
        return self.usable_pages * self.page_size

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.page_size * bytes_per_token(self.cfg, self.dtype)

    def allocate(self) -> None:
        L, C, R = self.cfg.num_hidden_layers, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim
        shape = (L, self.num_pages, self.page_size)
        self.ckv_LPGC = torch.zeros(*shape, C, dtype=self.dtype, device=self.device)
        self.kpe_LPGR = torch.zeros(*shape, R, dtype=self.dtype, device=self.device)

    def release(self) -> None:
        """Hand the memory back (release_memory_occupation); `allocate` takes it again (new addresses)."""
        self.ckv_LPGC = self.kpe_LPGR = None

    @property
    def allocated(self) -> bool:
        return self.ckv_LPGC is not None

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous [P, G, C] and [P, G, R] views of one layer."""
        return self.ckv_LPGC[layer], self.kpe_LPGR[layer]

    def _slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's caches as flat [N, C] / [N, R] rows, indexed by slot (page * page_size + offset)."""
        ckv, kpe = self.layer(layer)
        return ckv.view(-1, ckv.shape[-1]), kpe.view(-1, kpe.shape[-1])

    def write(self, mla, slots_T: torch.Tensor, kv_TC: torch.Tensor, pe_TR: torch.Tensor) -> None:
        """Store this step's latents of layer `mla.layer` at flat slots (page * page_size + offset): kv_TC as
        projected, normed on the way in (`MLA.store_latents`), and the rotated rope keys."""
        mla.store_latents(*self._slots(mla.layer), slots_T, kv_TC, pe_TR)

    def write_and_absorb(self, mla, slots_T: torch.Tensor, kv_TC: torch.Tensor, pe_TR: torch.Tensor,
                         q_nope_THP: torch.Tensor, q_pe_THR: torch.Tensor | None = None,
                         cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`write`, then q in latent space [T, H, C] (`MLA.store_latents_and_absorb`: one kernel on Triton; with
        cos_sin it also rotates the unrotated pe_TR and q_pe_THR, and returns (q_lat, rotated q_pe))."""
        return mla.store_latents_and_absorb(*self._slots(mla.layer), slots_T, kv_TC, pe_TR, q_nope_THP, q_pe_THR,
                                            cos_sin)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write of shared partial pages, in every layer, before a forward writes into them."""
        s = torch.tensor(src, dtype=torch.long, device=self.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.device)
        self.ckv_LPGC[:, d] = self.ckv_LPGC[:, s]
        self.kpe_LPGR[:, d] = self.kpe_LPGR[:, s]

    def gather(self, layer: int, pages: list[int] | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's latents [S, C] and rope keys [S, R] for positions [0, length)."""
        ckv, kpe = self.layer(layer)
        idx = torch.as_tensor(pages, dtype=torch.long, device=self.device)
        return (ckv[idx].reshape(-1, ckv.shape[-1])[:length], kpe[idx].reshape(-1, kpe.shape[-1])[:length])
