"""MoE: the router contract against HF's DeepseekV3MoE block, the grouped-expert seam, and (on sm90)
the Triton fused MoE against the reference (align-block-size: test_moe_align.py)."""
from __future__ import annotations

import pytest
import torch

from mxroll.model import ModelConfig
from mxroll.model.moe import MoE
from mxroll.precision import GemmConfig, MXFP8Tensor
from mxroll.precision.moe import experts_ref

transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                          reason="needs an sm90 GPU")


def block_pair(n_group, topk_group, norm, scale, dtype=torch.float32, E=16, K=4, seed=0):
    from tests.conftest import BASE
    d = dict(BASE, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group, topk_group=topk_group,
             norm_topk_prob=norm, routed_scaling_factor=scale, first_k_dense_replace=0, q_lora_rank=None,
             num_hidden_layers=1, n_shared_experts=1)
    hf_cfg = transformers.DeepseekV3Config(**d)
    hf_cfg._experts_implementation = "eager"
    hf = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(hf_cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        hf.gate.e_score_correction_bias.copy_(0.1 * torch.randn(E, generator=g))
    ours = MoE(ModelConfig.from_dict(dict(d, model_type="deepseek_v3")), dtype)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias.float())
        ours.experts.w13_weight.copy_(hf.experts.gate_up_proj)
        ours.experts.w2_weight.copy_(hf.experts.down_proj)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, n).weight.copy_(getattr(hf.shared_experts, n).weight)
    return hf, ours


@pytest.mark.parametrize("n_group, topk_group, norm", [(1, 1, True), (4, 2, True), (4, 2, False), (8, 2, True)])
def test_moe_block_matches_hf(n_group, topk_group, norm):
    hf, ours = block_pair(n_group, topk_group, norm, 2.446)
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x)[0] if isinstance(hf(x), tuple) else hf(x)
    got = ours(x[0])
    assert (got - ref[0]).abs().max() / ref.abs().max() < 1e-5


def test_routed_scaling_factor_applied_exactly_once():
    """Equal to HF's block with the factor, and measurably different from the same block with the
    factor applied zero times or twice: fails if the factor is dropped or doubled anywhere."""
    hf, ours = block_pair(4, 2, True, 2.5)
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(2))
    got = ours(x[0])
    outs = {}
    for factor in (1.0, 2.5, 6.25):
        hf.gate.routed_scaling_factor = factor
        with torch.no_grad():
            outs[factor] = hf(x)[0]
    assert (got - outs[2.5]).abs().max() < 1e-5
    assert (got - outs[1.0]).abs().max() > 1e-2 and (got - outs[6.25]).abs().max() > 1e-2


def qdq(t):
    scale, data = mx.to_mx(t.float().contiguous(), torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
    return mx.to_dtype(data, scale, torch.float8_e4m3fn, 32, torch.float32).to(t.dtype)


def test_mxfp8_experts_match_hf_block_with_trainer_emulation():
    hf, ours = block_pair(4, 2, True, 2.446, dtype=torch.float64, E=16, K=4, seed=3)
    with torch.no_grad():
        hf.experts.gate_up_proj.copy_(qdq(hf.experts.gate_up_proj))
        hf.experts.down_proj.copy_(qdq(hf.experts.down_proj))
    w13 = MXFP8Tensor.quantize(ours.experts.w13_weight.float())
    w2 = MXFP8Tensor.quantize(ours.experts.w2_weight.float())
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights, ids = ours.gate(x)
    got = experts_ref(x, ids, weights, w13, w2, GemmConfig("w8a8"))
    original = torch.nn.functional.linear
    torch.nn.functional.linear = lambda a, w, b=None: original(qdq(a), w, b)
    try:
        with torch.no_grad():
            ref = hf.experts(x, ids, weights.to(torch.float64))
    finally:
        torch.nn.functional.linear = original
    assert (got - ref).abs().max() / ref.abs().max() < 1e-6  # fp32 combine; a quantization slip is ~1e-2


def moe_case(T, E, K, D, F, quant, hot=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16)
    ids = torch.rand(T, E, device="cuda", generator=g).argsort(dim=1)[:, :K]
    if hot:
        ids[:, 0] = 3
    w = torch.rand(T, K, device="cuda", generator=g) * 2.5
    w13 = (torch.randn(E, 2 * F, D, device="cuda", generator=g) / D ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, D, F, device="cuda", generator=g) / F ** 0.5).to(torch.bfloat16)
    if quant:
        w13, w2 = MXFP8Tensor.quantize(w13), MXFP8Tensor.quantize(w2)
    return x, ids, w, w13, w2


