"""align-block-size: the torch-op version against the Python loop reference (always), and the Triton
counting sort against both, bit for bit (on CUDA, or on CPU under TRITON_INTERPRET=1 with tiny shapes)."""
from __future__ import annotations

import pytest
import torch

from mxroll.precision.kernels.moe_align import (align_block_size, align_block_size_ref, align_block_size_torch,
                                                block_first_ref, padded_rows)
from tests.kernel_device import SKIP_REASON, triton_runs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
triton_ok = pytest.mark.skipif(not triton_runs(), reason=SKIP_REASON)
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def routing(T, K, E, pattern, seed=0):
    """[T, K] int64 expert ids: K distinct experts per token ("random"), expert 0 in every token and the
    rest from the lower half ("hot": many experts get no row), or every row on expert E-1 ("one")."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "one":
        return torch.full((T, K), E - 1, dtype=torch.long)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if pattern == "hot":
        ids = torch.stack([torch.randperm(max(E // 2, K), generator=g)[:K] for _ in range(T)])
        ids[:, 0] = 0
    return ids


def check_against_ref(a, ids, E, BM):
    n = ids.numel()
    ref_ids, ref_exp = align_block_size_ref(ids, E, BM)
    R = padded_rows(n, E, BM)
    assert a.sorted_ids.dtype == a.block_expert.dtype == torch.int32
    assert a.sorted_ids.shape == (R,) and a.block_expert.shape == (R // BM,)
    assert a.sorted_ids[:len(ref_ids)].tolist() == ref_ids
    assert a.block_expert[:len(ref_exp)].tolist() == ref_exp
    assert (a.block_expert[len(ref_exp):] == E).all() and (a.sorted_ids[len(ref_ids):] == n).all()
    assert a.block_first.dtype == torch.int32 and a.block_first.tolist() == block_first_ref(ref_exp, R // BM)


def test_block_first_ref():
    """Runs [2, 2, 5, 7, 7, 7] then two blocks past the end."""
    assert block_first_ref([2, 2, 5, 7, 7, 7], 8) == [0, 0, 2, 3, 3, 3, 6, 7]


@pytest.mark.parametrize("T, K, E, BM", [(5, 2, 8, 4), (1, 6, 64, 16), (33, 3, 4, 16), (7, 1, 1, 8), (64, 8, 256, 16)])
def test_torch_path_matches_reference(T, K, E, BM):
    g = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if T > 5:
        ids[:, 0] = 0  # one hot expert; many experts get no token
    check_against_ref(align_block_size_torch(ids, E, BM), ids, E, BM)


def test_dispatch_on_cpu_is_the_torch_path():
    ids = routing(9, 3, 12, "hot")
    a, b = align_block_size(ids, 12, 16), align_block_size_torch(ids, 12, 16)
    assert torch.equal(a.sorted_ids, b.sorted_ids) and torch.equal(a.block_expert, b.block_expert)
    assert torch.equal(a.block_first, b.block_first)


def triton_matches(ids, E, BM, config=None):
    from mxroll.precision.kernels.triton_moe_align import align_block_size_triton
    got = align_block_size_triton(ids.to(DEVICE), E, BM, config=config)
    want = align_block_size_torch(ids, E, BM)
    if ids.numel() <= 8192:  # the Python loop is E passes over the ids
        check_against_ref(want, ids, E, BM)
    assert torch.equal(got.sorted_ids.cpu(), want.sorted_ids), (ids.shape, E, BM, config)
    assert torch.equal(got.block_expert.cpu(), want.block_expert), (ids.shape, E, BM, config)
    assert torch.equal(got.block_first.cpu(), want.block_first), (ids.shape, E, BM, config)


# (T, K, E, pattern): T*K of 1, 37*3 = 111 (no multiple of anything), E not a power of two, empty experts
SMALL = [(1, 1, 4, "random"), (37, 3, 6, "random"), (37, 3, 40, "hot"), (20, 2, 5, "one"), (16, 6, 64, "hot"),
         (23, 4, 33, "random")]


@triton_ok
@pytest.mark.parametrize("BM", [16, 64])
@pytest.mark.parametrize("T, K, E, pattern", SMALL)
def test_triton_one_launch(T, K, E, pattern, BM):
    triton_matches(routing(T, K, E, pattern, seed=T), E, BM)


@triton_ok
@pytest.mark.parametrize("BM", [16, 64])
@pytest.mark.parametrize("T, K, E, pattern", SMALL[1:])
@pytest.mark.parametrize("EPP", [1, 3])
def test_triton_chunked(T, K, E, pattern, BM, EPP):
    """Two launches: chunks of 32 ids (last one partial), EPP experts per program (E not a multiple)."""
    triton_matches(routing(T, K, E, pattern, seed=T + 1), E, BM, dict(CHUNK=32, EPP=EPP, num_warps=1))


@triton_ok
def test_triton_int32_ids():
    triton_matches(routing(19, 2, 10, "hot", seed=5).int(), 10, 16)


@gpu
@pytest.mark.parametrize("E, K", [(64, 6), (256, 8)])
@pytest.mark.parametrize("T", [1, 33, 256, 8192])
@pytest.mark.parametrize("BM", [16, 64, 128])
@pytest.mark.parametrize("pattern", ["random", "hot", "one"])
def test_triton_gpu_sizes(E, K, T, BM, pattern):
    ids = routing(T, K, E, pattern, seed=T)
    triton_matches(ids, E, BM)
    if T * K > 512:
        triton_matches(ids, E, BM, dict(CHUNK=512, EPP=2, num_warps=4))


@gpu
def test_triton_in_a_cuda_graph_follows_new_ids():
    """Captured once, replayed on other routings (and a different distribution): no host sync, no
    stale shape-dependent state; the dispatch point takes the Triton path on CUDA."""
    T, K, E, BM = 256, 6, 64, 16
    for n_tokens, chunked in ((T, False), (4096, True)):
        ids = torch.zeros(n_tokens, K, dtype=torch.long, device="cuda")
        ids.copy_(routing(n_tokens, K, E, "random", seed=0))
        align_block_size(ids, E, BM)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = align_block_size(ids, E, BM)
        for seed, pattern in ((1, "random"), (2, "hot"), (3, "one")):
            new = routing(n_tokens, K, E, pattern, seed=seed)
            ids.copy_(new)
            graph.replay()
            want = align_block_size_torch(new, E, BM)
            assert torch.equal(out.sorted_ids.cpu(), want.sorted_ids), (n_tokens, chunked, pattern)
            assert torch.equal(out.block_expert.cpu(), want.block_expert), (n_tokens, chunked, pattern)
            assert torch.equal(out.block_first.cpu(), want.block_first), (n_tokens, chunked, pattern)
