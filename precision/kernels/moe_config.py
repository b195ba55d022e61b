"""Tiles of the Triton fused MoE (triton_moe.py) by token count and rows per expert: plain Python, importable
(and tested) without Triton."""
from __future__ import annotations


def moe_config(T: int, quant: bool, topk: int, experts: int, hidden: int = 0) -> dict:
    """Tiles for T tokens routed to `topk` of `experts` experts. The tile height BM follows the average rows
    per expert r = T * topk / experts (moe_tile_sweep.json, H200, moonlight-16b-a3b r = 12..192 and deepseek-v3
    r = 4..128: the same token count gives 4x more rows per expert on moonlight): a tile much taller than r
    multiplies padding, a shorter one re-reads (and for MXFP8 re-dequantizes) each weight tile once per extra
    block. MXFP8: 16 rows up to r = 16, 32 below r = 32, 64 below 64, then 128 (vs the token-count rule this
    replaces: moonlight 128 / 512 / 1024 tokens 274 -> 211, 502 -> 378, 694 -> 494 us; deepseek-v3 128 / 256
    tokens 4683 -> 3436, 4786 -> 3667 us). bf16: 16 rows up to r = 12, 32 below 32, 64 below 64, then 128 x 128
    tiles (moonlight 512 / 1024 tokens 395 -> 346, 552 -> 406 us).
    MXFP8 above r = 12 (GROUP_MIN_ROWS) and below 32: 16-row blocks in groups of two (GROUP=2: a group's first
    block multiplies both, each weight tile dequantized once), where the 32-row tile (and, at r = 13..16, the
    16-row one) dequantized a busy expert's weights once per block (moe_group_sweep_20261202c.json, H200, same run,
    same bits): moonlight 256 tokens (r = 24) uniform 249.0 -> 249.1 us, uneven routing (busiest expert 141 rows)
    305.9 -> 285.9 (bf16 tiles 297.5); deepseek-v3 512 tokens (r = 16) 4579 -> 3878, uneven 4820 -> 4335. The
    engine's batch-256 MXFP8 decode step 12.75 / 12.74 -> 12.17 / 12.19 ms (throughput_20261202k_group_*.json,
    old / new alternating; bf16 12.50). Not below r = 12 (moonlight 128 tokens 191.2 -> 218.6 uniform, 230.0 ->
    225.5 uneven: the grouped kernel's 255 registers cost its lone blocks occupancy), nor for 64-row tiles (grouped
    or shorter blocks at moonlight 512 tokens 359-465 us against 279; sweeps _20261202a/b/c).
    Optional keys (compared by benchmarks/moe_split_sweep.py): SPLIT_GU / SPLIT_DOWN split the gate_up / down
    contraction over that many programs (fp32 partials summed in split order: deterministic, not the unsplit
    kernel's bits; off); USE_TMA loads weight tiles by tensor descriptor (on for MXFP8 tiles, below); GEMV replaces
    the tensor-core MMA by fp32 multiply-adds (BM of 1..4 rows).
    MXFP8 experts at 1..4 tokens take the GEMV path, split 4 ways up to 2 tokens (moe_split_sweep.json, H200,
    moonlight / deepseek-v3 shapes, vs the 16-row MMA blocks: 1 token 37.9 -> 26.8 / 140.7 -> 123.4 us, 2 tokens
    51.3 -> 47.0 / 261.7 -> 237.5, 4 tokens 87.4 -> 69.3 / 474.5 -> 415.5). At 8 tokens the sweep's gain was 3-4%
    and the engine's batch-8 decode step got 9% slower on it (throughput_20261201c_mxfp8_decode.json: 5.67 vs
    5.21 ms), so the MMA blocks serve from 5 tokens. fp32 accumulation in another order than the MMA path: the
    reference's sum to fp32 noise.
    MXFP8 tiles load their weights by tensor descriptor (TMA) and, below 128 rows, take 128 weight rows by 64
    columns a step (moe_tma_sweep.json, H200, against the 64 x 128 register-loaded tiles, same run; uneven routing
    included): moonlight 64..512 tokens 1.05-1.19x, deepseek-v3 64..1024 1.08-1.21x; at 128 rows TMA alone
    1.02-1.13x. The profile behind it (ncu, moonlight 256 tokens): the register-loaded gate_up tile held 220
    registers a thread (2 programs an SM) and issued an instruction every ~3.4 cycles: bound by issue and
    occupancy, not by HBM (28% of its bandwidth).
    BN_DOWN: the down kernel's N tile (over the `hidden` size D) where it differs from gate_up's. 128-row MXFP8
    tiles take 128 columns there (gate_up keeps 64: it dequantizes a gate and an up tile a step), and 128-row tiles
    of either format take 256 from D = 4096 (moe_down_tiles.json, H200, whole fused MoE, same bits: MXFP8 moonlight
    1024 / 2048 / 8192 tokens 461 -> 436, 866 -> 824, 3052 -> 2655 us; deepseek-v3 D = 7168, 2048 / 4096 / 8192
    tokens 8273 -> 7833, 13270 -> 11906, 23058 -> 20413 us; bf16 deepseek-v3 1.05-1.08x; 256 columns on moonlight's
    D = 2048 lost 1-5%; on the shorter tiles other widths moved by up to 5%, no more than two graphs of one
    unchanged config differed in the same run (up to 5.6%), so those keep one N tile)."""
    if quant and T <= 2:
        return dict(BM=1, BN=64, BK=128, num_warps=4, num_stages=3, GEMV=True, SPLIT_GU=4, SPLIT_DOWN=4)
    if quant and T <= 4:
        return dict(BM=1, BN=64, BK=128, num_warps=4, num_stages=3, GEMV=True)
    r = T * topk / max(1, experts)
    bm = 16 if r <= (16 if quant else 12) else 32 if r < 32 else 64 if r < 64 else 128
    if quant and GROUP_MIN_ROWS < r < 32:
        return dict(BM=16, BN=128, BK=64, num_warps=4, num_stages=3, USE_TMA=True, GROUP=2)
    if quant and bm < 128:
        return dict(BM=bm, BN=128, BK=64, num_warps=4, num_stages=3, USE_TMA=True)
    if bm < 128:
        return dict(BM=bm, BN=64, BK=128, num_warps=4, num_stages=3)
    bn_down = 256 if hidden >= 4096 else 128
    if quant:  # gate_up dequantizes two weight tiles a step: narrower N tiles there
        return dict(BM=128, BN=64, BN_DOWN=bn_down, BK=64, num_warps=8, num_stages=3, USE_TMA=True)
    return dict(BM=128, BN=128, BN_DOWN=bn_down, BK=64, num_warps=8, num_stages=3)


