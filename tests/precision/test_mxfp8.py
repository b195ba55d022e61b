"""MXFP8 quantize/dequantize: byte-identical to torchao's to_mx (RCEIL and FLOOR)."""
from __future__ import annotations

import pytest
import torch

from mxroll.precision.mxfp8 import MXFP8Tensor, dequantize, has_nonfinite, quantize

mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402

MODES = {"rceil": ScaleCalculationMode.RCEIL, "floor": ScaleCalculationMode.FLOOR}


def torchao_bytes(x: torch.Tensor, mode: str):
    scale, data = mx.to_mx(x.contiguous(), torch.float8_e4m3fn, 32, MODES[mode])
    return data.view(torch.uint8), scale.view(torch.uint8)


def assert_identical(x: torch.Tensor, mode: str):
    data, scale = quantize(x, scale_mode=mode)
    ref_data, ref_scale = torchao_bytes(x, mode)
    assert torch.equal(scale, ref_scale), f"scales differ at {torch.nonzero(scale != ref_scale)[:5].tolist()}"
    assert torch.equal(data.view(torch.uint8), ref_data), "element bytes differ"


def adversarial(dtype: torch.dtype) -> torch.Tensor:
    def block(base, **at):
        b = base.clone()
        for i, v in at.items():
            b[int(i[1:])] = v
        return b

    z = torch.zeros(32)
    ramp = torch.linspace(-1, 1, 32)
    rows = [z.clone(),                                   # all-zero block
            block(z, i7=3.0),                            # single nonzero
            block(z, i0=-1e-3)]
    for k in range(-20, 21, 3):                          # amax at 448 * 2^k boundaries
        for f in (1.0, 1.0 - 2**-9, 1.0 + 2**-7, 1.0 - 2**-24, 1.0 + 2**-23):
            rows.append(block(ramp * 448 * 2.0**k, i3=448 * 2.0**k * f))
    halfway = torch.full((32,), 1.0)
    halfway[:8] = torch.tensor([1.0625, 1.1875, 17.0, 18.0, 0.0029296875, -1.0625, 208.0, 464.0])
    rows += [block(torch.full((32,), 2.0**-130), i1=-(2.0**-133)),   # subnormals
             ramp * 2.0**-120,                                        # tiny
             ramp * 3e38,                                             # near fp32/bf16 max
             block(ramp * 1e-3, i5=1e4),                              # one outlier
             halfway]                                                 # e4m3 rounding ties
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_many_magnitudes(mode, dtype):
    g = torch.Generator().manual_seed(0)
    for exp in (-40, -12, -3, 0, 2, 9, 20, 60):
        x = (torch.randn(64, 256, generator=g) * 2.0**exp).to(dtype)
        assert_identical(x, mode)
    heavy = (torch.randn(16, 512, generator=g) * torch.exp(4 * torch.randn(16, 512, generator=g))).to(dtype)
    assert_identical(heavy, mode)
    assert_identical(torch.randn(2, 3, 4, 64, generator=g).to(dtype), mode)  # leading dims


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adversarial_blocks(mode, dtype):
    assert_identical(adversarial(dtype), mode)


@pytest.mark.parametrize("mode", ["rceil", "floor"])
def test_all_fp32_exponents_and_mantissas_near_boundary(mode):
    # every exponent, and mantissas within a few ulps of 448 * 2^k
    k = torch.arange(-140, 120, dtype=torch.float32)
    ulps = torch.arange(-4, 5, dtype=torch.float32)
    amax = (448 * torch.exp2(k)[:, None] * (1 + ulps[None, :] * 2.0**-23)).flatten()
    x = torch.linspace(-0.5, 0.5, 32)[None, :] * amax[:, None]
    x[:, 0] = amax
    assert_identical(x.contiguous(), mode)


@pytest.mark.parametrize("mode, inf_byte", [("rceil", 254), ("floor", 247)])
def test_nonfinite_blocks(mode, inf_byte):
    x = torch.randn(3, 32)
    x[0, 4] = float("nan")
    x[1, 9] = float("inf")
    x[2, 1] = -float("inf")
    assert_identical(x, mode)
    data, scale = quantize(x, scale_mode=mode)
    assert scale.flatten().tolist() == [255, inf_byte, inf_byte]
    assert torch.isnan(data[0, 4].float()) and float(data[1, 9]) == 448 and float(data[2, 1]) == -448
    assert has_nonfinite(scale=scale) and has_nonfinite(data=data)
    assert not has_nonfinite(*quantize(torch.randn(4, 64)))


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_torchao(mode, dtype):
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)).to(dtype) * 5
    data, scale = quantize(x, scale_mode=mode)
    ref = mx.to_dtype(data, scale.view(torch.float8_e8m0fnu), torch.float8_e4m3fn, 32, dtype)
    assert torch.equal(dequantize(data, scale, dtype), ref)
    # Round trip: FLOOR is idempotent; RCEIL is not (a block whose max rounds down to 448 * 2^k
    # gets a smaller scale the second time) -- one reason the engine never requantizes.
    d2, s2 = quantize(dequantize(data, scale, torch.float32), scale_mode=mode)
    same = torch.equal(d2.view(torch.uint8), data.view(torch.uint8)) and torch.equal(s2, scale)
    assert same == (mode == "floor")


def test_container_and_errors():
    t = MXFP8Tensor.quantize(torch.randn(4, 8, 64))
    assert t.shape == (4, 8, 64) and t.scale.shape == (4, 8, 2) and t[1].shape == (8, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 33))
    with pytest.raises(ValueError, match="scale_mode"):
        quantize(torch.randn(4, 32), scale_mode="ceil")
    with pytest.raises(TypeError, match="uint8"):
        MXFP8Tensor(t.data, t.scale.float())
    with pytest.raises(ValueError, match="does not fit"):
        MXFP8Tensor(t.data, t.scale[..., :1])
