"""Live weight updates on CPU over gloo: trainers in their own processes push weights (mxroll's
MXFP8 buckets, or sglang's per-tensor protocol written with raw torch.distributed); the engine's bytes
equal the trainer's, greedy outputs equal a fresh engine on the new checkpoint, weight_version moves;
every rejection leaves outputs and version as they were; 100 updates allocate nothing new."""
from __future__ import annotations

import json
import multiprocessing as mp
import socket

import pytest
import torch

from mxroll import Engine, configs
from mxroll.model import ModelConfig
from mxroll.model.loader import iter_checkpoint
from mxroll.model.synthetic import make_checkpoint
from mxroll.precision import Recipe
from mxroll.precision.mxfp8 import quantize
from mxroll.sync.bucket import dtype_name
from mxroll.sync.receiver import WeightUpdateError
from mxroll.sync.sender import WeightSender, buckets, mxfp8_named_tensors

from . import trainers

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
PROMPTS = [[0, 5, 6, 7], [0, 42, 17, 99, 3, 8]]
SPAWN = mp.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_cfg(**changes) -> dict:
    return {**json.loads(configs.model_preset_path("tiny").read_text()), **changes}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    return {name: make_checkpoint(cfg, root / name, seed=seed, dtype="bfloat16", progress=False)
            for name, cfg, seed in (("old", tiny_cfg(), 0), ("new", tiny_cfg(), 1), ("raw", tiny_cfg(), 2),
                                    ("other_arch", tiny_cfg(num_hidden_layers=2), 3))}


def new_engine(path, **kw) -> Engine:
    return Engine(model_path=str(path), device="cpu", quantization="mxfp8", progress=False,
                  weight_update_timeout=kw.pop("weight_update_timeout", 30), **kw)


@pytest.fixture()
def engine(ckpts):
    e = new_engine(ckpts["old"], weight_update_timeout=8)
    yield e
    e.shutdown()


def greedy(e: Engine) -> list[list[int]]:
    return [o["output_ids"] for o in e.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture(scope="module")
def fresh_outputs(ckpts):
    """Greedy outputs of engines loaded from each checkpoint: what an update must reproduce."""
    out = {}
    for name in ("old", "new", "raw"):
        e = new_engine(ckpts[name])
        out[name] = greedy(e)
        e.shutdown()
    assert out["old"] != out["new"] != out["raw"], "the checkpoints must generate differently"
    return out


def stored(e: Engine, name: str) -> torch.Tensor:
    return torch.tensor(e.get_weights_by_name(name, truncate_size=10**6))


def test_trainer_process_pushes_mxfp8_buckets(engine, ckpts, fresh_outputs):
    assert greedy(engine) == fresh_outputs["old"]
    q, port = SPAWN.Queue(), free_port()
    proc = SPAWN.Process(target=trainers.bucket_trainer, args=(port, str(ckpts["new"]), 8192, q))
    proc.start()
    metas, expected = q.get(timeout=120), q.get(timeout=120)
    assert len(metas) > 3, "the update should span several buckets"
    assert engine.init_weights_update_group("127.0.0.1", port, 1, 2, "weight_update_group", "gloo")[0]
    for i, (names, dtypes, shapes) in enumerate(metas):
        last = i == len(metas) - 1
        ok, msg = engine.update_weights_from_distributed(names, dtypes, shapes, "weight_update_group",
                                                         weight_version="step-1" if last else None,
                                                         load_format="flattened_bucket", commit=last)
        assert ok, msg
        if not last:  # staged, not applied: nothing moved yet
            assert engine.weight_version == "default"
    proc.join(60)
    engine.destroy_weights_update_group("weight_update_group")
    assert engine.weight_version == "step-1"
    # MXFP8 bytes stored exactly as the trainer made them; high-precision tensors equal too
    fp8 = [n for n, t in expected.items() if t.dtype == torch.float8_e4m3fn]
    assert fp8, "the recipe should have sent MXFP8 weights"
    for name, t in expected.items():
        want = t.float() if t.dtype != torch.uint8 else t.to(torch.int64)
        assert torch.equal(stored(engine, name).to(want.dtype), want), name
    out = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in out] == fresh_outputs["new"]
    assert {o["meta_info"]["weight_version"] for o in out} == {"step-1"}


def test_raw_torch_distributed_trainer_per_tensor(engine, ckpts, fresh_outputs):
    """sglang's protocol: names/dtypes/shapes in one call, one broadcast per tensor in that order; bf16
    tensors for MXFP8-stored weights are quantized by the recipe (the same bytes a fresh load makes)."""
    tensors = list(iter_checkpoint(ckpts["raw"], progress=False))
    names = [n for n, _ in tensors]
    q, done, port = SPAWN.Queue(), SPAWN.Event(), free_port()
    proc = SPAWN.Process(target=trainers.raw_trainer, args=(port, str(ckpts["raw"]), q, names, done))
    proc.start()
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, "g", "gloo")
    engine.update_weights_from_distributed(names, [dtype_name(t.dtype) for _, t in tensors],
                                           [list(t.shape) for _, t in tensors], "g")
    assert q.get(timeout=60) == "sent"
    done.set()
    proc.join(60)
    engine.destroy_weights_update_group("g")
    assert engine.weight_version == "1"  # no weight_version given: counts up
    assert greedy(engine) == fresh_outputs["raw"]


