"""sglang's Prometheus metrics (GET /metrics) and the totals behind them in get_server_info(): counters grow by what
the returned outputs say, gauges follow the engine's state, the text parses as the exposition format."""
from __future__ import annotations

import re
import urllib.request

from mxroll.rollout.metrics import METRICS

GREEDY = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}
LINE = re.compile(r'^([a-z_:]+)\{model_name="([^"]*)"(?:,weight_version="([^"]*)")?\} (-?[0-9.e+-]+|inf|nan)$')


def scrape(url) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    values, kinds = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
        elif not line.startswith("#"):
            m = LINE.match(line)
            assert m, line
            values[m.group(1)] = float(m.group(4))
    assert set(values) == set(kinds) and all(kinds[n] in ("gauge", "counter") for n in kinds)
    return values


def test_totals_count_returned_outputs(engine):
    before = engine.get_server_info()
    outs = engine.generate(input_ids=[[0, 5, 6], [0, 7]], sampling_params=dict(GREEDY, n=2))
    after = engine.get_server_info()
    assert after["num_requests_total"] - before["num_requests_total"] == 4
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(
        o["meta_info"]["prompt_tokens"] for o in outs) == 10
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 12
    assert after["steps_total"] > before["steps_total"] and 0.0 <= after["token_usage"] <= 1.0


def test_metrics_endpoint(engine, url):
    first = scrape(url)
    assert set(first) == {name for name, *_ in METRICS} | {"mxroll:weight_version_info"}
    engine.generate(input_ids=[0, 5, 6], sampling_params=GREEDY)
    second = scrape(url)
    assert second["sglang:num_requests_total"] == first["sglang:num_requests_total"] + 1
    assert second["sglang:generation_tokens_total"] == first["sglang:generation_tokens_total"] + 3
    assert second["sglang:prompt_tokens_total"] == first["sglang:prompt_tokens_total"] + 3
    assert second["mxroll:steps_total"] > first["mxroll:steps_total"]
    assert second["sglang:num_running_reqs"] == 0 and second["mxroll:paused"] == 0
    engine.pause_generation("in_place")
    try:
        assert scrape(url)["mxroll:paused"] == 1
    finally:
        engine.continue_generation()


def test_totals_and_text_by_hand():
    from mxroll.rollout.metrics import Totals, prometheus_text
    t = Totals()
    t.add([{"meta_info": {"prompt_tokens": 4, "completion_tokens": 2, "finish_reason": {"type": "abort"}}},
           {"meta_info": {"prompt_tokens": 4, "completion_tokens": 5, "finish_reason": {"type": "length", "length": 5}}}])
    info = {**t.as_info(), "num_running": 1, "num_waiting": 2, "recent_tokens_per_s": 12.5, "token_usage": 0.25,
            "prefix_cache_hit_rate": 0.0, "paused": False, "memory_released": True, "weight_version": 'v"2'}
    assert (t.requests, t.prompt_tokens, t.generation_tokens, t.aborted) == (2, 8, 7, 1)
    text = prometheus_text(info, 'models/a"b')
    assert 'sglang:num_aborted_requests_total{model_name="models/a\\"b"} 1.0' in text
    assert 'sglang:gen_throughput{model_name="models/a\\"b"} 12.5' in text
    assert 'mxroll:memory_released{model_name="models/a\\"b"} 1.0' in text
    assert 'weight_version="v\\"2"} 1.0' in text