@cuda
@pytest.mark.parametrize("quant, act_mode", [(False, "w8a8"), (True, "w8a8"), (True, "w8a16")])
def test_fused_moe_matches_reference(quant, act_mode):
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    for T, hot in ((1, False), (2, False), (5, True), (16, False), (64, False), (100, True), (300, False),
                   (500, True), (1000, False), (8192, False)):  # every tile height of moe_config (64 experts, top-6)
        x, ids, w, w13, w2 = moe_case(T, 64, 6, 256, 160, quant, hot, seed=T)
        y = fused_moe_triton(x, ids, w, w13, w2, act_mode)
        ref = experts_ref(x, ids, w, w13, w2, GemmConfig(act_mode))
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        assert y.shape == ref.shape and torch.isfinite(y).all() and err < 1e-2, (T, err)


def test_moe_config_follows_rows_per_expert():
    """Tile height by average rows per expert (T * top_k / experts), not by token count alone."""
    from mxroll.precision.kernels.moe_config import moe_config
    for quant in (False, True):
        # 1024 tokens: 96 rows per expert on a moonlight shape (64 experts, top-6), 32 on deepseek-v3 (256, top-8)
        assert moe_config(1024, quant, 6, 64)["BM"] == 128 and moe_config(1024, quant, 8, 256)["BM"] == 64
        assert moe_config(128, quant, 8, 256)["BM"] == 16
        heights = [moe_config(T, quant, 6, 64)["BM"] * moe_config(T, quant, 6, 64).get("GROUP", 1)
                   for T in range(5, 4097, 7)]  # rows a program multiplies at most
        assert heights == sorted(heights) and set(heights) == {16, 32, 64, 128}
    # MXFP8 from 12 rows an expert up to 32: 16-row blocks in groups of two (moonlight 256 tokens: 24 rows);
    # bf16 keeps 32-row tiles there, and neither format groups elsewhere
    assert moe_config(256, True, 6, 64) == dict(moe_config(256, True, 6, 64), BM=16, GROUP=2)
    assert moe_config(256, False, 6, 64)["BM"] == 32 and "GROUP" not in moe_config(256, False, 6, 64)
    assert [T for T in range(5, 4097) if moe_config(T, True, 6, 64).get("GROUP")] == list(range(129, 342))
    assert not any(moe_config(T, False, 6, 64).get("GROUP") for T in range(1, 4097, 7))
    # TMA weight loads are for MXFP8 tiles only (the kernel rejects them for bf16 experts)
    assert all(moe_config(T, True, 6, 64).get("USE_TMA") for T in range(5, 4097, 7))
    assert not any(moe_config(T, False, 6, 64).get("USE_TMA") for T in range(1, 4097, 7))
    assert moe_config(1, True, 8, 256).get("GEMV") and moe_config(4, True, 8, 256).get("GEMV")
    assert not moe_config(5, True, 8, 256).get("GEMV") and not moe_config(1, False, 8, 256).get("GEMV")
    # the down kernel's N tile: 128 for 128-row MXFP8 tiles (gate_up keeps 64), 256 from a 4096-wide hidden size
    tall_q, tall_b = moe_config(2048, True, 6, 64, 2048), moe_config(2048, False, 6, 64, 2048)
    assert (tall_q["BN"], tall_q["BN_DOWN"], tall_b["BN"], tall_b["BN_DOWN"]) == (64, 128, 128, 128)
    assert moe_config(4096, True, 8, 256, 7168)["BN_DOWN"] == moe_config(4096, False, 8, 256, 7168)["BN_DOWN"] == 256
    assert "BN_DOWN" not in moe_config(512, True, 6, 64, 2048) and "BN_DOWN" not in moe_config(64, False, 8, 256, 7168)


def test_bf16_copies_serve_from_64_rows_an_expert():
    """Kept bf16 expert copies serve the calls of the 128-row tier (64+ rows an expert on average)."""
    from mxroll.precision.kernels.moe_config import copy_serves, moe_config
    assert not copy_serves(682, 6, 64) and copy_serves(683, 6, 64) and copy_serves(8192, 6, 64)
    assert not copy_serves(2047, 8, 256) and copy_serves(2048, 8, 256)
    assert all(copy_serves(T, 6, 64) == (moe_config(T, True, 6, 64)["BM"] == 128) for T in range(5, 4097, 7))


