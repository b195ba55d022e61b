"""sglang's start_profile / stop_profile (Engine, the HTTP endpoints, the client): a Chrome trace of the engine's
steps, each a `mxroll.step#N` range holding the model's ops; bad options named; the engine serves on after."""
from __future__ import annotations

import gzip
import json
import urllib.request

import pytest

from mxroll.sync.http_client import EngineClient

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


def trace(path) -> list[dict]:
    with gzip.open(path) as f:
        return json.load(f)["traceEvents"]


def steps_in(events) -> list[str]:
    return sorted({e["name"] for e in events if e.get("name", "").startswith("mxroll.step#")})


def test_profile_until_stop(engine, tmp_path):
    engine.start_profile(output_dir=str(tmp_path / "traces"), activities=["CPU"], profile_prefix="run1")
    with pytest.raises(ValueError, match="already running"):
        engine.start_profile(output_dir=str(tmp_path))
    engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)
    path = engine.stop_profile()
    assert path.startswith(str(tmp_path / "traces" / "run1-")) and path.endswith(".trace.json.gz")
    events = trace(path)
    assert len(steps_in(events)) >= 4  # the prefill step and the decode steps (3 or more, by the schedule)
    assert any(e.get("name", "").startswith("aten::") for e in events)  # the model's ops inside them
    with pytest.raises(ValueError, match="no profile is running"):
        engine.stop_profile()


def test_profile_of_num_steps_stops_itself(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("MXROLL_TORCH_PROFILER_DIR", str(tmp_path))
    engine.start_profile(num_steps=2)
    out = engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)
    assert out["meta_info"]["completion_tokens"] == 4
    (path,) = tmp_path.glob("mxroll-*.trace.json.gz")
    assert steps_in(trace(path)) == ["mxroll.step#0", "mxroll.step#1"]
    with pytest.raises(ValueError, match="no profile is running"):
        engine.stop_profile()


@pytest.mark.parametrize("kwargs, message", [
    (dict(activities=["CPU", "MEM"]), "activities=\\['CPU', 'MEM'\\]"),
    (dict(activities=["GPU"]), "'GPU' needs a CUDA engine"),
    (dict(num_steps=0), "num_steps=0"), (dict(num_steps=True), "num_steps=True"),
    (dict(start_step=5), "start_step=5: not supported"), (dict(merge_profiles=True), "merge_profiles=True"),
    (dict(with_stack="yes"), "with_stack='yes'"), (dict(profile_prefix="a/b"), "profile_prefix='a/b'"),
])
def test_bad_profile_options_are_named(engine, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.start_profile(output_dir=str(tmp_path), **kwargs)
    assert engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)["meta_info"]["completion_tokens"] == 4


def test_profile_over_http(url, tmp_path):
    """sglang's endpoints and replies; the client's methods."""
    body = json.dumps({"output_dir": str(tmp_path), "num_steps": 1}).encode()
    req = urllib.request.Request(url + "/start_profile", data=body, headers={"Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.read().decode() == "Start profiling.\n"
    client = EngineClient(url)
    client.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)
    assert len(list(tmp_path.glob("mxroll-*.trace.json.gz"))) == 1  # ended by itself after one step
    client.start_profile(output_dir=str(tmp_path / "b"))
    client.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)
    reply = client.stop_profile()
    assert reply.startswith("Stop profiling. Trace: " + str(tmp_path / "b"))
    with pytest.raises(ValueError, match="no profile is running"):
        client.stop_profile()


def test_profile_running_at_shutdown_is_written(tiny_checkpoint, tmp_path):
    from mxroll import Engine
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    e.start_profile(output_dir=str(tmp_path))
    e.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)
    e.shutdown()
    (path,) = tmp_path.glob("mxroll-*.trace.json.gz")
    assert len(steps_in(trace(path))) >= 4


def test_a_failed_trace_write_is_logged_and_serving_goes_on(engine, tmp_path, caplog):
    engine.start_profile(output_dir=str(tmp_path), num_steps=1)

    def disk_full(path):
        raise OSError(28, "No space left on device")
    engine._profiler._prof.export_chrome_trace = disk_full
    with caplog.at_level("ERROR"):
        out = engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)
    assert out["meta_info"]["completion_tokens"] == 4 and "writing the profile" in caplog.text
    assert engine.is_alive() and engine.generate(input_ids=[0, 7], sampling_params=GREEDY)["output_ids"]