# MXFP8 tiles from more than this many rows an expert on average up to 32: 16-row blocks in groups of two
# (`GROUP`, triton_moe.py: a group's weight tiles dequantized once for both blocks); moe_config's docstring
GROUP_MIN_ROWS = 12

DEQUANT_ONCE_MIN_ROWS = 512


def dequant_once(T: int, topk: int, experts: int) -> bool:
    """Whether an MXFP8 MoE call of T tokens dequantizes all expert weights once into a bf16 workspace and runs
    the bf16 tiles (when the caller provides one), instead of dequantizing each weight tile once per 128-row block:
    from 512 rows an expert on average (moe_prefill_tiles_20261201_*.json, H200, same run: moonlight 8192 / 16384
    tokens 3085 -> 2433 / 5902 -> 4533 us, the dequantize pass 454 us of it; at 4096 tokens, 384 rows, 1517 vs 1548;
    deepseek-v3's pass takes 9.3 ms, more than it saves at 2048..8192 tokens, 64..256 rows)."""
    return T * topk >= DEQUANT_ONCE_MIN_ROWS * max(1, experts)


COPY_MIN_ROWS = 64


def copy_serves(T: int, topk: int, experts: int) -> bool:
    """Whether an MXFP8 MoE call of T tokens runs the bf16 tiles on exact bf16 copies of the experts (when the caller
    keeps them: the engine's `mxfp8_moe_bf16_copy`) instead of the MXFP8 tiles: from 64 rows an expert on average,
    the tier where the tiles are 128 rows tall and each block dequantizes its expert's weights again
    (moe_down_tiles.json, H200, whole MoE, today's configs: bf16 / MXFP8 tiles moonlight 1024 / 2048 / 8192 tokens
    405 / 436, 640 / 824, 2084 / 2655 us; deepseek-v3 2048 / 4096 / 8192 7405 / 7833, 9639 / 11906, 15622 / 20413;
    uneven routing at 1024 tokens 441 / 537, moe.json). Below it the MXFP8 tiles win (moonlight 512 tokens 343 / 283,
    deepseek-v3 1024 6875 / 5203 us) and run."""
    return T * topk >= COPY_MIN_ROWS * max(1, experts)