def test_dequant_once_from_512_rows_an_expert():
    """The fused MoE dequantizes MXFP8 experts once (into a workspace) from 512 rows an expert on average."""
    from mxroll.precision.kernels.moe_config import dequant_once
    assert not dequant_once(4096, 6, 64) and dequant_once(8192, 6, 64)  # moonlight: 384 / 768 rows an expert
    assert not dequant_once(8192, 8, 256) and dequant_once(16384, 8, 256)  # deepseek-v3: 256 / 512
    assert dequant_once(2048, 2, 8) and not dequant_once(2047, 2, 8)


@cuda
@pytest.mark.parametrize("act_mode", ["w8a8", "w8a16"])
def test_fused_moe_dequantize_once_into_the_workspace(act_mode):
    """With a workspace at dequant-once sizes: the experts dequantized exactly into it, the bf16 tiles, h still
    quantize-dequantized for w8a8: against the reference as the MXFP8 tiles are, within a few bf16 roundings of
    them, deterministic, whatever the workspace held before; below the size, or without a workspace, the MXFP8
    tiles' bits; a workspace too small, or not bf16, is an error naming it."""
    from mxroll.precision.kernels.moe_config import dequant_once
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    T, E, K, D, F = 2048, 8, 2, 256, 160
    assert dequant_once(T, K, E)
    x, ids, w, w13, w2 = moe_case(T, E, K, D, F, True, hot=True, seed=3)
    ws = torch.full((3 * E * F * D,), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = fused_moe_triton(x, ids, w, w13, w2, act_mode, workspace=ws)
    tiles = fused_moe_triton(x, ids, w, w13, w2, act_mode)
    ref = experts_ref(x, ids, w, w13, w2, GemmConfig(act_mode)).float()
    err, err_tiles = (((v.float() - ref).norm() / ref.norm()).item() for v in (y, tiles))
    assert torch.isfinite(y).all() and err < 1e-2 and err < 2 * err_tiles + 1e-3, (err, err_tiles)
    assert ((y.float() - tiles.float()).norm() / tiles.float().norm()).item() < 1e-2
    assert torch.equal(ws[:E * 2 * F * D].view(E, 2 * F, D), w13.dequantize())  # exact, in place
    ws.fill_(float("nan"))
    assert torch.equal(fused_moe_triton(x, ids, w, w13, w2, act_mode, workspace=ws), y)
    small = fused_moe_triton(x[:1000], ids[:1000], w[:1000], w13, w2, act_mode, workspace=ws)
    assert torch.equal(small, fused_moe_triton(x[:1000], ids[:1000], w[:1000], w13, w2, act_mode))
    for bad in (ws[:100], ws.float()):
        with pytest.raises(ValueError, match="workspace"):
            fused_moe_triton(x, ids, w, w13, w2, act_mode, workspace=bad)


@cuda
def test_fused_moe_all_tokens_on_one_expert_and_determinism():
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    x, ids, w, w13, w2 = moe_case(300, 8, 1, 128, 64, True)
    ids[:] = 5
    y = fused_moe_triton(x, ids, w, w13, w2)
    ref = experts_ref(x, ids, w, w13, w2, GemmConfig("w8a8"))
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert all(torch.equal(fused_moe_triton(x, ids, w, w13, w2), y) for _ in range(10))



@cuda
@pytest.mark.parametrize("quant", [False, True])
def test_fused_moe_adds_the_shared_output_as_torch_does(quant):
    """The combine pass adds the shared experts' output: the bits of `fused_moe(...) + shared` in bf16."""
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    for T in (1, 64, 300):
        x, ids, w, w13, w2 = moe_case(T, 64, 6, 256, 160, quant, False, seed=T)
        shared = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
        y = fused_moe_triton(x, ids, w, w13, w2, "w8a8", shared_TD=shared)
        assert torch.equal(y, fused_moe_triton(x, ids, w, w13, w2, "w8a8") + shared), T


DECODE_VARIANTS = {  # the optional moe_config keys (benchmarks/moe_split_sweep.py)
    "split": dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3, SPLIT_GU=4, SPLIT_DOWN=3),
    "split_bn32_bk64": dict(BM=16, BN=32, BK=64, num_warps=8, num_stages=4, SPLIT_GU=2, SPLIT_DOWN=8),
    "tma": dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4, USE_TMA=True),
    "tma_split": dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4, USE_TMA=True, SPLIT_GU=2, SPLIT_DOWN=2),
    "gemv": dict(BM=1, BN=64, BK=128, num_warps=4, num_stages=3, GEMV=True),
    "gemv_split": dict(BM=2, BN=32, BK=64, num_warps=4, num_stages=3, GEMV=True, SPLIT_GU=3, SPLIT_DOWN=2),
}


