"""Cached layout permutations against torchao's independent 128x4 scale swizzle."""
from __future__ import annotations

import pytest
import torch

from mxroll.precision.layout import LayoutCache

utils = pytest.importorskip("torchao.prototype.mx_formats.utils")


@pytest.mark.parametrize("rows, cols", [(128, 4), (256, 64), (576, 224), (100, 3), (7168, 512), (1, 1)])
def test_128x4_swizzle_matches_torchao(rows, cols):
    scale = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    cache = LayoutCache()
    assert torch.equal(cache.apply("scale_128x4", scale), utils.to_blocked(scale))


def test_second_application_reuses_the_index():
    cache = LayoutCache()
    a = torch.randint(0, 255, (576, 64), dtype=torch.uint8)
    out = cache.apply("scale_128x4", a)
    assert (cache.builds, cache.hits) == (1, 0)
    b = torch.randint(0, 255, (576, 64), dtype=torch.uint8)
    cache.apply("scale_128x4", b, out=out)  # a weight update: in place, no new index
    assert (cache.builds, cache.hits) == (1, 1)
    assert torch.equal(out, utils.to_blocked(b))
    cache.apply("scale_128x4", torch.zeros(128, 4, dtype=torch.uint8))
    assert cache.builds == 2