def test_trainer_dying_mid_update_times_out_and_keeps_weights(engine, ckpts, fresh_outputs):
    q, port = SPAWN.Queue(), free_port()
    proc = SPAWN.Process(target=trainers.bucket_trainer, args=(port, str(ckpts["new"]), 8192, q, 2))
    proc.start()
    metas, _ = q.get(timeout=120), q.get(timeout=120)
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, "weight_update_group", "gloo")
    for i in range(2):
        engine.update_weights_from_distributed(*metas[i], load_format="flattened_bucket", commit=False)
    with pytest.raises(WeightUpdateError, match="weight_update_group"):
        engine.update_weights_from_distributed(*metas[2], load_format="flattened_bucket")
    proc.join(60)
    assert engine.weight_version == "default"
    assert greedy(engine) == fresh_outputs["old"]
    assert not engine.receiver.pending and not engine.receiver.groups  # the broken group was closed


def _changed_state(e: Engine) -> list[tuple[str, torch.Tensor]]:
    """The engine's checkpoint times 2, as the trainer sends it (MXFP8 by the recipe): valid as it is."""
    doubled = [(n, t * 2) for n, t in iter_checkpoint(e.model_path, progress=False)]
    return mxfp8_named_tensors(doubled, Recipe(), e.model_config)


REJECTIONS = {
    "unknown name": (lambda s: s + [("model.layers.9.mlp.gate_proj.weight", torch.zeros(128, 64))], "unexpected"),
    "wrong shape": (lambda s: [(n, t[:-1] if n.endswith("embed_tokens.weight") else t) for n, t in s], "shape"),
    "wrong dtype": (lambda s: [(n, t.to(torch.int32) if n.endswith("norm.weight") else t) for n, t in s], "dtype"),
    "nan": (lambda s: [(n, t.float().fill_(float("nan")) if n.endswith("lm_head.weight") else t) for n, t in s],
            "NaN"),
    "nan scale": (lambda s: [(n, torch.full_like(t, 255) if n.endswith("o_proj.weight_scale_inv") else t)
                             for n, t in s], "NaN"),
    "scale missing": (lambda s: [(n, t) for n, t in s if not n.endswith("q_b_proj.weight_scale_inv")],
                      "weight_scale_inv"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejected_update_changes_nothing(engine, fresh_outputs, case):
    corrupt, message = REJECTIONS[case]
    bad = corrupt(_changed_state(engine))
    with pytest.raises(WeightUpdateError, match=message):
        engine.update_weights_from_tensor(bad)
    assert engine.weight_version == "default"
    assert greedy(engine) == fresh_outputs["old"]


def test_rejected_distributed_update_changes_nothing(engine, fresh_outputs):
    """A wrong shape announced for a flattened bucket: the bytes are drained (the trainer does not
    hang), the update is refused as a whole."""
    state = [(n, t * 2) for n, t in iter_checkpoint(engine.model_path, progress=False)]
    sender = WeightSender(engine, master_port=free_port(), backend="gloo", model_config=engine.model_config)
    sender.connect()
    bad = [(n, torch.randn(48, 64) if n.endswith("layers.0.self_attn.kv_a_proj_with_mqa.weight") else t)
           for n, t in state]
    with pytest.raises(WeightUpdateError, match="kv_a_proj_with_mqa.*shape"):
        sender.push(bad)
    with pytest.raises(WeightUpdateError, match="dtype"):
        engine.update_weights_from_distributed(["model.norm.weight"], ["complex64"], [[64]])
    sender.close()
    assert engine.weight_version == "default"
    assert greedy(engine) == fresh_outputs["old"]


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "call-per-bucket"])
def test_hundred_updates_allocate_nothing_new(engine, ckpts, fresh_outputs, one_call):
    sender = WeightSender(engine, master_port=free_port(), backend="gloo", bucket_bytes=1 << 16,
                          model_config=engine.model_config, one_call=one_call)
    sender.connect()
    new = list(iter_checkpoint(ckpts["new"], progress=False))
    old = list(iter_checkpoint(ckpts["old"], progress=False))
    ptrs = [p.data_ptr() for p in engine.model.parameters()]
    sender.push(new)
    arenas = engine.receiver.staging_allocations
    for i in range(99):
        stats = sender.push(old if i % 2 else new)
    assert stats["buckets"] > 1
    assert engine.receiver.staging_allocations == arenas, "later updates must reuse the staging arena"
    assert [p.data_ptr() for p in engine.model.parameters()] == ptrs, "weights are updated in place"
    assert engine.weight_version == "100"
    assert greedy(engine) == fresh_outputs["new"]
    sender.close()