@cuda
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("variant", sorted(DECODE_VARIANTS))
def test_fused_moe_decode_variants_match_reference(variant, quant):
    """Every optional decode config against the reference at pair-path and sorted-path token counts, on a
    shape whose F is not a multiple of BN (masked N tiles, TMA rows reaching into the next expert) and not a
    multiple of BK * splits (a short last split); every variant is deterministic, and split-K leaves its
    arrival counters at zero (a second call would skip or repeat the sum otherwise)."""
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    cfg = DECODE_VARIANTS[variant]
    if cfg.get("USE_TMA") and not quant:
        with pytest.raises(ValueError, match="USE_TMA"):
            fused_moe_triton(*moe_case(1, 16, 6, 512, 224, quant)[:5], "w8a8", config=cfg)
        return
    for T in (1, 3, 5, 12, 64):
        x, ids, w, w13, w2 = moe_case(T, 16, 6, 512, 224, quant, hot=T == 12, seed=T)
        y = fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=cfg)
        ref = experts_ref(x, ids, w, w13, w2, GemmConfig("w8a8"))
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        assert y.shape == ref.shape and torch.isfinite(y).all() and err < 1e-2, (T, err)
        assert torch.equal(fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=cfg), y)


@cuda
def test_fused_moe_tma_loads_keep_the_bits():
    """TMA only changes how the weight tile reaches the SM: same products, same MMA order, same bits."""
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    cfg = DECODE_VARIANTS["tma"]
    for T in (1, 12):
        x, ids, w, w13, w2 = moe_case(T, 16, 6, 512, 224, True, seed=T)
        y = fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=cfg)
        assert torch.equal(fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=dict(cfg, USE_TMA=False)), y)


