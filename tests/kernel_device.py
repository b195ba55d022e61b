"""Where the Triton kernel tests run: on a CUDA GPU, else on CPU tensors under the Triton interpreter
(triton installed and TRITON_INTERPRET=1); modules that need one of the two skip otherwise."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

SKIP_REASON = "needs a CUDA GPU, or triton with TRITON_INTERPRET=1"


def triton_runs() -> bool:
    """A Triton kernel can run here: on the GPU, or in the interpreter."""
    return torch.cuda.is_available() or (os.environ.get("TRITON_INTERPRET") == "1"
                                         and importlib.util.find_spec("triton") is not None)


def kernel_device() -> tuple[str, torch.dtype]:
    """(DEVICE, LOW) for a kernel test module, or skip the module (call it at module level).
    LOW is bf16 on CUDA and fp16 under the interpreter, which rounds float -> bf16 toward zero (numpy has
    no bf16) but fp16 to nearest."""
    __tracebackhide__ = True  # the skip is reported at the calling module's line
    if not triton_runs():
        pytest.skip(SKIP_REASON, allow_module_level=True)
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float16)
