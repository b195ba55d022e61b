"""Engine API on the tiny preset: output format, stopping, batching, seeding and bad requests."""
from __future__ import annotations

import json
import shutil

import pytest

from mxroll.rollout import Engine
from mxroll.rollout.cli import main


def test_output_format(engine):
    out = engine.generate(prompt="hello", sampling_params={"max_new_tokens": 5, "ignore_eos": True},
                          return_logprob=True)
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 5 == meta["completion_tokens"]
    assert meta["prompt_tokens"] == 6  # bos + 5 bytes
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(lp <= 0 and none is None for lp, _, none in meta["output_token_logprobs"])
    assert meta["weight_version"] == "default" and isinstance(out["text"], str)
    assert "output_token_logprobs" not in engine.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 1})[
        "meta_info"]


def test_stop_tokens_and_eos(engine, tiny_checkpoint, tmp_path):
    free = engine.generate(input_ids=[0, 40, 41], sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                                   "ignore_eos": True})
    stop = free["output_ids"][2]
    out = engine.generate(input_ids=[0, 40, 41], sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                                  "stop_token_ids": [stop], "ignore_eos": True})
    assert out["output_ids"] == free["output_ids"][:free["output_ids"].index(stop) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    # the same weights with that token as the checkpoint's eos: generation stops there unless ignore_eos
    path = tmp_path / "eos"
    shutil.copytree(tiny_checkpoint, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=[1, stop])))
    eos_engine = Engine(model_path=str(path), device="cpu", progress=False)
    greedy = {"temperature": 0, "max_new_tokens": 8}
    assert eos_engine.generate(input_ids=[0, 40, 41], sampling_params=greedy)["output_ids"] == out["output_ids"]
    ignored = eos_engine.generate(input_ids=[0, 40, 41], sampling_params=dict(greedy, ignore_eos=True))
    assert ignored["output_ids"] == free["output_ids"]


def test_batch_n_and_seeds(engine):
    params = {"max_new_tokens": 6, "n": 3, "seed": 11, "ignore_eos": True}
    a = engine.generate(prompt=["ab", "cd"], sampling_params=params)
    b = engine.generate(prompt=["ab", "cd"], sampling_params=params)
    assert len(a) == 6 and [x["output_ids"] for x in a] == [x["output_ids"] for x in b]
    assert len({tuple(x["output_ids"]) for x in a[:3]}) > 1  # the n samples differ
    single_n = engine.generate(prompt="ab", sampling_params=params)
    assert isinstance(single_n, list) and [x["output_ids"] for x in single_n] == [x["output_ids"] for x in a[:3]]


def test_greedy_batch_equals_single(engine):
    g = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    batch = engine.generate(input_ids=[[0, 9, 10], [0, 70]], sampling_params=g)
    assert batch[1]["output_ids"] == engine.generate(input_ids=[0, 70], sampling_params=g)["output_ids"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of"),
    (dict(prompt="a", input_ids=[1]), "exactly one of"),
    (dict(input_ids=[1, 9999]), "outside the vocabulary"),
    (dict(input_ids=[]), "at least one token"),
    (dict(input_ids=[[1], []]), "at least one token"),
    (dict(input_ids=[1], sampling_params={"max_new_tokens": 5000}), "context length"),
    (dict(prompt=["a", "b"], sampling_params=[{}]), "1 sampling_params for 2 prompts"),
    (dict(prompt=[1, 2]), "string"),
    (dict(input_ids=[1], sampling_params={"seed": 2**64}), "sampling_params.seed"),
    (dict(input_ids=[1], sampling_params={"stop_token_ids": 5}), "sampling_params.stop_token_ids"),
    (dict(input_ids=[1], sampling_params={"stop_token_ids": [3, 9999]}),
     r"prompt's sampling_params.stop_token_ids: token ids \[9999\] outside the vocabulary"),
    (dict(input_ids=[1], sampling_params={"temperature": float("inf")}), "sampling_params.temperature"),
    (dict(input_ids=[1], sampling_params=[5]), "sampling_params must be a dict"),
    (dict(input_ids=[1], sampling_params="temperature=0"), "sampling_params must be a dict"),
])
def test_bad_requests(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)


