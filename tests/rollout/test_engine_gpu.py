"""Engine on a CUDA GPU: MXFP8 weights through the Triton backend agree with the torch reference."""
from __future__ import annotations

import json

import pytest
import torch

from mxroll import configs
from mxroll.model.synthetic import make_checkpoint
from mxroll.rollout import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason="needs an sm90 GPU")


def test_triton_engine_matches_torch_reference(tmp_path):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    path = make_checkpoint(cfg, tmp_path / "tiny8", seed=0, mxfp8=True, progress=False)
    fast = Engine(model_path=str(path), device="cuda", progress=False)
    ref = Engine(model_path=str(path), device="cuda", progress=False, gemm_backend="torch")
    assert fast.get_model_info()["gemm_backend"] == "triton" and fast.get_model_info()["dtype"] == "bfloat16"
    ids = torch.arange(3, 60, device="cuda")
    a = fast.model.sequence_logits(ids, torch.arange(len(ids), device="cuda"), fast.model.new_cache(64))
    b = ref.model.sequence_logits(ids, torch.arange(len(ids), device="cuda"), ref.model.new_cache(64))
    assert ((a - b).norm() / b.norm()).item() < 2e-2
    out = fast.generate(prompt="hello", sampling_params={"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
                        return_logprob=True)
    assert out["meta_info"]["completion_tokens"] == 16
