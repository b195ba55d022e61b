"""sglang's garbage-collection controls: `freeze_gc` (Engine, POST/GET /freeze_gc, the HTTP client) and
`gc_warning_threshold_secs` (a warning for each long collection, naming the fix)."""
from __future__ import annotations

import gc
import logging
import urllib.request

import pytest

from mxroll import Engine
from mxroll.rollout.gc_watch import GcWatch
from mxroll.sync.http_client import EngineClient

GREEDY = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def unfrozen():
    """The test process's collector as it was: freeze_gc is process-wide."""
    yield
    gc.unfreeze()


class Cycle:
    def __init__(self):
        self.me = self


def test_engine_freeze_gc_moves_live_objects_out_of_collections(engine, unfrozen, caplog):
    before = engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)["output_ids"]
    gc.unfreeze()
    garbage = [Cycle() for _ in range(100)]
    del garbage  # unreachable cycles: freeze_gc collects them first instead of freezing them for good
    with caplog.at_level(logging.INFO, logger="mxroll.rollout.gc_watch"):
        engine.freeze_gc()
    assert gc.get_freeze_count() > 10_000  # torch, the model's modules, the tokenizer...
    assert "garbage collection frozen" in caplog.text
    assert not any(isinstance(o, Cycle) for o in gc.get_objects())
    assert engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)["output_ids"] == before


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_freeze_gc_over_http(url, unfrozen, method):
    """sglang's endpoint and reply (RL frameworks call it after warm-up)."""
    gc.unfreeze()
    with urllib.request.urlopen(urllib.request.Request(url + "/freeze_gc", method=method), timeout=60) as r:
        assert r.status == 200 and r.read().decode() == "Garbage collection frozen.\n"
    assert gc.get_freeze_count() > 0
    gc.unfreeze()
    EngineClient(url).freeze_gc()
    assert gc.get_freeze_count() > 0


def test_long_collections_are_logged_with_the_fix(caplog):
    watch = GcWatch(1e-9)  # every collection is "long"
    try:
        with caplog.at_level(logging.WARNING, logger="mxroll.rollout.gc_watch"):
            gc.collect()
        assert watch.long >= 1 and "long garbage collection: generation 2" in caplog.text
        assert watch.collections[2] >= 1 and watch.seconds[2] > 0 and watch.longest > 0
        assert "freeze_gc()" in caplog.text
    finally:
        watch.close()
    assert watch not in gc.callbacks
    n = watch.long
    gc.collect()
    assert watch.long == n  # closed: no longer called
    with pytest.raises(ValueError, match="gc_warning_threshold_secs=0"):
        GcWatch(0)


def test_engine_installs_the_watch_until_shutdown(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, gc_warning_threshold_secs=30.0)
    assert e._gc_watch in gc.callbacks and e._gc_watch.threshold == 30.0
    e.shutdown()
    assert e._gc_watch not in gc.callbacks
    plain = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    assert plain._gc_watch is None
    plain.shutdown()
    for bad in (-1, -0.5, "soon"):
        with pytest.raises(ValueError, match="gc_warning_threshold_secs"):
            Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, gc_warning_threshold_secs=bad)