def test_update_from_tensor_across_processes(engine, ckpts, fresh_outputs):
    payload = mxfp8_named_tensors(iter_checkpoint(ckpts["new"], progress=False), Recipe(), engine.model_config)
    q, done = SPAWN.Queue(), SPAWN.Event()
    proc = SPAWN.Process(target=trainers.ipc_trainer, args=(payload, q, done))
    proc.start()
    serialized = q.get(timeout=120)
    assert isinstance(serialized, str)
    engine.update_weights_from_tensor(serialized, weight_version="ipc")
    done.set()
    proc.join(60)
    assert engine.weight_version == "ipc"
    assert greedy(engine) == fresh_outputs["new"]


def test_fused_expert_naming_is_accepted(engine, fresh_outputs):
    """transformers' in-memory DeepseekV3 names routed experts gate_up_proj [E, 2F, D] / down_proj [E, D, F]."""
    cfg: ModelConfig = engine.model_config
    per_expert = dict(iter_checkpoint(engine.model_path, progress=False))
    fused = {n: t * 2 for n, t in per_expert.items() if ".experts." not in n}
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        e = [f"model.layers.{layer}.mlp.experts.{i}" for i in range(cfg.n_routed_experts)]
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[f"{x}.gate_proj.weight"], per_expert[f"{x}.up_proj.weight"]]) for x in e])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([per_expert[f"{x}.down_proj.weight"]
                                                                            for x in e])
    engine.update_weights_from_tensor(list(fused.items()))
    changed = greedy(engine)
    assert changed != fresh_outputs["old"]
    engine.update_weights_from_tensor(list(per_expert.items()))  # back, in per-expert naming
    assert greedy(engine) == fresh_outputs["old"]


def test_update_from_disk(engine, ckpts, fresh_outputs):
    with pytest.raises(WeightUpdateError, match="num_hidden_layers"):
        engine.update_weights_from_disk(str(ckpts["other_arch"]))
    with pytest.raises(WeightUpdateError):
        engine.update_weights_from_disk(str(ckpts["new"] / "missing"))
    assert greedy(engine) == fresh_outputs["old"]
    ok, _ = engine.update_weights_from_disk(str(ckpts["new"]), weight_version="disk")
    assert ok and engine.weight_version == "disk" and engine.get_model_info()["weight_version"] == "disk"
    assert greedy(engine) == fresh_outputs["new"]


def test_in_flight_requests_record_the_version_switch(engine, ckpts):
    """Paused in place mid-request, updated, continued: the request finishes on the new weights and its
    meta_info says at which output token the version changed."""
    stream = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=200), stream=True)
    first = next(stream)
    engine.pause_generation(mode="in_place")
    engine.update_weights_from_disk(str(ckpts["new"]), weight_version="v2")
    engine.continue_generation()
    *_, final = stream
    switches = final["meta_info"]["weight_version_switches"]
    assert final["meta_info"]["weight_version"] == "v2"
    assert [w["weight_version"] for w in switches] == ["default", "v2"] and switches[0]["output_index"] == 0
    assert len(first["output_ids"]) <= switches[1]["output_index"] < 200


def test_get_weights_by_name_errors(engine):
    with pytest.raises(WeightUpdateError, match="no weight"):
        engine.get_weights_by_name("model.layers.0.nope.weight")
    assert len(engine.get_weights_by_name("model.embed_tokens.weight", truncate_size=3)) == 3


def test_group_errors(engine):
    with pytest.raises(WeightUpdateError, match="no update group"):
        engine.update_weights_from_distributed(["model.norm.weight"], ["bfloat16"], [[64]], "missing")
    with pytest.raises(WeightUpdateError, match="world_size"):
        engine.init_weights_update_group("127.0.0.1", free_port(), 1, 1, "g", "gloo")
    with pytest.raises(WeightUpdateError, match="no update group"):
        engine.destroy_weights_update_group("never")


def test_buckets_keep_scales_with_their_weight():
    t = [("a.weight", torch.zeros(100, dtype=torch.uint8)), ("a.weight_scale_inv", torch.zeros(10, dtype=torch.uint8)),
         ("b.weight", torch.zeros(50, dtype=torch.uint8))]
    assert [[n for n, _ in b] for b in buckets(t, 105)] == [["a.weight", "a.weight_scale_inv"], ["b.weight"]]
    assert [[n for n, _ in b] for b in buckets(t, 1000)] == [["a.weight", "a.weight_scale_inv", "b.weight"]]


