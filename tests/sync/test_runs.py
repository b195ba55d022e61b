"""Neighbouring views merge into one view (only exact neighbours of one storage, dtype and device)."""
import torch

from mxroll.sync.runs import merge_pairs, merge_views


def test_neighbours_merge_and_the_merged_view_covers_exactly_their_bytes():
    arena = torch.arange(40, dtype=torch.float32)
    a, b, c = arena[0:10], arena[10:16].view(2, 3), arena[20:30]  # a|b neighbours, gap before c
    runs = merge_views([a, b, c])
    assert [idx for _, idx in runs] == [[0, 1], [2]]
    assert torch.equal(runs[0][0], arena[:16]) and runs[1][0] is c


def test_no_merge_across_storages_dtypes_or_strides():
    x, y = torch.zeros(8), torch.zeros(8)
    assert len(merge_views([x, y])) == 2
    raw = torch.zeros(16, dtype=torch.uint8)
    assert len(merge_views([raw[:8], raw[8:].view(torch.int16)])) == 2
    m = torch.zeros(4, 4)
    assert len(merge_views([m[:, 0], m[:, 1]])) == 2  # strided columns are not contiguous


def test_pairs_merge_only_when_both_sides_are_neighbours():
    dest, src = torch.zeros(30), torch.arange(30, dtype=torch.float32)
    pairs = [(dest[0:10], src[0:10]), (dest[10:20], src[10:20]), (dest[20:30], src[25:30].repeat(2))]
    merged = merge_pairs(pairs)
    assert len(merged) == 2
    for d, s in merged:
        d.copy_(s)
    assert torch.equal(dest[:20], src[:20]) and torch.equal(dest[20:], src[25:30].repeat(2))
    cast = merge_pairs([(dest[0:10], src[0:10].double()), (dest[10:20], src[10:20].double())])
    assert len(cast) == 2  # a copy that casts is never merged
