"""Engine and job configs: bad YAML files, engine fields and the context length, each error naming its source."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from mxroll.rollout import Engine
from mxroll.rollout.config import (EngineConfig, check_engine_config, from_sglang_args, resolve_context_length,
                                   rollout_config)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "engine: [1\n", "steps: 1\n  x: 2\n", "3\n", "\t"])
def test_bad_yaml_file_is_named(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)):
        rollout_config(str(path))


def test_bad_key_in_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 1\nbogus_key: 2\n")
    with pytest.raises(ValueError, match="bogus_key") as e:
        rollout_config(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("edit, field", [
    (dict(device="bogus"), "device"), (dict(device="meta"), "device"), (dict(device="cuda:x"), "device"),
    (dict(dtype="float16"), "dtype"), (dict(quantization="fp8"), "quantization"),
    (dict(act_mode="w4a4"), "act_mode"), (dict(scale_mode="even"), "scale_mode"),
    (dict(gemm_backend="cutlass"), "gemm_backend"), (dict(context_length=0), "context_length"),
    (dict(context_length=-5), "context_length"), (dict(context_length=True), "context_length"),
    (dict(log_level="LOUD"), "log_level"), (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"),
    (dict(norm_backend="cuda"), "norm_backend"), (dict(router_backend="flashinfer"), "router_backend"),
    (dict(rope_backend="flashinfer"), "rope_backend"),
    (dict(decode_attention_backend="torch"), "decode_attention_backend"),
    (dict(chunked_prefill_size=0), "chunked_prefill_size"), (dict(chunked_prefill_size="8k"), "chunked_prefill_size"),
    (dict(chunked_prefill_size=True), "chunked_prefill_size"), (dict(chunked_prefill_size=-2), "chunked_prefill_size"),
])
def test_check_engine_config_names_the_field(edit, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        check_engine_config(replace(EngineConfig(), **edit))


def test_check_engine_config_accepts_defaults_and_choices():
    check_engine_config(EngineConfig())
    for edit in (dict(device="cpu", dtype="bfloat16"), dict(dtype="float64", quantization="mxfp8"),
                 dict(gemm_backend="torch", context_length=7, log_level="debug", act_mode="w8a16",
                      scale_mode="floor", norm_backend="flashinfer", router_backend="torch", rope_backend="triton")):
        check_engine_config(replace(EngineConfig(), **edit))


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but no CUDA device is available"):
        check_engine_config(replace(EngineConfig(), device="cuda"))


def test_engine_checks_device_before_loading(tmp_path):
    with pytest.raises(ValueError, match="device='bogus'"):
        Engine(model_path=str(tmp_path / "not-loaded"), device="bogus")


def test_resolve_context_length():
    assert resolve_context_length(None, 2048) == 2048
    assert resolve_context_length(100, 2048) == 100
    assert resolve_context_length(2048, 2048) == 2048
    for bad in (0, -3):
        with pytest.raises(ValueError, match="context_length"):
            resolve_context_length(bad, 2048)
    with pytest.raises(ValueError, match="context_length=4096 exceeds .* 2048"):
        resolve_context_length(4096, 2048)


def test_decode_attention_choice():
    from mxroll.rollout.attention import TRITON_DECODE_MAX_ROWS, select_decode_attention

    assert select_decode_attention(None, "torch") == (0, "")
    assert select_decode_attention("flashinfer", "flashinfer")[0] == 0
    for requested in ("triton", "flashinfer"):
        with pytest.raises(ValueError, match=f"decode_attention_backend='{requested}' needs attention_backend"):
            select_decode_attention(requested, "torch")
    with pytest.raises(ValueError, match="decode_attention_backend='fa3'"):
        select_decode_attention("fa3", "flashinfer")
    try:
        import triton  # noqa: F401
    except ImportError:
        assert select_decode_attention(None, "flashinfer") == (0, "FlashInfer MLA for every decode batch "
                                                                  "(triton not importable)")
        with pytest.raises(ValueError, match="triton is not importable"):
            select_decode_attention("triton", "flashinfer")
    else:
        assert select_decode_attention(None, "flashinfer")[0] == TRITON_DECODE_MAX_ROWS
        assert select_decode_attention("triton", "flashinfer")[0] >= 1 << 20


def test_decode_attention_request_on_cpu_names_the_field(tiny_checkpoint):
    with pytest.raises(ValueError, match="decode_attention_backend='triton' needs attention_backend='flashinfer'"):
        Engine(model_path=str(tiny_checkpoint), device="cpu", decode_attention_backend="triton")


@pytest.mark.parametrize("field", ["mxfp8_dense_bf16_copy", "mxfp8_moe_bf16_copy"])
def test_bf16_copy_request_on_cpu_names_the_field(tiny_checkpoint, field):
    """The exact bf16 copies serve the Triton GEMM backend only: asking for them on the torch one is an error."""
    with pytest.raises(ValueError, match=f"{field}=True serves the Triton GEMM backend; this engine runs torch"):
        Engine(model_path=str(tiny_checkpoint), device="cpu", quantization="mxfp8", progress=False, **{field: True})


def test_sglang_engine_args_map_to_mxroll_names():
    """sglang's keywords RL frameworks pass: renamed ones are mapped, single-GPU values dropped, the rest kept."""
    out = from_sglang_args(dict(random_seed=7, tp_size=1, dp_size=1, nnodes=1, node_rank=0, trust_remote_code=True,
                                enable_memory_saver=False, base_gpu_id=0, page_size=32))
    assert out == {"seed": 7, "page_size": 32}
    assert from_sglang_args(dict(base_gpu_id=3)) == {"device": "cuda:3"}
    assert from_sglang_args(dict(base_gpu_id=3, device="cuda:3")) == {"device": "cuda:3"}
    assert from_sglang_args({}) == {}
    assert from_sglang_args(dict(random_seed=None)) == {}  # sglang's unset seed: the engine's default
    assert from_sglang_args(dict(disable_radix_cache=False)) == {"enable_prefix_caching": True}
    assert from_sglang_args(dict(disable_radix_cache=True)) == {"enable_prefix_caching": False}
    # what RL frameworks pass when they launch sglang engines: plumbing and switches with no effect here
    launched = dict(host="10.0.0.1", port=30001, nccl_port=30002, dist_init_addr="10.0.0.1:30003", gpu_id_step=1,
                    skip_server_warmup=True, enable_weights_cpu_backup=False, enable_draft_weights_cpu_backup=True,
                    enable_metrics=True, kv_cache_dtype="auto", schedule_policy="fcfs")
    assert from_sglang_args(dict(launched, mem_fraction_static=0.7)) == {"mem_fraction_static": 0.7}
    assert from_sglang_args(dict(kv_cache_dtype="bfloat16", dtype="bfloat16")) == {"dtype": "bfloat16"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp_size=2), "tp_size=2: an mxroll engine runs on one GPU"),
    (dict(ep_size=8), "ep_size=8"),
    (dict(tp_size=True), "tp_size=True"),
    (dict(nnodes=2), "nnodes=2"),
    (dict(trust_remote_code="yes"), "trust_remote_code='yes': must be true or false"),
    (dict(random_seed=1, seed=2), "random_seed=1 and seed=2"),
    (dict(base_gpu_id=-1), "base_gpu_id=-1"),
    (dict(base_gpu_id=1, device="cuda:0"), "base_gpu_id=1 and device='cuda:0' disagree"),
    (dict(disable_radix_cache=True, enable_prefix_caching=True), "disable_radix_cache=True and enable_prefix"),
    (dict(disable_radix_cache="no"), "disable_radix_cache='no': must be true or false"),
    (dict(kv_cache_dtype="fp8_e4m3"), "kv_cache_dtype='fp8_e4m3': the latent cache holds the model's dtype"),
    (dict(schedule_policy="lpm"), "schedule_policy='lpm'"), (dict(enable_metrics=1), "enable_metrics=1"),
    (dict(skip_server_warmup="yes"), "skip_server_warmup='yes'"),
])
def test_sglang_engine_args_refused_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        from_sglang_args(kwargs)


