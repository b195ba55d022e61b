"""FlashInfer's MLA paged attention (`flashinfer.mla.BatchMLAPagedAttentionWrapper`, FA3 on sm90)
over the absorbed formulation: q is folded into latent space (W_UK), the kernel attends over the
cached latents and rope keys, W_UV maps the result back per head. One plan per step serves all
layers. Decode batches captured in CUDA graphs use a wrapper per batch size over fixed index
buffers (`graph_wrapper`); re-planning before a replay updates those buffers in place.

Planning always reads host tensors (FA3 schedules the work on the CPU). The wrapper's `plan()` in
FlashInfer 0.7.2 validates, selects a backend and snapshots buffers on every call (1.4-2.1 ms of host
time per step on an H100). A graph's first plan goes through it; later plans of that graph
(`GraphReplanner`, when `fast_plan`) call the planner module the wrapper loaded and copy the page
table into the captured buffers, which is all that plan() changes for a captured FA2/FA3 graph. It
checks that the schedule's launch shape (the plan info) is the captured one and fails loudly if not.
Decode batches of up to `triton_decode_rows` rows attend with the Triton split-KV kernel instead
(`triton_mla.py`: FlashInfer's kernel leaves most SMs idle on a few rows); it reads the page table on the
GPU, so such a step skips the host-side plan and a captured graph only needs the table copied in. Those steps
also store the latents and absorb q in one launch (`MLA.store_latents_and_absorb`; with FUSED_SMALL_DECODE_ROPE
it rotates q_pe and k_pe too) and apply W_UV inside the split merge.
Checked against the torch reference on the device (tests/rollout/test_attention_gpu.py).
Legend: T tokens, H heads, C kv_lora_rank, R qk_rope_head_dim.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from ..kv_cache import PagedLatentCache
from ..step_inputs import PageTable, StepInputs

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 256 << 20
FAST_PLAN_BACKENDS = ("fa2", "fa3")  # planners whose replans keep a captured graph valid
# Triton decode steps store the latents and absorb q in one launch and apply W_UV in the split merge (3 launches
# per layer instead of 5); False keeps the separate kernels (benchmarks compare the two).
FUSED_SMALL_DECODE = True
# True: the rope of q_pe and k_pe also goes into that launch (bit-identical, one launch fewer a layer). Off until it
# measures faster: H200 (throughput_20261201cc_decode_rope_*.json, same run) with the rotation in the store's programs,
# batch 1 bf16 2.20 -> 2.15 ms but MXFP8 1.77 -> 1.81 (batch 8 unchanged): no clear gain. Now it runs in programs of
# its own (T more), which is not measured on the device yet.
FUSED_SMALL_DECODE_ROPE = False


class GraphReplanner:
    """Re-plans one captured graph's wrapper without the wrapper's per-call Python machinery."""

    def __init__(self, wrapper, buffers: PageTable, num_heads: int, head_dim_ckv: int, causal: bool):
        self.module = wrapper._cached_module
        self.float_ws, self.int_ws = wrapper._float_workspace_buffer, wrapper._int_workspace_buffer
        self.pinned_ws = wrapper._pin_memory_int_workspace_buffer
        self.plan_info = _plan_info(wrapper._plan_info)
        self.buffers, self.num_heads, self.head_dim_ckv, self.causal = buffers, num_heads, head_dim_ckv, causal

    @classmethod
    def attach(cls, wrapper, buffers: PageTable, num_heads: int, head_dim_ckv: int,
               causal: bool) -> tuple["GraphReplanner | None", str]:
        """(replanner, why) for a wrapper just planned through its public plan(); None when this FlashInfer
        build does not expose what a direct replan needs (then plan() runs every step)."""
        backend = getattr(wrapper, "_planned_backend_name", None)
        if backend not in FAST_PLAN_BACKENDS:
            return None, f"planned backend {backend!r} is not one of {FAST_PLAN_BACKENDS}"
        missing = [a for a in ("_cached_module", "_float_workspace_buffer", "_int_workspace_buffer",
                               "_pin_memory_int_workspace_buffer", "_plan_info") if getattr(wrapper, a, None) is None]
        if missing:
            return None, f"the wrapper does not expose {missing}"
        if not hasattr(wrapper._cached_module, "plan"):
            return None, "the planner module has no plan()"
        return cls(wrapper, buffers, num_heads, head_dim_ckv, causal), f"direct replan ({backend} planner module)"

    def plan(self, table: PageTable) -> None:
        check_fits(self.buffers, table, "GraphReplanner")
        info = self.module.plan(self.float_ws, self.int_ws, self.pinned_ws, table.qo_indptr, table.kv_indptr,
                                table.kv_lens, self.num_heads, self.head_dim_ckv, self.causal)
        if _plan_info(info) != self.plan_info:
            raise RuntimeError(f"FlashInfer MLA replan changed the launch shape of a captured graph: "
                               f"{_plan_info(info)} != {self.plan_info}")
        copy_table(self.buffers, table)


def check_fits(buffers: PageTable, table: PageTable, who: str) -> None:
    """A step's host page table must have the captured graph's rows and fit its page-index buffer."""
    B, P = table.kv_lens.numel(), table.kv_indices.numel()
    if B != buffers.kv_lens.numel() or P > buffers.kv_indices.numel():
        raise ValueError(f"{who}: {B} rows / {P} pages do not fit the captured buffers "
                         f"({buffers.kv_lens.numel()} rows / {buffers.kv_indices.numel()} pages)")


def copy_table(buffers: PageTable, table: PageTable) -> None:
    """The host page table into a captured graph's device buffers (stream-ordered before the replay)."""
    buffers.qo_indptr.copy_(table.qo_indptr, non_blocking=True)
    buffers.kv_indptr.copy_(table.kv_indptr, non_blocking=True)
    buffers.kv_indices[:table.kv_indices.numel()].copy_(table.kv_indices, non_blocking=True)
    buffers.kv_lens.copy_(table.kv_lens, non_blocking=True)


