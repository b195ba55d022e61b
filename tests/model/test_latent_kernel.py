"""The Triton latent cache write (model.kernels.triton_latent) against what it replaces: the Triton norm's
output (model.kernels.triton_norm), its MXFP8 quantize-dequantize (precision fake_quant), the index copies
at the slots. Bit for bit. Runs on a CUDA GPU, or on CPU under TRITON_INTERPRET=1; skipped otherwise."""
from __future__ import annotations

import os

import pytest
import torch

from mxroll.model.kernels import ModelKernels
from mxroll.model.ops import absorb_ref, store_latent, store_latent_absorb, store_latent_ref
from mxroll.precision.kernels.mxfp8_gemm import fake_quant

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
# The interpreter rounds float -> bfloat16 toward zero (numpy has no bf16); fp16 rounds to nearest there.
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16
INTERPRETED = DEVICE == "cpu"


def inputs(T: int, C: int, R: int, N: int, seed: int):
    """kv as MLA has it (a split view of the kv_a projection), a contiguous rope key, distinct shuffled slots,
    caches filled with a sentinel pattern."""
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(T, C + R, generator=g) * 3).to(DEVICE, LOW)
    kv = proj[:, :C]
    k_pe = torch.randn(T, R, generator=g).to(DEVICE, LOW)
    w = (torch.rand(C, generator=g) + 0.5).to(DEVICE, LOW)
    slots = torch.randperm(N, generator=g)[:T].to(DEVICE)
    ckv = torch.randn(N, C, generator=g).to(DEVICE, LOW)
    kpe = torch.randn(N, R, generator=g).to(DEVICE, LOW)
    return kv, k_pe, w, slots, ckv, kpe


@pytest.mark.parametrize("qdq", [None, "rceil", "floor"])
@pytest.mark.parametrize("T,C,R", [(1, 512, 64), (5, 512, 64), (3, 96, 32)])  # moonlight's latent; a padded width
def test_triton_latent_write_is_the_triton_norm_and_index_copies(qdq, T, C, R):
    from mxroll.model.kernels.triton_latent import store_latent_triton
    from mxroll.model.kernels.triton_norm import rmsnorm_triton

    kv, k_pe, w, slots, ckv, kpe = inputs(T, C, R, N=3 * T + 4, seed=T * C + R)
    ref_ckv, ref_kpe = ckv.clone(), kpe.clone()
    normed = rmsnorm_triton(kv, w, 1e-6)
    ref_ckv[slots] = normed if qdq is None else fake_quant(normed, qdq)
    ref_kpe[slots] = k_pe
    store_latent_triton(ckv, kpe, slots, kv, k_pe, w, 1e-6, qdq)
    assert torch.equal(kpe, ref_kpe)  # untouched rows included
    if qdq is None or not INTERPRETED:
        assert torch.equal(ckv, ref_ckv)
    else:  # the interpreter's e4m3 cast does not round to nearest: the rows and blocks, not the rounding
        rest = torch.ones(ckv.shape[0], dtype=torch.bool, device=DEVICE)
        rest[slots] = False
        assert torch.equal(ckv[rest], ref_ckv[rest]) and (ckv[slots] == ref_ckv[slots]).float().mean() > 0.9
    if qdq is not None:  # the rounding is not the identity on these values
        assert not torch.equal(ckv[slots], normed)


@pytest.mark.parametrize("qdq", [None, "rceil"])
def test_store_latent_dispatch_triton_equals_the_torch_path_on_the_triton_norm(qdq):
    """What MLA.store_latents runs: ModelKernels(latent="triton") vs the separate kernels (latent="torch")."""
    kv, k_pe, w, slots, ckv, kpe = inputs(4, 512, 64, N=20, seed=7)
    old_ckv, old_kpe = ckv.clone(), kpe.clone()
    store_latent(old_ckv, old_kpe, slots, kv, k_pe, w, 1e-6, "triton", qdq, backend="torch")
    store_latent(ckv, kpe, slots, kv, k_pe, w, 1e-6, "triton", qdq, backend="triton")
    assert torch.equal(kpe, old_kpe)
    if qdq is not None and INTERPRETED:
        pytest.skip("the interpreter's e4m3 cast does not round to nearest (the GPU run checks this case)")
    assert torch.equal(ckv, old_ckv)
    # and the torch reference norm: the same up to the fp32 sum order (one step of a few values at most)
    ref_ckv, ref_kpe = ckv.clone(), kpe.clone()
    store_latent_ref(ref_ckv, ref_kpe, slots, kv, k_pe, w, 1e-6, "torch", qdq)
    assert torch.equal(kpe, ref_kpe) and (ckv == ref_ckv).float().mean() > 0.99