def test_prefill_chunk_from_device_memory(monkeypatch):
    """chunked_prefill_size unset: 8192 on CPU; on a GPU the largest of 32768 / 16384 / ... whose estimated prefill
    activations fit in half of what mem_fraction_static leaves, so a larger model or a smaller device gets less."""
    import json
    from types import SimpleNamespace

    from mxroll import configs
    from mxroll.model import ModelConfig
    from mxroll.rollout.kv_cache import plan_chunk, prefill_bytes_per_token

    def shape(name):
        return ModelConfig.from_dict(json.loads(configs.model_preset_path(name).read_text()))

    moon, dsv3 = shape("moonlight-16b-a3b"), shape("deepseek-v3")
    per = prefill_bytes_per_token(moon, torch.bfloat16)
    assert 100 * 1024 < per < 400 * 1024 and prefill_bytes_per_token(dsv3, torch.bfloat16) > 3 * per
    assert plan_chunk(moon, torch.bfloat16, torch.device("cpu"), 0.85)[0] == 8192
    gib = 2**30
    device = torch.device("cuda", 0)
    for total, fraction, model, expect in ((141 * gib, 0.85, moon, 32768), (80 * gib, 0.85, moon, 32768),
                                           (80 * gib, 0.9, moon, 16384), (141 * gib, 0.85, dsv3, 16384),
                                           (24 * gib, 0.85, moon, 8192), (141 * gib, 1.0, moon, 2048)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, t=total: SimpleNamespace(total_memory=t))
        tokens, why = plan_chunk(model, torch.bfloat16, device, fraction)
        assert tokens == expect, (total / gib, fraction, tokens)
        assert tokens * prefill_bytes_per_token(model, torch.bfloat16) <= (1 - fraction) * total / 2 or tokens == 2048
        assert f"mem_fraction_static={fraction}" in why


def test_engine_resolves_the_prefill_chunk(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    assert e.config.chunked_prefill_size == 8192 and e.scheduler.max_batch_tokens == 8192
    e.shutdown()
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, chunked_prefill_size=24)
    assert e.config.chunked_prefill_size == 24 and e.scheduler.max_batch_tokens == 24
    e.shutdown()
    # sglang's -1: no chunking, a prompt up to the context length prefills in one step
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, chunked_prefill_size=-1, context_length=40)
    assert e.config.chunked_prefill_size == 40 and e.scheduler.max_batch_tokens == 40
    out = e.generate(input_ids=[5] * 39, sampling_params={"max_new_tokens": 1, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 1 and e.steps[-1].tokens == 39  # one step
    e.shutdown()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_prefill_tokens=16384), "unknown EngineConfig option 'max_prefill_tokens'; use chunked_prefill_size"),
    (dict(chunk_prefill_size=64), "unknown EngineConfig option 'chunk_prefill_size'; did you mean 'chunked_prefill_size'?"),
    (dict(gpu_memory_utilization=0.5), "use mem_fraction_static"),
])
def test_unknown_engine_options_are_named_with_the_close_ones(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Engine(model_path="preset:tiny", device="cpu", progress=False, **kwargs)