def test_group_can_be_destroyed_and_formed_again(engine, ckpts, fresh_outputs):
    """Closing tears both sides down at once (neither waits on the other); a new group then works."""
    for name in ("new", "old"):
        sender = WeightSender(engine, master_port=free_port(), backend="gloo", model_config=engine.model_config)
        sender.connect()
        sender.push(list(iter_checkpoint(ckpts[name], progress=False)))
        sender.close()
        assert not engine.receiver.groups
        assert greedy(engine) == fresh_outputs[name]


def test_bucket_sizes_must_cover_the_names(engine):
    with pytest.raises(WeightUpdateError, match="bucket_sizes add up"):
        engine.update_weights_from_distributed(["model.norm.weight"] * 2, ["bfloat16"] * 2, [[64]] * 2,
                                               load_format="flattened_bucket", bucket_sizes=[1])
    with pytest.raises(WeightUpdateError, match="flattened_bucket"):
        engine.update_weights_from_distributed(["model.norm.weight"], ["bfloat16"], [[64]], bucket_sizes=[1])


def test_high_precision_update_for_mxfp8_weights_is_quantized_and_logged_once(engine, ckpts, fresh_outputs, caplog):
    """bf16 tensors for weights the engine stores MXFP8: quantized by the recipe (the bytes a fresh load
    makes), and said once per engine, not once per update."""
    bf16 = list(iter_checkpoint(ckpts["new"], progress=False))
    with caplog.at_level("INFO", logger="mxroll.sync.receiver"):
        engine.update_weights_from_tensor(bf16)
        engine.update_weights_from_tensor(bf16)
    said = [r for r in caplog.records if "were quantized with the recipe" in r.getMessage()]
    assert len(said) == 1 and "rceil" in said[0].getMessage()
    assert greedy(engine) == fresh_outputs["new"]
    want, _ = quantize(dict(bf16)["model.layers.0.self_attn.o_proj.weight"], scale_mode="rceil")
    got = stored(engine, "model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(got, want.float())


def test_trainer_tensors_updated_in_place_reuse_the_plan(engine, ckpts, fresh_outputs):
    """A trainer whose MXFP8 tensors keep their storage (only the bytes change) gets its plan reused:
    buckets, metadata and byte views made once; each push still sends the current bytes. On the engine,
    neighbouring tensors are checked and copied as runs (fewer copies than tensors)."""
    new = mxfp8_named_tensors(iter_checkpoint(ckpts["new"], progress=False), Recipe(), engine.model_config)
    old = dict(mxfp8_named_tensors(iter_checkpoint(ckpts["old"], progress=False), Recipe(), engine.model_config))
    mine = [(n, t.clone()) for n, t in new]
    sender = WeightSender(engine, master_port=free_port(), backend="gloo", bucket_bytes=1 << 17,
                          model_config=engine.model_config)
    sender.connect()
    first = sender.push(mine)
    assert not first["plan_reused"] and first["buckets"] > 1
    assert greedy(engine) == fresh_outputs["new"]
    for name, t in mine:
        t.copy_(old[name])  # the optimizer step: same storage, new bytes
    second = sender.push(mine)
    assert second["plan_reused"]
    assert greedy(engine) == fresh_outputs["old"]
    plan = next(iter(engine.receiver._plans.values()))
    # (on CPU the engine keeps high-precision weights in fp32: those copies cast and stay one per tensor)
    assert len(plan.copies) < 0.6 * len(plan.staged), "neighbouring staged tensors must merge into runs"
    assert len(plan.finite.checks) < len(plan.staged) / 4
    for name, t in mine:
        t.copy_(dict(new)[name])
    assert sender.push(mine)["plan_reused"]
    assert greedy(engine) == fresh_outputs["new"]
    probe = next(n for n, _ in new if n.endswith("experts.1.down_proj.weight"))
    assert torch.equal(stored(engine, probe), dict(new)[probe].float())
    sender.close()


def test_nan_inside_a_merged_run_is_named(engine, ckpts, fresh_outputs):
    new = [(n, t.clone()) for n, t in
           mxfp8_named_tensors(iter_checkpoint(ckpts["new"], progress=False), Recipe(), engine.model_config)]
    sender = WeightSender(engine, master_port=free_port(), backend="gloo", model_config=engine.model_config)
    sender.connect()
    sender.push(new)
    victim = next(n for n, t in new if n.endswith("experts.2.up_proj.weight"))
    dict(new)[victim].view(torch.uint8)[0, 3] = 0x7F  # an e4m3 NaN in the middle of a run of experts
    before = engine.weight_version
    with pytest.raises(WeightUpdateError, match="experts.2.up_proj.weight") as err:
        sender.push(new)
    assert "1 tensors" in str(err.value)
    assert engine.weight_version == before and greedy(engine) == fresh_outputs["new"]
    sender.close()