def test_extreme_seed_and_near_zero_temperature(engine):
    top = engine.generate(input_ids=[0, 7], sampling_params={"seed": 2**64 - 1, "max_new_tokens": 3})
    assert top["output_ids"] == engine.generate(input_ids=[0, 7], sampling_params={"seed": 2**64 - 1,
                                                                                   "max_new_tokens": 3})["output_ids"]
    g = {"max_new_tokens": 6, "ignore_eos": True}
    greedy = engine.generate(input_ids=[0, 7], sampling_params=dict(g, temperature=0), return_logprob=True)
    near = engine.generate(input_ids=[0, 7], sampling_params=dict(g, temperature=1e-6), return_logprob=True)
    assert near["output_ids"] == greedy["output_ids"]
    assert near["meta_info"]["output_token_logprobs"] == greedy["meta_info"]["output_token_logprobs"]


def test_engine_config_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        Engine(model_path=str(tiny_checkpoint), bogus=1)
    with pytest.raises(ValueError, match="dtype"):
        Engine(model_path=str(tiny_checkpoint), dtype="float16")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Engine(model_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown model preset"):
        Engine(model_path="preset:nope", cache_dir=str(tmp_path))


def test_model_info(engine):
    info = engine.get_model_info()
    assert info["is_generation"] and info["dtype"] == "float32" and info["device"] == "cpu"
    # sglang's keys
    assert info["model_path"] == info["tokenizer_path"] == str(engine.model_path)
    assert info["preferred_sampling_params"] is None and info["weight_version"] == engine.weight_version


def test_cli_make_checkpoint_and_rollout_job(tmp_path, capsys):
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--seed", "3"]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["hidden_size"] == 64
    rc = main(["rollout", f"engine.model_path={tmp_path / 'ck'}", f"output_dir={tmp_path / 'run'}",
               "steps=1", "sampling.n=2", "sampling.max_new_tokens=4", "wandb.mode=disabled", "engine.progress=false"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 and all(len(r["logprobs"]) == len(r["output_ids"]) for r in rows)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert metrics["samples"] == 6
    assert main(["rollout", "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_preset_model_path_is_written_once(tmp_path):
    e = Engine(model_path="preset:tiny", cache_dir=str(tmp_path), progress=False, seed=2)
    assert (tmp_path / "presets" / "tiny-seed2" / "config.json").is_file()
    first = (tmp_path / "presets" / "tiny-seed2" / "model.safetensors").stat().st_mtime_ns
    assert e.generate(prompt="x", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] >= 1
    e.shutdown()  # on a GPU its KV cache holds most of the memory the second engine sizes its cache from
    Engine(model_path="preset:tiny", cache_dir=str(tmp_path), progress=False, seed=2).shutdown()
    assert (tmp_path / "presets" / "tiny-seed2" / "model.safetensors").stat().st_mtime_ns == first


def test_graph_capture_at_start_up_and_its_out_of_memory_error(monkeypatch):
    """Start-up capture (the engine's `_capture_graphs`, driven here with a stand-in for the graphs): every size by
    default, nothing with cuda_graph_lazy_capture, and running out of memory names the settings that help."""
    import contextlib
    import types

    import torch
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    calls = []

    class Graphs:
        max_size, graphs = 1024, {}

        def capture_all(self, progress):
            calls.append(progress)
            if fail:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
            self.graphs.update({1: None, 1024: None})

    e = Engine.__new__(Engine)
    e.device, e.runner = torch.device("cuda", 0), types.SimpleNamespace(graphs=Graphs())
    e.config = types.SimpleNamespace(cuda_graph_lazy_capture=True, progress=False)
    fail = False
    assert "first use" in e._capture_graphs() and not calls
    e.config.cuda_graph_lazy_capture = False
    assert "2 captured at start-up" in e._capture_graphs() and calls == [False]
    fail = True
    with pytest.raises(RuntimeError, match=r"batches up to 1024 rows\) ran out of device memory: lower "
                                           r"cuda_graph_max_bs .*Tried to allocate 2.00 GiB\)$"):
        e._capture_graphs()
    e.runner.graphs = None
    assert e._capture_graphs() == ""
