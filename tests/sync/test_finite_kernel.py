"""The one-pass Triton NaN/inf flag against its torch reference (`validate._bad(...).any()`), on CUDA or
under the Triton interpreter; skipped otherwise."""
import pytest
import torch

from tests.kernel_device import kernel_device

DEVICE, _ = kernel_device()

from mxroll.sync.finite_kernel import BLOCK, any_bad_  # noqa: E402
from mxroll.sync.validate import FiniteCheck, _bad  # noqa: E402


def finite_bytes(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randint(0, 254 if kind == "e8m0" else 127, (n,), generator=g, dtype=torch.uint8)
    if kind == "e4m3":
        x = x | (torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8) << 7)  # both signs, never 0x7f/0xff
    return x


@pytest.mark.parametrize("kind,bad_values", [("e4m3", [0x7F, 0xFF]), ("e8m0", [254, 255])])
@pytest.mark.parametrize("n", [1, BLOCK - 1, 3 * BLOCK + 17])
def test_byte_kinds_match_the_reference(kind, bad_values, n):
    g = torch.Generator().manual_seed(n)
    for where in (None, 0, n - 1, n // 2):
        for value in bad_values:
            x = finite_bytes(kind, n, g)
            if where is not None:
                x[where] = value
            flags = torch.zeros(2, dtype=torch.int32, device=DEVICE)
            any_bad_(kind, x.to(DEVICE), flags, 1)
            assert flags.tolist() == [0, int(bool(_bad(kind, x).any()))] == [0, int(where is not None)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_floats_match_the_reference(dtype):
    n = 2 * BLOCK + 5
    for value in (None, float("nan"), float("inf"), float("-inf")):
        x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype) * 1e4
        if value is not None:
            x[n - 3] = value
        flags = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        any_bad_("float", x.to(DEVICE), flags, 0)
        assert flags.item() == int(bool(_bad("float", x).any())) == int(value is not None)


def test_finite_check_names_the_offender_on_both_paths():
    arena = finite_bytes("e4m3", 4 * 4096, torch.Generator().manual_seed(3)).to(DEVICE)
    named = [(f"w{i}", arena[i * 4096:(i + 1) * 4096].view(torch.float8_e4m3fn)) for i in range(4)]
    arena[2 * 4096 + 100] = 0xFF
    for backend in ("torch", "triton"):
        check = FiniteCheck(named, backend=backend)
        assert len(check.checks) == 1  # four neighbours: one reduction
        assert check.run() == ["w2"]
