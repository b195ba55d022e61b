"""The Triton split-KV MLA decode kernel against its fp32 torch reference: shuffled pages, contexts that end
inside a page, on a page boundary and shorter than the split count, heads not a multiple of the head block,
q read through the absorbed bmm's strided [B, H, C] view, and the split merge."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_device import kernel_device

DEVICE, LOW = kernel_device()

from mxroll.rollout.attention.triton_mla import decode_splits, mla_decode_ref, mla_decode_triton  # noqa: E402


def paged_case(lens, heads, page, C=64, R=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    per_row = [-(-n // page) for n in lens]
    P = sum(per_row) + 3
    perm = torch.randperm(P, generator=g)[:sum(per_row)].to(torch.int32)  # scattered, some pages unused
    indptr = torch.tensor([0] + per_row, dtype=torch.int32).cumsum(0).to(torch.int32)
    ckv = torch.randn(P, page, C, generator=g).to(LOW)
    kpe = torch.randn(P, page, R, generator=g).to(LOW)
    q_HBC = torch.randn(heads, len(lens), C, generator=g).to(LOW)  # as the absorb bmm lays it out
    qpe = torch.randn(len(lens), heads, R, generator=g).to(LOW)
    dev = dict(device=DEVICE)
    return (q_HBC.to(**dev).transpose(0, 1), qpe.to(**dev), ckv.to(**dev), kpe.to(**dev), indptr.to(**dev),
            perm.to(**dev), torch.tensor(lens, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("splits", [1, 4, 16])
@pytest.mark.parametrize("lens, heads, page", [([1, 37, 64, 130], 16, 16), ([5, 200], 20, 64), ([33], 16, 1)])
def test_mla_decode_matches_reference(splits, lens, heads, page):
    args = paged_case(lens, heads, page, seed=splits)
    scale = 0.13
    out = torch.empty(len(lens), heads, args[0].shape[-1], dtype=LOW, device=DEVICE)
    mla_decode_triton(*args, scale, splits, out, block_n=16)
    ref = mla_decode_ref(*args, scale)
    err = (out.float() - ref).abs().max().item()
    assert err < 2e-2 * ref.abs().max().item(), err  # p rounded to the cache dtype before the PV product
    again = torch.empty_like(out)
    mla_decode_triton(*args, scale, splits, again, block_n=16)
    assert torch.equal(out, again)


@pytest.mark.parametrize("splits", [1, 4, 64])
@pytest.mark.parametrize("lens, heads, V, block_c", [([1, 37, 64, 130], 16, 32, 16), ([300], 20, 48, 64)])
def test_mla_decode_with_w_uv_is_the_merge_then_unabsorb(splits, lens, heads, V, block_c):
    """W_UV applied in the merge: the fp32 reference's values through W_UV, and the separate path (merge to the
    cache dtype, then MLA.unabsorb's bmm) to a rounding; latent columns in 4 blocks (their partials summed by the
    last program to arrive) or in one."""
    args = paged_case(lens, heads, 16, seed=splits + V)
    C = args[0].shape[-1]
    g = torch.Generator().manual_seed(V)
    w_uv = (torch.randn(heads, V, C, generator=g) * 0.2).to(DEVICE, LOW)
    out = torch.empty(len(lens), heads, V, dtype=LOW, device=DEVICE)
    mla_decode_triton(*args, 0.13, splits, out, block_n=16, w_uv_HVC=w_uv, block_c=block_c)
    ref = torch.einsum("bhc,hvc->bhv", mla_decode_ref(*args, 0.13), w_uv.float())
    assert (out.float() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    o_lat = torch.empty(len(lens), heads, C, dtype=LOW, device=DEVICE)
    mla_decode_triton(*args, 0.13, splits, o_lat, block_n=16)
    separate = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
    assert (out.float() - separate.float()).abs().max().item() <= 2.0 ** -7 * separate.float().abs().max().item()
    again = torch.empty_like(out)
    mla_decode_triton(*args, 0.13, splits, again, block_n=16, w_uv_HVC=w_uv, block_c=block_c)
    assert torch.equal(out, again)


def test_mla_decode_rejects_bad_input():
    q, qpe, ckv, kpe, indptr, idx, lens = paged_case([3], 16, 16)
    out = torch.empty(1, 16, 64, dtype=LOW, device=DEVICE)
    with pytest.raises(AssertionError):
        mla_decode_triton(q, qpe, ckv, kpe, indptr, idx, lens, 0.1, 3, out)  # splits not a power of two
    with pytest.raises(AssertionError):
        mla_decode_triton(q, qpe, ckv, kpe, indptr, idx.long(), lens, 0.1, 2, out)


def test_decode_splits_rule():
    assert decode_splits(1, 16, 132) == 64 and decode_splits(8, 16, 132) == 32 and decode_splits(128, 16, 132) == 2
    assert decode_splits(256, 16, 132) == 1 and decode_splits(1, 128, 132) == 32
    assert all(s & (s - 1) == 0 for s in (decode_splits(b, 16, 132) for b in range(1, 300)))
