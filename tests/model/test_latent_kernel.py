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
