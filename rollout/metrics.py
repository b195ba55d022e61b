"""sglang's Prometheus metrics (`GET /metrics`, the text exposition format) from the engine's state and totals, under
sglang's metric names so that scrapers and dashboards made for sglang read them unchanged; mxroll's own figures under
`mxroll:`. Pure Python."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Totals:
    """Counters since start-up, counted when a request's outputs are returned (as sglang counts them)."""
    requests: int = 0  # samples returned (a request of n samples counts n)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    aborted: int = 0  # samples returned with finish_reason abort
    steps: int = 0  # engine steps finished

    def as_info(self) -> dict:
        """The get_server_info() keys."""
        return {"num_requests_total": self.requests, "prompt_tokens_total": self.prompt_tokens,
                "generation_tokens_total": self.generation_tokens, "num_aborted_requests_total": self.aborted,
                "steps_total": self.steps}

    def add(self, outputs: list[dict]) -> None:
        for out in outputs:
            meta = out["meta_info"]
            self.requests += 1
            self.prompt_tokens += meta["prompt_tokens"]
            self.generation_tokens += meta["completion_tokens"]
            self.aborted += (meta.get("finish_reason") or {}).get("type") == "abort"


# (name, type, help, key of get_server_info())
METRICS = (
    ("sglang:num_running_reqs", "gauge", "The number of running requests.", "num_running"),
    ("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.", "num_waiting"),
    ("sglang:gen_throughput", "gauge", "The generation throughput (token/s), recent steps.", "recent_tokens_per_s"),
    ("sglang:token_usage", "gauge", "The token usage (share of the KV cache in use).", "token_usage"),
    ("sglang:cache_hit_rate", "gauge", "The prefix cache hit rate.", "prefix_cache_hit_rate"),
    ("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.", "prompt_tokens_total"),
    ("sglang:generation_tokens_total", "counter", "Number of generation tokens processed.", "generation_tokens_total"),
    ("sglang:num_requests_total", "counter", "Number of requests processed.", "num_requests_total"),
    ("sglang:num_aborted_requests_total", "counter", "Number of requests aborted.", "num_aborted_requests_total"),
    ("mxroll:steps_total", "counter", "Engine steps run.", "steps_total"),
    ("mxroll:paused", "gauge", "1 while generation is paused.", "paused"),
    ("mxroll:memory_released", "gauge", "1 while the KV cache or the weights are released.", "memory_released"),
)


def _escaped(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(info: dict, model_name: str) -> str:
    """The exposition text of METRICS from `Engine.get_server_info()`."""
    model = _escaped(model_name)
    lines = []
    for name, kind, text, key in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
                  f'{name}{{model_name="{model}"}} {float(info[key])!r}']
    lines += ["# HELP mxroll:weight_version_info The weight version the engine serves.",
              "# TYPE mxroll:weight_version_info gauge",
              f'mxroll:weight_version_info{{model_name="{model}",weight_version="{_escaped(info["weight_version"])}"}} '
              "1.0"]
    return "\n".join(lines) + "\n"
