"""Programmatic dependent launch (PDL, sm90+) for the small Triton kernels of a decode step.

A kernel launched with `pdl_args(...)` may be scheduled while the kernel before it on the stream is still
running; `pdl_wait(PDL)` blocks until that kernel has completed and its writes are visible (griddepcontrol.wait),
then lets the kernel after it be scheduled in turn (griddepcontrol.launch_dependents). It is each kernel's first
statement, except in the decode GEMVs, which read before it what the kernel just before them does not write: the
dense one (`triton_gemv`) its weight rows, the MoE's down kernel (`triton_moe_gemv`) its expert ids and the rows
they name, the MoE's gate_up the rows and input of the hosted shared experts, whose products it computes there (it
stores after the wait: the kernel before may still read memory its output reuses). A kernel starts only once the
one before it has passed its own wait (or completed, without PDL), so every kernel before that one has completed:
weights are written only between steps (loads, updates), never by the kernel just before a GEMV, the MoE's expert
ids by the router, before the gate_up launch that precedes the down launch, and gate_up's input before the router.
So results are those of the serial launch; what is saved is the launch gap between back-to-back small kernels
(captured into CUDA graphs as programmatic edges) and the latency of those early reads.
Off on CPU, under the Triton interpreter, before sm90, or with `ENABLED` False.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: kernels launch without PDL
    gdc_launch_dependents = gdc_wait = None

ENABLED = True  # benchmarks compare with False


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """The first statement of a kernel launched with `pdl_args`."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_args(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel that calls `pdl_wait(PDL)` before reading anything but weights, on t's device."""
    if ENABLED and gdc_wait is not None and t.is_cuda and _sm90(t.device):
        return dict(PDL=True, launch_pdl=True)
    return dict(PDL=False)


@functools.lru_cache(maxsize=8)
def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9