def test_triton_latent_needs_the_triton_norm():
    with pytest.raises(ValueError, match="norm"):
        ModelKernels(norm="torch", latent="triton")
    kv, k_pe, w, slots, ckv, kpe = inputs(2, 96, 32, N=6, seed=1)
    with pytest.raises(ValueError, match="norm"):
        store_latent(ckv, kpe, slots, kv, k_pe, w, 1e-6, "torch", None, backend="triton")


def absorb_inputs(T: int, H: int, P: int, V: int, C: int, seed: int):
    """q_nope as MLA has it (a split view of q [T, H, P + R]) and W_UK as rows of kv_b_proj [H, P + V, C]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, P + 16, generator=g).to(DEVICE, LOW)
    kv_b = (torch.randn(H, P + V, C, generator=g) * 0.1).to(DEVICE, LOW)
    return q[..., :P], kv_b[:, :P]


@pytest.mark.parametrize("qdq", [None, "rceil"])
@pytest.mark.parametrize("T,H,P,C,R", [(1, 16, 128, 512, 64), (4, 16, 128, 512, 64), (19, 3, 24, 96, 32)])
def test_latent_absorb_is_the_store_and_the_absorb(qdq, T, H, P, C, R):
    """One launch = store_latent_triton's bits in the caches + absorb's bmm to the fp32 sum order (19 tokens: more
    than one 16-row block; P and C not powers of two)."""
    from mxroll.model.kernels.triton_latent import latent_absorb_triton, store_latent_triton

    kv, k_pe, w, slots, ckv, kpe = inputs(T, C, R, N=3 * T + 4, seed=T + C)
    q_nope, w_uk = absorb_inputs(T, H, P, 32, C, seed=T)
    ref_ckv, ref_kpe = ckv.clone(), kpe.clone()
    store_latent_triton(ref_ckv, ref_kpe, slots, kv, k_pe, w, 1e-6, qdq)
    q_lat = latent_absorb_triton(ckv, kpe, slots, kv, k_pe, w, 1e-6, qdq, q_nope, w_uk)
    assert torch.equal(ckv, ref_ckv) and torch.equal(kpe, ref_kpe)
    assert q_lat.shape == (T, H, C) and q_lat.is_contiguous()
    exact = torch.einsum("thp,hpc->thc", q_nope.double(), w_uk.double())
    ref = absorb_ref(q_nope, w_uk)
    tol = 2 * (exact.abs() * 2.0 ** -8 + 1e-6)  # a rounding of the fp32 sum, in either order (bf16: 8 bits)
    assert ((q_lat.double() - exact).abs() <= tol).all() and ((ref.double() - exact).abs() <= tol).all()
    assert (q_lat == ref).float().mean() > 0.95  # mostly the same bits: only the fp32 sum order differs


def test_store_latent_absorb_dispatch():
    kv, k_pe, w, slots, ckv, kpe = inputs(3, 512, 64, N=12, seed=3)
    q_nope, w_uk = absorb_inputs(3, 16, 128, 128, 512, seed=4)
    old_ckv, old_kpe = ckv.clone(), kpe.clone()
    old = store_latent_absorb(old_ckv, old_kpe, slots, kv, k_pe, w, 1e-6, q_nope, w_uk, "triton", None, "torch")
    new = store_latent_absorb(ckv, kpe, slots, kv, k_pe, w, 1e-6, q_nope, w_uk, "triton", None, "triton")
    assert torch.equal(ckv, old_ckv) and torch.equal(kpe, old_kpe)
    assert (new.float() - old.float()).abs().max() <= 2.0 ** -7 * old.float().abs().max()
    with pytest.raises(ValueError, match="norm"):
        store_latent_absorb(ckv, kpe, slots, kv, k_pe, w, 1e-6, q_nope, w_uk, "torch", None, "triton")


def rope_inputs(T: int, H: int, R: int, seed: int):
    """q_pe as MLA has it (a split view of q [T, H, P + R]) and the cos / sin rows of T scattered positions."""
    import dataclasses

    from mxroll import configs
    from mxroll.model import ModelConfig
    from mxroll.model.rope import Rope
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(T, H, 24 + R, generator=g) * 4).to(DEVICE, LOW)
    cfg = dataclasses.replace(ModelConfig.from_file(configs.model_preset_path("tiny")), qk_rope_head_dim=R)  # YaRN
    cos, sin = Rope(cfg).cos_sin(torch.randint(0, 4000, (T,), generator=g).to(DEVICE))
    return q[..., 24:], (cos, sin)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("qdq", [None, "rceil"])
@pytest.mark.parametrize("T,H,P,C,R", [(1, 16, 128, 512, 64), (4, 16, 128, 512, 64), (3, 3, 24, 96, 32)])
def test_latent_absorb_with_rope_is_the_rope_kernel_then_the_launch(interleave, qdq, T, H, P, C, R):
    """With rope, the one launch also rotates q_pe and k_pe: the cache, q_lat and the rotated q_pe are the bits of
    rope_triton followed by the launch without rope (and rope_triton's are the reference's, test_rope_kernel)."""
    from mxroll.model.kernels.triton_latent import latent_absorb_triton
    from mxroll.model.kernels.triton_rope import rope_triton

    kv, k_pe, w, slots, ckv, kpe = inputs(T, C, R, N=3 * T + 4, seed=T + C + 1)
    q_nope, w_uk = absorb_inputs(T, H, P, 32, C, seed=T + 1)
    q_pe, (cos, sin) = rope_inputs(T, H, R, seed=T + 2)
    ref_ckv, ref_kpe = ckv.clone(), kpe.clone()
    ref_q_pe, ref_k_pe = rope_triton(q_pe, k_pe, (cos, sin), interleave)
    ref_q_lat = latent_absorb_triton(ref_ckv, ref_kpe, slots, kv, ref_k_pe, w, 1e-6, qdq, q_nope, w_uk)
    q_lat, q_pe_rot = latent_absorb_triton(ckv, kpe, slots, kv, k_pe, w, 1e-6, qdq, q_nope, w_uk,
                                           (q_pe, cos, sin, interleave))
    assert torch.equal(ckv, ref_ckv) and torch.equal(kpe, ref_kpe) and torch.equal(q_lat, ref_q_lat)
    assert q_pe_rot.shape == (T, H, R) and q_pe_rot.is_contiguous() and torch.equal(q_pe_rot, ref_q_pe)
    assert not torch.equal(q_pe_rot, q_pe.contiguous())  # rotated


def test_store_latent_absorb_dispatch_with_rope():
    """model.ops.store_latent_absorb's rope on both backends: the torch path rotates with rope_ref first."""
    from mxroll.model.ops import rope_ref
    kv, k_pe, w, slots, ckv, kpe = inputs(3, 512, 64, N=12, seed=5)
    q_nope, w_uk = absorb_inputs(3, 16, 128, 128, 512, seed=6)
    q_pe, cos_sin = rope_inputs(3, 16, 64, seed=7)
    old_ckv, old_kpe = ckv.clone(), kpe.clone()
    old, old_pe = store_latent_absorb(old_ckv, old_kpe, slots, kv, k_pe, w, 1e-6, q_nope, w_uk, "triton", None, "torch",
                                      (q_pe, cos_sin, False))
    new, new_pe = store_latent_absorb(ckv, kpe, slots, kv, k_pe, w, 1e-6, q_nope, w_uk, "triton", None, "triton",
                                      (q_pe, cos_sin, False))
    assert torch.equal(ckv, old_ckv) and torch.equal(kpe, old_kpe) and torch.equal(new_pe, old_pe)
    assert torch.equal(old_pe, rope_ref(q_pe, k_pe, cos_sin, False)[0])
    assert torch.equal(kpe[slots], rope_ref(q_pe, k_pe, cos_sin, False)[1])
    assert (new.float() - old.float()).abs().max() <= 2.0 ** -7 * old.float().abs().max()