@cuda
@pytest.mark.parametrize("quant", [False, True])
def test_fused_moe_grouped_blocks_keep_the_bits(quant):
    """GROUP: the first block of each GROUP consecutive blocks of an expert's run multiplies all of them, each weight
    tile loaded (and dequantized) once; every block keeps its own accumulator over the same K steps, so the bits are
    GROUP=1's. Hot routing: one expert with a run of many blocks (groups cut short at its end), others of one or
    two blocks, empty experts; a shape whose D and F are not multiples of the tiles."""
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    for T, BM, bn, warps in ((60, 16, 128, 4), (150, 32, 128, 8), (300, 64, 128, 8)):
        x, ids, w, w13, w2 = moe_case(T, 16, 6, 352, 224, quant, hot=True, seed=T)
        cfg = dict(BM=BM, BN=bn, BK=64, num_warps=warps, num_stages=3, USE_TMA=quant)
        base = fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=cfg)
        for group in (2, 4):
            y = fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=dict(cfg, GROUP=group))
            assert torch.equal(y, base), (T, BM, group)
        ref = experts_ref(x, ids, w, w13, w2, GemmConfig("w8a8"))
        assert ((base.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    for bad in (dict(cfg, GROUP=3), dict(cfg, GROUP=2, SPLIT_GU=2)):
        with pytest.raises(ValueError, match="GROUP"):
            fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=bad)


@cuda
@pytest.mark.parametrize("quant", [False, True])
def test_fused_moe_down_tile_width(quant):
    """The down kernel's own N tile (BN_DOWN, narrower or wider than gate_up's, D not a multiple of it) changes no
    bit: each output element sums the same K steps in the same order; the default config at 128-row tiles uses it."""
    from mxroll.precision.kernels.moe_config import moe_config
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    T = 200  # 75 rows an expert: 128-row tiles
    x, ids, w, w13, w2 = moe_case(T, 16, 6, 352, 224, quant, seed=3)
    cfg = moe_config(T, quant, 6, 16, 352)
    assert cfg["BM"] == 128 and cfg["BN_DOWN"] == 128
    base = fused_moe_triton(x, ids, w, w13, w2, "w8a8", config={k: v for k, v in cfg.items() if k != "BN_DOWN"})
    assert torch.equal(fused_moe_triton(x, ids, w, w13, w2, "w8a8"), base)
    for bn in (64, 256):
        assert torch.equal(fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=dict(cfg, BN_DOWN=bn)), base), bn
    ref = experts_ref(x, ids, w, w13, w2, GemmConfig("w8a8"))
    assert ((base.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@cuda
def test_fused_moe_runs_large_calls_on_bf16_copies(monkeypatch):
    """bf16_copy: from 64 rows an expert the call runs the bf16 tiles on the copies (the bits of the dequantize-once
    workspace path; NaN copies show they are read), below it the MXFP8 tiles (the copies are not read); bad copies
    are rejected."""
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    x, ids, w, w13, w2 = moe_case(300, 16, 6, 352, 224, True, seed=5)  # 112 rows an expert
    copy = (w13.dequantize(torch.bfloat16).contiguous(), w2.dequantize(torch.bfloat16).contiguous())
    ws = torch.empty(3 * 16 * 224 * 352, dtype=torch.bfloat16, device="cuda")
    with_copy = fused_moe_triton(x, ids, w, w13, w2, "w8a8", bf16_copy=copy)
    from mxroll.precision.kernels import moe_config
    monkeypatch.setattr(moe_config, "DEQUANT_ONCE_MIN_ROWS", 64)  # the workspace path at this size: bf16 tiles
    assert torch.equal(fused_moe_triton(x, ids, w, w13, w2, "w8a8", workspace=ws), with_copy)
    monkeypatch.undo()
    nan = (torch.full_like(copy[0], float("nan")), torch.full_like(copy[1], float("nan")))
    assert torch.isnan(fused_moe_triton(x, ids, w, w13, w2, "w8a8", bf16_copy=nan)).all()
    xs, ids_s, w_s = x[:40], ids[:40], w[:40]  # 15 rows an expert: MXFP8 tiles, copies unread
    assert torch.equal(fused_moe_triton(xs, ids_s, w_s, w13, w2, "w8a8", bf16_copy=nan),
                       fused_moe_triton(xs, ids_s, w_s, w13, w2, "w8a8"))
    ref = experts_ref(x, ids, w, w13, w2, GemmConfig("w8a8"))
    assert ((with_copy.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    with pytest.raises(ValueError, match="bf16 copies"):
        fused_moe_triton(x, ids, w, w13, w2, "w8a8", bf16_copy=(copy[0][:8], copy[1]))


@cuda
@pytest.mark.parametrize("quant", [False, True])
def test_fused_moe_rows_gemv_path(quant, monkeypatch):
    """With the path on for one and two tokens, triton_moe_gemv (whole weight rows per program): against the tile
    path of the same call to fp32-summation noise (a bf16 ulp here and there), the same bits twice, x_qdq honoured;
    turning the path off gives the tile path's bits."""
    from mxroll.precision.kernels import triton_moe_gemv
    from mxroll.precision.kernels.moe_config import moe_config
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    from mxroll.precision.mxfp8 import MXFP8Tensor as MX
    for T in (1, 2):
        monkeypatch.setattr(triton_moe_gemv, "MAX_TOKENS_MXFP8", 2)
        monkeypatch.setattr(triton_moe_gemv, "MAX_TOKENS_BF16", 2)
        x, ids, w, w13, w2 = moe_case(T, 16, 6, 352, 224, quant, seed=T)
        assert triton_moe_gemv.serves(T, quant)
        y = fused_moe_triton(x, ids, w, w13, w2, "w8a8")
        tiles = fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=moe_config(T, quant, 6, 16))
        err = ((y.float() - tiles.float()).norm() / tiles.float().norm()).item()
        assert err < 5e-3 and torch.equal(fused_moe_triton(x, ids, w, w13, w2, "w8a8"), y), (T, err)
        if quant:
            xq = MX.quantize(x).dequantize(torch.bfloat16)
            assert torch.equal(fused_moe_triton(xq, ids, w, w13, w2, "w8a8", x_qdq=True),
                               fused_moe_triton(xq, ids, w, w13, w2, "w8a8"))
        monkeypatch.setattr(triton_moe_gemv, "MAX_TOKENS_MXFP8" if quant else "MAX_TOKENS_BF16", 0)
        assert torch.equal(fused_moe_triton(x, ids, w, w13, w2, "w8a8"), tiles)
        monkeypatch.undo()