def _plan_info(info) -> tuple[int, ...]:
    return tuple(int(v) for v in info)


@dataclass
class GraphPlan:
    """A captured batch size's wrapper, the metadata buffers it was captured on, and how it is re-planned."""
    wrapper: object
    buffers: PageTable
    replanner: GraphReplanner | None = None
    path: str | None = None  # set by the first plan


class FlashInferAttention:
    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, cache: PagedLatentCache, num_heads: int, sm_scale: float, max_pages_per_seq: int,
                 fast_plan: bool = True, triton_decode_rows: int = 0):
        import flashinfer

        self.flashinfer = flashinfer
        self.cache, self.num_heads, self.sm_scale = cache, num_heads, sm_scale
        self.max_pages_per_seq, self.fast_plan = max_pages_per_seq, fast_plan
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=cache.device)
        self.eager = flashinfer.mla.BatchMLAPagedAttentionWrapper(self.workspace)
        self.wrapper = self.eager
        self.step: StepInputs | None = None
        self.triton_decode_rows, self.fused_small_decode = triton_decode_rows, FUSED_SMALL_DECODE
        self.fused_rope = FUSED_SMALL_DECODE_ROPE
        if triton_decode_rows:
            from .triton_mla import decode_splits, mla_decode_triton
            self.decode_splits, self.mla_decode_triton = decode_splits, mla_decode_triton
            self.sms = torch.cuda.get_device_properties(cache.device).multi_processor_count
        self.triton: tuple[PageTable, int] | None = None  # this step's device page table and splits, if Triton decodes
        self.plan_paths: dict[int, str] = {}  # graph batch size -> how its steps are planned (logs, benchmarks)

    def graph_wrapper(self, batch_size: int) -> GraphPlan:
        """A wrapper whose metadata lives in fixed buffers sized for `batch_size` rows (CUDA graphs)."""
        dev, i32 = self.cache.device, torch.int32
        # rows of a group share prompt pages, so the index list can exceed the physical pages
        buffers = PageTable(qo_indptr=torch.empty(batch_size + 1, dtype=i32, device=dev),
                            kv_indptr=torch.empty(batch_size + 1, dtype=i32, device=dev),
                            kv_indices=torch.empty(batch_size * self.max_pages_per_seq, dtype=i32, device=dev),
                            kv_lens=torch.empty(batch_size, dtype=i32, device=dev))
        wrapper = self.flashinfer.mla.BatchMLAPagedAttentionWrapper(
            self.workspace, use_cuda_graph=True, qo_indptr=buffers.qo_indptr, kv_indptr=buffers.kv_indptr,
            kv_indices=buffers.kv_indices, kv_len_arr=buffers.kv_lens)
        return GraphPlan(wrapper, buffers)

    def begin(self, step: StepInputs, graph: GraphPlan | None = None) -> None:
        self.step = step
        self.wrapper = graph.wrapper if graph is not None else self.eager
        table = step.page_table()
        rows = table.kv_lens.numel()
        self.triton = None
        if step.is_decode and rows <= self.triton_decode_rows:
            self.triton = self._device_table(table, graph), self.decode_splits(rows, self.num_heads, self.sms)
            if graph is not None and graph.path is None:
                graph.path = self.plan_paths[rows] = f"Triton split-KV decode ({self.triton[1]} splits per row)"
                log.info("MLA graph batch %d: %s", rows, graph.path)
            return
        if graph is not None and graph.replanner is not None:
            graph.replanner.plan(table)
            return
        self.plan(self.wrapper, table)
        if graph is not None and graph.path is None:
            self._attach(graph, rows)

    def _device_table(self, table: PageTable, graph: GraphPlan | None) -> PageTable:
        """The page table on the GPU: copied into a captured graph's buffers (fixed addresses), else fresh."""
        if graph is None:
            dev = self.cache.device
            return PageTable(*(t.to(dev, non_blocking=True) for t in (table.qo_indptr, table.kv_indptr,
                                                                        table.kv_indices, table.kv_lens)))
        check_fits(graph.buffers, table, "Triton decode")
        copy_table(graph.buffers, table)
        return graph.buffers

    def plan(self, wrapper, table: PageTable) -> None:
        """FlashInfer's public plan() on host tensors."""
        with warnings.catch_warnings():  # the flat CSR plan form is the one verified on sm90 (deprecated upstream)
            warnings.simplefilter("ignore", DeprecationWarning)
            wrapper.plan(table.qo_indptr, table.kv_indptr, table.kv_indices, table.kv_lens,
                         self.num_heads, self.cache.cfg.kv_lora_rank, self.cache.cfg.qk_rope_head_dim,
                         self.cache.page_size, True, self.sm_scale, self.cache.dtype, self.cache.dtype)

    def _attach(self, graph: GraphPlan, size: int) -> None:
        if not self.fast_plan:
            graph.path = "FlashInfer plan() every step (attention_fast_plan off)"
        else:
            graph.replanner, why = GraphReplanner.attach(graph.wrapper, graph.buffers, self.num_heads,
                                                         self.cache.cfg.kv_lora_rank, True)
            graph.path = why if graph.replanner is not None else f"FlashInfer plan() every step: no direct replan ({why})"
            if graph.replanner is None:
                log.warning("MLA graph batch %d: %s", size, graph.path)
        self.plan_paths[size] = graph.path
        log.info("MLA graph batch %d: %s", size, graph.path)

    def fuses_rope(self) -> bool:
        """This step's attention rotates q_pe and k_pe itself (`MLA.forward` passes them unrotated, with cos_sin):
        in the latent store + absorb launch of a small decode batch."""
        return self.triton is not None and self.fused_small_decode and self.fused_rope

    def forward(self, mla, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR, cos_sin=None) -> torch.Tensor:
        dtype = self.cache.dtype
        ckv, kpe = self.cache.layer(mla.layer)
        if self.triton is not None and self.fused_small_decode:
            # three launches: latent store + absorb (+ rope), split-KV attention, merge + unabsorb (W_UV)
            t, splits = self.triton
            if cos_sin is None:
                q_lat_THC = self.cache.write_and_absorb(mla, self.step.slots_T, kv_TC, k_pe_TR, q_nope_THP.to(dtype))
            else:
                q_lat_THC, q_pe_THR = self.cache.write_and_absorb(mla, self.step.slots_T, kv_TC, k_pe_TR,
                                                                  q_nope_THP.to(dtype), q_pe_THR, cos_sin)
            _, w_uv_HVC = mla.absorbed_weights()
            o_THV = torch.empty(*q_lat_THC.shape[:2], w_uv_HVC.shape[1], dtype=dtype, device=q_lat_THC.device)
            return self.mla_decode_triton(q_lat_THC, q_pe_THR.to(dtype), ckv, kpe, t.kv_indptr, t.kv_indices,
                                          t.kv_lens, self.sm_scale, splits, o_THV, w_uv_HVC=w_uv_HVC.to(dtype))
        assert cos_sin is None, "rope is fused only into the small-decode latent store (fuses_rope)"
        self.cache.write(mla, self.step.slots_T, kv_TC, k_pe_TR)
        # q_lat is a [T, H, C] view of the bmm's [H, T, C] result: FlashInfer's MLA kernels read q (and q_pe)
        # through their token and head strides, so no copy. The output is a [T, H, C] contiguous buffer, the
        # layout unabsorb's bmm has always read (a cuBLAS call whose layout changes may change algorithm).
        q_lat_THC = mla.absorb(q_nope_THP.to(dtype))
        o_lat_THC = torch.empty(q_lat_THC.shape, dtype=dtype, device=q_lat_THC.device)
        if self.triton is not None:
            t, splits = self.triton
            self.mla_decode_triton(q_lat_THC, q_pe_THR.to(dtype), ckv, kpe, t.kv_indptr, t.kv_indices, t.kv_lens,
                                   self.sm_scale, splits, o_lat_THC)
            return mla.unabsorb(o_lat_THC)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.wrapper.run(q_lat_THC, q_pe_THR.to(dtype), ckv, kpe, out=o_lat_THC)
        return mla.unabsorb(o_lat_THC)
