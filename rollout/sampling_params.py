"""Per-request sampling parameters (sglang names), validated with errors naming the field."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

# Temperatures below this sample greedily: dividing logits by them would overflow or flush every
# probability but the top one anyway.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 (or anything below GREEDY_EPS) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None
    # Logprobs are of the sampling distribution (logits / temperature); True reports raw (temperature 1).
    raw_logprob: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {unknown}; known: {sorted(known)}")
        if d.get("stop_token_ids") is not None:
            d["stop_token_ids"] = tuple(d["stop_token_ids"])
        else:
            d.pop("stop_token_ids", None)
        params = cls(**d)
        params.validate()
        return params

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"sampling_params.{name}={getattr(self, name)!r}: {why}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            bad("max_new_tokens", "must be an integer >= 0")
        if not _is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            bad("top_k", "must be -1 (off) or an integer >= 1")
        if not _is_num(self.min_p) or not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be true or false")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or null")
        if not isinstance(self.raw_logprob, bool):
            bad("raw_logprob", "must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
